"""What a channel does with the commits handed to it (IO thread only).

A `Commit` is one unit of the promise: its publishes, the ACK of its
delivery (or several ACKs, or a reject) -- all of it reaches the broker
committed, or none of it. A channel commits in one of two modes:

`Transactions` (AMQP tx, the default): **group commit**. A commit that
finds nothing in flight on its channel goes out at once -- its publishes,
ACKs, then ``Tx.Commit`` -- together with the others handed over in the
same batch of calls (no timer: nothing waits for company). Commits handed
over while a ``Tx.Commit`` is in flight queue up; when ``Tx.CommitOk``
arrives, all of them go out together with one ``Tx.Commit``, and the next
``Tx.CommitOk`` settles them all. RabbitMQ processes one ``Tx.Commit`` of
a channel at a time (a second one while one is pending closes the
connection, 504), so the queue is what would wait anyway; a transaction
holding many commits keeps each one's promise: its publishes and ACK are
committed with the others, or not at all. The broker's cost is per
``Tx.Commit`` (one fsync, or one Raft round for a quorum queue), which is
why grouping is the lever.

A group fails as a whole: the broker closing the channel because of one
member (a publish to an exchange that does not exist, a message above its
size limit) rolls back every member. The error then says whether the
commit failed *shared* (with others) or alone, so that only a member
that failed alone counts against its message (`settlement`); a commit
marked `alone` (a delivery that came back from a failed group, or from a
quarantine queue) is always sent in a group of its own.

`Confirms` (``commit-mode confirm``): publish, wait for the broker's
publisher confirms, then ACK: at-least-once, no transaction.

Outcomes: a commit's `outcome.Outcome` gets None when committed,
`ChannelLost` when the broker certainly did not commit it (`refused` when
the broker closed the channel, `shared` when others failed with it), and
`CommitInDoubt` when the connection went after ``Tx.Commit`` was sent.
"""

import pika.spec

from gocept.amqprun.errors import ChannelLost
from gocept.amqprun.errors import CommitInDoubt
import gocept.amqprun.properties


class Commit:
    """One commit handed to the IO thread.

    epoch: the epoch of the delivery it settles (None: any channel).
    publishes: (exchange, routing_key, Header, body) tuples.
    acks: the delivery tags to ACK; reject: (tag, requeue) or None.
    alone: never share a transaction with other commits.
    """

    __slots__ = ('outcome', 'epoch', 'publishes', 'acks', 'reject', 'alone')

    def __init__(self, outcome, epoch, publishes, acks, reject, alone):
        self.outcome = outcome
        self.epoch = epoch
        self.publishes = publishes
        self.acks = acks
        self.reject = reject
        self.alone = alone

    @property
    def tags(self):
        """The delivery tags it settles."""
        if self.reject is None:
            return self.acks
        return self.acks + (self.reject[0],)


def publish(channel, publishes):
    to_properties = gocept.amqprun.properties.properties_from
    for exchange, routing_key, header, body in publishes:
        channel.basic_publish(
            exchange, routing_key, body, to_properties(header))


def settle(channel, commit):
    for tag in commit.acks:
        channel.basic_ack(tag)
    if commit.reject is not None:
        channel.basic_reject(commit.reject[0], requeue=commit.reject[1])


