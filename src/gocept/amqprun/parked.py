"""Parked messages: what an operator sees of them and brings back.

A message that keeps failing is parked in ``<queue>.parked`` with the
records of its failure (`retry`). `Parked` lists, shows, replays and
drops such messages, on a pika BlockingConnection of its own (never the
daemon's; one thread), while the daemon runs -- the daemon never
consumes parked queues -- on classic and quorum queues alike.

Reading without changing. AMQP cannot peek: ``basic.get`` and a requeue
(nack, reject) flag the message ``redelivered`` and count a return in a
quorum queue's ``x-delivery-count`` -- a delivery limit could drop a
parked message just because someone looked at it. So every operation
makes one *pass* over a parked queue: it takes (``basic.get``) exactly
as many messages as the queue held when the pass began and settles each
in an AMQP transaction that ACKs it and either republishes it unchanged
to the queue's tail (kept; without the broker's ``x-delivery-count``),
publishes it to its handler queue (replayed) or nothing more (dropped).
After the pass the kept messages are in their old order, none is
redelivered or counted, and none was unsettled longer than one
transaction. A pass holds up to `batch` kept messages per transaction.

Around a pass:

- A message parked while a pass runs is not seen by it; it ends up among
  the kept messages instead of behind them.
- Tools exclude each other: each operation holds the lock of its parked
  queues, an exclusive queue ``<queue>.parked.lock`` that the broker
  removes with the connection; another tool waits up to `lock_timeout`
  seconds, then raises `Busy`. Nothing else may consume parked queues.
- A replay or drop of ids first makes a pass that only looks: an id not
  parked raises `NotParked` before anything was moved.
- A lost connection (`Interrupted`): what was replayed or dropped before
  is done; the messages in hand (a batch of kept ones, or the one being
  moved) return to the head of the parked queue, flagged redelivered --
  unless the connection was lost after ``Tx.Commit`` was sent: then the
  commit is *in doubt* (the broker committed or rolled back, nobody can
  tell which) and `Interrupted.in_doubt` names the message. The kept
  messages are all there, their order rotated by what the pass had done.
"""

import logging
import time

import pika.exceptions

from gocept.amqprun.parkedmessage import REPLAYS  # noqa: F401 (API)
from gocept.amqprun.parkedmessage import ParkedMessage
from gocept.amqprun.parkedmessage import jsonable  # noqa: F401 (API)
from gocept.amqprun.retry import DELIVERY_COUNT
import gocept.amqprun.errors
import gocept.amqprun.inspection
import gocept.amqprun.properties
import gocept.amqprun.retry


log = logging.getLogger(__name__)


def lock_queue(queue):
    """The exclusive queue whose owner works on `queue`'s parked queue."""
    return f'{gocept.amqprun.retry.parked_queue(queue)}.lock'


class NotParked(LookupError):
    """Message ids that are not parked (`ids`); nothing was changed."""

    def __init__(self, ids, queues):
        self.ids = list(ids)
        self.queues = list(queues)
        super().__init__(
            f'not parked in {", ".join(map(repr, self.queues))}: '
            f'{", ".join(map(str, self.ids))}')


class UnknownQueue(ValueError):
    """A queue that is not a handler queue of the configuration."""


class Busy(gocept.amqprun.errors.AMQPError):
    """Another tool holds the lock of a parked queue (`lock_queue`)."""


class TargetMissing(gocept.amqprun.errors.AMQPError):
    """A handler queue to replay to does not exist on the broker."""


class Interrupted(gocept.amqprun.errors.AMQPError):
    """The connection (or channel) was lost during an operation.

    done: the `ParkedMessage` objects replayed or dropped before;
    in_doubt: the one whose commit was in doubt (None if none was);
    action: 'replay', 'drop' or 'read'.
    """

    def __init__(self, message, action, done=(), in_doubt=None):
        super().__init__(message)
        self.action = action
        self.done = list(done)
        self.in_doubt = in_doubt


# What a pass does with a message.
KEEP = 'keep'
REPLAY = 'replay'
DROP = 'drop'
ACTING = {REPLAY: 'replaying', DROP: 'dropping', 'read': 'reading'}


