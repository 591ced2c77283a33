"""Channels: the per-channel half of the thread boundary.

The contract of the boundary is written in `connection`: only the IO
thread touches pika. Here are the objects that cross it:

- `Slot`: a logical channel that survives reconnects. `Slot.commit` is
  thread-safe: it hands the work to the IO thread and waits for an
  `outcome.Outcome` (or, with ``wait=False``, has the IO thread call a
  callback). Every other method of a Slot runs in the IO thread.
- `Delivery`: a received message as a worker gets it, tied to the slot
  and the epoch (the pika channel) it came on.

A slot's `epoch` counts the pika channels it has had. A delivery
remembers the epoch it came with; settling it on a later epoch is refused
locally with `ChannelLost` (acking an old delivery tag on a new channel
would close that channel; the broker has already requeued it).

What a channel does with commits -- group commits in transaction mode,
publisher confirms in confirm mode -- is `commits`. A slot also knows
which of its deliveries are not settled yet: when the broker closes the
channel, they return to their queues, and the connection is told which
(`Connection.returned`), so that they are not mistaken for messages that
killed a process when they come back (see `settlement`).
"""

import functools
import logging
import threading

import pika.exceptions

from gocept.amqprun.errors import ChannelLost
from gocept.amqprun.errors import ConnectionUnavailable
from gocept.amqprun.outcome import Outcome
import gocept.amqprun.commits
import gocept.amqprun.errors
import gocept.amqprun.properties


log = logging.getLogger(__name__)


class Delivery:
    """A received message as the IO thread hands it to a worker.

    queue: the queue of its handler; source: the queue it came from (the
    same, or an auxiliary queue of it, see `retry`). span: its
    `tracing.ConsumerSpan` once a worker took it (while tracing).
    """

    __slots__ = ('slot', 'epoch', 'delivery_tag', 'routing_key', 'exchange',
                 'redelivered', 'header', 'body', 'queue', 'source', 'alone',
                 'expected', 'span')

    def __init__(self, slot, epoch, delivery_tag, routing_key, exchange,
                 redelivered, header, body, queue, source=None):
        self.slot = slot
        self.epoch = epoch
        self.delivery_tag = delivery_tag
        self.routing_key = routing_key
        self.exchange = exchange
        self.redelivered = redelivered
        self.header = header
        self.body = body
        self.queue = queue
        self.source = source or queue
        # Its commit goes in a transaction of its own (see `commits`).
        self.alone = False
        # It came back for a reason this process saw (see `settlement`).
        self.expected = False
        self.span = None

    def __repr__(self):
        return (f'<Delivery {self.header.message_id} from {self.source!r} '
                f'tag={self.delivery_tag} {self.slot}>')

    @property
    def current(self):
        """False once the channel it came on is gone (thread-safe)."""
        return self.epoch == self.slot.epoch


