"""The `server` command: the daemon and its subcommands.

::

    server CONFIG                      run the daemon
    server check [--no-connect] CONFIG check the configuration (`check`;
                                       ``server --check CONFIG`` too)
    server parked ACTION ... CONFIG    list, show, replay or drop parked
                                       messages (`parkedcli`)
    server ready [--wait S] CONFIG     does the daemon consume? (`ready`)
    server init DIR                    a new project (`init`)
    server --help | --version

The subcommands are modules of their own, listed in `cli.COMMANDS`;
this module runs the daemon.

The exit codes (`interfaces`) are the contract with supervisors: 0 after
SIGTERM/SIGINT, 1 after SIGUSR1 or a failure (restart), 2 when the
configuration or the command line is wrong or the broker refused it at
start-up (do not restart).
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
import gocept.amqprun.cli
import gocept.amqprun.config
import gocept.amqprun.errors
import gocept.amqprun.interfaces
import gocept.amqprun.log
import gocept.amqprun.server


log = logging.getLogger(__name__)

DESCRIPTION = '''\
Run the gocept.amqprun daemon configured by CONFIG (a ZConfig file, e.g.
etc/server.conf): consume the queues of the handlers its ZCML registers
until SIGTERM or SIGINT (stop) or SIGUSR1 (stop, exit 1: restart).'''

EPILOG = '''\
exit codes:
  0  stopped by SIGTERM or SIGINT (check: nothing wrong)
  1  stopped by SIGUSR1, the broker unreachable at start-up, or a fatal
     error at run time: restart (check: problems found)
  2  the configuration or the command line is wrong, or the broker
     refused it at start-up (credentials, virtual host, a queue's
     arguments): do not restart

See the documentation, "Deploy the daemon".'''


def version():
    """The version line of ``--version``."""
    return (f'gocept.amqprun {importlib.metadata.version("gocept.amqprun")}'
            f' (Python {platform.python_version()}, pika {pika.__version__})')


def parser(prog='server', config_file=None):
    """The argument parser of the daemon form; `config_file` is the
    default of CONFIG (buildout's scripts pass it)."""
    cli = gocept.amqprun.cli
    usage = '\n       '.join(
        ['%(prog)s [-h] [--version] CONFIG'] + cli.usages(prog))
    epilog = 'commands (%(prog)s COMMAND --help for more):\n' + ''.join(
        f'  {name:<9} {cli.command(name).HELP}\n' for name in cli.COMMANDS)
    result = argparse.ArgumentParser(
        prog=prog, usage=usage, description=DESCRIPTION,
        epilog=epilog + '\n' + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    gocept.amqprun.cli.add_config_argument(result, config_file)
    result.add_argument('--version', action='version', version=version())
    return result


def main(config_file=None, argv=None, prog='server'):
    """Run the `server` command with `argv` (default: sys.argv[1:]);
    exit with its code (SystemExit).

    `config_file` is the configuration file when the command line names
    none (zc.recipe.egg's ``arguments`` passes it: ``main('...conf')``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    cli = gocept.amqprun.cli
    if argv and (argv[0] in cli.COMMANDS or argv[0] in cli.ALIASES):
        sys.exit(cli.run_command(argv[0], argv[1:], prog, config_file))
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
            channels=config.worker.channels,
            prefetch=config.prefetch,
            shutdown_timeout=config.worker.shutdown_timeout,
            retry_policy=config.retry_policy,
            confirm=config.worker.commit_mode == 'confirm',
            on_ready=lambda: events.put(Ready()))
        monitor = make_monitor(server, config, config_file)
        watchdog = make_watchdog(server, config)
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
        return run(server, events, monitor, progress, watchdog)
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
        return gocept.amqprun.monitor.Monitor(
            server, (host, port), token=config.monitor.token)
    except OSError as e:
        where = gocept.amqprun.config.where(
            config_file, gocept.amqprun.config.read_lines(config_file),
            'monitor', 'address')
        problem = (f'{where}: cannot listen on {host}:{port}: '
                   f'{e.strerror or e}')
        if e.errno == errno.EADDRINUSE:
            raise MonitorUnavailable(problem) from None
        raise gocept.amqprun.config.ConfigError(problem) from None


def make_watchdog(server, config):
    """The `watchdog.Watchdog` of ``slow-handler-warning`` (not yet
    started), or None when that is 0."""
    interval = config.worker.slow_handler_warning
    if not interval:
        return None
    import gocept.amqprun.watchdog
    return gocept.amqprun.watchdog.Watchdog(server, interval)


def report(error, logged=False):
    """Log `error` (unless `logged` or logging is not set up yet) and
    print it to stderr unless the log goes to the terminal already."""
    handlers = logging.getLogger().handlers
    if handlers and not logged:
        log.error('%s', error)
    if not any(isinstance(h, logging.StreamHandler)
               and h.stream in (sys.stdout, sys.stderr) for h in handlers):
        print(f'error: {error}', file=sys.stderr)


# What happens to a running daemon, in the order the main thread learns
# of it (`run`). Each says whether the daemon goes on (None) or with
# which exit code it stops.

class Ready:
    """The server is connected and consumes (again)."""

    def apply(self, daemon):
        return daemon.ready()


class Signalled:
    """A signal arrived: SIGUSR1 stops with exit 1, the others with 0."""

    def __init__(self, signum):
        self.signum = signum

    def apply(self, daemon):
        log.info('Received signal %s, shutting down.',
                 signal.Signals(self.signum).name)
        return EXIT_FAILURE if self.signum == signal.SIGUSR1 else EXIT_OK


class Failed:
    """`Server.start` raised `error`: exit 1 (a supervisor restarts), or
    2 when the broker refused the configuration (`errors.Refused`:
    starting again does not help)."""

    def __init__(self, error):
        self.error = error

    def apply(self, daemon):
        log.error('Stopping after a fatal error: %s', self.error)
        if not daemon.started:
            report(self.error, logged=True)
        if isinstance(self.error, gocept.amqprun.errors.Refused):
            return EXIT_CONFIG
        return EXIT_FAILURE


class Stopped:
    """`Server.start` returned (somebody called `Server.stop`)."""

    def apply(self, daemon):
        return EXIT_OK


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Seconds within which the main thread handles a signal at the latest.
SIGNAL_LATENCY = 0.5


class Daemon:
    """The life cycle of a running daemon in the main thread: start the
    server in a thread of its own, react to `events` until one ends it,
    shut down in order (see `run`)."""

    def __init__(self, server, events, monitor=None, progress=None,
                 watchdog=None):
        self.server = server
        self.events = events
        self.monitor = monitor
        self.progress = progress
        self.watchdog = watchdog
        self.started = False
        self.runner = threading.Thread(
            target=self._run_server, name='amqprun-io', daemon=True)

    def _run_server(self):
        try:
            self.server.start()
        except Exception as e:
            self.events.put(Failed(e))
        else:
            self.events.put(Stopped())

    def run(self):
        """Run until a signal or a failure; return the exit code."""
        for signum in SIGNALS:
            signal.signal(signum, lambda signum, frame: self.events.put(
                Signalled(signum)))
        if self.monitor is not None:
            self.monitor.start()
        if self.watchdog is not None:
            self.watchdog.start()
        self.runner.start()
        code = event = None
        while code is None:
            try:
                # Not without a timeout: a signal that arrives while the
                # main thread is about to wait (or at another thread) does
                # not interrupt the wait, and its handler runs only when
                # the main thread runs Python code again.
                event = self.events.get(timeout=SIGNAL_LATENCY)
            except queue.Empty:
                continue
            code = event.apply(self)
        return self.shut_down(code, stop=self.started
                              or isinstance(event, Signalled))

    def ready(self):
        """The first time: log "Started.", begin the progress lines and
        notify ProcessStarted (a failing subscriber stops the daemon)."""
        if self.started:
            return None
        self.started = True
        log.info('Started.')
        if self.progress is not None:
            self.progress.start()
        try:
            zope.event.notify(gocept.amqprun.interfaces.ProcessStarted())
        except Exception:
            log.exception('A ProcessStarted subscriber failed; stopping.')
            return EXIT_FAILURE
        return None

    def shut_down(self, code, stop):
        """Notify ProcessStopping, stop the progress lines, the server
        (if `stop`: else it has returned already), the watchdog (which
        reports handlers that hold up the stop) and the monitor, in that
        order; return the exit code."""
        if self.monitor is not None:
            self.monitor.stopping = True
        if self.started:
            try:
                zope.event.notify(
                    gocept.amqprun.interfaces.ProcessStopping())
            except Exception:
                log.exception('A ProcessStopping subscriber failed.')
                code = code or EXIT_FAILURE
        if self.progress is not None:
            self.progress.stop()
        if stop:
            self.server.stop()
        self.runner.join(self.server.shutdown_timeout)
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.monitor is not None:
            self.monitor.stop()
        return code


def run(server, events, monitor=None, progress=None, watchdog=None):
    """Run `server` until a signal or a failure; return the exit code.

    `events` is the queue the server's on_ready callback puts `Ready`
    into. The `monitor` (a `monitor.Monitor`) answers from the start
    until the server stopped; `progress` (a `log.Progress`) logs from the
    first time the server consumes until shutdown; `watchdog` (a
    `watchdog.Watchdog`) watches the handlers from start to exit.
    """
    return Daemon(server, events, monitor, progress, watchdog).run()
