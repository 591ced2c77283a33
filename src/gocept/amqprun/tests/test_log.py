"""The log: progress lines, JSON, pika kept quiet."""

import json
import logging
import sys

import pytest

import gocept.amqprun.config
import gocept.amqprun.log
import gocept.amqprun.stats
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.test_monitor import HANDLERS
from gocept.amqprun.tests.test_monitor import ZCML


PIKA_LOGGER = '<logger>\n  name pika\n  level WARNING\n</logger>\n'


def record(msg, *args, exc_info=None, name='gocept.amqprun.worker', **kw):
    result = logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args,
                               exc_info)
    result.__dict__.update(kw)
    return result


def as_json(rec):
    text = gocept.amqprun.log.JSONFormatter().format(rec)
    assert '\n' not in text
    return json.loads(text)


def test_json_names_the_message_of_the_daemons_lines():
    try:
        1 / 0
    except ZeroDivisionError:
        exc_info = sys.exc_info()
    entry = as_json(record('Handling message %s from queue %r failed',
                           '<1@host>', 'orders', exc_info=exc_info,
                           message_id='<1@host>', queue='orders'))
    assert entry['message'] == "Handling message <1@host> from queue " \
        "'orders' failed"
    assert entry['message_id'] == '<1@host>'
    assert entry['queue'] == 'orders'
    assert entry['level'] == 'ERROR'
    assert entry['logger'] == 'gocept.amqprun.worker'
    assert entry['thread'] == 'MainThread'
    assert entry['time'][:4].isdigit() and entry['time'][10] == 'T'
    assert 'ZeroDivisionError' in entry['exception']
    # The message comes as data, not from the wording of the line.
    entry = as_json(record('Message %s from queue %r: parked.', '<2@h>', 'q'))
    assert 'message_id' not in entry and 'queue' not in entry


def test_json_without_a_message():
    entry = as_json(record('Connecting to %s and %s', 'a', 'b'))
    assert 'message_id' not in entry and 'queue' not in entry
    assert 'exception' not in entry


def test_json_takes_the_message_from_extra_or_the_handling_block():
    entry = as_json(record('x', message_id='<3@h>', queue='q3'))
    assert (entry['message_id'], entry['queue']) == ('<3@h>', 'q3')
    with gocept.amqprun.log.handling('<4@h>', 'q4'):
        entry = as_json(record('inside a handler', name='myapp'))
    assert (entry['message_id'], entry['queue']) == ('<4@h>', 'q4')
    assert 'message_id' not in as_json(record('after it'))


class Clock:

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_line_counts_since_start_and_rate_since_last_line():
    stats = gocept.amqprun.stats.Stats()
    clock = Clock()
    progress = gocept.amqprun.log.Progress(stats, 60, clock)
    progress._last = (clock(), 0)
    for _ in range(120):
        stats.message('q', 'handled')
    for _ in range(30):
        stats.transaction()
    stats.message('q', 'retried')
    clock.now += 60
    assert progress.line() == (
        'Progress: 120 handled, 1 retried, 0 parked since start; '
        '2.00 handled/s in the last 60 s; 30 AMQP transaction(s).')
    stats.message('q', 'handled')
    stats.message('q', 'crash-looped')
    clock.now += 10
    assert progress.line() == (
        'Progress: 121 handled, 1 retried, 0 parked, 1 crash-looped since '
        'start; 0.10 handled/s in the last 10 s; 30 AMQP transaction(s).')


def test_progress_off_with_interval_0(caplog):
    progress = gocept.amqprun.log.Progress(gocept.amqprun.stats.Stats(), 0)
    progress.start()
    progress.stop()
    assert not caplog.records


@pytest.fixture
def logging_state():
    """Restore the root and pika loggers after the test."""
    root = logging.getLogger()
    pika = logging.getLogger('pika')
    saved = root.handlers[:], root.level, pika.handlers[:], pika.level
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], pika.handlers[:] = saved[0], saved[2]
    root.setLevel(saved[1])
    pika.setLevel(saved[3])


