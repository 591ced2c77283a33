"""The `server` command: run the daemon from a ZConfig file."""

import logging
import queue
import signal
import sys
import threading

import zope.component
import zope.component.event  # routes zope.event.notify to ZCML subscribers
import zope.event

from gocept.amqprun.interfaces import EXIT_CONFIG
from gocept.amqprun.interfaces import EXIT_FAILURE
from gocept.amqprun.interfaces import EXIT_OK
import gocept.amqprun.check
import gocept.amqprun.config
import gocept.amqprun.interfaces
import gocept.amqprun.server


log = logging.getLogger(__name__)


def main(config_file=None):
    """Run the daemon; exit 0 after SIGTERM/SIGINT, 1 after SIGUSR1 or a
    failure, 2 on a configuration error."""
    if sys.argv[1:2] == ['--check']:
        args = sys.argv[2:] or ([config_file] if config_file else [])
        sys.exit(gocept.amqprun.check.main(args))
    if config_file is None:
        if len(sys.argv) != 2 or sys.argv[1].startswith('-'):
            print('usage: server CONFIG_FILE', file=sys.stderr)
            sys.exit(EXIT_CONFIG)
        config_file = sys.argv[1]
    events = queue.SimpleQueue()
    try:
        config = gocept.amqprun.config.load_config(config_file)
        gocept.amqprun.config.setup_logging(config)
        gocept.amqprun.config.load_components(config)
        server = gocept.amqprun.server.Server(
            gocept.amqprun.config.parameters_from(config),
            workers=config.worker.amount,
            prefetch=config.prefetch,
            shutdown_timeout=config.worker.shutdown_timeout,
            retry_policy=config.retry_policy,
            confirm=config.worker.commit_mode == 'confirm',
            on_ready=lambda: events.put(('ready', None)))
    except (gocept.amqprun.config.ConfigError,
            gocept.amqprun.server.DuplicateQueueError, ValueError) as e:
        if logging.getLogger().handlers:
            log.error('%s', e)
        print(f'error: {e}', file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    zope.component.provideUtility(
        server, gocept.amqprun.interfaces.ISender)
    sys.exit(run(server, events))


def run(server, events):
    """Run `server` until a signal or a failure; return the exit code.

    `events` is the queue the server's on_ready callback puts into.
    """
    def on_signal(signum, frame):
        events.put(('signal', signum))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, on_signal)

    def serve():
        try:
            server.start()
        except Exception as e:
            events.put(('failed', e))
        else:
            events.put(('stopped', None))
    runner = threading.Thread(target=serve, name='amqprun-io', daemon=True)
    runner.start()
    started = False
    while True:
        kind, value = events.get()
        if kind == 'ready':
            if not started:
                started = True
                log.info('Started.')
                try:
                    zope.event.notify(
                        gocept.amqprun.interfaces.ProcessStarted())
                except Exception:
                    log.exception('A ProcessStarted subscriber failed; '
                                  'stopping.')
                    code = EXIT_FAILURE
                    break
        elif kind == 'signal':
            log.info('Received signal %s, shutting down.',
                     signal.Signals(value).name)
            code = EXIT_FAILURE if value == signal.SIGUSR1 else EXIT_OK
            break
        elif kind == 'failed':
            log.error('Stopping after a fatal error: %s', value)
            code = EXIT_FAILURE
            break
        elif kind == 'stopped':
            code = EXIT_OK
            break
    if started:
        try:
            zope.event.notify(gocept.amqprun.interfaces.ProcessStopping())
        except Exception:
            log.exception('A ProcessStopping subscriber failed.')
            code = code or EXIT_FAILURE
    server.stop()
    runner.join(server.shutdown_timeout)
    logging.shutdown()
    return code
