"""The `server` command: run the daemon from a ZConfig file.

::

    server CONFIG                      run the daemon
    server check [--no-connect] CONFIG check the configuration (`check`;
                                       ``server --check CONFIG`` too)
    server --help | --version

The exit codes (`interfaces`) are the contract with supervisors: 0 after
SIGTERM/SIGINT, 1 after SIGUSR1 or a failure (restart), 2 when the
configuration or the command line is wrong (do not restart).
"""

import argparse
import errno
import importlib.metadata
import logging
import platform
import queue
import signal
import sys
import threading

import pika
import zope.component
import zope.component.event  # routes zope.event.notify to ZCML subscribers
import zope.event

from gocept.amqprun.interfaces import EXIT_CONFIG
from gocept.amqprun.interfaces import EXIT_FAILURE
from gocept.amqprun.interfaces import EXIT_OK
import gocept.amqprun.check
import gocept.amqprun.config
import gocept.amqprun.errors
import gocept.amqprun.interfaces
import gocept.amqprun.log
import gocept.amqprun.server


log = logging.getLogger(__name__)

USAGE = '''\
%(prog)s [-h] [--version] CONFIG
       %(prog)s check [-h] [--no-connect] CONFIG'''

DESCRIPTION = '''\
Run the gocept.amqprun daemon configured by CONFIG (a ZConfig file, e.g.
etc/server.conf): consume the queues of the handlers its ZCML registers
until SIGTERM or SIGINT (stop) or SIGUSR1 (stop, exit 1: restart).'''

EPILOG = '''\
commands:
  check CONFIG   load CONFIG and its ZCML, list the handlers and compare
                 their queues with the broker's (--check CONFIG is the
                 same; --no-connect: only load and list)

exit codes:
  0  stopped by SIGTERM or SIGINT (check: everything agrees)
  1  stopped by SIGUSR1, the broker unusable at start-up, or a fatal
     error at run time (check: problems found)
  2  the configuration or the command line is wrong

See README.txt, "Running the daemon".'''


def version():
    """The version line of ``--version``."""
    return (f'gocept.amqprun {importlib.metadata.version("gocept.amqprun")}'
            f' (Python {platform.python_version()}, pika {pika.__version__})')


def parser(prog='server', config_file=None):
    """The argument parser of the daemon form; `config_file` is the
    default of CONFIG (buildout's scripts pass it)."""
    result = argparse.ArgumentParser(
        prog=prog, usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument(
        'config', metavar='CONFIG', nargs='?' if config_file else None,
        default=config_file, help='the ZConfig file' + (
            f' (default: {config_file})' if config_file else ''))
    result.add_argument('--version', action='version', version=version())
    return result


def main(config_file=None, argv=None, prog='server'):
    """Run the `server` command with `argv` (default: sys.argv[1:]);
    exit with its code (SystemExit).

    `config_file` is the configuration file when the command line names
    none (zc.recipe.egg's ``arguments`` passes it: ``main('...conf')``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (['check'], ['--check']):
        args = argv[1:]
        if config_file and all(arg.startswith('-') for arg in args):
            args.append(config_file)
        sys.exit(gocept.amqprun.check.main(args, prog=f'{prog} check'))
    options = parser(prog, config_file).parse_args(argv)
    sys.exit(serve(options.config))


def serve(config_file):
    """Load `config_file`, run the daemon until a signal or a failure;
    return the exit code."""
    events = queue.SimpleQueue()
    try:
        config = gocept.amqprun.config.load_config(config_file)
        gocept.amqprun.config.setup_logging(config)
        gocept.amqprun.config.load_components(config)
        server = gocept.amqprun.server.Server(
            config.parameters,
            workers=config.worker.amount,
            prefetch=config.prefetch,
            shutdown_timeout=config.worker.shutdown_timeout,
            retry_policy=config.retry_policy,
            confirm=config.worker.commit_mode == 'confirm',
            on_ready=lambda: events.put(('ready', None)))
        monitor = make_monitor(server, config, config_file)
    except (gocept.amqprun.config.ConfigError,
            gocept.amqprun.server.DuplicateQueueError, ValueError) as e:
        report(e)
        return EXIT_CONFIG
    except MonitorUnavailable as e:
        report(e)
        return EXIT_FAILURE
    zope.component.provideUtility(
        server, gocept.amqprun.interfaces.ISender)
    progress = gocept.amqprun.log.Progress(
        server.stats, config.worker.progress_interval)
    try:
        return run(server, events, monitor, progress)
    finally:
        logging.shutdown()


class MonitorUnavailable(Exception):
    """The monitor's address is in use (a restart may help)."""


def make_monitor(server, config, config_file):
    """The `monitor.Monitor` of the <monitor> section, its port bound (not
    yet serving), or None without one. Raises MonitorUnavailable if the
    address is in use, a ConfigError naming its line if it cannot be
    bound otherwise."""
    if config.monitor is None:
        return None
    import gocept.amqprun.monitor   # prometheus_client only if needed
    host, port = config.monitor.address
    try:
        return gocept.amqprun.monitor.Monitor(server, (host, port))
    except OSError as e:
        where = gocept.amqprun.config.where(
            config_file, gocept.amqprun.config.read_lines(config_file),
            'monitor', 'address')
        problem = (f'{where}: cannot listen on {host}:{port}: '
                   f'{e.strerror or e}')
        if e.errno == errno.EADDRINUSE:
            raise MonitorUnavailable(problem) from None
        raise gocept.amqprun.config.ConfigError(problem) from None


def report(error, logged=False):
    """Log `error` (unless `logged` or logging is not set up yet) and
    print it to stderr unless the log goes to the terminal already."""
    handlers = logging.getLogger().handlers
    if handlers and not logged:
        log.error('%s', error)
    if not any(isinstance(h, logging.StreamHandler)
               and h.stream in (sys.stdout, sys.stderr) for h in handlers):
        print(f'error: {error}', file=sys.stderr)


def run(server, events, monitor=None, progress=None):
    """Run `server` until a signal or a failure; return the exit code.

    `events` is the queue the server's on_ready callback puts into. The
    `monitor` (a `monitor.Monitor`) answers from the start until the
    server stopped; `progress` (a `log.Progress`) logs from the first
    time the server consumes until shutdown.
    """
    def on_signal(signum, frame):
        events.put(('signal', signum))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, on_signal)

    def run_server():
        try:
            server.start()
        except Exception as e:
            events.put(('failed', e))
        else:
            events.put(('stopped', None))
    runner = threading.Thread(
        target=run_server, name='amqprun-io', daemon=True)
    if monitor is not None:
        monitor.start()
    runner.start()
    started = False
    while True:
        kind, value = events.get()
        if kind == 'ready':
            if not started:
                started = True
                log.info('Started.')
                if progress is not None:
                    progress.start()
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
            if not started:
                report(value, logged=True)
            code = EXIT_FAILURE
            break
        elif kind == 'stopped':
            code = EXIT_OK
            break
    if monitor is not None:
        monitor.stopping = True
    if started:
        try:
            zope.event.notify(gocept.amqprun.interfaces.ProcessStopping())
        except Exception:
            log.exception('A ProcessStopping subscriber failed.')
            code = code or EXIT_FAILURE
    if progress is not None:
        progress.stop()
    if started or kind == 'signal':
        # Otherwise start() returned: there is nothing to stop.
        server.stop()
    runner.join(server.shutdown_timeout)
    if monitor is not None:
        monitor.stop()
    return code

