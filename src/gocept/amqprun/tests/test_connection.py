import gocept.amqprun.connection
import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.server
import gocept.amqprun.testing
import pytest
import threading


Parameters = gocept.amqprun.connection.Parameters


def test_parameters_defaults_and_string_port():
    params = Parameters(hostname='localhost', port='5673')
    assert params.port == 5673
    assert params.virtual_host == '/'
    assert params.heartbeat_interval == 60
    [pika_params] = params.pika_parameters()
    assert pika_params.port == 5673
    assert pika_params.heartbeat == 60
    assert pika_params.blocked_connection_timeout == 300


def test_parameters_unknown_keyword_is_an_error():
    with pytest.raises(TypeError, match='hostnme'):
        Parameters(hostnme='localhost')


def test_parameters_need_hostname_or_url():
    with pytest.raises(ValueError):
        Parameters()


def test_several_hosts_are_tried_in_order():
    params = Parameters(hostname='a b:5673, c', port=5672)
    assert [(p.host, p.port) for p in params.pika_parameters()] == [
        ('a', 5672), ('b', 5673), ('c', 5672)]
    assert params.describe() == (
        'amqp://guest@a:5672/%2F, amqp://guest@b:5673/%2F, '
        'amqp://guest@c:5672/%2F')


def test_url_parameters_keep_url_options():
    params = Parameters(
        url='amqp://user:secret@host:1234/vhost?heartbeat=7')
    [p] = params.pika_parameters()
    assert (p.host, p.port, p.virtual_host) == ('host', 1234, 'vhost')
    assert p.credentials.username == 'user'
    assert p.heartbeat == 7
    assert 'secret' not in params.describe()
    assert 'secret' not in repr(params)


def test_ssl_uses_tls_port_and_verifies():
    params = Parameters(hostname='broker', ssl=True)
    [p] = params.pika_parameters()
    assert p.port == 5671
    assert p.ssl_options.context.check_hostname
    assert p.ssl_options.server_hostname == 'broker'
    assert params.describe() == 'amqps://guest@broker:5671/%2F'


def test_wrong_credentials_fail_with_clear_error(amqp_parameters):
    params = Parameters(hostname=amqp_parameters.hostname,
                        port=amqp_parameters.port, username='nobody',
                        password='wrong-secret', connection_attempts=5)
    connection = gocept.amqprun.connection.Connection(params)
    with pytest.raises(gocept.amqprun.connection.ConnectionFailed,
                       match='refused the credentials') as info:
        connection.run()
    assert 'after 1 attempt(s)' in str(info.value)
    assert 'wrong-secret' not in str(info.value)


def test_unknown_vhost_fails_with_clear_error(amqp_parameters):
    params = Parameters(hostname=amqp_parameters.hostname,
                        port=amqp_parameters.port,
                        virtual_host='no-such-vhost')
    connection = gocept.amqprun.connection.Connection(params)
    with pytest.raises(gocept.amqprun.connection.ConnectionFailed,
                       match='virtual host'):
        connection.run()


def test_close_before_run_returns_at_once(amqp_parameters):
    connection = gocept.amqprun.connection.Connection(amqp_parameters)
    connection.close()
    connection.run()  # returns instead of running forever
    connection.cancel_consumers()


def test_stale_epoch_is_refused_locally(amqp_parameters):
    connection = gocept.amqprun.connection.Connection(amqp_parameters)
    slot = connection.acquire_sender()
    with pytest.raises(gocept.amqprun.connection.ChannelLost):
        slot.commit(epoch=slot.epoch + 1)


def test_deleted_queue_is_redeclared_and_consumed_again(
        amqp_parameters, amqp_client, zca, name_prefix, caplog):
    handled = []

    @gocept.amqprun.handler.declare(f'{name_prefix}.in', f'{name_prefix}.in')
    def handle(message):
        handled.append(message.body)
    zca.registerUtility(handle, gocept.amqprun.interfaces.IHandler, 'h')
    amqp_client.forget(f'{name_prefix}.in')
    amqp_client.forget(f'{name_prefix}.in.parked')
    amqp_client.forget(f'{name_prefix}.in.retry')
    server = gocept.amqprun.server.Server(
        gocept.amqprun.testing.environment_parameters(retry_delay=0.1),
        workers=2)
    runner = gocept.amqprun.testing.ServerThread(server).start()
    try:
        amqp_client.channel.queue_delete(f'{name_prefix}.in')
        gocept.amqprun.testing.wait_for(
            lambda: amqp_client.exists(f'{name_prefix}.in'), timeout=20)
        assert server.wait_until_running(20)
        amqp_client.send(f'{name_prefix}.in', b'after')
        gocept.amqprun.testing.wait_for(lambda: handled == [b'after'])
        assert 'the broker cancelled consuming' in caplog.text
    finally:
        runner.stop()


def test_commit_after_channel_loss_raises_channel_lost(
        amqp_parameters, amqp_client, zca, name_prefix):
    """A handler still running when its channel goes: its commit fails and
    the broker redelivers the message (never acked on a new channel)."""
    release = threading.Event()
    seen = []

    @gocept.amqprun.handler.declare(f'{name_prefix}.in', f'{name_prefix}.in')
    def handle(message):
        seen.append(message.body)
        if len(seen) == 1:
            release.wait(20)
        return [gocept.amqprun.message.Message(
            {}, message.body, routing_key=f'{name_prefix}.out')]
    zca.registerUtility(handle, gocept.amqprun.interfaces.IHandler, 'h')
    for suffix in ('in', 'in.parked', 'in.retry'):
        amqp_client.forget(f'{name_prefix}.{suffix}')
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    server = gocept.amqprun.server.Server(
        gocept.amqprun.testing.environment_parameters(retry_delay=0.1),
        workers=1)
    runner = gocept.amqprun.testing.ServerThread(server).start()
    try:
        amqp_client.send(f'{name_prefix}.in', b'once')
        gocept.amqprun.testing.wait_for(lambda: seen)
        # Deleting the queue makes the daemon reconnect; the running
        # handler's delivery belongs to the old channel.
        amqp_client.channel.queue_delete(f'{name_prefix}.in')
        gocept.amqprun.testing.wait_for(
            lambda: amqp_client.exists(f'{name_prefix}.in'), timeout=20)
        release.set()
        assert server.wait_until_running(20)
        amqp_client.send(f'{name_prefix}.in', b'twice')
        assert amqp_client.wait(out).body == b'twice'
        assert amqp_client.get(out) is None
    finally:
        release.set()
        runner.stop()
