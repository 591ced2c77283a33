"""Handlers running longer than the broker's consumer timeout.

RabbitMQ closes a channel whose delivery stays unacknowledged longer than
``consumer_timeout`` (30 min by default): the delivery returns to its
queue, and so do the channel's other deliveries. The daemon says so with
the message id, and counts it as an unsettled return (see `retry`): a
handler that always runs too long cannot loop forever. A private broker
with a 2 s timeout, checked every 0.5 s, makes that testable.
"""

import pytest

import gocept.amqprun.retry
from gocept.amqprun.testing import PrivateBroker
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.test_faults import Echo
from gocept.amqprun.tests.test_faults import client_of
from gocept.amqprun.tests.test_faults import drain
from gocept.amqprun.tests.test_faults import tally


HANDLERS = '''\
import time
import gocept.amqprun.handler
import gocept.amqprun.message


@gocept.amqprun.handler.declare({queue!r}, {queue!r})
def echo(message):
    if message.body == b'slow':
        time.sleep(3.5)
    return [gocept.amqprun.message.Message(
        {{}}, message.body, routing_key={out!r})]
'''


@pytest.fixture(scope='module')
def impatient_broker():
    """A private broker whose consumers must ACK within 2 s."""
    if not PrivateBroker.available():
        pytest.skip('rabbitmq-server is not installed')
    broker = PrivateBroker(
        config='consumer_timeout = 2000\n',
        advanced='{rabbit, [{channel_tick_interval, 500}]}')
    try:
        broker.start()
        yield broker
    finally:
        broker.cleanup()


@pytest.mark.slow
def test_a_handler_beyond_the_consumer_timeout_is_counted_and_parked(
        impatient_broker, tmp_path, name_prefix):
    parameters = impatient_broker.parameters()
    with client_of(parameters) as client:
        echo = Echo(tmp_path, parameters, client, name_prefix, amount=2,
                    server_extra='  retry_delay 0.1\n',
                    worker_extra='  retries 1\n  retry-delay 0\n')
        process = echo.process(start=False)
        (process.directory / 'handlers.py').write_text(HANDLERS.format(
            queue=echo.queue, out=echo.out))
        process.start()
        try:
            slow = client.send(echo.queue, b'slow')
            for i in range(20):
                client.send(echo.queue, b'%06d' % i)
            parked = f'{echo.queue}.parked'
            wait_for(lambda: client.count(parked) == 1, timeout=30)
            [message] = [client.get(parked)]
            assert message.header.message_id == slow
            headers = message.header.headers
            assert headers[gocept.amqprun.retry.UNSETTLED] == 2
            assert 'without being settled' in headers[
                gocept.amqprun.retry.ERROR]
            wait_for(lambda: echo.replies(client) >= 20, timeout=30)
            log = process.log_text()
            # (Other channels may time out too while the quarantined slow
            # message runs alone: their deliveries wait unacknowledged.)
            assert log.count('longer than its consumer timeout') >= 2
            assert f'Being handled: {slow} from {echo.queue!r}' in log
            assert (f'Being handled: {slow} from '
                    f'{echo.queue + ".quarantine"!r}') in log
            assert process.stop() == 0
            assert client.count(echo.queue) == 0
            # Every other message answered exactly once; the slow one
            # never got a reply committed.
            tally(drain(client, echo.out), 20)
        finally:
            echo.cleanup()


@pytest.mark.slow
def test_the_deliveries_waiting_beside_a_timed_out_one_are_not_counted(
        impatient_broker, tmp_path, name_prefix):
    # One worker: while it runs the slow handler, the quick messages wait
    # on the same channel. The timeout closes it; they return, but only
    # the slow one -- the one being handled -- counts as unsettled.
    parameters = impatient_broker.parameters()
    with client_of(parameters) as client:
        echo = Echo(tmp_path, parameters, client, name_prefix, amount=1,
                    server_extra='  retry_delay 0.1\n',
                    worker_extra='  retries 1\n  retry-delay 0\n')
        process = echo.process(start=False)
        (process.directory / 'handlers.py').write_text(HANDLERS.format(
            queue=echo.queue, out=echo.out))
        process.start()
        try:
            slow = client.send(echo.queue, b'slow')
            for i in range(8):
                client.send(echo.queue, b'%06d' % i)
            parked = f'{echo.queue}.parked'
            wait_for(lambda: client.count(parked) == 1
                     and echo.replies(client) >= 8, timeout=30)
            assert client.get(parked).header.message_id == slow
            log = process.log_text()
            assert f'Being handled: {slow} from {echo.queue!r}' in log
            counted = [line for line in log.splitlines()
                       if 'returned unsettled' in line]
            assert counted and all(slow in line for line in counted), \
                counted
            assert process.stop() == 0
            tally(drain(client, echo.out), 8)
        finally:
            echo.cleanup()
