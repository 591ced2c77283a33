"""`transport.batch_writes` relies on pika internals: these tests fail
loudly when pika changes them."""

import collections
import os
import socket
import threading

import pika
import pika.adapters.utils.io_services_utils as io_services_utils

import gocept.amqprun.connection
import gocept.amqprun.transport


def test_pika_plaintext_transport_has_what_batch_writes_replaces():
    cls = getattr(io_services_utils, gocept.amqprun.transport.CLASS_NAME)
    # The method replaced and the base class method it replaces.
    assert callable(cls._produce)
    assert cls._produce.__qualname__ == '_AsyncTransportBase._produce'


def test_pika_rejects_deliveries_of_consumers_being_cancelled_by_a_set():
    # channel.Slot cancels consumers and takes the tag out of this set,
    # so that their late deliveries are not rejected by pika.
    import inspect
    import pika.channel
    source = inspect.getsource(pika.channel.Channel._on_deliver)
    assert 'consumer_tag in self._cancelled' in source
    assert 'self.basic_reject(' in source
    assert '_cancelled.add(consumer_tag)' in inspect.getsource(
        pika.channel.Channel.basic_cancel)


def run_select_connection(parameters, on_channel, timeout=20):
    """Open a pika SelectConnection with writes batched; call
    `on_channel(connection, channel, done)`; run until `done()`."""
    result = {}
    [params] = parameters.pika_parameters()

    def on_open(connection):
        transport = connection._transport
        result['applies'] = gocept.amqprun.transport.applies(transport)
        result['buffers'] = type(getattr(transport, '_tx_buffers', None))
        result['count'] = type(
            getattr(transport, '_tx_buffered_byte_count', None))
        result['sock'] = type(getattr(transport, '_sock', None))
        result['batched'] = gocept.amqprun.transport.batch_writes(connection)
        connection.channel(on_open_callback=lambda ch: on_channel(
            connection, ch, connection.close))

    def on_error(connection, error):
        result['error'] = error
        connection.ioloop.stop()

    connection = pika.SelectConnection(
        params, on_open_callback=on_open, on_open_error_callback=on_error,
        on_close_callback=lambda c, reason: c.ioloop.stop())
    timer = connection.ioloop.call_later(timeout, connection.ioloop.stop)
    connection.ioloop.start()
    connection.ioloop.remove_timeout(timer)
    assert 'error' not in result, result
    return result


def test_batched_writes_carry_large_and_many_frames_intact(
        amqp_parameters, amqp_client, name_prefix):
    queue = amqp_client.declare(f'{name_prefix}.q', [f'{name_prefix}.q'])
    big = os.urandom(8 * 1024 * 1024)     # far beyond a socket buffer
    small = [b'%06d' % i for i in range(2000)]

    def publish(connection, channel, done):
        channel.basic_publish('', queue, big)
        for body in small:
            channel.basic_publish('', queue, body)
        channel.confirm_delivery(
            lambda frame: None,
            callback=lambda frame: channel.queue_declare(
                queue, passive=True, callback=lambda frame: done()))
    result = run_select_connection(amqp_parameters, publish)
    assert result['applies'] and result['batched']
    assert result['buffers'] is collections.deque
    assert result['count'] is int
    assert issubclass(result['sock'], socket.socket)
    received = amqp_client.wait_many(queue, 2001)
    assert received[0].body == big
    assert [m.body for m in received[1:]] == small


def test_a_daemon_connection_is_batched(amqp_parameters):
    connection = gocept.amqprun.connection.Connection(amqp_parameters)
    runner = threading.Thread(target=connection.run, daemon=True)
    runner.start()
    try:
        assert connection.wait_until_ready(20)
        transport = connection._pika._transport
        assert gocept.amqprun.transport.applies(transport)
        assert transport._produce.__func__.__qualname__ == (
            'batch_writes.<locals>._produce')
    finally:
        connection.close()
        runner.join(10)
