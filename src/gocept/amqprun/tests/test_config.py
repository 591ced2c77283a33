"""Configuration errors: where they are and what was meant."""

import inspect
import sys

import pytest

import gocept.amqprun.config
import gocept.amqprun.retry
import gocept.amqprun.server


def load(tmp_path, server='  hostname localhost\n', worker='', extra=''):
    """Load a configuration whose <amqp-server> keys start on line 4 and
    whose <worker> keys start on line 8 (after component-configuration,
    line 7)."""
    (tmp_path / 'server.zcml').write_text('<configure />\n')
    path = tmp_path / 'server.conf'
    path.write_text(
        '<eventlog>\n</eventlog>\n'
        f'<amqp-server>\n{server}</amqp-server>\n'
        '<worker>\n'
        f'  component-configuration {tmp_path}/server.zcml\n{worker}'
        f'</worker>\n{extra}')
    return gocept.amqprun.config.load_config(path)


def error(tmp_path, **kw):
    with pytest.raises(gocept.amqprun.config.ConfigError) as e:
        load(tmp_path, **kw)
    return str(e.value).replace(f'{tmp_path}/server.conf', 'FILE')


@pytest.mark.parametrize('kw, expected', [
    (dict(server='  hostnam localhost\n'),
     "FILE, line 4, section <amqp-server>, key hostnam: 'hostnam' is not "
     "a known key name; did you mean hostname?"),
    (dict(worker='  ammount 2\n'),
     "FILE, line 8, section <worker>, key ammount: 'ammount' is not a "
     "known key name; did you mean amount?"),
    (dict(extra='<monitr>\n  address :1\n</monitr>\n'),
     "FILE, line 9: unknown type name: 'monitr'; did you mean <monitor>?"),
    (dict(server='  hostname localhost\n  xyzzy 1\n'),
     "FILE, line 5, section <amqp-server>, key xyzzy: 'xyzzy' is not a "
     "known key name"),
])
def test_unknown_names_get_the_closest_known_one(tmp_path, kw, expected):
    assert error(tmp_path, **kw) == expected


@pytest.mark.parametrize('kw, expected', [
    (dict(worker='  retries 2\n  commit-mode tx\n'),
     'FILE, line 9, section <worker>, key commit-mode: must be '
     '"transaction" or "confirm", not \'tx\''),
    (dict(worker='  park nowhere\n'),
     'FILE, line 8, section <worker>, key park: must be "queue" or '
     '"reject", not \'nowhere\''),
    (dict(worker='  prefetch 0\n'),
     'FILE, line 8, section <worker>, key prefetch: must be at least 1, '
     'not 0'),
    (dict(server='  hostname localhost\n  prefetch 0\n'),
     'FILE, line 5, section <amqp-server>, key prefetch: must be at '
     'least 1, not 0'),
    (dict(worker='  amount 0\n'),
     'FILE, line 8, section <worker>, key amount: must be at least 1, '
     'not 0'),
    (dict(worker='  retries -1\n'),
     'FILE, line 8, section <worker>, key retries: must be at least 0, '
     'not -1'),
    (dict(worker='  retry-delay -5\n'),
     'FILE, line 8, section <worker>, key retry-delay: must be at least 0, '
     'not -5'),
    (dict(worker='  retry-backoff 0.5\n'),
     'FILE, line 8, section <worker>, key retry-backoff: must be at least '
     '1, not 0.5'),
    (dict(worker='  retry-delay 10\n  retry-max-delay 5\n'),
     'FILE, line 9, section <worker>, key retry-max-delay: must not be less '
     'than retry-delay (10)'),
    (dict(worker='  progress-interval -5\n'),
     'FILE, line 8, section <worker>, key progress-interval: must be at '
     'least 0, not -5.0'),
    (dict(worker='  slow-handler-warning -1\n'),
     'FILE, line 8, section <worker>, key slow-handler-warning: must be '
     'at least 0, not -1.0'),
    (dict(server='  hostname localhost\n  connection_attempts 0\n'),
     'FILE, line 5, section <amqp-server>, key connection_attempts: must '
     'be at least 1, not 0'),
    (dict(server='  port 5672\n'),
     'FILE, line 3, section <amqp-server>: either hostname or url is '
     'required'),
    (dict(server='  url amqp://guest:guest@host:port/\n'),
     'FILE, line 4, section <amqp-server>, key url: '),
])
def test_errors_found_after_parsing_name_line_section_key(
        tmp_path, kw, expected):
    assert error(tmp_path, **kw).startswith(expected)


@pytest.mark.parametrize('address', [
    'localhost', '127.0.0.1', '127.0.0.1:http', 'a:1:2', '1.2.3.4:70000'])
def test_bad_monitor_address_names_file_line_key(tmp_path, address):
    assert error(tmp_path, extra=f'<monitor>\n  address {address}\n'
                 '</monitor>\n').startswith(
        'FILE, line 10, section <monitor>, key address: ')


@pytest.mark.parametrize('address, expected', [
    ('127.0.0.1:8410', ('127.0.0.1', 8410)),
    (':8410', ('', 8410)),
    ('[::1]:8410', ('::1', 8410)),
    ('localhost:0', ('localhost', 0)),
])
def test_monitor_address(tmp_path, address, expected):
    config = load(tmp_path, extra=f'<monitor>\n  address {address}\n'
                  '</monitor>\n')
    assert config.monitor.address == expected


