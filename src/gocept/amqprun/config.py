"""The configuration file: loading, checking and what it configures.

`load_config` reads a ZConfig file against ``schema.xml`` and checks what
the schema cannot; every problem is a `ConfigError` whose message names
the file, line, section and key. Used by the daemon (`main`) and the
check command (`check`).
"""

import difflib
import importlib.resources
import importlib.util
import logging
import os
import re
import sys

import ZConfig
import zope.component
import zope.configuration.config
import zope.configuration.xmlconfig

import gocept.amqprun.interfaces
import gocept.amqprun.parameters
import gocept.amqprun.retry
import gocept.amqprun.settings


COMMIT_MODES = ('transaction', 'confirm')
# Lower bounds of numeric keys checked after parsing:
# (section, key, minimum). Keys not set (None) are not checked.
MINIMUMS = (
    ('amqp-server', 'port', 1),
    ('amqp-server', 'heartbeat_interval', 0),
    ('amqp-server', 'connection_attempts', 1),
    ('amqp-server', 'retry_delay', 0),
    ('amqp-server', 'max_retry_delay', 0),
    ('amqp-server', 'blocked_connection_timeout', 0),
    ('amqp-server', 'socket_timeout', 0),
    ('amqp-server', 'send_timeout', 0),
    ('amqp-server', 'prefetch', 1),
    ('worker', 'amount', 1),
    ('worker', 'channels', 1),
    ('worker', 'prefetch', 1),
    ('worker', 'shutdown-timeout', 0),
    ('worker', 'progress-interval', 0),
    ('worker', 'slow-handler-warning', 0),
)
# The <worker> keys of the retry policy: RetryPolicy's argument -> key.
# RetryPolicy checks them (retry.PolicyError names the argument).
RETRY_KEYS = {
    'retries': 'retries',
    'delay': 'retry-delay',
    'park': 'park',
    'error_routing_key': 'error-routing-key',
    'backoff': 'retry-backoff',
    'max_delay': 'retry-max-delay',
}


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


def load_schema():
    resource = importlib.resources.files('gocept.amqprun') / 'schema.xml'
    with importlib.resources.as_file(resource) as path:
        return ZConfig.loadSchema(str(path))


def monitor_address(value):
    """The ZConfig datatype of ``<monitor> address``: ``HOST:PORT``,
    ``[IPV6]:PORT`` or ``:PORT`` (all interfaces) -> (host, port).

    Raises ValueError (ZConfig names file, line and key)."""
    match = re.fullmatch(r'(\[([0-9A-Fa-f:.]+)\]|[^\s:\[\]]*):(\d+)',
                         value.strip())
    if match is None:
        raise ValueError(
            f'expected HOST:PORT (e.g. 127.0.0.1:8410), not {value!r}')
    host = match.group(2) or match.group(1)
    port = int(match.group(3))
    if port > 65535:
        raise ValueError(f'port {port} is out of range (0-65535)')
    return host, port


def load_config(path):
    """Load and check the configuration file; raise ConfigError.

    Adds to the ZConfig result: `prefetch` (from <worker> or
    <amqp-server>, None if neither sets it), `retry_policy` (a
    `retry.RetryPolicy`) and `parameters` (`parameters.Parameters`).
    """
    path = os.fspath(path)
    schema = load_schema()
    try:
        config, _ = ZConfig.loadConfig(schema, path)
    except ZConfig.ConfigurationError as e:
        raise ConfigError(describe_config_error(path, e, schema)) from None
    except OSError as e:
        raise ConfigError(f'{path}: cannot read: {e.strerror}') from None
    check_config(config, path)
    return config


def load(path):
    """Load the configuration (`load_config`) and its ZCML into the
    global registry (`load_components`); return the ZConfig object.
    Raises ConfigError naming file and line. Logging is not set up."""
    config = load_config(path)
    load_components(config)
    return config


