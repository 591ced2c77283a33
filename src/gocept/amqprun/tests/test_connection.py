import threading

import pytest

import gocept.amqprun.connection
import gocept.amqprun.errors
import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.parameters
import gocept.amqprun.server
import gocept.amqprun.testing


Parameters = gocept.amqprun.parameters.Parameters


def test_wrong_credentials_fail_with_clear_error(amqp_parameters):
    params = Parameters(hostname=amqp_parameters.hostname,
                        port=amqp_parameters.port, username='nobody',
                        password='wrong-secret', connection_attempts=5)
    connection = gocept.amqprun.connection.Connection(params)
    # Refused (a ConnectionFailed): the daemon exits 2, not restarted.
    with pytest.raises(gocept.amqprun.errors.Refused,
                       match='refused the credentials') as info:
        connection.run()
    assert 'after 1 attempt(s)' in str(info.value)
    assert 'wrong-secret' not in str(info.value)


def test_unknown_vhost_fails_with_clear_error(amqp_parameters):
    params = Parameters(hostname=amqp_parameters.hostname,
                        port=amqp_parameters.port,
                        virtual_host='no-such-vhost')
    connection = gocept.amqprun.connection.Connection(params)
    with pytest.raises(gocept.amqprun.errors.Refused,
                       match='virtual host'):
        connection.run()


def test_close_before_run_returns_at_once(amqp_parameters):
    connection = gocept.amqprun.connection.Connection(amqp_parameters)
    connection.close()
    runner = threading.Thread(target=connection.run, daemon=True)
    runner.start()
    runner.join(5)
    assert not runner.is_alive(), 'run() did not return after close()'
    assert connection.wait_until_stopped(0)
    connection.cancel_consumers(timeout=5)   # returns at once: not running


def test_stale_epoch_is_refused_locally(amqp_parameters):
    connection = gocept.amqprun.connection.Connection(amqp_parameters)
    slot = connection.acquire_sender()
    with pytest.raises(gocept.amqprun.errors.ChannelLost):
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
    amqp_client.forget(f'{name_prefix}.in.quarantine')
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
        amqp_parameters, amqp_client, zca, name_prefix, caplog):
    """A handler still running when its connection goes: its commit fails
    with ChannelLost (never acked on the new channel) and the broker
    redelivers the message, which is then answered once."""
    release = threading.Event()
    seen = []

    @gocept.amqprun.handler.declare(f'{name_prefix}.in', f'{name_prefix}.in')
    def handle(message):
        seen.append((message.body, message.redelivered))
        if len(seen) == 1:
            release.wait(20)
        return [gocept.amqprun.message.Message(
            {}, message.body, routing_key=f'{name_prefix}.out')]
    zca.registerUtility(handle, gocept.amqprun.interfaces.IHandler, 'h')
    for suffix in ('in', 'in.parked', 'in.retry', 'in.quarantine'):
        amqp_client.forget(f'{name_prefix}.{suffix}')
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    proxy = gocept.amqprun.testing.Proxy.to(amqp_parameters)
    server = gocept.amqprun.server.Server(
        proxy.parameters(retry_delay=0.1), workers=1)
    runner = gocept.amqprun.testing.ServerThread(server).start()
    try:
        amqp_client.send(f'{name_prefix}.in', b'once')
        gocept.amqprun.testing.wait_for(lambda: seen)
        assert proxy.cut() == 1
        gocept.amqprun.testing.wait_for(lambda: proxy.connections == 1)
        assert server.wait_until_running(20)
        release.set()
        assert amqp_client.wait(out).body == b'once'
        assert seen == [(b'once', False), (b'once', True)]
        assert amqp_client.get(out) is None
        assert 'ChannelLost' in caplog.text
    finally:
        release.set()
        runner.stop()
        proxy.stop()
