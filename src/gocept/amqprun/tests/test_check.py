"""The `check` command against the real broker."""

import subprocess
import sys

import pytest

import gocept.amqprun.parameters
import gocept.amqprun.check
import gocept.amqprun.connection
import gocept.amqprun.testing


HANDLERS = """\
    import gocept.amqprun.handler

    @gocept.amqprun.handler.declare(
        '{p}.in', ['{p}.a', '{p}.b'], arguments={{'x-max-length': 10}},
        principal='alice')
    def first(message):
        return []

    @gocept.amqprun.handler.declare('{p}.in', '{p}.c')
    def second(message):
        return []
"""


@pytest.fixture
def configure(tmp_path, amqp_parameters, zca, monkeypatch):
    """Write a configuration (server.conf, server.zcml, handlers.py);
    return the path of server.conf. The check imports `handlers`."""
    monkeypatch.delitem(sys.modules, 'handlers', raising=False)
    made = []

    def factory(prefix, zcml, parameters=amqp_parameters, handlers=HANDLERS,
                **kw):
        directory = tmp_path / f'conf{len(made)}'
        process = gocept.amqprun.testing.ServerProcess(
            directory, parameters, handlers=handlers.format(p=prefix),
            zcml=zcml, **kw)
        monkeypatch.syspath_prepend(str(directory))
        made.append(process)
        return process.config
    yield factory
    sys.modules.pop('handlers', None)


def run_check(capsys, *args):
    code = gocept.amqprun.check.main([str(a) for a in args])
    return code, capsys.readouterr().out


FIRST = '<utility component="handlers.first" name="first" />'
SECOND = '<utility component="handlers.second" name="second" />'


def test_before_the_first_start_lists_queues_that_will_be_created(
        configure, capsys, amqp_client, name_prefix):
    config = configure(name_prefix, FIRST)
    code, out = run_check(capsys, config)
    assert code == 0, out
    assert 'first\n' in out
    assert 'server.zcml", line 4' in out
    assert f'queue: {name_prefix}.in' in out
    assert f'routing keys: {name_prefix}.a, {name_prefix}.b' in out
    assert "arguments: {'x-max-length': 10}" in out
    assert 'principal: alice' in out
    assert '  exchange amq.topic: ok\n' in out
    assert (f'  {name_prefix}.in: will be created and bound to amq.topic '
            f'with {name_prefix}.a, {name_prefix}.b when the daemon '
            'starts\n') in out
    for suffix in ('retry', 'parked', 'quarantine'):
        assert (f'  {name_prefix}.in.{suffix}: will be created when the '
                'daemon starts\n') in out
    assert 'ERROR' not in out and 'WARNING' not in out
    assert out.endswith('OK.\n')
    # Passive: the check created nothing.
    assert not amqp_client.exists(f'{name_prefix}.in')
    assert not amqp_client.exists(f'{name_prefix}.in.retry')


def test_agrees_with_what_the_daemon_declared(
        configure, capsys, amqp_client, name_prefix, server_process):
    zcml = FIRST
    config = configure(name_prefix, zcml)
    process = server_process(
        handlers=HANDLERS.format(p=name_prefix), zcml=zcml)
    for suffix in ('', '.retry', '.parked', '.quarantine'):
        amqp_client.forget(f'{name_prefix}.in{suffix}')
    assert process.stop() == 0
    code, out = run_check(capsys, config)
    assert out.endswith('OK.\n'), out
    assert code == 0
    assert f'{name_prefix}.in: ok (0 message(s), 0 consumer(s))' in out
    assert 'will be created' not in out


def test_reports_different_arguments_without_changing_the_queue(
        configure, capsys, amqp_client, name_prefix):
    config = configure(name_prefix, FIRST, worker_extra='  retries 0\n')
    amqp_client.declare(f'{name_prefix}.in', arguments={'x-max-length': 5})
    amqp_client.declare(f'{name_prefix}.in.parked')
    amqp_client.declare(f'{name_prefix}.in.quarantine')
    amqp_client.send(f'{name_prefix}.x', b'')  # nothing bound: no-op
    code, out = run_check(capsys, config)
    assert code == 1
    assert (f"ERROR: {name_prefix}.in: differs from the declaration with "
            "arguments {'x-max-length': 10}: 406 PRECONDITION_FAILED") in out
    assert f'{name_prefix}.in.parked: ok' in out
    assert '1 problem(s).' in out
    # The queue kept its arguments: our own declaration still agrees.
    amqp_client.channel.queue_declare(
        f'{name_prefix}.in', durable=True, arguments={'x-max-length': 5})