def check_config(config, path):
    """Check what the schema cannot and complete `config` (see
    `load_config`); a ConfigError names file, line, section and key."""
    lines = read_lines(path)

    def fail(section, key, problem):
        raise ConfigError(f'{where(path, lines, section, key)}: {problem}')
    server, worker = config.amqp_server, config.worker
    sections = {'amqp-server': server, 'worker': worker}
    for section, key, minimum in MINIMUMS:
        value = getattr(sections[section], key.replace('-', '_'))
        if value is not None and value < minimum:
            fail(section, key, f'must be at least {minimum}, not {value}')
    if not server.hostname and not server.url:
        fail('amqp-server', None, 'either hostname or url is required')
    if worker.commit_mode not in COMMIT_MODES:
        fail('worker', 'commit-mode', 'must be "transaction" or '
             f'"confirm", not {worker.commit_mode!r}')
    config.prefetch = (worker.prefetch if worker.prefetch is not None
                       else server.prefetch)
    try:
        config.retry_policy = gocept.amqprun.retry.RetryPolicy(**{
            argument: getattr(worker, key.replace('-', '_'))
            for argument, key in RETRY_KEYS.items()})
    except gocept.amqprun.retry.PolicyError as e:
        fail('worker', RETRY_KEYS[e.argument], e.problem(RETRY_KEYS))
    key = 'url' if server.url else 'hostname'
    try:
        config.parameters = parameters_from(config)
        config.parameters.pika_parameters()
    except (ValueError, OSError) as e:
        fail('amqp-server', key, str(e))
    if config.monitor is not None \
            and importlib.util.find_spec('prometheus_client') is None:
        fail('monitor', None, 'needs the Python package prometheus_client '
             '(a dependency of gocept.amqprun: pip install '
             'prometheus_client)')
    if config.monitor is not None:
        config.monitor.token = None
        if config.monitor.token_file:
            try:
                config.monitor.token = read_token(config.monitor.token_file)
            except ValueError as e:
                fail('monitor', 'token-file', str(e))


def read_token(path):
    """The token in the file at `path` (surrounding white space
    stripped). Raises ValueError when the file is accessible by group or
    others, cannot be read or holds no token; the message never contains
    the token."""
    try:
        with open(path, 'rb') as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as e:
        raise ValueError(f'cannot read {path}: {e.strerror}') from None
    if mode & 0o077:
        raise ValueError(
            f'{path} is accessible by group or others (mode '
            f'{mode & 0o777:04o}); a token file must be 0600 or stricter '
            f'(chmod 600 {path})')
    try:
        token = data.decode('utf-8').strip()
    except UnicodeDecodeError:
        raise ValueError(f'{path} is not UTF-8 text') from None
    if not token:
        raise ValueError(f'{path} is empty: it must hold the token')
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(f'{path}: the token must be one word of printable '
                         'characters (no spaces)')
    return token


def read_lines(path):
    """The lines of the file at `path` ([] if it cannot be read)."""
    try:
        with open(path, encoding='utf-8') as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return []


def walk(lines):
    """(line number, enclosing section types, line) for every line of a
    ZConfig file; the section types are lower-case, innermost last, and
    a line opening or closing a section is outside of it."""
    sections = []
    for number, line in enumerate(lines, 1):
        yield number, tuple(sections), line
        tag = re.match(r'\s*<(/?)([\w.-]+)', line)
        if tag and tag.group(1):
            if sections:
                sections.pop()
        elif tag and not line.rstrip().endswith('/>'):
            sections.append(tag.group(2).lower())


def first_word(line):
    words = line.split(None, 1)
    return words[0].lower() if words else ''


def locate(lines, section, key=None):
    """The number of the line that sets `key` in the first `section`
    (a section type; None: top level), or that opens the section if
    `key` is None; None when not found (e.g. in an %include'd file)."""
    for number, sections, line in walk(lines):
        if key is None:
            tag = re.match(r'\s*<([\w.-]+)', line)
            if tag and tag.group(1).lower() == section:
                return number
        elif sections[-1:] == ((section,) if section else ()) \
                and first_word(line) == key.lower():
            return number
    return None


