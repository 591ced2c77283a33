"""The `server` command: run the daemon from a ZConfig file."""

import importlib.resources
import logging
import queue
import re
import signal
import sys
import threading

import ZConfig
import zope.component
import zope.component.event  # routes zope.event.notify to ZCML subscribers
import zope.configuration.config
import zope.configuration.xmlconfig
import zope.event

import gocept.amqprun.connection
import gocept.amqprun.interfaces
import gocept.amqprun.retry
import gocept.amqprun.server
import gocept.amqprun.settings


log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_RESTART = 1       # SIGUSR1, or a failure at run time
EXIT_CONFIG = 2        # a configuration or usage error

SERVER_KEYS = tuple(
    name for name in gocept.amqprun.connection.Parameters.defaults)


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


def load_schema():
    resource = importlib.resources.files('gocept.amqprun') / 'schema.xml'
    with importlib.resources.as_file(resource) as path:
        return ZConfig.loadSchema(str(path))


def load_config(path):
    """Load and check the configuration file; raise ConfigError."""
    try:
        config, _ = ZConfig.loadConfig(load_schema(), path)
    except ZConfig.ConfigurationError as e:
        raise ConfigError(describe_config_error(path, e)) from None
    except OSError as e:
        raise ConfigError(f'{path}: cannot read: {e.strerror}') from None
    server = config.amqp_server
    if not server.hostname and not server.url:
        raise ConfigError(
            f'{path}: section <amqp-server>: '
            'either hostname or url is required')
    # Confirm mode does not block a worker until its confirms are in, so
    # its prefetch bounds the confirms in flight: it wants more.
    default_prefetch = 20 if config.worker.commit_mode == 'confirm' else 2
    prefetch = config.worker.prefetch or server.prefetch or default_prefetch
    if prefetch < 1:
        raise ConfigError(
            f'{path}: section <worker>/<amqp-server>: key prefetch: '
            'must be at least 1')
    if config.worker.amount < 1:
        raise ConfigError(
            f'{path}: section <worker>: key amount: must be at least 1')
    config.prefetch = prefetch
    worker = config.worker
    if worker.commit_mode not in ('transaction', 'confirm'):
        raise ConfigError(
            f'{path}: section <worker>: key commit-mode: must be '
            f'"transaction" or "confirm", not {worker.commit_mode!r}')
    try:
        config.retry_policy = gocept.amqprun.retry.RetryPolicy(
            retries=worker.retries, delay=worker.retry_delay,
            park=worker.park, error_routing_key=worker.error_routing_key)
    except ValueError as e:
        raise ConfigError(f'{path}: section <worker>: {e}') from None
    return config


def describe_config_error(path, error):
    """'FILE, line N, section <S>, key K: what is wrong' for a ZConfig
    error (ZConfig does not always say where)."""
    message = re.sub(r' \(line \d+.*\)$', '', str(error.message))
    lineno = getattr(error, 'lineno', None)
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    unknown = re.match(r"'(.+)' is not a known key name", message)
    if lineno is None and unknown:
        for number, line in enumerate(lines, 1):
            words = line.split(None, 1)
            if words and words[0].lower() == unknown.group(1).lower():
                lineno = number
                break
    if not lineno or lineno > len(lines):
        return f'{path}: {message}'
    sections = []
    for line in lines[:lineno - 1]:
        tag = re.match(r'\s*<(/?)([\w-]+)', line)
        if tag and tag.group(1):
            if sections:
                sections.pop()
        elif tag and not line.rstrip().endswith('/>'):
            sections.append(tag.group(2))
    where = [f'{path}, line {lineno}']
    if sections:
        where.append(f'section <{sections[-1]}>')
    words = lines[lineno - 1].split(None, 1)
    if words and not words[0].startswith('<'):
        where.append(f'key {words[0]}')
    return f'{", ".join(where)}: {message}'


def parameters_from(config):
    """connection.Parameters from the <amqp-server> section."""
    server = config.amqp_server
    kw = {name: getattr(server, name) for name in SERVER_KEYS
          if getattr(server, name, None) is not None}
    return gocept.amqprun.connection.Parameters(**kw)


def setup(config):
    """Configure logging, provide ISettings and load the ZCML."""
    config.eventlog()
    for logger in config.loggers:
        logger()
    load_components(config)


def load_components(config):
    """Provide ISettings (from <settings>), then load the ZCML into the
    global registry; raise ConfigError naming the ZCML file and line."""
    settings = gocept.amqprun.settings.Settings()
    if config.settings is not None:
        settings.update(config.settings.mapping)
    zope.component.provideUtility(
        settings, gocept.amqprun.interfaces.ISettings)
    zcml = config.worker.component_configuration
    try:
        zope.configuration.xmlconfig.file(zcml)
    except zope.configuration.config.ConfigurationError as e:
        raise ConfigError(f'{zcml}: {e}') from None


def main(config_file=None):
    """Run the daemon; exit 0 after SIGTERM/SIGINT, 1 after SIGUSR1 or a
    failure, 2 on a configuration error."""
    if sys.argv[1:2] == ['--check']:
        # Not at the top: check imports this module.
        from gocept.amqprun import check
        args = sys.argv[2:] or ([config_file] if config_file else [])
        sys.exit(check.main(args))
    if config_file is None:
        if len(sys.argv) != 2 or sys.argv[1].startswith('-'):
            print('usage: server CONFIG_FILE', file=sys.stderr)
            sys.exit(EXIT_CONFIG)
        config_file = sys.argv[1]
    events = queue.SimpleQueue()
    try:
        config = load_config(config_file)
        setup(config)
        server = gocept.amqprun.server.Server(
            parameters_from(config),
            workers=config.worker.amount,
            prefetch=config.prefetch,
            shutdown_timeout=config.worker.shutdown_timeout,
            retry_policy=config.retry_policy,
            confirm=config.worker.commit_mode == 'confirm',
            on_ready=lambda: events.put(('ready', None)))
    except (ConfigError, gocept.amqprun.server.DuplicateQueueError,
            ValueError) as e:
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
                    code = EXIT_RESTART
                    break
        elif kind == 'signal':
            log.info('Received signal %s, shutting down.',
                     signal.Signals(value).name)
            code = EXIT_RESTART if value == signal.SIGUSR1 else EXIT_OK
            break
        elif kind == 'failed':
            log.error('Stopping after a fatal error: %s', value)
            code = EXIT_RESTART
            break
        elif kind == 'stopped':
            code = EXIT_OK
            break
    if started:
        try:
            zope.event.notify(gocept.amqprun.interfaces.ProcessStopping())
        except Exception:
            log.exception('A ProcessStopping subscriber failed.')
            code = code or EXIT_RESTART
    server.stop()
    runner.join(server.shutdown_timeout)
    logging.shutdown()
    return code