class Slot:
    """A logical channel that survives reconnects.

    Consumer slots consume from every queue of the connection and pass
    deliveries to `on_delivery` (called in the IO thread; it must not
    block). Sender slots only publish.
    """

    def __init__(self, connection, name, on_delivery=None):
        self.connection = connection
        self.name = name
        self.on_delivery = on_delivery
        self.epoch = 0
        # IO thread only:
        self.channel = None
        self.opening = False
        self.consumer_tags = []
        self.commits = None     # commits.Transactions/Confirms of channel
        self._waiting = []      # commits waiting for the channel to open
        # Deliveries received and not yet settled by a commit, by tag.
        self._unsettled = {}

    def __repr__(self):
        return f'<Slot {self.name} epoch={self.epoch}>'

    @property
    def usable(self):
        """IO thread: whether the slot has an open, ready channel."""
        return (self.channel is not None and self.channel.is_open
                and not self.opening)

    @property
    def busy(self):
        """IO thread: whether commits wait for the channel or the
        broker."""
        return bool(self._waiting or (self.commits and self.commits.busy))

    # Thread-safe API

    def commit(self, epoch=None, publishes=(), ack=None, reject=None,
               timeout=None, wait=True, callback=None, alone=False):
        """Publish, ACK and reject in one commit; thread-safe.

        epoch: the epoch of the delivery to ack/reject; None to use
            whatever channel the slot has (waiting for one if necessary).
        publishes: (exchange, routing_key, Header, body) tuples.
        ack: a delivery tag to ACK, or a list of them.
        reject: (delivery tag, requeue) to reject.
        alone: in a transaction of its own (see `commits`).

        Returns when the broker confirmed the commit. Raises ChannelLost
        when the broker certainly did not commit (the channel went before
        ``Tx.Commit`` was sent, `epoch` is stale, the broker closed the
        channel because of what was sent, or -- confirm mode -- a publish
        was NACKed or not confirmed), CommitInDoubt when the connection
        went after ``Tx.Commit`` was sent, and ConnectionUnavailable when
        no channel came up within `timeout` (default: the send_timeout
        parameter). With `wait=False` it returns at once and the IO thread
        calls `callback(error)` (None: committed) when the outcome is
        known; without a callback a failure is logged.
        """
        if epoch is not None and epoch != self.epoch:
            raise ChannelLost(f'{self}: channel of epoch {epoch} is gone')
        if timeout is None:
            timeout = self.connection.send_timeout
        if not wait and callback is None:
            callback = self._log_failure
        outcome = Outcome(callback)
        acks = tuple(ack) if isinstance(ack, list) else (
            () if ack is None else (ack,))
        self.connection.call(self._commit, gocept.amqprun.commits.Commit(
            outcome, epoch, tuple(publishes), acks, reject, alone))
        if not wait:
            return None
        try:
            return outcome.result(timeout)
        except TimeoutError:
            if outcome.cancel():
                raise ConnectionUnavailable(
                    f'{self}: no connection to the broker within '
                    f'{timeout} s') from None
            # Already handed to the broker: its outcome is what counts.
            return outcome.result()

    @staticmethod
    def _log_failure(error):
        if error is not None:
            log.warning('A commit nobody waits for failed: %s', error)

    # IO thread

    def _commit(self, commit):
        outcome = commit.outcome
        if commit.epoch is not None and (
                commit.epoch != self.epoch or self.channel is None
                or not self.channel.is_open):
            # The delivery's channel is gone (it may still be starting to
            # consume from further queues: deliveries of the first come
            # already, so an open channel is enough).
            if outcome.set_running_or_notify_cancel():
                outcome.set_exception(ChannelLost(
                    f'{self}: channel of epoch {commit.epoch} is gone'))
        elif commit.epoch is None and not self.usable:
            self._waiting.append(commit)
        else:
            self.commits.submit(commit)

    def unsettled_tags(self):
        """The delivery tags of the channel not settled by a commit."""
        return self._unsettled.keys()

    def committed(self, commit):
        """`commit` is committed: its deliveries are settled."""
        for tag in commit.tags:
            self._unsettled.pop(tag, None)

    def new_channel(self):
        """Open a new pika channel on the current connection (the epoch
        changed already when the old one was lost)."""
        self.opening = True
        self.channel = None
        self.connection.open_channel(self._on_open)

    def _on_open(self, channel):
        self.channel = channel
        channel.add_on_close_callback(self._on_close)
        channel.add_on_cancel_callback(self._on_cancelled_by_broker)
        if self.connection.confirm:
            self.commits = gocept.amqprun.commits.Confirms(self, channel)
            channel.confirm_delivery(
                self.commits.on_confirm, callback=self._on_mode_selected)
        else:
            self.commits = gocept.amqprun.commits.Transactions(
                self, channel)
            channel.tx_select(callback=self._on_mode_selected)

    def _on_mode_selected(self, frame):
        self.consumer_tags = []
        if self.on_delivery is None:
            self._on_ready()
        else:
            self._start_consuming(None, then=self._on_ready)

    def consume_more(self, queues):
        """Start consuming `queues` too (declared after the others)."""
        if self.usable and self.on_delivery is not None:
            self._start_consuming(queues)

    def _start_consuming(self, queues, then=None):
        """Consume `queues` (None: all of the connection's), each group
        after a basic.qos with its prefetch (it applies to the consumers
        created after it); then call `then`."""
        steps = []
        for prefetch, group in self.connection.consumption(self, queues):
            steps.append(functools.partial(
                self.channel.basic_qos,
                prefetch_count=prefetch or self.connection.prefetch))
            steps.extend(functools.partial(self._consume, queue)
                         for queue in group)

        def next_step(frame=None):
            if steps and self.channel is not None:
                step = steps.pop(0)
                self.control(functools.partial(step, callback=next_step))
            elif not steps and then is not None:
                then()
        next_step()

    def _consume(self, queue, callback):
        self.consumer_tags.append(self.channel.basic_consume(
            queue.name, functools.partial(self._on_message, queue),
            callback=callback))

    def _on_ready(self):
        self.opening = False
        log.debug('%s ready', self)
        waiting, self._waiting = self._waiting, []
        for commit in waiting:
            self._commit(commit)
        self.connection.slot_ready(self)

    def _on_message(self, queue, channel, method, properties, body):
        if channel is not self.channel:
            return
        delivery = Delivery(
            self, self.epoch, method.delivery_tag, method.routing_key,
            method.exchange, method.redelivered,
            gocept.amqprun.properties.header_from(properties), body,
            queue.handler_queue, queue.name)
        self._unsettled[method.delivery_tag] = delivery
        self.on_delivery(delivery)

    def _on_close(self, channel, reason):
        if channel is not self.channel:
            return
        self.lost(reason)
        self.connection.slot_closed(self, reason)

    def _on_cancelled_by_broker(self, frame):
        self.connection.slot_cancelled(self)

    def lost(self, reason):
        """The current channel is gone: fail the commits on it, and tell
        the connection which deliveries return to their queues."""
        self.epoch += 1
        self.channel = None
        self.consumer_tags = []
        commits, self.commits = self.commits, None
        unsettled, self._unsettled = self._unsettled, {}
        refused = isinstance(reason, pika.exceptions.ChannelClosedByBroker)
        failed = []
        if commits is not None:
            why = f'{self}: {gocept.amqprun.errors.reason(reason)}'
            failed = commits.lost(why, refused)
        if unsettled:
            self.connection.returned(
                self, list(unsettled.values()), reason,
                {tag for commit in failed for tag in commit.tags})
        self.connection.check_idle()

    def fail_waiting(self, error):
        """Fail the commits waiting for a channel (the connection ends)."""
        waiting, self._waiting = self._waiting, []
        for commit in waiting:
            if commit.outcome.set_running_or_notify_cancel():
                commit.outcome.set_exception(error)
        self.lost(error)

    def cancel(self, done):
        """Cancel consuming; call `done` when the broker confirmed (or at
        once when there is nothing to cancel)."""
        channel = self.channel
        if channel is None or not channel.is_open or not self.consumer_tags:
            done()
            return
        tags = list(self.consumer_tags)
        self.consumer_tags = []
        remaining = set(tags)

        def cancelled(tag, frame=None):
            remaining.discard(tag)
            if not remaining:
                done()
        for tag in tags:
            self.control(functools.partial(
                self._cancel_consumer, channel, tag,
                functools.partial(cancelled, tag)))

    @staticmethod
    def _cancel_consumer(channel, tag, callback):
        channel.basic_cancel(tag, callback=callback)
        # Until CancelOk, pika rejects (requeues) the consumer's deliveries
        # still on their way: they would come back as unsettled returns,
        # and a reject sent while a Tx.Commit is in flight closes the
        # connection (504). Let them come to us instead: they wait with
        # the others that no handler started (and are put back in one
        # transaction, see `server`). pika's private state:
        # tests/test_transport.py fails when it changes.
        channel._cancelled.discard(tag)

    def control(self, function):
        """Send what `function` sends on the channel without disturbing a
        commit in flight (`commits.Transactions.control`)."""
        if self.commits is None:
            function()
        else:
            self.commits.control(function)


class Senders:
    """The sender slots of a connection: a thread that sends outside a
    handler takes one for its commit (`acquire`) and gives it back
    (`release`); thread-safe. A slot made here opens its channel in the
    IO thread, once the connection is up."""

    def __init__(self, connection):
        self.connection = connection
        self._slots = []
        self._free = []
        self._lock = threading.Lock()

    def acquire(self):
        with self._lock:
            if self._free:
                return self._free.pop()
            slot = Slot(self.connection, f'sender-{len(self._slots)}')
            self._slots.append(slot)
        self.connection.call(self._open, slot)
        return slot

    def release(self, slot):
        with self._lock:
            self._free.append(slot)

    def all(self):
        """Every sender slot made so far."""
        with self._lock:
            return list(self._slots)

    @staticmethod
    def _open(slot):
        # IO thread: a slot made while connected opens now; one made before
        # opens with the others when the connection is up.
        if slot.connection.connected and slot.channel is None \
                and not slot.opening:
            slot.new_channel()
