"""Comparing declared queues with the broker's (for the check command);
the blocking connection of tools."""

import pika
import pika.exceptions

from gocept.amqprun.errors import ConnectionFailed
from gocept.amqprun.errors import reason


class QueueState:
    """What the broker says about a declared `topology.Queue`.

    status: 'ok', 'missing' (no such queue) or 'different' (it exists,
        but a declaration with our arguments is refused; `detail` has
        the broker's reason).
    messages, consumers: counts while the queue exists, else None.
    """

    def __init__(self, queue, status, detail=None, messages=None,
                 consumers=None):
        self.queue = queue
        self.status = status
        self.detail = detail
        self.messages = messages
        self.consumers = consumers

    def __repr__(self):
        return f'<QueueState {self.queue.name!r} {self.status}>'


def connect(parameters):
    """A pika BlockingConnection of its own to the broker of `parameters`
    (a `parameters.Parameters`; its addresses are tried in turn), for
    tools that run outside of the daemon's IO thread. Raises
    ConnectionFailed with one line saying why."""
    try:
        return pika.BlockingConnection(parameters.pika_parameters())
    except pika.exceptions.AMQPError as e:
        why = reason(e)
        if why == e.__class__.__name__ and e.args:
            why = str(e.args[-1])  # pika's connection workflow error
        raise ConnectionFailed(
            f'Cannot connect to {parameters.describe()}: {why}') from None


def inspect_queues(parameters, queues):
    """Compare `queues` with the broker's live queues, changing nothing.

    A passive declare tells whether a queue exists. An existing one is then
    declared with our durability and arguments: the broker accepts that
    without change when they are equal and refuses it (406
    PRECONDITION_FAILED) when they differ. Bindings cannot be inspected
    over AMQP and are not compared. Blocking, on a short-lived connection
    of its own (not the daemon's IO thread). Returns a QueueState per
    queue; raises ConnectionFailed.
    """
    connection = connect(parameters)
    result = []
    try:
        channel = connection.channel()
        for queue in queues:
            try:
                ok = channel.queue_declare(queue.name, passive=True)
            except pika.exceptions.ChannelClosedByBroker as e:
                channel = connection.channel()
                if e.reply_code != 404:
                    result.append(QueueState(queue, 'different', reason(e)))
                else:
                    result.append(QueueState(queue, 'missing'))
                continue
            try:
                channel.queue_declare(queue.name, durable=True,
                                      arguments=queue.arguments)
            except pika.exceptions.ChannelClosedByBroker as e:
                channel = connection.channel()
                result.append(QueueState(
                    queue, 'different', reason(e),
                    ok.method.message_count, ok.method.consumer_count))
                continue
            result.append(QueueState(
                queue, 'ok', None, ok.method.message_count,
                ok.method.consumer_count))
    except pika.exceptions.AMQPError as e:
        raise ConnectionFailed(
            f'Lost the connection to {parameters.describe()}: '
            f'{reason(e)}') from None
    finally:
        if connection.is_open:
            connection.close()
    return result
