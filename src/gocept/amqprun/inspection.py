"""Comparing what the daemon declares with the broker (for the check
command): queues and the exchanges they depend on; the blocking
connection of tools."""

import pika
import pika.exceptions

from gocept.amqprun.errors import ConnectionFailed
from gocept.amqprun.errors import reason


class QueueState:
    """What the broker says about a declared `topology.Queue`.

    status: 'ok', 'missing' (no such queue: the daemon creates it) or
        'different' (it exists, but a declaration with our arguments is
        refused; `detail` has the broker's reason).
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


def inspect(parameters, queues, exchanges=()):
    """Compare `queues` (`topology.Queue`) with the broker's live queues
    and tell which of `exchanges` (names) exist, changing nothing.

    A passive declare tells whether a queue or an exchange exists. An
    existing queue is then declared with our durability and arguments:
    the broker accepts that without change when they are equal and
    refuses it (406 PRECONDITION_FAILED) when they differ. Bindings
    cannot be inspected over AMQP and are not compared. Blocking, on a
    short-lived connection of its own (not the daemon's IO thread).
    Returns ([QueueState per queue], {exchange: problem}), a problem
    being None when the exchange exists; raises ConnectionFailed.
    """
    connection = connect(parameters)
    try:
        channels = _Channels(connection)
        states = [_queue_state(channels, queue) for queue in queues]
        exchange_problems = {name: _exchange_problem(channels, name)
                             for name in exchanges}
    except pika.exceptions.AMQPError as e:
        raise ConnectionFailed(
            f'Lost the connection to {parameters.describe()}: '
            f'{reason(e)}') from None
    finally:
        if connection.is_open:
            connection.close()
    return states, exchange_problems


def inspect_queues(parameters, queues):
    """The QueueState of each of `queues` (see `inspect`)."""
    return inspect(parameters, queues)[0]


class _Channels:
    """A channel of `connection`, replaced after the broker closed it
    (it does so to answer a refused or passive declaration)."""

    def __init__(self, connection):
        self.connection = connection
        self.channel = connection.channel()

    def call(self, method, *args, **kw):
        """`method` of the channel; a ChannelClosedByBroker it raises
        leaves a fresh channel behind."""
        try:
            return getattr(self.channel, method)(*args, **kw)
        except pika.exceptions.ChannelClosedByBroker:
            self.channel = self.connection.channel()
            raise


def _queue_state(channels, queue):
    try:
        ok = channels.call('queue_declare', queue.name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code != 404:
            return QueueState(queue, 'different', reason(e))
        return QueueState(queue, 'missing')
    messages, consumers = ok.method.message_count, ok.method.consumer_count
    try:
        channels.call('queue_declare', queue.name, durable=True,
                      arguments=queue.arguments)
    except pika.exceptions.ChannelClosedByBroker as e:
        return QueueState(queue, 'different', reason(e), messages,
                          consumers)
    return QueueState(queue, 'ok', None, messages, consumers)


def _exchange_problem(channels, name):
    try:
        channels.call('exchange_declare', name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == 404:
            return 'does not exist'
        return f'cannot be inspected: {reason(e)}'
    return None