class Transactions:
    """Group commits on one channel in transaction mode.

    `slot` is the channel's `channel.Slot`: it gets `committed(commit)`
    for every commit the broker confirmed.
    """

    def __init__(self, slot, channel):
        self.slot = slot
        self.channel = channel
        self.queued = []      # handed over, not sent yet
        self.in_flight = []   # sent, waiting for Tx.CommitOk
        self._flushing = False
        self._controls = []   # to send once no Tx.Commit is in flight

    def control(self, function):
        """Call `function` (which sends something else on the channel,
        e.g. basic.cancel) now, or -- while a ``Tx.Commit`` is in flight,
        when RabbitMQ answers anything else with 504 -- right after its
        ``Tx.CommitOk``."""
        if self.in_flight:
            self._controls.append(function)
        else:
            function()

    @property
    def busy(self):
        """Whether a commit is queued or in flight."""
        return bool(self.queued or self.in_flight)

    def submit(self, commit):
        self.queued.append(commit)
        if not self.in_flight and not self._flushing:
            # After the calls at hand: they go out in the same group.
            self._flushing = True
            self.slot.connection.defer(self._flush)

    def _flush(self):
        self._flushing = False
        if self.in_flight or not self.queued:
            return
        group = self._next_group()
        if not group:
            return
        self.in_flight = group
        try:
            for commit in group:
                publish(self.channel, commit.publishes)
            self._settle(group)
            self.channel.tx_commit(callback=self._committed)
        except Exception as e:
            # The channel is closing (pika refuses to send): nothing of
            # this transaction reached the broker's commit.
            self.in_flight = []
            error = ChannelLost(f'{self.slot}: {e}', shared=len(group) > 1)
            for commit in group:
                commit.outcome.set_exception(error)

    def _settle(self, group):
        """ACK (and reject) what the group settles. The ACKs of the
        oldest deliveries go as one ``basic.ack`` with ``multiple``: all
        tags up to the highest of them that no other delivery of the
        channel still holds (one frame for the broker to process instead
        of one per message); the others one by one."""
        acks = set()
        for commit in group:
            acks.update(commit.acks)
            if commit.reject is not None:
                self.channel.basic_reject(
                    commit.reject[0], requeue=commit.reject[1])
        if not acks:
            return
        others = [tag for tag in self.slot.unsettled_tags()
                  if tag not in acks]
        below = min(others, default=None)
        covered = [tag for tag in acks if below is None or tag < below]
        if len(covered) > 1:
            self.channel.basic_ack(max(covered), multiple=True)
            acks.difference_update(covered)
        for tag in acks:
            self.channel.basic_ack(tag)

    def _next_group(self):
        """Take the queued commits that go together: all of them up to
        the first one marked alone, or that one by itself."""
        group = []
        while self.queued:
            commit = self.queued[0]
            if commit.alone and group:
                break
            del self.queued[0]
            if not commit.outcome.set_running_or_notify_cancel():
                continue        # its waiter gave up before it was sent
            group.append(commit)
            if commit.alone:
                break
        return group

    def _committed(self, frame):
        group, self.in_flight = self.in_flight, []
        stats = self.slot.connection.stats
        if stats is not None:
            stats.transaction()
        for commit in group:
            self.slot.committed(commit)
            commit.outcome.set_result(None)
        controls, self._controls = self._controls, []
        for function in controls:
            function()
        if self.queued:
            self._flush()
        else:
            self.slot.connection.check_idle()

    def lost(self, why, refused):
        """The channel is gone: fail what is queued and in flight; return
        the members of a group of several that the broker refused.

        A group whose ``Tx.Commit`` was sent is in doubt -- unless the
        broker closed the channel (`refused`), which it does before it
        processes later frames: then it was rolled back."""
        group, self.in_flight = self.in_flight, []
        queued, self.queued = self.queued, []
        shared = len(group) > 1
        for commit in group:
            if refused:
                commit.outcome.set_exception(
                    ChannelLost(why, refused=True, shared=shared))
            else:
                commit.outcome.set_exception(CommitInDoubt(why))
        for commit in queued:
            # Never sent.
            if commit.outcome.set_running_or_notify_cancel():
                commit.outcome.set_exception(ChannelLost(why))
        return group if refused and shared else []


class Confirms:
    """Publisher confirms on one channel: a commit publishes, waits for
    the broker's confirms of its publishes, then ACKs/rejects
    (at-least-once: a crash in between repeats the publishes)."""

    def __init__(self, slot, channel):
        self.slot = slot
        self.channel = channel
        self.sequence = 0         # publishes on the channel
        self.unconfirmed = set()
        self.waiting = []         # (first, last, commit), in order

    @property
    def busy(self):
        return bool(self.waiting)

    @staticmethod
    def control(function):
        """Call `function` now: confirm mode has nothing in flight that
        other methods would disturb."""
        function()

    def submit(self, commit):
        if not commit.outcome.set_running_or_notify_cancel():
            return
        try:
            first = self.sequence + 1
            publish(self.channel, commit.publishes)
            self.sequence += len(commit.publishes)
            self.unconfirmed.update(range(first, self.sequence + 1))
            if not commit.publishes:
                settle(self.channel, commit)
                self.slot.committed(commit)
                commit.outcome.set_result(None)
                return
        except Exception as e:
            commit.outcome.set_exception(ChannelLost(f'{self.slot}: {e}'))
            return
        self.waiting.append((first, self.sequence, commit))

    def on_confirm(self, frame):
        method = frame.method
        if method.multiple:
            confirmed = {n for n in self.unconfirmed
                         if n <= method.delivery_tag}
        else:
            confirmed = {method.delivery_tag}
        self.unconfirmed -= confirmed
        nacked = confirmed if isinstance(
            method, pika.spec.Basic.Nack) else ()
        unconfirmed = self.unconfirmed
        remaining = []
        # Per entry, look up its own few publishes: the entries and the
        # unconfirmed publishes both number up to the prefetch.
        for entry in self.waiting:
            first, last, commit = entry
            if nacked and any(n in nacked for n in range(first, last + 1)):
                commit.outcome.set_exception(ChannelLost(
                    f'{self.slot}: the broker did not accept a publish '
                    '(basic.nack)'))
            elif any(n in unconfirmed for n in range(first, last + 1)):
                remaining.append(entry)
            else:
                try:
                    settle(self.channel, commit)
                except Exception as e:
                    commit.outcome.set_exception(
                        ChannelLost(f'{self.slot}: {e}'))
                else:
                    self.slot.committed(commit)
                    commit.outcome.set_result(None)
        self.waiting = remaining
        if not remaining:
            self.slot.connection.check_idle()

    def lost(self, why, refused):
        """The channel is gone: a commit of a delivery fails (it was not
        ACKed; its input comes again), pure publishes are in doubt."""
        waiting, self.waiting = self.waiting, []
        self.unconfirmed = set()
        for first, last, commit in waiting:
            if refused or commit.epoch is not None:
                commit.outcome.set_exception(
                    ChannelLost(why, refused=refused))
            else:
                commit.outcome.set_exception(CommitInDoubt(why))
        return []