def where(path, lines, section, key=None):
    """'FILE, line N, section <S>, key K' (as far as known)."""
    number = locate(lines, section, key)
    parts = [f'{path}, line {number}' if number else str(path)]
    if section:
        parts.append(f'section <{section}>')
    if key:
        parts.append(f'key {key}')
    return ', '.join(parts)


def describe_config_error(path, error, schema=None):
    """'FILE, line N, section <S>, key K: what is wrong' for a ZConfig
    error (ZConfig does not always say where); with the `schema`, an
    unknown key or section type gets the closest known one as a
    suggestion ("did you mean ...?")."""
    message = re.sub(r' \(line \d+.*\)$', '', str(error.message))
    lineno = getattr(error, 'lineno', None)
    lines = read_lines(path)
    unknown = re.match(r"'(.+)' is not a known key name", message)
    if lineno is None and unknown:
        for number, _, line in walk(lines):
            if first_word(line) == unknown.group(1).lower():
                lineno = number
                break
    if not lineno or lineno > len(lines):
        return f'{path}: {message}'
    sections = ()
    for number, sections, line in walk(lines[:lineno]):
        pass
    parts = [f'{path}, line {lineno}']
    if sections:
        parts.append(f'section <{sections[-1]}>')
    word = first_word(line)
    if word and word[0] not in '<%':
        parts.append(f'key {word}')
    if schema is not None:
        message += suggestion(schema, sections, message)
    return f'{", ".join(parts)}: {message}'


def suggestion(schema, sections, message):
    """'; did you mean ...?' for an unknown key or section type, or ''."""
    unknown_key = re.match(r"'(.+)' is not a known key name", message)
    unknown_type = re.match(r"unknown type name: '(.+)'", message)
    if unknown_key:
        word = unknown_key.group(1)
        try:
            section = schema.gettype(sections[-1]) if sections else schema
        except ZConfig.SchemaError:
            return ''
        known = [key for key, _ in section if key not in (None, '+')]
    elif unknown_type:
        word = unknown_type.group(1)
        known = [name for name in schema.gettypenames() if '.' not in name]
    else:
        return ''
    close = difflib.get_close_matches(word.lower(), known, n=1)
    if not close:
        return ''
    shown = close[0] if unknown_key else f'<{close[0]}>'
    return f'; did you mean {shown}?'


def parameters_from(config):
    """`parameters.Parameters` from the <amqp-server> section (keys it
    does not set keep the defaults of Parameters)."""
    server = config.amqp_server
    kw = {name: getattr(server, name)
          for name in gocept.amqprun.parameters.Parameters.defaults
          if getattr(server, name, None) is not None}
    return gocept.amqprun.parameters.Parameters(**kw)


def setup_logging(config):
    """Configure logging from <eventlog> and the <logger> sections.

    Unless a <logger> section names ``pika``, pika's logger is set to
    CRITICAL: pika logs every frame at DEBUG and half a dozen ERROR lines
    for one failed connection attempt, while gocept.amqprun reports every
    connection event itself (connecting, connected, failed, lost, with
    the reason).
    """
    config.eventlog()
    for logger in config.loggers:
        logger()
    if 'pika' not in {logger.name for logger in config.loggers}:
        logging.getLogger('pika').setLevel(logging.CRITICAL)


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
        raise ConfigError(f'{zcml}: {e}{import_hint(e)}') from None


def import_hint(error):
    """What to do about a ZCML `error` that is a module not found, or
    ''."""
    if 'No module named' not in str(error):
        return ''
    return ('\n    (The handler modules must be importable by '
            f'{sys.executable}: install their package into its '
            'environment, e.g. pip install -e . in the project, or put '
            'their directory on PYTHONPATH; see the documentation, '
            '"Write handlers".)')
