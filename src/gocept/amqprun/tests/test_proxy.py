"""The fault-injecting proxies of gocept.amqprun.testing, against the real
broker: `Proxy` forwards and cuts, `AMQPProxy` cuts at exact protocol steps.

Every test through a proxy is bounded: a watchdog cuts the proxy's
connections after WATCHDOG seconds, so a blocked pika call ends in a
connection error (and the test fails on its assertions).
"""

import threading

import pika
import pika.exceptions
import pytest

import gocept.amqprun.testing
from gocept.amqprun.testing import AMQPProxy
from gocept.amqprun.testing import BASIC_ACK
from gocept.amqprun.testing import BASIC_GET_OK
from gocept.amqprun.testing import BASIC_PUBLISH
from gocept.amqprun.testing import CONFIRM_SELECT
from gocept.amqprun.testing import Client
from gocept.amqprun.testing import FrameReader
from gocept.amqprun.testing import Proxy
from gocept.amqprun.testing import TO_BROKER
from gocept.amqprun.testing import TO_CLIENT
from gocept.amqprun.testing import TX_COMMIT
from gocept.amqprun.testing import TX_COMMIT_OK
from gocept.amqprun.testing import TX_SELECT
from gocept.amqprun.testing import wait_for


WATCHDOG = 30
ConnectionLost = pika.exceptions.AMQPConnectionError


@pytest.fixture
def proxy(amqp_parameters):
    """An AMQPProxy to the test broker, cut by a watchdog after WATCHDOG
    seconds."""
    proxy = AMQPProxy.to(amqp_parameters)
    watchdog = threading.Timer(WATCHDOG, proxy.cut)
    watchdog.daemon = True
    watchdog.start()
    yield proxy
    watchdog.cancel()
    proxy.stop()


@pytest.fixture
def connect(proxy):
    """A factory of `Client`s connected through `proxy`, closed after."""
    clients = []

    def factory():
        clients.append(Client(proxy.parameters()))
        return clients[-1]
    yield factory
    for client in clients:
        client.close()


@pytest.fixture
def queue(amqp_client, name_prefix):
    """A queue on the broker, deleted after the test."""
    return amqp_client.declare(f'{name_prefix}.q')


def publish(client, queue, body=b'x'):
    client.channel.basic_publish('', queue, body)


def commit_is_cut(channel, rule):
    """Commit on `channel`: `rule` cuts the connection."""
    with pytest.raises(ConnectionLost):
        channel.tx_commit()
    assert rule.fired.wait(10)


def consumers(client, queue):
    return client.channel.queue_declare(
        queue, passive=True).method.consumer_count


def frame(kind, channel, payload):
    return (bytes([kind]) + channel.to_bytes(2, 'big')
            + len(payload).to_bytes(4, 'big') + payload + b'\xce')


# Proxy and AMQPProxy alike


@pytest.mark.parametrize('factory', [Proxy, AMQPProxy])
def test_proxy_forwards_and_cuts(
        factory, amqp_parameters, amqp_client, name_prefix):
    proxy = factory.to(amqp_parameters)
    try:
        client = Client(proxy.parameters())
        try:
            queue = client.declare(f'{name_prefix}.in', [f'{name_prefix}.in'])
            # This client's connection is cut: the fixture's deletes it.
            amqp_client.forget(queue)
            big = bytes(range(256)) * (5 * 4096)    # 5 MiB, both ways
            client.send(queue, big)
            assert client.wait(queue).body == big
            assert proxy.accepted == 1
            assert proxy.connections == 1
            assert proxy.cut() == 1
            assert proxy.connections == 0
            with pytest.raises(pika.exceptions.AMQPConnectionError):
                client.send(queue, b'lost')
                client.count(queue)
        finally:
            client.close()
        # New connections pass again.
        client = Client(proxy.parameters())
        try:
            client.send(queue, b'again')
            assert client.wait(queue).body == b'again'
            assert proxy.accepted == 2
        finally:
            client.close()
    finally:
        proxy.stop()
    assert not gocept.amqprun.testing.port_open('127.0.0.1', proxy.port)


# Frames


def test_frame_reader_splits_a_stream_however_it_is_read():
    header = b'AMQP\x00\x00\x09\x01'
    frames = [
        frame(1, 0, b'\x00\x0a\x00\x0b' + b'start-ok'),
        frame(1, 1, b'\x00\x5a\x00\x14'),               # Tx.Commit
        frame(1, 2, b'\x00\x3c\x00\x28' + b'publish'),
        frame(2, 2, b'\x00\x3c' + bytes(12)),            # content header
        frame(3, 2, bytes(range(256)) * 300),            # body
        frame(8, 0, b''),                                # heartbeat
    ]
    stream = header + b''.join(frames)
    expected = [(header, None, None)] + [
        (f, int.from_bytes(f[1:3], 'big'),
         (int.from_bytes(f[7:9], 'big'), int.from_bytes(f[9:11], 'big'))
         if f[0] == 1 else None)
        for f in frames]
    assert expected[2][1:] == (1, TX_COMMIT)
    for size in (1, 3, 7, 8, 1000, len(stream)):
        reader = FrameReader(header=True)
        units = []
        for start in range(0, len(stream), size):
            units.extend(reader.feed(stream[start:start + size]))
        assert units == expected, size
        assert not reader.opaque


