"""Worker threads: one handled message = one transaction.

Each worker owns one consumer slot (a channel, see `channel`) and gets
only that slot's deliveries, so its commit -- replies published plus the
ACK -- is an AMQP transaction of its own, concurrent with the other
workers' commits. Workers never touch pika: they call `Slot.commit`.

What a worker guarantees about a delivery: it is settled exactly once by
this process -- by the handler's commit (see `session`), or, when that
failed for certain, by the retry policy's commit (ACK plus a retry or
parked copy); never both. A delivery whose channel is gone is left to the
broker, which redelivers it.
"""

import collections
import hashlib
import logging
import threading
import time

import transaction

import gocept.amqprun.errors
import gocept.amqprun.log
import gocept.amqprun.message
import gocept.amqprun.retry
import gocept.amqprun.security
import gocept.amqprun.session


log = logging.getLogger(__name__)


class BrokerRefused(Exception):
    """The broker refused every commit of a message's handling."""


class Retry:
    """A dispatcher item: settle `delivery`, which failed with `error`,
    through the retry policy (a NACKed input in confirm mode)."""

    def __init__(self, delivery, error):
        self.delivery = delivery
        self.error = error


class Activity(collections.namedtuple(
        'Activity', 'worker thread_id message_id queue seconds')):
    """What a worker does now: its name and thread id; the message id
    and queue of the delivery it handles and for how many seconds (all
    three None while it is idle)."""