def test_defaults(tmp_path):
    config = load(tmp_path)
    assert config.monitor is None
    assert config.worker.progress_interval == 60
    assert config.worker.slow_handler_warning == 60
    assert config.prefetch is None
    assert config.parameters.hostname == 'localhost'


# schema.xml is the home of the <worker> defaults (and what the
# documentation shows); the Python API repeats some in its signatures, for
# code that embeds a Server: these tests keep them equal. <worker> key ->
# the argument of Server (RetryPolicy's: config.RETRY_KEYS).
SERVER_DEFAULTS = {
    'channels': 'channels',
    'amount': 'workers',
    'shutdown-timeout': 'shutdown_timeout',
    'prefetch': 'prefetch',
}
# Keys with a default no Python signature repeats (main passes it on).
SCHEMA_ONLY = {'progress-interval', 'commit-mode', 'slow-handler-warning'}


def signature_default(function, argument):
    return inspect.signature(function).parameters[argument].default


def test_schema_defaults_are_the_defaults_of_the_python_api(tmp_path):
    worker = load(tmp_path).worker
    expected = {key: signature_default(
        gocept.amqprun.server.Server, argument)
        for key, argument in SERVER_DEFAULTS.items()}
    expected.update({key: signature_default(
        gocept.amqprun.retry.RetryPolicy, argument)
        for argument, key in gocept.amqprun.config.RETRY_KEYS.items()})
    actual = {key: getattr(worker, key.replace('-', '_'))
              for key in expected}
    assert actual == expected
    # commit-mode transaction is Server(confirm=False).
    assert worker.commit_mode == 'transaction'
    assert signature_default(gocept.amqprun.server.Server, 'confirm') \
        is False
    with_default = {key for key, info in schema_keys('worker')
                    if info.getdefault() is not None}
    assert with_default <= set(expected) | SCHEMA_ONLY


def schema_keys(section):
    return list(gocept.amqprun.config.load_schema().gettype(section))


def test_schema_names_the_default_prefetch_of_the_server():
    description = ' '.join(dict(schema_keys('amqp-server'))[
        'prefetch'].description.split())
    assert (f'default {gocept.amqprun.server.DEFAULT_PREFETCH}, '
            f'{gocept.amqprun.server.DEFAULT_CONFIRM_PREFETCH} with '
            'commit-mode confirm') in description


def test_prefetch_of_worker_wins(tmp_path):
    config = load(tmp_path, server='  hostname h\n  prefetch 5\n',
                  worker='  prefetch 7\n')
    assert config.prefetch == 7


@pytest.mark.parametrize('component, hinted', [
    ('nosuchapp.handlers.answer', True),    # the package is not installed
    ('gocept.amqprun.handler.nonesuch', False),     # a wrong name
])
def test_missing_handler_module_says_how_to_make_it_importable(
        tmp_path, zca, component, hinted):
    config = load(tmp_path)
    (tmp_path / 'server.zcml').write_text(
        '<configure xmlns="http://namespaces.zope.org/zope">\n'
        '  <include package="gocept.amqprun" />\n'
        f'  <utility component="{component}" name="x" />\n</configure>\n')
    with pytest.raises(gocept.amqprun.config.ConfigError) as e:
        gocept.amqprun.config.load_components(config)
    message = str(e.value)
    assert message.startswith(f'{tmp_path}/server.zcml: ')
    hint = ('(The handler modules must be importable by '
            f'{sys.executable}: install their package')
    assert (hint in message) is hinted
def monitor_with_token(tmp_path, content, mode=0o600):
    token_file = tmp_path / 'token'
    token_file.write_bytes(content)
    token_file.chmod(mode)
    return dict(extra='<monitor>\n  address :0\n'
                f'  token-file {token_file}\n</monitor>\n')


def test_monitor_token_is_read_from_its_file(tmp_path):
    config = load(tmp_path, **monitor_with_token(tmp_path, b's3cret\n'))
    assert config.monitor.token == 's3cret'
    config = load(tmp_path, extra='<monitor>\n  address :0\n</monitor>\n')
    assert config.monitor.token is None


@pytest.mark.parametrize('content, mode, problem', [
    (b's3cret', 0o640, 'is accessible by group or others (mode 0640); a '
     'token file must be 0600 or stricter'),
    (b's3cret', 0o604, 'is accessible by group or others (mode 0604)'),
    (b'\n  \n', 0o600, 'is empty: it must hold the token'),
    (b'two words', 0o400, 'the token must be one word'),
])
def test_monitor_token_file_must_be_private_and_not_empty(
        tmp_path, content, mode, problem):
    message = error(tmp_path, **monitor_with_token(tmp_path, content, mode))
    assert message.startswith(
        'FILE, line 11, section <monitor>, key token-file: ')
    assert problem in message
    assert 's3cret' not in message


def test_monitor_token_file_must_exist(tmp_path):
    message = error(tmp_path, extra='<monitor>\n  address :0\n'
                    f'  token-file {tmp_path}/nonesuch\n</monitor>\n')
    assert message.startswith('FILE, line 11, section <monitor>, key '
                              'token-file: ')