def test_frame_reader_passes_what_is_not_amqp_0_9_1_unparsed():
    # The broker answers a wrong protocol header with its own.
    reader = FrameReader()
    reply = b'AMQP\x00\x00\x09\x01'
    assert reader.feed(reply) == [(reply, None, None)]
    assert reader.opaque
    assert reader.feed(b'\x01') == [(b'\x01', None, None)]
    # A wrong frame end.
    reader = FrameReader()
    good = frame(8, 0, b'')
    assert reader.feed(good + good[:-1] + b'\x00') == [
        (good, 0, None), (good[:-1] + b'\x00', None, None)]
    assert reader.opaque
    # Another protocol's header from the client.
    reader = FrameReader(header=True)
    assert reader.feed(b'AMQP\x01\x01\x00\x0a' + good) == [
        (b'AMQP\x01\x01\x00\x0a', None, None), (good, None, None)]


def test_arm_refuses_what_would_never_match(proxy):
    with pytest.raises(TypeError):
        proxy.arm([TX_COMMIT, TX_COMMIT_OK])
    with pytest.raises(TypeError):
        proxy.arm()
    with pytest.raises(ValueError):
        proxy.arm(TX_COMMIT, cut='during')
    with pytest.raises(ValueError):
        proxy.arm(TX_COMMIT, direction='client')
    with pytest.raises(ValueError):
        proxy.arm(TX_COMMIT, nth=0)


# AMQPProxy against the broker


def test_large_and_many_messages_pass_intact_both_ways(
        proxy, connect, amqp_client, queue):
    # Body frames are up to 128 KiB, the proxy reads up to 64 KiB at a
    # time: the large messages' frames are split across reads, the small
    # ones come several in a read.
    bodies = [bytes(range(256)) * (5 * 4096)]             # 5 MiB
    bodies += [b'small %d' % i for i in range(20)]
    bodies += [bytes(reversed(range(256))) * (3 * 4096)]  # 3 MiB
    client = connect()
    for body in bodies:
        publish(client, queue, body)
    received = [client.wait(queue).body for body in bodies]
    assert received == bodies
    assert proxy.seen(BASIC_PUBLISH, TO_BROKER) == len(bodies)
    assert proxy.seen(BASIC_GET_OK, TO_CLIENT) == len(bodies)


def test_cut_before_commit_makes_the_broker_roll_back(
        proxy, connect, amqp_client, queue):
    client = connect()
    # A consumer on the queue itself, on the committing channel: once the
    # broker dropped it, it has handled all the channel sent before.
    client.channel.basic_consume(queue, lambda *args: None)
    client.channel.tx_select()
    publish(client, queue)
    rule = proxy.arm(TX_COMMIT)
    commit_is_cut(client.channel, rule)
    assert rule.hit == (TO_BROKER, client.channel.channel_number, TX_COMMIT)
    assert proxy.seen(BASIC_PUBLISH, TO_BROKER) == 1
    assert proxy.seen(TX_COMMIT) == 0
    wait_for(lambda: consumers(amqp_client, queue) == 0)
    assert amqp_client.count(queue) == 0


def test_cut_before_commit_ok_leaves_the_commit_in_doubt(
        proxy, connect, amqp_client, queue):
    client = connect()
    client.channel.tx_select()
    publish(client, queue)
    rule = proxy.arm(TX_COMMIT_OK, direction=TO_CLIENT)
    commit_is_cut(client.channel, rule)
    assert proxy.seen(TX_COMMIT, TO_BROKER) == 1
    assert proxy.seen(TX_COMMIT_OK) == 0
    wait_for(lambda: amqp_client.count(queue) == 1)


def test_a_rule_fires_at_the_nth_match_counted_from_arming(
        proxy, connect, amqp_client, queue):
    client = connect()
    client.channel.tx_select()
    publish(client, queue)
    client.channel.tx_commit()              # before arming: not counted
    rule = proxy.arm(TX_COMMIT, nth=3)
    for i in range(2):
        publish(client, queue)
        client.channel.tx_commit()
        assert not rule.fired.is_set()
        assert rule.matched == i + 1
    publish(client, queue)
    commit_is_cut(client.channel, rule)
    assert proxy.seen(TX_COMMIT) == 3
    assert amqp_client.count(queue) == 3