class Parked:
    """The parked messages of `queues` (the names of handler queues) on
    the broker of `parameters` (`parameters.Parameters`); see the
    module's docstring for what each operation guarantees.

    Connects on first use, on a connection of its own, and reconnects
    after a lost one; use it from one thread. `close()` (or leaving a
    ``with`` block) closes the connection.

    An unknown `queue` raises `UnknownQueue`; an unreachable broker
    `errors.ConnectionFailed`; a lost connection `Interrupted`.
    """

    def __init__(self, parameters, queues, lock_timeout=30.0, batch=50):
        self.parameters = parameters
        self.queues = list(queues)
        self.lock_timeout = lock_timeout
        self.batch = batch
        self._connection = None
        self._channel = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        connection, self._connection = self._connection, None
        self._channel = None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except pika.exceptions.AMQPError:
                pass

    def list(self, queue=None):
        """The parked messages of `queue` (default: of every queue), in
        their order, queue by queue."""
        result = []
        self._run('read', self._selected(queue),
                  lambda message: result.append(message) or KEEP)
        return result

    def show(self, message_id, queue=None):
        """The (first) parked message with `message_id`."""
        for message in self.list(queue):
            if message.message_id == message_id:
                return message
        raise NotParked([message_id], self._parked_queues(queue))

    def replay(self, ids=None, queue=None, dry_run=False):
        """Move the parked messages with `ids` (None: all) back into the
        handler queues they failed in, each in a transaction of its own;
        return them. `dry_run`: return what would be moved, change
        nothing."""
        return self._settle(REPLAY, ids, queue, dry_run)

    def drop(self, ids=None, queue=None):
        """Delete the parked messages with `ids` (None: all), each in a
        transaction of its own; return them."""
        return self._settle(DROP, ids, queue)

    # Internals

    def _selected(self, queue):
        if queue is None:
            return list(self.queues)
        if queue not in self.queues:
            raise UnknownQueue(
                f'{queue!r} is not a handler queue of this configuration '
                f'(known: {", ".join(self.queues) or "none"})')
        return [queue]

    def _parked_queues(self, queue):
        return [gocept.amqprun.retry.parked_queue(q)
                for q in self._selected(queue)]

    def _settle(self, action, ids, queue, dry_run=False):
        queues = self._selected(queue)
        wanted = None if ids is None else set(ids)
        if wanted is not None and not wanted:
            return []
        if wanted is None and dry_run:
            return self.list(queue)

        def pick(message):
            if wanted is None or message.message_id in wanted:
                return action
            return KEEP
        return self._run(action, queues, pick, check=wanted,
                         dry_run=dry_run)

    def _run(self, action, queues, choose, check=None, dry_run=False):
        """Lock `queues`, make a pass over each with `choose` (a message
        -> KEEP, REPLAY or DROP); return the messages replayed or
        dropped. With ids to `check`, a pass that only reads comes
        first (NotParked)."""
        done = []
        self._in_doubt = None
        try:
            self._connect()
            self._lock(queues)
            try:
                if check is not None:
                    seen = []
                    for queue in queues:
                        self._pass(queue, lambda m: seen.append(m) or KEEP)
                    selected = [m for m in seen if m.message_id in check]
                    missing = check - {m.message_id for m in selected}
                    if missing:
                        raise NotParked(sorted(missing, key=str), [
                            gocept.amqprun.retry.parked_queue(q)
                            for q in queues])
                    if dry_run:
                        return selected
                    touched = [q for q in queues
                               if any(m.queue == q for m in selected)]
                else:
                    touched = queues
                if action == REPLAY:
                    self._check_targets(touched)
                for queue in touched:
                    self._pass(queue, choose, done)
            finally:
                self._unlock(queues)
        except pika.exceptions.AMQPError as e:
            self._lost()
            raise self._interrupted(action, e, done) from None
        return done

    def _interrupted(self, action, error, done):
        why = gocept.amqprun.errors.reason(error)
        if isinstance(error, pika.exceptions.ChannelClosed):
            # A commit the broker refused was rolled back.
            in_doubt = None
            text = f'The broker closed the channel ({why})'
        else:
            in_doubt = self._in_doubt
            text = f'Lost the connection to the broker ({why})'
        if done:
            text += f' after {ACTING[action]} {len(done)} message(s)'
        if in_doubt is not None:
            text += (
                f'; {action} of message {in_doubt.message_id} is in doubt '
                '(connection lost after Tx.Commit): it is either '
                + (f'back in {in_doubt.queue!r}' if action == REPLAY
                   else 'dropped') +
                f' or still in {in_doubt.queue + ".parked"!r}; list it to '
                'see. Nothing else is lost or doubled.')
        else:
            text += ('; nothing is lost: messages not yet settled are '
                     'still parked.')
        return Interrupted(text, action, done, in_doubt)

    def _connect(self):
        if self._connection is not None and self._connection.is_open \
                and self._channel is not None and self._channel.is_open:
            try:
                # Idle, it answered no heartbeats: is it still there?
                self._connection.process_data_events(0)
            except pika.exceptions.AMQPError:
                pass
            else:
                if self._connection.is_open and self._channel.is_open:
                    return
        self.close()
        self._connection = gocept.amqprun.inspection.connect(
            self.parameters)
        self._open_channel()

    def _open_channel(self):
        self._channel = self._connection.channel()
        self._channel.tx_select()

    def _lost(self):
        # A channel closed by the broker leaves the connection usable,
        # but unacked messages and locks are bound to the connection:
        # start afresh.
        self.close()

    def _lock(self, queues):
        """Take the locks of `queues` (in a fixed order), waiting up to
        `lock_timeout` seconds in all."""
        deadline = time.monotonic() + self.lock_timeout
        for number, queue in enumerate(sorted(queues)):
            name = lock_queue(queue)
            while True:
                try:
                    self._channel.queue_declare(name, exclusive=True)
                    break
                except pika.exceptions.ChannelClosedByBroker as e:
                    if e.reply_code != 405:     # RESOURCE_LOCKED
                        raise
                    self._open_channel()
                if time.monotonic() >= deadline:
                    self._unlock(sorted(queues)[:number])
                    raise Busy(
                        'Another tool works on '
                        f'{gocept.amqprun.retry.parked_queue(queue)!r} '
                        f'(it holds {name!r}); gave up after '
                        f'{self.lock_timeout:g} s.')
                self._connection.sleep(0.1)

    def _unlock(self, queues):
        """Release the locks of `queues` (a lost connection released
        them already)."""
        if self._channel is None:
            return
        try:
            for queue in queues:
                self._channel.queue_delete(lock_queue(queue))
        except pika.exceptions.AMQPError:
            self.close()

    def _count(self, name):
        """Ready messages in queue `name` (None if it does not exist)."""
        try:
            ok = self._channel.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code != 404:
                raise
            self._open_channel()
            return None
        return ok.method.message_count

    def _check_targets(self, queues):
        for queue in queues:
            if self._count(queue) is None:
                raise TargetMissing(
                    f'Queue {queue!r} does not exist on the broker: nothing '
                    'replayed (the daemon declares it when it starts).')

    def _pass(self, queue, choose, done=None):
        """Take each message `queue`'s parked queue held at the start
        once, and settle it as `choose` says (see the module)."""
        name = gocept.amqprun.retry.parked_queue(queue)
        count = self._count(name) or 0
        channel = self._channel
        kept = []
        for _ in range(count):
            method, properties, body = channel.basic_get(name)
            if method is None:
                break
            message = ParkedMessage(
                queue, gocept.amqprun.properties.header_from(properties),
                body, method.redelivered)
            what = choose(message)
            if what == KEEP:
                kept.append((method.delivery_tag, properties, body))
                if len(kept) >= self.batch:
                    self._keep(name, kept)
                continue
            self._keep(name, kept)
            if what == REPLAY:
                channel.basic_publish(
                    '', queue, body, gocept.amqprun.properties
                    .properties_from(message.replay_header()))
            channel.basic_ack(method.delivery_tag)
            self._in_doubt = message
            channel.tx_commit()
            self._in_doubt = None
            done.append(message)
            log.info('%s message %s of %r (parked since %s).',
                     'Replayed' if what == REPLAY else 'Dropped',
                     message.message_id, queue, message.parked_at)
        self._keep(name, kept)

    def _keep(self, name, kept):
        """Republish `kept` messages to their queue's tail, ACK them."""
        if not kept:
            return
        for tag, properties, body in kept:
            headers = properties.headers
            if headers and DELIVERY_COUNT in headers:
                properties.headers = {k: v for k, v in headers.items()
                                      if k != DELIVERY_COUNT} or None
            self._channel.basic_publish('', name, body, properties)
            self._channel.basic_ack(tag)
        self._channel.tx_commit()
        kept.clear()
