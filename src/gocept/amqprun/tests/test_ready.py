"""`server ready`: asks the daemon of a configuration for its /readyz."""

import pytest

import gocept.amqprun.cli
import gocept.amqprun.ready
import gocept.amqprun.testing


def ready(capsys, *args):
    code = gocept.amqprun.cli.run_command('ready', [str(a) for a in args])
    return code, capsys.readouterr().out


@pytest.fixture
def daemon(server_process, name_prefix):
    """A factory of ServerProcesses with a <monitor> on a free port."""
    def factory(**kw):
        port = gocept.amqprun.testing.free_port()
        return server_process(
            handlers=f'''
import gocept.amqprun.handler
h = gocept.amqprun.handler.declare('{name_prefix}.q', 'k')(print)
''', zcml='<utility component="handlers.h" name="h" />',
            extra=f'<monitor>\n  address 127.0.0.1:{port}\n</monitor>\n',
            **kw), port
    return factory


def test_ready_while_the_daemon_consumes(daemon, capsys, amqp_client,
                                         name_prefix):
    process, port = daemon()
    for suffix in ('', '.retry', '.parked', '.quarantine'):
        amqp_client.forget(f'{name_prefix}.q{suffix}')
    code, out = ready(capsys, process.config)
    assert code == 0
    assert out == f'http://127.0.0.1:{port}/readyz: ready\n'
    assert process.stop() == 0
    code, out = ready(capsys, process.config)
    assert code == 1
    assert out.startswith(f'http://127.0.0.1:{port}/readyz: no answer (')


def test_wait_until_the_daemon_consumes(daemon, capsys, amqp_client,
                                        name_prefix):
    process, port = daemon(start=False)
    for suffix in ('', '.retry', '.parked', '.quarantine'):
        amqp_client.forget(f'{name_prefix}.q{suffix}')
    process.start(wait=False)
    code, out = ready(capsys, '--wait', 60, process.config)
    assert code == 0, out
    assert 'Started.' in process.log_text()
    assert process.stop() == 0


def test_not_ready_names_the_reason(daemon, capsys):
    # The broker refuses nothing but is not there: the daemon runs its
    # monitor and tries to connect.
    nobody = gocept.amqprun.parameters.Parameters(
        hostname='127.0.0.1', port=gocept.amqprun.testing.free_port())
    process, port = daemon(
        start=False, parameters=nobody,
        server_extra='  connection_attempts 1000\n  retry_delay 0.2\n')
    process.start(wait=False)
    process.wait_for_log('Monitoring on', timeout=30)
    code, out = ready(capsys, '--wait', 0.6, process.config)
    assert code == 1
    assert out == (f'http://127.0.0.1:{port}/readyz: 503: not ready: not '
                   'connected to the broker\n')


def test_without_monitor_or_with_a_broken_config(tmp_path, capsys):
    zcml = tmp_path / 'server.zcml'
    zcml.write_text('<configure />\n')
    conf = tmp_path / 'server.conf'
    conf.write_text('<eventlog>\n</eventlog>\n<amqp-server>\n'
                    '  hostname localhost\n</amqp-server>\n<worker>\n'
                    f'  component-configuration {zcml}\n</worker>\n')
    code, out = ready(capsys, conf)
    assert code == 2
    assert out == (f'ERROR: {conf} has no <monitor> section: there is '
                   'nobody to ask\n')
    conf.write_text(conf.read_text().replace('hostname', 'hostnme'))
    code, out = ready(capsys, conf)
    assert code == 2
    assert out.startswith(f'ERROR: {conf}, line 4, section <amqp-server>')


@pytest.mark.parametrize('address, url', [
    (('127.0.0.1', 8410), 'http://127.0.0.1:8410/readyz'),
    (('', 8410), 'http://127.0.0.1:8410/readyz'),
    (('0.0.0.0', 1), 'http://127.0.0.1:1/readyz'),
    (('::', 8410), 'http://[::1]:8410/readyz'),
    (('::1', 8410), 'http://[::1]:8410/readyz'),
    (('host.example', 80), 'http://host.example:80/readyz'),
])
def test_readyz_url(address, url):
    assert gocept.amqprun.ready.readyz_url(address) == url
