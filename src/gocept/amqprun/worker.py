"""Worker threads: one handled message = one transaction.

Each worker owns one consumer slot (a channel, see `connection`) and gets
only that slot's deliveries, so its commit -- replies published plus the
ACK -- is an AMQP transaction of its own, concurrent with the other
workers' commits. Workers never touch pika: they call `Slot.commit`.
"""

import hashlib
import logging
import queue
import threading
import transaction
import gocept.amqprun.errors
import gocept.amqprun.message
import gocept.amqprun.retry
import gocept.amqprun.security
import gocept.amqprun.session


log = logging.getLogger(__name__)


class BrokerRefused(Exception):
    """The broker refused every commit of a message's handling."""


class Worker(threading.Thread):
    """Handles the deliveries put into `inbox` until it gets None."""

    def __init__(self, server, index):
        super().__init__(name=f'amqprun-worker-{index}', daemon=True)
        self.server = server
        self.inbox = queue.SimpleQueue()
        self.stopping = False

    def run(self):
        while True:
            delivery = self.inbox.get()
            if delivery is None or self.stopping:
                # Unhandled deliveries go back to the queue when the
                # channel closes.
                if delivery is None:
                    return
                continue
            if not delivery.current:
                log.debug('Dropping delivery %s of a closed channel.',
                          delivery.delivery_tag)
                continue
            try:
                self.handle(delivery)
            except Exception:
                # handle() logs what it can; a worker never dies.
                log.exception('Unexpected error in %s', self.name)

    def handle(self, delivery):
        handler = self.server.handlers[delivery.queue]
        message = gocept.amqprun.message.Message(
            delivery.header, delivery.body, delivery.delivery_tag,
            routing_key=gocept.amqprun.retry.original_routing_key(delivery),
            redelivered=delivery.redelivered)
        message_id = message.header.message_id
        refusals = self.server.refusals
        key = message_id or hashlib.sha1(delivery.body).hexdigest()
        refused = refusals.count(key)
        if refused > self.server.retry_policy.retries:
            self.failed(delivery, message_id, BrokerRefused(
                f'the broker refused {refused} commit(s) of its handling'),
                park=True)
            refusals.forget(key)
            return
        manager = transaction.manager
        txn = manager.begin()
        session = gocept.amqprun.session.Session.join(
            self.server, txn, delivery, message)
        try:
            with gocept.amqprun.security.interaction(handler.principal):
                replies = handler(message)
                for reply in replies or ():
                    session.send(reply)
            manager.commit()
        except Exception as error:
            log.exception('Handling message %s from queue %r failed',
                          message_id, delivery.queue)
            manager.abort()
            if isinstance(error, gocept.amqprun.errors.ChannelLost) \
                    and error.refused:
                refusals.add(key)
            self.failed(delivery, message_id, error)
        else:
            if refused:
                refusals.forget(key)
            log.debug('Handled message %s from queue %r',
                      message_id, delivery.queue)

    def failed(self, delivery, message_id, error, park=False):
        """Settle a failed delivery as the server's RetryPolicy says: ACK it
        and republish it for a retry or park it, in one AMQP transaction."""
        description, publishes, reject = self.server.retry_policy.decide(
            delivery, error, park=park)
        try:
            delivery.slot.commit(
                delivery.epoch, publishes,
                ack=None if reject else delivery.delivery_tag,
                reject=reject)
        except gocept.amqprun.errors.AMQPError as e:
            log.warning('Message %s from queue %r: could not commit its '
                        '%s (%s); the broker redelivers it.', message_id,
                        delivery.queue, description, e)
        else:
            (log.error if 'retry' not in description else log.warning)(
                'Message %s from queue %r: %s.', message_id, delivery.queue,
                description)
