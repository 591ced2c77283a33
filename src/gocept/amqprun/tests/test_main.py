"""End-to-end: the real `server` entry point in a subprocess."""

import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

import gocept.amqprun.main
import gocept.amqprun.parameters
import gocept.amqprun.testing


HANDLERS = '''
import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message
import pathlib
import zope.component
import zope.security.management

PREFIX = {prefix!r}


def out(body, **header):
    return gocept.amqprun.message.Message(
        header, body, routing_key=PREFIX + '.out')


@gocept.amqprun.handler.declare(PREFIX + '.echo', [PREFIX + '.a', PREFIX + '.b'])
def echo(message):
    settings = zope.component.getUtility(gocept.amqprun.interfaces.ISettings)
    return [out(message.body + b' ' + message.routing_key.encode()),
            out(settings['Greeting.Text'])]


@gocept.amqprun.handler.declare(PREFIX + '.flaky', PREFIX + '.flaky')
def flaky(message):
    marker = pathlib.Path('flaky-' + message.header.message_id)
    if not marker.exists():
        marker.touch()
        raise RuntimeError('first try fails')
    return [out(b'flaky ok')]


@gocept.amqprun.handler.declare(PREFIX + '.secure', PREFIX + '.secure',
                                principal='zope.manager')
def secure(message):
    [p] = zope.security.management.getInteraction().participations
    return [out(p.principal.id)]


@gocept.amqprun.handler.declare(PREFIX + '.sender', PREFIX + '.sender')
def via_sender(message):
    sender = zope.component.getUtility(gocept.amqprun.interfaces.ISender)
    sender.send(out(b'sent via ISender'))


@zope.component.adapter(gocept.amqprun.interfaces.IProcessStarted)
def started(event):
    pathlib.Path('events').open('a').write('started\\n')


@zope.component.adapter(gocept.amqprun.interfaces.IProcessStopping)
def stopping(event):
    pathlib.Path('events').open('a').write('stopping\\n')
'''

ZCML = '''
  <utility component="handlers.echo" name="echo" />
  <utility component="handlers.flaky" name="flaky" />
  <utility component="handlers.secure" name="secure" />
  <utility component="handlers.via_sender" name="via_sender" />
  <subscriber handler="handlers.started" />
  <subscriber handler="handlers.stopping" />
'''


@pytest.fixture
def daemon(server_process, amqp_client, name_prefix):
    for queue in ('echo', 'flaky', 'secure', 'sender'):
        amqp_client.forget(f'{name_prefix}.{queue}')
        amqp_client.forget(f'{name_prefix}.{queue}.retry')
        amqp_client.forget(f'{name_prefix}.{queue}.parked')
        amqp_client.forget(f'{name_prefix}.{queue}.quarantine')
    amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    return server_process(
        handlers=HANDLERS.format(prefix=name_prefix), zcml=ZCML,
        settings={'Greeting.Text': 'Hello World'},
        worker_extra='  retry-delay 0.1\n')


def test_replies_ids_routing_keys_and_settings(
        daemon, amqp_client, name_prefix):
    ids = [amqp_client.send(f'{name_prefix}.{key}', b'hi')
           for key in 'ab']
    replies = amqp_client.wait_many(f'{name_prefix}.out', 4)
    bodies = sorted(r.body for r in replies)
    assert bodies == sorted([
        b'Hello World', b'Hello World',
        f'hi {name_prefix}.a'.encode(), f'hi {name_prefix}.b'.encode()])
    for reply in replies:
        assert reply.header.correlation_id in ids
        assert reply.header.headers['references'] == (
            reply.header.correlation_id)
        assert reply.header.message_id.startswith('<')
        assert reply.header.message_id not in ids
    assert len({r.header.message_id for r in replies}) == 4
    assert daemon.stop() == 0
    assert amqp_client.count(f'{name_prefix}.echo') == 0


