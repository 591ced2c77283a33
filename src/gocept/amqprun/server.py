"""The Server: consumes the handlers' queues and sends transactionally."""

import logging
import threading
import time
import transaction
import zope.component
import zope.interface
from gocept.amqprun import tracing
import gocept.amqprun.connection
import gocept.amqprun.dispatch
import gocept.amqprun.errors
import gocept.amqprun.interfaces
import gocept.amqprun.retry
import gocept.amqprun.session
import gocept.amqprun.settlement
import gocept.amqprun.stats
import gocept.amqprun.topology
import gocept.amqprun.worker


log = logging.getLogger(__name__)

# Unacked deliveries per worker and queue. Transaction mode: a worker
# whose commit is in flight goes on with the next delivery, so a few per
# worker keep the commits of a channel grouping. Confirm mode does not
# block a worker until its confirms are in either, and wants many
# confirms in flight (docs/explanation/performance.rst).
DEFAULT_PREFETCH = 10
DEFAULT_CONFIRM_PREFETCH = 100
# Seconds stop() waits for the broker: to cancel the consumers, to answer
# the commits in flight and to close the connection.
BROKER_TIMEOUT = 5.0


class DuplicateQueueError(ValueError):
    """Two handlers consume from the same queue."""


class OutboxUnavailable(Exception):
    """The outbox cannot be used (its database is unreachable, its tables
    cannot be created)."""


def duplicate_queues(named_handlers):
    """{queue name: [names]} of the queues that more than one of
    `named_handlers` ((name, IHandler) pairs) consume, names in the
    order given. The daemon refuses them (`collect_handlers`), the check
    command lists them all."""
    names = {}
    for name, handler in named_handlers:
        names.setdefault(handler.queue_name, []).append(name)
    return {queue: found for queue, found in names.items()
            if len(found) > 1}


def collect_handlers():
    """The registered IHandler utilities by queue name.

    Raises DuplicateQueueError naming the queue and its handlers.
    """
    named = sorted(zope.component.getUtilitiesFor(
        gocept.amqprun.interfaces.IHandler))
    duplicates = duplicate_queues(named)
    if duplicates:
        queue, names = next(iter(duplicates.items()))
        raise DuplicateQueueError(
            f'Queue {queue!r} is consumed by {len(names)} handlers: '
            f'{" and ".join(map(repr, names))}.')
    return {handler.queue_name: handler for name, handler in named}


@zope.interface.implementer(
    gocept.amqprun.interfaces.ILoop, gocept.amqprun.interfaces.ISender)