def write_config(directory, eventlog, extra=''):
    (directory / 'server.zcml').write_text('<configure />\n')
    path = directory / 'server.conf'
    path.write_text(
        f'<eventlog>\n{eventlog}</eventlog>\n{extra}'
        '<amqp-server>\n  hostname localhost\n</amqp-server>\n'
        f'<worker>\n  component-configuration {directory}/server.zcml\n'
        '</worker>\n')
    return path


def test_json_formatter_from_the_configuration(tmp_path, logging_state):
    log_file = tmp_path / 'log.json'
    config = gocept.amqprun.config.load_config(write_config(
        tmp_path, '  level INFO\n  <logfile>\n'
        f'    path {log_file}\n'
        '    formatter gocept.amqprun.log.JSONFormatter\n'
        '  </logfile>\n'))
    gocept.amqprun.config.setup_logging(config)
    logging.getLogger('gocept.amqprun.worker').warning(
        'Message %s from queue %r: retried.', '<5@h>', 'q',
        extra={'message_id': '<5@h>', 'queue': 'q'})
    logging.getLogger('myapp').info('two\nlines')
    entries = [json.loads(line)
               for line in log_file.read_text().splitlines()]
    assert [(e['logger'], e['message'], e.get('queue')) for e in entries] \
        == [('gocept.amqprun.worker',
             "Message <5@h> from queue 'q': retried.", 'q'),
            ('myapp', 'two\nlines', None)]


@pytest.mark.parametrize('pika_level, expected', [
    (None, logging.CRITICAL), ('DEBUG', logging.DEBUG)])
def test_pika_is_quiet_unless_configured(
        tmp_path, logging_state, pika_level, expected):
    extra = (f'<logger>\n  name pika\n  level {pika_level}\n</logger>\n'
             if pika_level else '')
    config = gocept.amqprun.config.load_config(
        write_config(tmp_path, '  level DEBUG\n', extra))
    gocept.amqprun.config.setup_logging(config)
    assert logging.getLogger('pika').level == expected


@pytest.fixture
def daemon(server_process, amqp_client, name_prefix):
    """An unstarted ServerProcess with the handlers of test_monitor."""
    for queue in ('flaky', 'slow'):
        for suffix in ('', '.retry', '.parked'):
            amqp_client.forget(f'{name_prefix}.{queue}{suffix}')
    amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    return server_process(
        start=False, handlers=HANDLERS.format(prefix=name_prefix),
        zcml=ZCML, worker_extra='  retry-delay 0.1\n'
        '  progress-interval 0.2\n')


def test_progress_lines_appear(daemon, amqp_client, name_prefix):
    daemon.start()
    daemon.wait_for_log('Progress: 0 handled, 0 retried, 0 parked since '
                        'start;')
    amqp_client.send(f'{name_prefix}.flaky', b'')
    amqp_client.wait(f'{name_prefix}.out')
    daemon.wait_for_log('Progress: 1 handled, 1 retried, 0 parked since '
                        'start;')
    assert daemon.stop() == 0
    # The last line comes at shutdown.
    assert 'INFO gocept.amqprun.log Progress: 1 handled' in (
        daemon.log_text().split('Received signal SIGTERM')[1])


def test_debug_log_as_json_without_pika(daemon, amqp_client, name_prefix):
    text = daemon.config.read_text()
    assert PIKA_LOGGER in text
    daemon.config.write_text(text.replace(PIKA_LOGGER, '').replace(
        'zope.exceptions.log.Formatter', 'gocept.amqprun.log.JSONFormatter'))
    daemon.start(wait=False)

    def entries():
        return [json.loads(line) for line in daemon.log_text().splitlines()
                if line.endswith('}')]
    wait_for(lambda: any(e['message'] == 'Started.' for e in entries()),
             timeout=30)
    message_id = amqp_client.send(f'{name_prefix}.flaky', b'')
    amqp_client.wait(f'{name_prefix}.out')
    assert daemon.stop() == 0
    log = entries()
    assert not [e for e in log if e['logger'].startswith('pika')]
    assert any(e['level'] == 'DEBUG' for e in log)
    [failed] = [e for e in log if 'exception' in e]
    assert failed['message_id'] == message_id
    assert failed['queue'] == f'{name_prefix}.flaky'
    assert 'RuntimeError: first try fails' in failed['exception']