def test_failure_then_success(daemon, amqp_client, name_prefix):
    msgid = amqp_client.send(f'{name_prefix}.flaky', b'')
    reply = amqp_client.wait(f'{name_prefix}.out')
    assert reply.body == b'flaky ok'
    assert reply.header.correlation_id == msgid
    log = daemon.log_text()
    assert f'Handling message {msgid} from queue' in log
    assert 'RuntimeError: first try fails' in log
    assert 'Traceback' in log
    assert daemon.stop() == 0


def test_principal_and_sender_inside_handler(
        daemon, amqp_client, name_prefix):
    amqp_client.send(f'{name_prefix}.secure', b'')
    assert amqp_client.wait(f'{name_prefix}.out').body == b'zope.manager'
    msgid = amqp_client.send(f'{name_prefix}.sender', b'')
    reply = amqp_client.wait(f'{name_prefix}.out')
    assert reply.body == b'sent via ISender'
    assert reply.header.correlation_id == msgid


def test_sigterm_exits_0_and_notifies_events(daemon):
    assert daemon.stop(signal.SIGTERM) == 0
    assert (daemon.directory / 'events').read_text() == (
        'started\nstopping\n')
    assert 'Received signal SIGTERM' in daemon.log_text()


def test_sigint_exits_0(daemon):
    assert daemon.stop(signal.SIGINT) == 0


def test_sigusr1_exits_1(daemon):
    assert daemon.stop(signal.SIGUSR1) == 1


def test_duplicate_queue_fails_naming_it(server_process, name_prefix):
    handlers = f'''
import gocept.amqprun.handler
one = gocept.amqprun.handler.declare('{name_prefix}.q', 'a')(print)
two = gocept.amqprun.handler.declare('{name_prefix}.q', 'b')(print)
'''
    process = server_process(start=False, handlers=handlers, zcml='''
  <utility component="handlers.one" name="one" />
  <utility component="handlers.two" name="two" />''')
    process.start(wait=False)
    assert process.wait() == 2
    assert f"Queue '{name_prefix}.q' is consumed by 2 handlers" in (
        process.output_text())


def test_queue_refused_by_broker_fails_naming_it(
        server_process, amqp_client, name_prefix):
    amqp_client.declare(f'{name_prefix}.q', arguments={'x-max-length': 1})
    handlers = f'''
import gocept.amqprun.handler
h = gocept.amqprun.handler.declare(
    '{name_prefix}.q', 'a', arguments={{'x-max-length': 2}})(print)
'''
    process = server_process(start=False, handlers=handlers, zcml='''
  <utility component="handlers.h" name="h" />''')
    process.start(wait=False)
    assert process.wait() == 2      # 406: restarting does not help
    log = process.log_text()
    assert f"The broker refused declaring queue '{name_prefix}.q'" in log
    assert 'PRECONDITION_FAILED' in log


def run_main(*args, cwd=None):
    return subprocess.run(
        [sys.executable, '-m', 'gocept.amqprun', *args], cwd=cwd,
        capture_output=True, text=True, timeout=60)


def test_config_error_names_file_and_line(tmp_path):
    conf = tmp_path / 'bad.conf'
    conf.write_text('<eventlog>\n</eventlog>\n<amqp-server>\n'
                    '  hostname localhost\n  no_such_key 1\n'
                    '</amqp-server>\n')
    result = run_main(str(conf))
    assert result.returncode == 2
    assert str(conf) in result.stderr
    assert 'no_such_key' in result.stderr
    assert 'line 5' in result.stderr


def write_config(directory, zcml):
    """A minimal configuration naming `zcml` on its line 7."""
    conf = directory / 'server.conf'
    conf.write_text('<eventlog>\n</eventlog>\n<amqp-server>\n'
                    '  hostname localhost\n</amqp-server>\n<worker>\n'
                    f'  component-configuration {zcml}\n</worker>\n')
    return conf