def test_reports_duplicate_queues_with_file_and_line(
        configure, capsys, name_prefix):
    config = configure(name_prefix, f'{FIRST}\n{SECOND}')
    code, out = run_check(capsys, config)
    assert code == 1
    assert f"ERROR: queue '{name_prefix}.in' is consumed by 2 handlers:" \
        in out
    assert 'first (File "' in out and 'server.zcml", line 4.' in out
    assert 'second (File "' in out and 'server.zcml", line 5.' in out
    assert 'Broker:' not in out


def test_configuration_error_names_file_and_line(
        configure, capsys, name_prefix):
    config = configure(name_prefix, FIRST, worker_extra='  bogus 1\n')
    lines = config.read_text().splitlines()
    number = lines.index('  bogus 1') + 1
    code, out = run_check(capsys, config)
    assert code == 2
    assert f'{config}, line {number}, section <worker>, key bogus:' in out


def test_zcml_error_names_file_and_line(configure, capsys, name_prefix):
    config = configure(
        name_prefix, '<utility component="handlers.nonesuch" name="x" />')
    code, out = run_check(capsys, config)
    assert code == 2
    assert 'server.zcml' in out
    assert 'line 4' in out
    assert 'nonesuch' in out


def test_unreachable_broker_is_a_problem(configure, capsys, name_prefix):
    params = gocept.amqprun.parameters.Parameters(
        hostname='127.0.0.1', port=gocept.amqprun.testing.free_port())
    config = configure(name_prefix, FIRST, parameters=params)
    code, out = run_check(capsys, config)
    assert code == 1
    assert 'ERROR: Cannot connect to amqp://guest@127.0.0.1:' in out
    assert out.endswith('1 problem(s).\n')


def test_usage_error(capsys):
    assert gocept.amqprun.check.main([]) == 2


@pytest.mark.parametrize('command', [
    ['-m', 'gocept.amqprun', 'check'],
    ['-c', 'import gocept.amqprun.main as m; m.main()', '--check'],
])
def test_command_lines(configure, name_prefix, command):
    config = configure(name_prefix, FIRST)
    result = subprocess.run(
        [sys.executable, *command, str(config), '--no-connect'],
        cwd=config.parent, capture_output=True, text=True, timeout=60,
        env={'PYTHONPATH': ':'.join([str(config.parent)] + sys.path)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f'queue: {name_prefix}.in' in result.stdout
    assert 'OK.' in result.stdout


def test_names_the_monitor_and_suggests_known_keys(
        configure, capsys, name_prefix):
    config = configure(name_prefix, FIRST,
                       extra='<monitor>\n  address :8410\n</monitor>\n')
    code, out = run_check(capsys, config, '--no-connect')
    assert code == 0
    assert ('Monitor: *:8410 (/, /metrics, /healthz, /readyz, /parked, '
            '/parked/ID, POST /parked/replay, POST /parked/drop; no '
            'token-file: POST refused)\n') in out
    config.write_text(config.read_text().replace('address', 'adress'))
    code, out = run_check(capsys, config, '--no-connect')
    assert code == 2
    assert "'adress' is not a known key name; did you mean address?" in out


def test_parked_messages_are_a_warning(
        configure, capsys, amqp_client, name_prefix):
    config = configure(name_prefix, FIRST)
    parked = amqp_client.declare(f'{name_prefix}.in.parked')
    for body in (b'1', b'2'):
        amqp_client.channel.basic_publish('', parked, body)
    gocept.amqprun.testing.wait_for(lambda: amqp_client.count(parked) == 2)
    code, out = run_check(capsys, config)
    assert code == 0, out
    assert (f'  WARNING: {name_prefix}.in.parked: 2 parked message(s) '
            'wait') in out
    assert out.endswith('1 warning(s).\nOK.\n')


DEAD_LETTERING = """\
    import gocept.amqprun.handler

    @gocept.amqprun.handler.declare('{p}.dl', '{p}.dl', arguments={{
        'x-dead-letter-exchange': '{p}.dlx'}})
    def first(message):
        return []
"""


def test_missing_dead_letter_exchange_is_a_problem(
        configure, capsys, amqp_client, name_prefix):
    config = configure(name_prefix, FIRST, handlers=DEAD_LETTERING)
    code, out = run_check(capsys, config)
    assert code == 1, out
    assert (f"  ERROR: exchange '{name_prefix}.dlx' does not exist (the "
            f"x-dead-letter-exchange of queue '{name_prefix}.dl')\n") in out
    assert '  exchange amq.topic: ok\n' in out
    amqp_client.channel.exchange_declare(f'{name_prefix}.dlx', 'fanout')
    try:
        code, out = run_check(capsys, config)
        assert code == 0, out
        assert f'  exchange {name_prefix}.dlx: ok\n' in out
    finally:
        amqp_client.channel.exchange_delete(f'{name_prefix}.dlx')
