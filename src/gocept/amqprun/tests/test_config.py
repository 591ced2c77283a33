"""Configuration errors: where they are and what was meant."""

import sys

import pytest

import gocept.amqprun.config


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
    (dict(worker='  progress-interval -5\n'),
     'FILE, line 8, section <worker>, key progress-interval: must be at '
     'least 0, not -5.0'),
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
    assert config.prefetch is None
    assert config.parameters.hostname == 'localhost'


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
