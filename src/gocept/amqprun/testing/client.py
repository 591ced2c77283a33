"""A plain AMQP client for tests.

Test-side code: it owns a blocking pika connection of its own, used only
by the thread that made it (not the daemon's IO thread).
"""

import contextlib
import time

import pika
import pika.exceptions

import gocept.amqprun.message
import gocept.amqprun.properties


# The queues beside a handler's queue (with the default retry policy).
AUXILIARY = ('', '.retry', '.parked', '.quarantine')


class Received:
    """A message a `Client` got: header (message.Header), body (bytes),
    routing_key."""

    def __init__(self, method, properties, body):
        self.routing_key = method.routing_key
        self.redelivered = method.redelivered
        self.header = gocept.amqprun.properties.header_from(properties)
        self.body = body

    def __repr__(self):
        return f'<Received {self.routing_key} {self.body[:40]!r}>'


class Client:
    """A plain AMQP client for tests: declare queues, send, receive.

    Queues it declares (or is told to `forget`) are deleted by `close()`,
    with the daemon's auxiliary queues beside them.
    """

    def __init__(self, parameters):
        self.parameters = parameters
        self.connection = pika.BlockingConnection(
            parameters.pika_parameters())
        self.channel = self.connection.channel()
        self.queues = []

    def declare(self, name, routing_keys=(), arguments=None):
        """Declare a (durable) queue bound to `routing_keys` on amq.topic;
        it is deleted on close()."""
        self.channel.queue_declare(name, durable=True, arguments=arguments)
        for key in routing_keys:
            self.channel.queue_bind(name, 'amq.topic', routing_key=key)
        self.forget(name)
        self.queues.append(name)
        return name

    def forget(self, name):
        """Delete `name` on close() (a queue the daemon declared)."""
        if name not in self.queues:
            self.queues.append(name)

    def send(self, routing_key, body=b'', header=None,
             exchange='amq.topic'):
        """Publish a message; return its message-id."""
        message = gocept.amqprun.message.Message(
            header or {}, body, routing_key=routing_key)
        self.channel.basic_publish(
            exchange, routing_key, message.body,
            gocept.amqprun.properties.properties_from(message.header))
        return message.header.message_id

    def get(self, queue):
        """One message from `queue` (ACKed), or None."""
        method, properties, body = self.channel.basic_get(
            queue, auto_ack=True)
        if method is None:
            return None
        return Received(method, properties, body)

    def wait(self, queue, timeout=10):
        """The next message on `queue`; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.get(queue)
            if message is not None:
                return message
            if time.monotonic() > deadline:
                raise AssertionError(
                    f'no message on {queue!r} within {timeout} s')
            self.connection.sleep(0.02)

    def wait_many(self, queue, count, timeout=30):
        """`count` messages from `queue`."""
        deadline = time.monotonic() + timeout
        result = []
        while len(result) < count:
            message = self.get(queue)
            if message is not None:
                result.append(message)
                continue
            if time.monotonic() > deadline:
                raise AssertionError(
                    f'{len(result)} of {count} messages on {queue!r} '
                    f'within {timeout} s')
            self.connection.sleep(0.02)
        return result

    def count(self, queue):
        """Messages ready in `queue` (None if it does not exist)."""
        try:
            ok = self.channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            self.channel = self.connection.channel()
            return None
        return ok.method.message_count

    def exists(self, queue):
        return self.count(queue) is not None

    def close(self):
        """Delete the queues it declared or was told to `forget` -- each
        with the queues the daemon declares beside a handler's queue
        (``.retry``, ``.parked``, ``.quarantine``; deleting a queue that
        does not exist changes nothing) -- and close the connection."""
        with contextlib.suppress(Exception):
            if not self.channel.is_open:
                self.channel = self.connection.channel()
            for name in self.queues:
                for suffix in AUXILIARY:
                    self.channel.queue_delete(name + suffix)
        with contextlib.suppress(Exception):
            self.connection.close()
