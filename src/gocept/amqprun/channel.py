"""Channels: the per-channel half of the thread boundary.

The contract of the boundary is written in `connection`: only the IO
thread touches pika. Here are the objects that cross it:

- `Slot`: a logical channel that survives reconnects. `Slot.commit` is
  thread-safe: it hands the work to the IO thread and waits for an
  `Outcome`. Every other method of a Slot runs in the IO thread.
- `Delivery`: a received message as a worker gets it, tied to the slot
  and the epoch (the pika channel) it came on.
- `outcome.Outcome`: the one-shot result the IO thread hands back.

A slot's `epoch` counts the pika channels it has had. A delivery
remembers the epoch it came with; settling it on a later epoch is refused
locally with `ChannelLost` (acking an old delivery tag on a new channel
would close that channel; the broker has already requeued it).

Every slot's channel is in transaction mode: what a `Slot.commit`
publishes, ACKs and rejects reaches the broker in one AMQP transaction.
Different slots commit concurrently; the commits of one slot follow each
other: the next one's frames are sent only after the broker confirmed the
previous one (RabbitMQ closes the connection, 504, when a channel gets
anything while it processes ``Tx.Commit``). A commit fails with
`ChannelLost` when the broker certainly did not commit it, and with
`CommitInDoubt` when the connection went after ``Tx.Commit`` was sent.

In the opt-in confirm mode the channels use publisher confirms instead: a
commit publishes, waits for the confirms and only then ACKs --
at-least-once, as a crash in between repeats publishes. A NACK fails it
with `ChannelLost`, so does a lost channel when the commit belongs to a
delivery (which is then not ACKed, and comes again); a lost channel
before the confirms of mere publishes leaves them in doubt
(`CommitInDoubt`).
"""

import collections
import functools
import logging

import pika.exceptions
import pika.spec

from gocept.amqprun.errors import ChannelLost
from gocept.amqprun.errors import CommitInDoubt
from gocept.amqprun.errors import ConnectionUnavailable
from gocept.amqprun.outcome import Outcome
import gocept.amqprun.errors
import gocept.amqprun.properties


log = logging.getLogger(__name__)


class Delivery:
    """A received message as the IO thread hands it to a worker.

    queue: the queue of its handler; source: the queue it came from (the
    same, or an auxiliary queue of it, see `retry`).
    """

    __slots__ = ('slot', 'epoch', 'delivery_tag', 'routing_key', 'exchange',
                 'redelivered', 'header', 'body', 'queue', 'source')

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

    def __repr__(self):
        return (f'<Delivery {self.header.message_id} from {self.source!r} '
                f'tag={self.delivery_tag} {self.slot}>')

    @property
    def current(self):
        """False once the channel it came on is gone (thread-safe)."""
        return self.epoch == self.slot.epoch