class Server:
    """Connects to the broker, consumes the handlers' queues with `workers`
    worker threads and sends messages on transaction commit.

    parameters: `parameters.Parameters`.
    setup_handlers: consume the registered IHandler utilities' queues
        (False: only send).
    workers: the number of worker threads; each takes the oldest delivery
        there is (see `dispatch`).
    prefetch: unacked deliveries per worker and queue (default 10, in
        confirm mode 100).
    shutdown_timeout: seconds `stop()` waits for running handlers.
    retry_policy: what happens to failed messages (`retry.RetryPolicy`;
        default: 3 retries 5 s apart, then ``<queue>.parked``).
    confirm: commit with publisher confirms instead of AMQP transactions
        (faster, at-least-once: a crash between the confirms and the ACK
        repeats the replies).
    on_ready: called (in the IO thread; must not block) each time the
        connection is up and consuming.
    channels: consumer channels (default 1); the commits of a channel's
        deliveries go out together (see `commits`).

    The state, in the words used throughout: *connected* (to the broker,
    queues declared), *running* (connected and consuming every handler
    queue; `ILoop` calls it so, the connection says *ready*), *alive*
    (the IO loop runs, connected or reconnecting, and every worker
    thread lives).
    """

    def __init__(self, parameters, setup_handlers=True, workers=1,
                 prefetch=None, shutdown_timeout=30.0, on_ready=None,
                 retry_policy=None, confirm=False, channels=1):
        self.parameters = parameters
        self.shutdown_timeout = shutdown_timeout
        self.retry_policy = (
            retry_policy or gocept.amqprun.retry.RetryPolicy())
        self.stats = gocept.amqprun.stats.Stats()
        self.handlers = collect_handlers() if setup_handlers else {}
        self.outbox = zope.component.queryUtility(
            gocept.amqprun.interfaces.IOutbox) if self.handlers else None
        queues = gocept.amqprun.topology.queues_for(
            self.handlers.values(), self.retry_policy)
        if prefetch is None:
            prefetch = (DEFAULT_CONFIRM_PREFETCH if confirm
                        else DEFAULT_PREFETCH)
        count = workers if self.handlers else 0
        channels = min(channels, count)
        self.dispatcher = gocept.amqprun.dispatch.Dispatcher(count)
        self.settlement = gocept.amqprun.settlement.Settlement(
            self.retry_policy, self.stats, self.dispatcher.put)
        self.workers = [gocept.amqprun.worker.Worker(self, i)
                        for i in range(count)]
        self.on_ready = on_ready
        self.connection = gocept.amqprun.connection.Connection(
            parameters, queues, consumers=channels,
            # Per channel: the workers' share of each queue's deliveries.
            prefetch=-(-prefetch * count // channels) if channels
            else prefetch,
            on_delivery=self._dispatch, on_ready=self._on_ready,
            confirm=confirm, stats=self.stats, on_returned=self._returned)
        self._started = False
        self._stopping = threading.Lock()
        self._failure = None

    def _dispatch(self, delivery):
        """IO thread: hand `delivery` to the workers; one from an
        auxiliary queue (the quarantine) or suspected of making commits
        fail runs alone (see `settlement.Settlement.classify`)."""
        if delivery.redelivered or delivery.header.headers:
            self.settlement.classify(delivery)
        self.dispatcher.put(delivery, isolated=delivery.alone
                            or delivery.source != delivery.queue)

    def _returned(self, slot, deliveries, reason, failed_tags):
        """IO thread: a consumer channel went with `deliveries`."""
        handling = {worker.current[0] for worker in self.workers
                    if worker.current is not None}
        self.settlement.returned(deliveries, reason, failed_tags, handling)

    def _on_ready(self):
        self._started = True
        if self.on_ready is not None:
            self.on_ready()

    @property
    def running(self):
        """True while connected and consuming every handler queue."""
        return self.connection.ready

    @property
    def connected(self):
        """True while connected to the broker."""
        return self.connection.connected

    @property
    def alive(self):
        """True while the IO loop runs (connected or reconnecting) and
        every worker thread lives."""
        return self.connection.alive and all(
            w.is_alive() for w in self.workers)

    def activity(self):
        """What every worker does now: a list of `worker.Activity` (the
        message id, queue and seconds of what it handles, or idle);
        thread-safe."""
        now = time.monotonic()
        return [worker.activity(now) for worker in self.workers]

    def wait_until_running(self, timeout=None):
        """Wait until connected and consuming; return `running`."""
        return self.connection.wait_until_ready(timeout)

    def start(self):
        """Run in the calling thread until `stop()`.

        Raises errors.ConnectionFailed when the broker cannot be used,
        OutboxUnavailable when the outbox's database cannot, and the error
        given to `fail()` after that was called.
        """
        if self.outbox is not None:
            try:
                self.outbox.prepare()
            except Exception as e:
                raise OutboxUnavailable(
                    f'Cannot prepare {self.outbox!r}: {e}') from e
        for worker in self.workers:
            worker.start()
        # This thread becomes the IO thread (see `tracing.serving`).
        quiet = tracing.serving() if tracing.ACTIVE else None
        try:
            self.connection.run()
        finally:
            tracing.restore(quiet)
            self.dispatcher.close()
            self._join_workers(timeout=0)
        if self._failure is not None:
            raise self._failure

    def fail(self, error):
        """Stop because of `error`, which `start()` then raises.

        Thread-safe and returns at once (the stop runs in a thread of its
        own), so a thread that `stop()` waits for may call it.
        """
        if self._failure is None:
            self._failure = error
        threading.Thread(target=self.stop, name='amqprun-fail',
                         daemon=True).start()

    def stop(self):
        """Stop consuming, let running handlers finish and commit (up to
        `shutdown_timeout`), put the deliveries no handler started back
        into their queues, wait for the broker to answer the commits in
        flight, close the connection (giving up on a broker that does not
        answer within `BROKER_TIMEOUT` each time).

        Thread-safe: the first call stops, a later or concurrent one
        returns at once. Must not be called from a handler (it waits for
        the handlers to finish).
        """
        if not self._stopping.acquire(blocking=False):
            return
        if self._started:
            log.info('Stopping: cancelling consumers.')
        self.connection.cancel_consumers(timeout=BROKER_TIMEOUT)
        unstarted = self.dispatcher.close()
        self._join_workers(self.shutdown_timeout)
        self._put_back(unstarted)
        if not self.connection.wait_for_commits(BROKER_TIMEOUT):
            log.warning('The broker did not answer every commit within '
                        '%s s; it redelivers what it did not commit.',
                        BROKER_TIMEOUT)
        self.connection.close()
        self.connection.wait_until_stopped(BROKER_TIMEOUT)
        if self._started:
            log.info('Stopped.')

    def _join_workers(self, timeout):
        """Wait for the workers (told to stop by closing the dispatcher)
        up to `timeout` seconds in all."""
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            if worker.is_alive() and worker.ident is not None:
                worker.join(max(0, deadline - time.monotonic()))
                if worker.is_alive() and timeout:
                    log.warning('%s did not finish within %s s; its message '
                                'returns to the queue.', worker.name, timeout)

    def _put_back(self, items):
        """Settle the deliveries no handler started: ACK each and, in the
        same transaction, put it back into its queue as it is -- so that
        a graceful stop does not count as an unsettled return (which the
        broker's own requeue would be, see `retry`). A delivery that came
        back unsettled is counted now, as a worker would have. Whatever
        cannot be committed is left to the broker, which redelivers it."""
        by_slot = {}
        settlement = self.settlement
        for item in items:
            if isinstance(item, gocept.amqprun.settlement.Retry) \
                    or not item.current:
                continue
            if settlement.returns_unsettled(item):
                settlement.quarantine(item)
                continue
            by_slot.setdefault((item.slot, item.epoch), []).append(item)
        for (slot, epoch), deliveries in by_slot.items():
            try:
                slot.commit(epoch, [gocept.amqprun.retry.republished(d)
                                    for d in deliveries],
                            ack=[d.delivery_tag for d in deliveries],
                            timeout=BROKER_TIMEOUT)
            except gocept.amqprun.errors.AMQPError as e:
                log.warning('Could not put %d unstarted message(s) back (%s); '
                            'the broker redelivers them.', len(deliveries), e)
            else:
                log.info('Put %d unstarted message(s) back into their '
                         'queue(s).', len(deliveries))

    def send(self, message):
        """Publish `message` when the calling thread's transaction commits
        (ISender). Inside a handler it joins the handler's transaction."""
        txn = transaction.get()
        session = gocept.amqprun.session.Session.of(self, txn)
        if session is None:
            session = gocept.amqprun.session.Session.join(self, txn)
        session.send(message)