class Worker(threading.Thread):
    """Handles what the server's dispatcher gives it for slot `index`
    until the dispatcher is closed.

    `current` is (delivery, time.monotonic() when it started) while the
    worker handles a delivery, else None. Only the worker thread sets it,
    as one tuple, so any thread reads a consistent pair (see `activity`).
    """

    current = None

    def __init__(self, server, index):
        super().__init__(name=f'amqprun-worker-{index}', daemon=True)
        self.server = server
        self.index = index

    def activity(self, now=None):
        """What this worker does now (an `Activity`); thread-safe."""
        current = self.current
        if current is None:
            return Activity(self.name, self.ident, None, None, None)
        delivery, started = current
        return Activity(
            self.name, self.ident, delivery.header.message_id,
            delivery.queue, (now or time.monotonic()) - started)

    def run(self):
        dispatcher = self.server.dispatcher
        while True:
            item = dispatcher.get(self.index)
            if item is None:
                return
            delivery = item.delivery if isinstance(item, Retry) else item
            self.current = (delivery, time.monotonic())
            try:
                with gocept.amqprun.log.handling(
                        delivery.header.message_id, delivery.queue):
                    if isinstance(item, Retry):
                        self.failed(item.delivery, item.error)
                    elif not item.current:
                        log.debug('Dropping delivery %s of a closed '
                                  'channel.', item.delivery_tag)
                    elif gocept.amqprun.retry.returns(item):
                        self.quarantine(item)
                    else:
                        self.handle(item)
            except Exception:
                # handle() logs what it can; a worker never dies.
                log.exception('Unexpected error in %s', self.name)
            finally:
                self.current = None

    def quarantine(self, delivery):
        """`delivery` came back unsettled: count it (see `retry`)."""
        settle(self.server, delivery,
               self.server.retry_policy.quarantine(delivery))

    def handle(self, delivery):
        server = self.server
        handler = server.handlers[delivery.queue]
        message = gocept.amqprun.message.Message(
            delivery.header, delivery.body, delivery.delivery_tag,
            routing_key=gocept.amqprun.retry.original_routing_key(delivery),
            redelivered=delivery.redelivered or bool(
                gocept.amqprun.retry.unsettled(delivery.header)))
        message_id = message.header.message_id
        refusals = server.refusals
        key = message_id or hashlib.sha1(delivery.body).hexdigest()
        refused = refusals.count(key)
        if refused > server.retry_policy.retries:
            self.failed(delivery, BrokerRefused(
                f'the broker refused {refused} commit(s) of its handling'),
                park=True)
            refusals.forget(key)
            return
        stats = server.stats
        manager = transaction.manager
        txn = manager.begin()
        session = gocept.amqprun.session.Session.join(
            server, txn, delivery, message)
        stats.started()
        delivery.slot.handling.add(delivery)
        handler_seconds = commit_seconds = outcome = None
        try:
            started = time.perf_counter()
            try:
                self.call(handler, message, session, delivery.queue)
            finally:
                handled = time.perf_counter()
                handler_seconds = handled - started
            manager.commit()
            commit_seconds = time.perf_counter() - handled
        except Exception as error:
            manager.abort()
            if session.settled:
                # The AMQP commit went through (or is in doubt); what
                # failed finished after it. The delivery is done.
                log.exception(
                    'Message %s from queue %r: its ACK was committed, but '
                    'a data manager failed after that', message_id,
                    delivery.queue)
                outcome = 'handled'
                return
            log.exception('Handling message %s from queue %r failed',
                          message_id, delivery.queue)
            if isinstance(error, gocept.amqprun.errors.ChannelLost) \
                    and error.refused:
                refusals.add(key)
            self.failed(delivery, error)
        else:
            if refused:
                refusals.forget(key)
            if not session.confirming:
                outcome = 'handled'
            log.debug('Handled message %s from queue %r',
                      message_id, delivery.queue)
        finally:
            delivery.slot.handling.discard(delivery)
            stats.finished(delivery.queue, handler_seconds, commit_seconds,
                           outcome)
        self.prune_outbox()

    def call(self, handler, message, session, queue):
        """Call `handler` in the current transaction and send its replies
        through `session` -- or, when the outbox recorded `message` as
        handled, send what it recorded instead."""
        outbox = self.server.outbox
        message_id = message.header.message_id
        if outbox is not None and outbox.applies(queue, message_id):
            recorded = outbox.recorded(queue, message_id)
            if recorded is not None:
                log.info('Message %s from queue %r was handled before '
                         '(outbox): sending its %d recorded message(s) '
                         'again.', message_id, queue, len(recorded))
                for reply in recorded:
                    session.send(reply)
                return
            # At commit time: what the transaction sends is complete.
            transaction.get().addBeforeCommitHook(
                outbox.record, (queue, message_id, session.messages))
        with gocept.amqprun.security.interaction(handler.principal):
            replies = handler(message)
            for reply in replies or ():
                session.send(reply)

    def prune_outbox(self):
        outbox = self.server.outbox
        if outbox is None or not outbox.prune_due():
            return
        try:
            outbox.prune(transaction.manager)
        except Exception:
            log.exception('Could not delete old outbox records')

    def failed(self, delivery, error, park=False):
        """Settle a failed delivery as the server's RetryPolicy says."""
        settle(self.server, delivery,
               self.server.retry_policy.decide(delivery, error, park=park))


def settle(server, delivery, decision):
    """Commit `decision` (a `retry.Decision`) for `delivery`: ACK it and
    publish the decision's copies, or reject it, in one AMQP transaction
    on its channel. A delivery whose channel is gone is left to the
    broker, which redelivers it."""
    message_id = delivery.header.message_id
    if not delivery.current:
        log.warning('Message %s from queue %r: its channel is gone; the '
                    'broker redelivers it.', message_id, delivery.queue)
        return
    try:
        delivery.slot.commit(
            delivery.epoch, decision.publishes,
            ack=None if decision.reject else delivery.delivery_tag,
            reject=decision.reject)
    except gocept.amqprun.errors.CommitInDoubt as e:
        server.stats.commit_in_doubt()
        log.warning('Commit in doubt: message %s from queue %r, %s (%s); '
                    'the broker either has it or redelivers the message.',
                    message_id, delivery.queue, decision.description, e)
    except gocept.amqprun.errors.AMQPError as e:
        log.warning('Message %s from queue %r: could not commit its %s '
                    '(%s); the broker redelivers it.', message_id,
                    delivery.queue, decision.description, e)
    else:
        server.stats.message(delivery.queue, decision.outcome)
        level = logging.ERROR if decision.outcome == 'parked' \
            else logging.WARNING
        log.log(level, 'Message %s from queue %r: %s.', message_id,
                delivery.queue, decision.description)