def test_a_rule_may_match_one_channel_only(proxy, connect):
    client = connect()
    other = client.connection.channel()
    for channel in (client.channel, other):
        channel.tx_select()
    rule = proxy.arm(TX_COMMIT, channel=other.channel_number)
    client.channel.tx_commit()
    client.channel.tx_commit()
    assert not rule.fired.is_set()
    commit_is_cut(other, rule)
    assert rule.hit == (TO_BROKER, other.channel_number, TX_COMMIT)


def test_a_rule_may_pick_any_of_several_methods(
        proxy, connect, amqp_client, queue):
    client = connect()
    client.channel.tx_select()
    # Steps: Commit, Commit-Ok, Commit, Commit-Ok: the 4th is the second
    # transaction's Commit-Ok.
    rule = proxy.arm(TX_COMMIT, TX_COMMIT_OK, nth=4)
    publish(client, queue)
    client.channel.tx_commit()
    publish(client, queue)
    commit_is_cut(client.channel, rule)
    assert rule.hit == (TO_CLIENT, client.channel.channel_number,
                        TX_COMMIT_OK)
    wait_for(lambda: amqp_client.count(queue) == 2)


def test_seen_counts_the_method_frames_passed_on_per_direction(
        proxy, connect, amqp_client, queue):
    client = connect()
    assert proxy.seen(TX_SELECT) == 0
    client.channel.tx_select()
    for i in range(3):
        publish(client, queue)
    client.channel.tx_commit()
    client.channel.tx_commit()
    assert proxy.seen(TX_SELECT, TO_BROKER) == 1
    assert proxy.seen(BASIC_PUBLISH, TO_BROKER) == 3
    assert proxy.seen(BASIC_PUBLISH, TO_CLIENT) == 0
    assert proxy.seen(TX_COMMIT) == 2
    assert proxy.seen(TX_COMMIT_OK, TO_CLIENT) == 2
    assert proxy.seen(TX_COMMIT_OK, TO_BROKER) == 0
    # Basic.Ack goes both ways: publisher confirms and consumer acks.
    confirming = client.connection.channel()
    confirming.confirm_delivery()
    confirming.basic_publish('', queue, b'confirmed')
    assert proxy.seen(CONFIRM_SELECT, TO_BROKER) == 1
    assert proxy.seen(BASIC_ACK, TO_CLIENT) == 1
    assert proxy.seen(BASIC_ACK, TO_BROKER) == 0
    method, _, _ = confirming.basic_get(queue)
    confirming.basic_ack(method.delivery_tag)
    wait_for(lambda: proxy.seen(BASIC_ACK, TO_BROKER) == 1)
    assert proxy.seen(BASIC_ACK) == 2


@pytest.mark.parametrize('cut, left', [('after', 0), ('before', 1)])
def test_cut_after_passes_the_frame_on_cut_before_drops_it(
        cut, left, proxy, connect, amqp_client, queue):
    publish(amqp_client, queue, b'to ack')
    client = connect()
    method, _, body = next(client.channel.consume(
        queue, inactivity_timeout=10))
    assert body == b'to ack'
    rule = proxy.arm(BASIC_ACK, direction=TO_BROKER, cut=cut)
    # A publisher confirm is a Basic.Ack too, but to the client.
    confirming = client.connection.channel()
    confirming.confirm_delivery()
    confirming.basic_publish('', amqp_client.declare(f'{queue}.2'), b'')
    assert proxy.seen(BASIC_ACK, TO_CLIENT) == 1
    assert not rule.fired.is_set()
    client.channel.basic_ack(method.delivery_tag)
    assert rule.fired.wait(10)
    assert proxy.connections == 0   # fired means: the cut is done
    with pytest.raises(ConnectionLost):
        client.channel.basic_qos(prefetch_count=1)
    # Once the consumer is gone, the broker has requeued the message,
    # unless the ACK reached it.
    wait_for(lambda: consumers(amqp_client, queue) == 0)
    assert amqp_client.count(queue) == left
    assert proxy.seen(BASIC_ACK, TO_BROKER) == 1 - left


def test_cut_after_a_large_transaction_passes_all_of_it_on(
        proxy, connect, amqp_client, queue):
    client = connect()
    client.channel.tx_select()
    big = bytes(range(256)) * (8 * 4096)    # 8 MiB
    for i in range(3):
        publish(client, queue, big)
    rule = proxy.arm(TX_COMMIT, cut='after')
    commit_is_cut(client.channel, rule)
    wait_for(lambda: amqp_client.count(queue) == 3)
    assert amqp_client.get(queue).body == big


def test_rules_span_connections_and_new_connections_pass(
        proxy, connect, amqp_client, queue):
    first, second = connect(), connect()
    for client in (first, second):
        client.channel.tx_select()
    rule = proxy.arm(TX_COMMIT, nth=2)
    first.channel.tx_commit()
    commit_is_cut(second.channel, rule)
    assert proxy.connections == 1       # only the second one was cut
    first.channel.tx_commit()
    third = connect()
    third.channel.tx_select()
    publish(third, queue)
    third.channel.tx_commit()
    assert amqp_client.count(queue) == 1