def test_missing_zcml_file_is_named(tmp_path):
    conf = write_config(tmp_path, '/nonexistent.zcml')
    result = run_main(str(conf))
    assert result.returncode == 2
    assert '/nonexistent.zcml' in result.stderr
    assert 'line 7' in result.stderr


@pytest.mark.parametrize('eventlog', [
    '', '  <logfile>\n    path STDOUT\n  </logfile>\n'])
def test_zcml_error_is_named_once(tmp_path, eventlog):
    zcml = tmp_path / 'server.zcml'
    zcml.write_text('<configure xmlns="http://namespaces.zope.org/zope">\n'
                    '  <include package="gocept.amqprun" />\n'
                    '  <utility component="no.such.thing" name="x" />\n'
                    '</configure>\n')
    conf = write_config(tmp_path, zcml)
    conf.write_text(conf.read_text().replace(
        '<eventlog>\n', '<eventlog>\n' + eventlog))
    result = run_main(str(conf))
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert str(zcml) in output
    assert output.count("Couldn't import no.such") == 1
    assert 'line 3' in output


def test_usage_error_without_config():
    result = run_main()
    assert result.returncode == 2
    assert 'usage' in result.stderr


PIKA_LOGGER = '<logger>\n  name pika\n  level WARNING\n</logger>\n'


def test_unreachable_broker_exits_1_saying_why_in_one_line(server_process):
    nobody = gocept.amqprun.parameters.Parameters(
        hostname='127.0.0.1', port=gocept.amqprun.testing.free_port())
    process = server_process(
        start=False, parameters=nobody,
        server_extra='  connection_attempts 2\n  retry_delay 0.1\n')
    # No <logger> for pika: the daemon keeps pika quiet.
    process.config.write_text(
        process.config.read_text().replace(PIKA_LOGGER, ''))
    process.start(wait=False)
    assert process.wait() == 1
    log = process.log_text()
    assert ' pika' not in log
    assert 'guest@' in log and ':guest@' not in log
    assert 'after 2 attempt(s)' in log
    assert log.count('Cannot connect to amqp://guest@127.0.0.1') == 1
    assert 'Stopping after a fatal error: Cannot connect' in log
    assert 'Stopping: cancelling consumers.' not in log
    assert 'Stopped.' not in log
    # The log goes to a file: the cause is on stderr, too.
    assert process.output_text().startswith(
        'error: Cannot connect to amqp://guest@127.0.0.1')


def test_failing_start_subscriber_stops_with_exit_1(server_process):
    handlers = '''
import zope.component
import gocept.amqprun.interfaces

@zope.component.adapter(gocept.amqprun.interfaces.IProcessStarted)
def broken(event):
    raise RuntimeError('cannot start')
'''
    process = server_process(start=False, handlers=handlers, zcml='''
  <subscriber handler="handlers.broken" />''')
    process.start(wait=False)
    assert process.wait() == 1
    log = process.log_text()
    assert 'A ProcessStarted subscriber failed; stopping.' in log
    assert 'RuntimeError: cannot start' in log


def test_misspelt_key_gets_a_suggestion(tmp_path):
    conf = write_config(tmp_path, '/nonexistent.zcml')
    conf.write_text(conf.read_text().replace('hostname', 'hostnme'))
    result = run_main(str(conf))
    assert result.returncode == 2
    assert result.stderr == (
        f'error: {conf}, line 4, section <amqp-server>, key hostnme: '
        "'hostnme' is not a known key name; did you mean hostname?\n")


def test_error_found_after_parsing_names_the_line(tmp_path):
    zcml = tmp_path / 'server.zcml'
    zcml.write_text('<configure />\n')
    conf = write_config(tmp_path, zcml)
    conf.write_text(conf.read_text().replace(
        '</worker>', '  commit-mode fast\n</worker>'))
    result = run_main(str(conf))
    assert result.returncode == 2
    assert f'{conf}, line 8, section <worker>, key commit-mode: must be' \
        in result.stderr