class Slot:
    """A logical channel in transaction mode that survives reconnects.

    Consumer slots consume from every queue of the connection and pass
    deliveries to `on_delivery` (called in the IO thread; it must not
    block). Sender slots only publish.
    """

    def __init__(self, connection, name, on_delivery=None):
        self.connection = connection
        self.name = name
        self.on_delivery = on_delivery
        self.epoch = 0
        # Deliveries of this slot a worker is handling (workers add and
        # remove them; the IO thread only copies it).
        self.handling = set()
        # IO thread only:
        self.channel = None
        self.opening = False
        self.consumer_tags = []
        self._pending = []        # outcomes awaiting Commit-Ok, in order
        self._waiting = []        # commits waiting for the channel to open
        self._queued = collections.deque()   # commits after the pending
        self._sequence = 0        # confirm mode: publishes on the channel
        self._unconfirmed = set()
        self._confirms = []       # (first, last, outcome, ack, reject)

    def __repr__(self):
        return f'<Slot {self.name} epoch={self.epoch}>'

    @property
    def usable(self):
        """IO thread: whether the slot has an open, ready channel."""
        return (self.channel is not None and self.channel.is_open
                and not self.opening)

    # Thread-safe API

    def commit(self, epoch=None, publishes=(), ack=None, reject=None,
               timeout=None, wait=True, on_failure=None, on_success=None):
        """Publish, ACK and reject in one AMQP transaction; thread-safe.

        epoch: the epoch of the delivery to ack/reject; None to use
            whatever channel the slot has (waiting for one if necessary).
        publishes: (exchange, routing_key, Header, body) tuples.
        ack: a delivery tag to ACK, or a list of them.
        reject: (delivery tag, requeue) to reject.

        Returns when the broker confirmed the commit. Raises ChannelLost
        when the broker certainly did not commit (the channel went before
        ``Tx.Commit`` was sent, `epoch` is stale, the broker closed the
        channel because of what was sent, or -- confirm mode -- a publish
        was NACKed or not confirmed), CommitInDoubt when the connection
        went after ``Tx.Commit`` was sent, and ConnectionUnavailable when
        no channel came up within `timeout` (default: the send_timeout
        parameter). With `wait=False` it returns at once; a failure is
        then logged, and in confirm mode a NACK calls `on_failure(error)`
        in the IO thread (the channel lives on, the input is not ACKed),
        the confirms `on_success()`.
        """
        if epoch is not None and epoch != self.epoch:
            raise ChannelLost(f'{self}: channel of epoch {epoch} is gone')
        if timeout is None:
            timeout = self.connection.parameters.send_timeout
        outcome = Outcome()
        outcome.log_errors = not wait
        outcome.on_nack = on_failure
        outcome.on_success = on_success
        outcome.for_delivery = epoch is not None
        self.connection.call(
            self._commit, outcome, epoch, tuple(publishes), ack, reject)
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

    # IO thread

    def _commit(self, outcome, epoch, publishes, ack, reject):
        if epoch is not None and epoch != self.epoch:
            if outcome.set_running_or_notify_cancel():
                outcome.set_exception(ChannelLost(
                    f'{self}: channel of epoch {epoch} is gone'))
            return
        if epoch is not None:
            # The delivery's channel; it may still be starting to consume
            # from further queues (deliveries of the first come already).
            if self.channel is None or not self.channel.is_open:
                if outcome.set_running_or_notify_cancel():
                    outcome.set_exception(ChannelLost(
                        f'{self}: channel is closed'))
                return
        elif not self.usable:
            self._waiting.append((outcome, epoch, publishes, ack, reject))
            return
        confirm = self.connection.confirm
        if self._pending and not confirm:
            self._queued.append((outcome, epoch, publishes, ack, reject))
            return
        if not outcome.set_running_or_notify_cancel():
            return
        channel = self.channel
        if confirm:
            self._commit_confirmed(outcome, channel, publishes, ack, reject)
            return
        try:
            self._publish(channel, publishes)
            self._settle(channel, ack, reject)
            self._pending.append(outcome)
            channel.tx_commit(callback=functools.partial(
                self._committed, outcome))
        except Exception as e:
            if outcome in self._pending:
                self._pending.remove(outcome)
            outcome.set_exception(ChannelLost(f'{self}: {e}'))
            self._commit_queued()

    def _commit_queued(self):
        """Send the commits queued behind the one just confirmed."""
        while self._queued and not self._pending:
            self._commit(*self._queued.popleft())

    @staticmethod
    def _publish(channel, publishes):
        to_properties = gocept.amqprun.properties.properties_from
        for exchange, routing_key, header, body in publishes:
            channel.basic_publish(
                exchange, routing_key, body, to_properties(header))

    @staticmethod
    def _settle(channel, ack, reject):
        if isinstance(ack, list):
            for tag in ack:
                channel.basic_ack(tag)
        elif ack is not None:
            channel.basic_ack(ack)
        if reject is not None:
            channel.basic_reject(reject[0], requeue=reject[1])

    def _commit_confirmed(self, outcome, channel, publishes, ack, reject):
        """Confirm mode: publish, wait for the broker's confirms, then
        ACK/reject (at-least-once: a crash in between repeats the
        publishes)."""
        try:
            first = self._sequence + 1
            self._publish(channel, publishes)
            self._sequence += len(publishes)
            self._unconfirmed.update(range(first, self._sequence + 1))
            if not publishes:
                self._settle(channel, ack, reject)
                outcome.set_result(None)
                return
        except Exception as e:
            outcome.set_exception(ChannelLost(f'{self}: {e}'))
            return
        self._pending.append(outcome)
        self._confirms.append((first, self._sequence, outcome, ack, reject))

    def _on_confirm(self, frame):
        method = frame.method
        if method.multiple:
            confirmed = {n for n in self._unconfirmed
                         if n <= method.delivery_tag}
        else:
            confirmed = {method.delivery_tag}
        self._unconfirmed -= confirmed
        nacked = confirmed if isinstance(
            method, pika.spec.Basic.Nack) else ()
        unconfirmed = self._unconfirmed
        remaining = []
        # Per entry, look up its own few publishes: the entries and the
        # unconfirmed publishes both number up to the prefetch.
        for entry in self._confirms:
            first, last, outcome, ack, reject = entry
            if nacked and any(n in nacked for n in range(first, last + 1)):
                self._pending.remove(outcome)
                error = ChannelLost(
                    f'{self}: the broker did not accept a publish '
                    '(basic.nack)')
                outcome.set_exception(error)
                if outcome.on_nack is not None:
                    outcome.on_nack(error)
            elif any(n in unconfirmed for n in range(first, last + 1)):
                remaining.append(entry)
            else:
                self._pending.remove(outcome)
                try:
                    self._settle(self.channel, ack, reject)
                except Exception as e:
                    outcome.set_exception(ChannelLost(f'{self}: {e}'))
                else:
                    outcome.set_result(None)
                    if outcome.on_success is not None:
                        outcome.on_success()
        self._confirms = remaining

    def _committed(self, outcome, frame):
        if outcome in self._pending:
            self._pending.remove(outcome)
            outcome.set_result(None)
        self._commit_queued()

    def open(self):
        """Open a new channel (a new epoch) on the current connection."""
        self.opening = True
        self.channel = None
        self.connection.open_channel(self._on_open)

    def _on_open(self, channel):
        self.channel = channel
        channel.add_on_close_callback(self._on_close)
        channel.add_on_cancel_callback(self._on_cancelled_by_broker)
        if self.connection.confirm:
            self._sequence = 0
            self._unconfirmed = set()
            self._confirms = []
            channel.confirm_delivery(
                self._on_confirm, callback=self._on_mode_selected)
        else:
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
                steps.pop(0)(callback=next_step)
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
        for item in waiting:
            self._commit(*item)
        self.connection.slot_ready(self)

    def _on_message(self, queue, channel, method, properties, body):
        if channel is not self.channel:
            return
        self.on_delivery(Delivery(
            self, self.epoch, method.delivery_tag, method.routing_key,
            method.exchange, method.redelivered,
            gocept.amqprun.properties.header_from(properties), body,
            queue.handler_queue, queue.name))

    def _on_close(self, channel, reason):
        if channel is not self.channel:
            return
        self.lost(reason)
        self.connection.slot_closed(self, reason)

    def _on_cancelled_by_broker(self, frame):
        self.connection.slot_cancelled(self)

    def lost(self, reason):
        """The current channel is gone: fail what waits on it.

        A commit whose ``Tx.Commit`` was sent is in doubt -- unless the
        broker closed the channel, which it does before processing later
        frames: then every commit not confirmed yet was rolled back.
        """
        self.epoch += 1
        self.channel = None
        self.consumer_tags = []
        self._confirms = []
        self._unconfirmed = set()
        pending, self._pending = self._pending, []
        queued, self._queued = self._queued, collections.deque()
        refused = isinstance(reason, pika.exceptions.ChannelClosedByBroker)
        why = f'{self}: {gocept.amqprun.errors.reason(reason)}'
        for outcome in pending:
            if refused or (self.connection.confirm and outcome.for_delivery):
                outcome.set_exception(ChannelLost(why, refused=refused))
            else:
                outcome.set_exception(CommitInDoubt(why))
        for outcome, *rest in queued:
            # Never sent.
            if outcome.set_running_or_notify_cancel():
                outcome.set_exception(ChannelLost(why))

    def log_consumer_timeout(self):
        """Name the deliveries being handled when the broker closed the
        channel for a delivery unacknowledged beyond its consumer timeout;
        thread-safe."""
        being_handled = sorted(f'{d.header.message_id} from {d.source!r}'
                               for d in list(self.handling))
        log.error('%s: a delivery stayed unacknowledged longer than its '
                  'consumer timeout. Being handled: %s. The channel\'s '
                  'deliveries return and count as unsettled; raise the '
                  'broker\'s consumer_timeout or shorten the handler.',
                  self, ', '.join(being_handled) or 'nothing')

    def fail_waiting(self, error):
        """Fail the commits waiting for a channel (the connection ends)."""
        waiting, self._waiting = self._waiting, []
        for outcome, *rest in waiting:
            if outcome.set_running_or_notify_cancel():
                outcome.set_exception(error)
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
            channel.basic_cancel(tag, callback=functools.partial(
                cancelled, tag))
