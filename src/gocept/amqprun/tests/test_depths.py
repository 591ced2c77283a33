"""Queue depths read from the real broker."""

import logging

import pytest

import gocept.amqprun.depths
import gocept.amqprun.testing


class Clock:

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def queues(amqp_client, name_prefix):
    """A handler queue with 3 messages and its parked queue with 1."""
    queue = amqp_client.declare(f'{name_prefix}.in', [f'{name_prefix}.in'])
    parked = amqp_client.declare(f'{name_prefix}.in.parked',
                                 [f'{name_prefix}.p'])
    for i in range(3):
        amqp_client.send(f'{name_prefix}.in', b'%d' % i)
    amqp_client.send(f'{name_prefix}.p', b'')
    gocept.amqprun.testing.wait_for(
        lambda: amqp_client.count(queue) == 3
        and amqp_client.count(parked) == 1)
    return queue, parked


def test_reads_handler_and_parked_queues(amqp_parameters, queues,
                                         name_prefix):
    queue, parked = queues
    missing = f'{name_prefix}.nonesuch'
    depths = gocept.amqprun.depths.QueueDepths(
        amqp_parameters, [queue, missing],
        {queue: parked, missing: missing + '.parked'})
    try:
        assert depths.snapshot() == {}      # not read yet
        assert depths.poll()
        # A queue that does not exist is left out; the others are read
        # on the same connection after the broker's 404.
        assert depths.snapshot() == {
            queue: gocept.amqprun.depths.Depth(3, 0, 1)}
    finally:
        depths.close()
    # Without a parked queue: None.
    depths = gocept.amqprun.depths.QueueDepths(amqp_parameters, [queue])
    try:
        assert depths.poll()
        assert depths.snapshot() == {
            queue: gocept.amqprun.depths.Depth(3, 0, None)}
    finally:
        depths.close()


def test_keeps_the_last_values_for_a_while_then_omits_them(
        amqp_parameters, queues, caplog):
    queue, parked = queues
    caplog.set_level(logging.INFO, 'gocept.amqprun.depths')
    proxy = gocept.amqprun.testing.Proxy.to(amqp_parameters)
    clock = Clock()
    depths = gocept.amqprun.depths.QueueDepths(
        proxy.parameters(socket_timeout=2), [queue], {queue: parked},
        stale_after=30, clock=clock)
    try:
        assert depths.poll()
        proxy.stop()
        clock.now += 10
        assert not depths.poll()
        assert 'cannot read the queue depths from the broker' in caplog.text
        # The last values, while at most 30 s old...
        assert depths.snapshot() == {
            queue: gocept.amqprun.depths.Depth(3, 0, 1)}
        clock.now += 21
        # ... then none.
        assert not depths.poll()
        assert depths.snapshot() == {}
        assert caplog.text.count('cannot read the queue depths') == 1
        proxy = gocept.amqprun.testing.Proxy.to(
            amqp_parameters, port=proxy.port)
        assert depths.poll()
        assert depths.snapshot()[queue].messages == 3
        assert 'reading the queue depths again' in caplog.text
    finally:
        depths.close()
        proxy.stop()
