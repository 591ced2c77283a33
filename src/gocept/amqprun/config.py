"""The configuration file: loading, checking and what it configures.

`load_config` reads a ZConfig file against ``schema.xml`` and checks what
the schema cannot; every problem is a `ConfigError` whose message names
the file, line, section and key. Used by the daemon (`main`) and the
check command (`check`).
"""

import importlib.resources
import re

import ZConfig
import zope.component
import zope.configuration.config
import zope.configuration.xmlconfig

import gocept.amqprun.interfaces
import gocept.amqprun.parameters
import gocept.amqprun.retry
import gocept.amqprun.settings


COMMIT_MODES = ('transaction', 'confirm')


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


def load_schema():
    resource = importlib.resources.files('gocept.amqprun') / 'schema.xml'
    with importlib.resources.as_file(resource) as path:
        return ZConfig.loadSchema(str(path))


def load_config(path):
    """Load and check the configuration file; raise ConfigError.

    Adds to the ZConfig result: `prefetch` (from <worker> or
    <amqp-server>, None if neither sets it) and `retry_policy` (a
    `retry.RetryPolicy`).
    """
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
    worker = config.worker
    if worker.commit_mode not in COMMIT_MODES:
        raise ConfigError(
            f'{path}: section <worker>: key commit-mode: must be '
            f'"transaction" or "confirm", not {worker.commit_mode!r}')
    prefetch = worker.prefetch or server.prefetch
    if prefetch is not None and prefetch < 1:
        raise ConfigError(
            f'{path}: section <worker>/<amqp-server>: key prefetch: '
            'must be at least 1')
    if worker.amount < 1:
        raise ConfigError(
            f'{path}: section <worker>: key amount: must be at least 1')
    config.prefetch = prefetch
    try:
        config.retry_policy = gocept.amqprun.retry.RetryPolicy(
            retries=worker.retries, delay=worker.retry_delay,
            backoff=worker.retry_backoff, max_delay=worker.retry_max_delay,
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
    """`parameters.Parameters` from the <amqp-server> section (keys it
    does not set keep the defaults of Parameters)."""
    server = config.amqp_server
    kw = {name: getattr(server, name)
          for name in gocept.amqprun.parameters.Parameters.defaults
          if getattr(server, name, None) is not None}
    return gocept.amqprun.parameters.Parameters(**kw)


def setup_logging(config):
    """Configure logging from <eventlog> and the <logger> sections."""
    config.eventlog()
    for logger in config.loggers:
        logger()


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
