"""Telling why the broker closed a channel, from its reply."""

import pika
import pika.exceptions
import pytest

import gocept.amqprun.errors
from gocept.amqprun.errors import queue_deleted
from gocept.amqprun.errors import timed_out
from gocept.amqprun.testing import unique_name


Closed = pika.exceptions.ChannelClosedByBroker

NO_QUEUE = Closed(404, "NOT_FOUND - no queue 'q' in vhost '/'")
HOME_NODE_DOWN = Closed(
    404, "NOT_FOUND - home node 'a@h' of durable queue 'q' in vhost '/' "
    'is down or inaccessible')
NO_EXCHANGE = Closed(404, "NOT_FOUND - no exchange 'x' in vhost '/'")
CONSUMER_TIMEOUT = Closed(
    406, 'PRECONDITION_FAILED - delivery acknowledgement on channel 1 '
    'timed out. Timeout value used: 1800000 ms. This timeout value can '
    'be configured, see consumers doc guide to learn more')
INEQUIVALENT = Closed(
    406, "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' "
    "in vhost '/': received 'false' but current is 'true'")


@pytest.mark.parametrize('why, deleted, late', [
    (NO_QUEUE, True, False),
    (HOME_NODE_DOWN, False, False),
    (NO_EXCHANGE, False, False),
    (CONSUMER_TIMEOUT, False, True),
    (INEQUIVALENT, False, False),
    (pika.exceptions.ConnectionClosedByBroker(320, 'CONNECTION_FORCED'),
     False, False),
    ('a reason without a reply code', False, False),
    (None, False, False),
])
def test_close_reasons_are_told_apart(why, deleted, late):
    assert queue_deleted(why) is deleted
    assert timed_out(why) is late


def test_reply_codes_have_their_amqp_names():
    errors = gocept.amqprun.errors
    assert (errors.CONNECTION_FORCED, errors.NOT_FOUND,
            errors.PRECONDITION_FAILED) == (320, 404, 406)


def test_the_brokers_own_replies_are_recognised(amqp_parameters):
    connection = pika.BlockingConnection(
        amqp_parameters.pika_parameters())
    try:
        channel = connection.channel()
        with pytest.raises(Closed) as missing:
            channel.basic_consume(unique_name(), lambda *args: None)
        assert queue_deleted(missing.value)
        channel = connection.channel()
        queue = unique_name()
        channel.queue_declare(queue, exclusive=True,   # gone with us
                              arguments={'x-max-length': 10})
        with pytest.raises(Closed) as refused:
            channel.queue_declare(queue, exclusive=True,
                                  arguments={'x-max-length': 20})
        assert refused.value.reply_code == 406
        assert not queue_deleted(refused.value)
        assert not timed_out(refused.value)
    finally:
        connection.close()
