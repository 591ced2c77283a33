"""Worker threads: one handled message = one transaction.

A worker takes the oldest delivery from the dispatcher (whichever channel
it came on), handles it in a transaction of its own and commits: the
replies and the ACK go out on the delivery's channel (see `session` and
`commits`). Workers never touch pika: they call `Slot.commit`.

What becomes of a delivery is `settlement`'s: it is settled exactly once
by this process -- by the handler's commit, or, when that failed for
certain, by the retry policy's commit; a delivery whose channel is gone is
left to the broker, which redelivers it.
"""

import collections
import logging
import threading
import time

import transaction

from gocept.amqprun import tracing
import gocept.amqprun.log
import gocept.amqprun.message
import gocept.amqprun.retry
import gocept.amqprun.security
import gocept.amqprun.session
import gocept.amqprun.settlement


log = logging.getLogger(__name__)

# Seconds a worker about to run an isolated (quarantined) delivery waits
# for the commits of the others to be answered, so that nothing else is in
# flight should it kill the process.
SETTLE_BEFORE_ISOLATED = 30.0


class Activity(collections.namedtuple(
        'Activity', 'worker thread_id message_id queue seconds')):
    """What a worker does now: its name and thread id; the message id
    and queue of the delivery it handles and for how many seconds (all
    three None while it is idle)."""


class Worker(threading.Thread):
    """Handles what the server's dispatcher gives worker `index` until
    the dispatcher is closed.

    `server` is what the worker needs of its Server: `dispatcher`,
    `handlers` (by queue), `settlement`, `outbox` (or None), `stats`, and
    `connection` (to wait for commits before an isolated delivery).

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
            retry = isinstance(item, gocept.amqprun.settlement.Retry)
            delivery = item.delivery if retry else item
            self.current = (delivery, time.monotonic())
            traced = tracing.enter(delivery) if tracing.ACTIVE else None
            try:
                with gocept.amqprun.log.handling(
                        delivery.header.message_id, delivery.queue):
                    if retry:
                        self.server.settlement.failed(delivery, item.error)
                    else:
                        self.process(delivery)
            except Exception:
                # What can fail is logged where it fails; a worker never
                # dies.
                log.exception('Unexpected error in %s', self.name)
            finally:
                self.current = None
                if traced is not None:
                    tracing.leave(delivery, traced)
            self.prune_outbox()

    def process(self, delivery):
        """Quarantine `delivery`, park it, or handle it."""
        settlement = self.server.settlement
        if not delivery.current:
            log.debug('Dropping delivery %s of a closed channel.',
                      delivery.delivery_tag)
        elif settlement.returns_unsettled(delivery):
            settlement.quarantine(delivery)
        elif not settlement.refused_too_often(delivery):
            if delivery.alone or delivery.source != delivery.queue:
                # Isolated (see `dispatch`): alone in flight, too.
                delivery.alone = True
                self.server.connection.wait_for_commits(
                    SETTLE_BEFORE_ISOLATED)
            self.handle(delivery)

    def handle(self, delivery):
        """Call the handler in a transaction and commit it; a failure
        aborts it and goes the retry way."""
        server = self.server
        message = gocept.amqprun.message.Message(
            delivery.header, delivery.body, delivery.delivery_tag,
            routing_key=gocept.amqprun.retry.original_routing_key(delivery),
            redelivered=delivery.redelivered or bool(
                gocept.amqprun.retry.unsettled(delivery.header)))
        manager = transaction.manager
        session = gocept.amqprun.session.Session.join(
            server, manager.begin(), delivery, message)
        server.stats.started()
        handler_seconds = None
        try:
            started = time.perf_counter()
            try:
                self.call(server.handlers[delivery.queue], message, session,
                          delivery.queue)
            finally:
                handler_seconds = time.perf_counter() - started
            manager.commit()
        except Exception as error:
            manager.abort()
            self.failed(delivery, session, error)
        else:
            log.debug('Handled message %s from queue %r',
                      message.header.message_id, delivery.queue)
        finally:
            server.stats.finished(delivery.queue, handler_seconds)

    def failed(self, delivery, session, error):
        """The handler, a vote or the commit failed with `error`."""
        about = gocept.amqprun.settlement.about(delivery)
        if session.settled:
            # The AMQP commit went through (or is in doubt); what failed
            # finished after it. The delivery is done.
            log.exception(
                'Message %s from queue %r: its ACK was committed, but a '
                'data manager failed after that', about['message_id'],
                delivery.queue, extra=about)
            return
        log.exception('Handling message %s from queue %r failed',
                      about['message_id'], delivery.queue, extra=about)
        settlement = self.server.settlement
        settlement.count_refusal(delivery, error)
        settlement.failed(delivery, error)

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
                         'again.', message_id, queue, len(recorded),
                         extra={'message_id': message_id, 'queue': queue})
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
