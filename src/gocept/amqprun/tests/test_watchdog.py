"""The stuck-handler watchdog: a real Server, a handler that hangs."""

import logging
import threading

import pytest

import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.main
import gocept.amqprun.server
import gocept.amqprun.testing
import gocept.amqprun.watchdog
import gocept.amqprun.worker
from gocept.amqprun.testing import wait_for


INTERVAL = 0.4


def warnings(caplog):
    return [r for r in caplog.records
            if r.name == 'gocept.amqprun.watchdog'
            and r.levelno == logging.WARNING]


@pytest.fixture
def stuck_server(amqp_parameters, amqp_client, zca, name_prefix):
    """A running Server whose handler waits for `release` (an Event);
    yields (server, release)."""
    release = threading.Event()

    @gocept.amqprun.handler.declare(f'{name_prefix}.stuck',
                                    f'{name_prefix}.stuck')
    def stuck_handler(message):
        release.wait(60)  # the line the warning must name
    zca.registerUtility(stuck_handler, gocept.amqprun.interfaces.IHandler,
                        name='stuck')
    server = gocept.amqprun.server.Server(amqp_parameters, workers=2)
    for queue in server.connection.queues:
        amqp_client.forget(queue.name)
    runner = gocept.amqprun.testing.ServerThread(server).start()
    try:
        yield server, release
    finally:
        release.set()
        runner.stop()


def test_a_stuck_handler_is_reported_with_its_stack_repeatedly(
        stuck_server, amqp_client, name_prefix, caplog):
    server, release = stuck_server
    caplog.set_level(logging.WARNING, 'gocept.amqprun.watchdog')
    watchdog = gocept.amqprun.watchdog.Watchdog(server, INTERVAL)
    watchdog.start()
    try:
        message_id = amqp_client.send(f'{name_prefix}.stuck', b'')
        wait_for(lambda: len(warnings(caplog)) >= 3, timeout=20,
                 message='fewer than 3 warnings about the stuck handler')
        first, second, third = warnings(caplog)[:3]
        text = first.getMessage()
        assert text.startswith(
            f'Message {message_id} from queue {name_prefix + ".stuck"!r}: '
            'its handling has run for ')
        assert f'(slow-handler-warning {INTERVAL:g} s) in amqprun-worker-'\
            in text
        # Where it hangs: the handler's line, and the Event it waits on.
        assert ', in stuck_handler\n    release.wait(60)  # the line the ' \
            'warning must name' in text
        assert 'threading.py' in text
        # Repeated every further interval, seconds growing.
        seconds = [float(r.args[2]) for r in (first, second, third)]
        assert seconds[0] >= INTERVAL
        assert seconds[1] >= 2 * INTERVAL
        assert seconds[2] >= 3 * INTERVAL
        release.set()
        wait_for(lambda: not any(a.seconds for a in server.activity()))
        count = len(warnings(caplog))
        assert watchdog.check() == []
        # Three further intervals without a warning.
        threading.Event().wait(3 * INTERVAL)
        assert len(warnings(caplog)) == count
    finally:
        watchdog.stop()
    assert not any(t.name == 'amqprun-watchdog'
                   for t in threading.enumerate())


def test_another_message_in_the_same_thread_starts_its_own_count():
    """Pure logic: the count belongs to one handling."""
    Activity = gocept.amqprun.worker.Activity

    class Server:
        activities = []

        def activity(self):
            return self.activities
    server = Server()
    watchdog = gocept.amqprun.watchdog.Watchdog(server, 10)
    server.activities = [Activity('w0', 1, 'a', 'q', 11.0)]
    assert len(watchdog.check()) == 1
    server.activities = [Activity('w0', 1, 'a', 'q', 15.0)]
    assert watchdog.check() == []          # not yet 20 s
    server.activities = [Activity('w0', 1, 'a', 'q', 35.0)]
    assert len(watchdog.check()) == 1      # once, though 2 intervals passed
    server.activities = [Activity('w0', 1, 'a', 'q', 39.0)]
    assert watchdog.check() == []
    # The same id again (a retry), started anew: counted from 0.
    server.activities = [Activity('w0', 1, 'a', 'q', 10.5)]
    assert len(watchdog.check()) == 1
    server.activities = [Activity('w0', 1, 'b', 'q', 12.0)]
    assert len(watchdog.check()) == 1
    server.activities = [Activity('w0', 1, None, None, None)]
    assert watchdog.check() == []
    assert gocept.amqprun.watchdog.oldest_handling([
        Activity('w0', 1, None, None, None),
        Activity('w1', 2, 'c', 'q', 3.5),
        Activity('w2', 3, 'd', 'q', 1.0)]) == 3.5
    assert gocept.amqprun.watchdog.oldest_handling(
        [Activity('w0', 1, None, None, None)]) == 0.0
    with pytest.raises(ValueError):
        gocept.amqprun.watchdog.Watchdog(server, 0)


HANDLERS = '''
import gocept.amqprun.handler
import pathlib
import time

PREFIX = {prefix!r}


@gocept.amqprun.handler.declare(PREFIX + '.slow', PREFIX + '.slow')
def slow(message):
    deadline = time.monotonic() + 30
    while not pathlib.Path('go').exists() and time.monotonic() < deadline:
        time.sleep(0.02)
'''


def test_the_daemon_runs_the_watchdog_of_its_configuration(
        server_process, amqp_client, name_prefix):
    for suffix in ('', '.retry', '.parked', '.quarantine'):
        amqp_client.forget(f'{name_prefix}.slow{suffix}')
    process = server_process(
        handlers=HANDLERS.format(prefix=name_prefix),
        zcml='<utility component="handlers.slow" name="slow" />',
        worker_extra='  slow-handler-warning 0.5\n')
    message_id = amqp_client.send(f'{name_prefix}.slow', b'')
    process.wait_for_log(
        f'WARNING gocept.amqprun.watchdog Message {message_id} from queue',
        count=2)
    assert ', in slow\n' in process.log_text()
    (process.directory / 'go').touch()
    assert process.stop() == 0


def test_slow_handler_warning_0_means_no_watchdog(tmp_path):
    class Config:
        class worker:
            slow_handler_warning = 0
    assert gocept.amqprun.main.make_watchdog(object(), Config) is None
    Config.worker.slow_handler_warning = 2.5
    watchdog = gocept.amqprun.main.make_watchdog(object(), Config)
    assert watchdog.interval == 2.5