def test_monitor_port_in_use_exits_1(tmp_path):
    zcml = tmp_path / 'server.zcml'
    zcml.write_text('<configure />\n')
    conf = write_config(tmp_path, zcml)
    with socket.create_server(('127.0.0.1', 0)) as taken:
        port = taken.getsockname()[1]
        conf.write_text(conf.read_text() + (
            f'<monitor>\n  address 127.0.0.1:{port}\n</monitor>\n'))
        result = run_main(str(conf))
    assert result.returncode == 1
    assert result.stderr.startswith(
        f'error: {conf}, line 10, section <monitor>, key address: cannot '
        f'listen on 127.0.0.1:{port}: ')


@pytest.mark.parametrize('option', ['--help', '-h'])
def test_help(option):
    result = run_main(option)
    assert result.returncode == 0
    assert result.stdout.startswith(
        'usage: python -m gocept.amqprun [-h] [--version] CONFIG\n')
    assert 'check [-h] [--no-connect] CONFIG' in result.stdout
    assert 'exit codes:\n  0  stopped by SIGTERM' in result.stdout


def test_version():
    result = run_main('--version')
    assert result.returncode == 0
    assert result.stdout.startswith('gocept.amqprun ')
    assert 'Python 3.' in result.stdout


def run_buildout_script(*args, cwd=None):
    """bin/server as zc.recipe.egg makes it with `arguments`."""
    return subprocess.run(
        [sys.executable, '-c',
         'import gocept.amqprun.main, sys; '
         "sys.argv[0] = 'server'; "
         "gocept.amqprun.main.main('/nonexistent/server.conf')", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60)


def test_buildout_script_help_does_not_start_the_daemon():
    result = run_buildout_script('--help')
    assert result.returncode == 0
    assert result.stdout.startswith('usage: server [-h] [--version] CONFIG')
    assert '(default: /nonexistent/server.conf)' in result.stdout


def test_buildout_script_checks_its_own_configuration():
    result = run_buildout_script('check', '--no-connect')
    assert result.returncode == 2
    assert result.stdout.startswith('ERROR: /nonexistent/server.conf: ')


CHECKOUT = pathlib.Path(__file__).resolve().parents[4]


@pytest.mark.slow
def test_make_run_starts_a_private_broker_where_none_answers(tmp_path):
    if not gocept.amqprun.testing.PrivateBroker.available():
        pytest.skip('rabbitmq-server is not installed')
    if not (CHECKOUT / 'etc' / 'run_example.py').exists():
        pytest.skip('not running from a checkout')
    port = gocept.amqprun.testing.free_port()
    conf = tmp_path / 'server.conf'
    text = (CHECKOUT / 'etc' / 'server.conf').read_text()
    conf.write_text(text.replace(
        '  hostname localhost\n', f'  hostname localhost:{port}\n'))
    output = tmp_path / 'output.txt'
    with output.open('w') as out:
        script = subprocess.Popen(
            [sys.executable, 'etc/run_example.py', str(conf)],
            cwd=CHECKOUT, stdout=out, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH='etc'))
    try:
        gocept.amqprun.testing.wait_for(
            lambda: 'gocept.amqprun.main Started.' in output.read_text()
            or script.poll() is not None, timeout=60)
        assert gocept.amqprun.testing.port_open('127.0.0.1', port)
        script.send_signal(signal.SIGINT)
        assert script.wait(60) == 0
    finally:
        if script.poll() is None:
            script.kill()
    text = output.read_text()
    assert f'No broker answers on localhost:{port}: starting a private ' \
        'RabbitMQ node' in text
    assert 'gocept.amqprun.server Stopped.' in text
    assert text.endswith(
        f'Stopping the private RabbitMQ node amqprun{port}@localhost.\n')
    assert not gocept.amqprun.testing.port_open('127.0.0.1', port)
