"""What becomes of a delivery after its handler ran.

A delivery is settled exactly once by this process: by its handler's
commit (the replies and its ACK, see `session`), or -- when that failed
for certain -- by the retry policy's commit (ACK plus a retry, quarantine
or parked copy, see `retry`); never both. A delivery whose channel is gone
is left to the broker, which redelivers it.

`Settlement` keeps the accounts of both kinds of commit (the counters of
`stats`, the log lines) and what the process knows about deliveries that
come back:

- `Refusals`: commits the broker refused *alone* (closing the channel
  because of what one message sent) count against that message; after
  the policy's retries it is parked instead of being tried for ever.
- Expected returns: when the broker closes a channel, the deliveries not
  settled on it return to their queues, flagged redelivered. A redelivered
  delivery normally counts as an unsettled return (a process may have
  died with it, see `retry`), but these this process saw go back itself,
  for a reason that is not theirs: members of a group commit the broker
  refused because of one of them (each is then committed alone, so that
  only the culprit fails again -- and that one alone is counted), or
  deliveries that merely waited on a channel the broker closed. Only the
  deliveries being handled when a consumer timeout closed their channel
  count: one of them ran too long.
"""

import collections
import hashlib
import logging
import threading

from gocept.amqprun import tracing
import gocept.amqprun.errors
import gocept.amqprun.retry


log = logging.getLogger(__name__)


class BrokerRefused(Exception):
    """The broker refused every commit of a message's handling."""


class Retry:
    """A dispatcher item: settle `delivery`, which failed with `error`,
    through the retry policy (an input NACKed in confirm mode)."""

    def __init__(self, delivery, error):
        self.delivery = delivery
        self.error = error


def key(delivery):
    """What identifies a delivery's message across redeliveries: its
    message id, else a digest of its body."""
    return delivery.header.message_id or hashlib.sha1(
        delivery.body).hexdigest()


class Settlement:
    """The accounts and decisions of one Server's deliveries.

    retry_policy: a `retry.RetryPolicy`; stats: a `stats.Stats`;
    retry_later: a function(Retry) that has a worker settle a delivery
    through the retry policy (the server's dispatcher).
    """

    def __init__(self, retry_policy, stats, retry_later):
        self.retry_policy = retry_policy
        self.stats = stats
        self.retry_later = retry_later
        self.refusals = Refusals()
        self.expected = Expected()

    # The IO thread

    def classify(self, delivery):
        """A delivery arrived: if it came back, note whether this process
        expected it (`delivery.expected`) and whether it is suspected of
        making a commit fail (`delivery.alone`: it was in a refused group,
        or refused alone before). A suspect runs isolated (see `dispatch`)
        and commits alone, so that its failure sinks nobody else."""
        if not gocept.amqprun.retry.returns(delivery):
            return
        message = key(delivery)
        alone = self.expected.take(message)
        delivery.expected = alone is not None
        delivery.alone = bool(alone) or self.refusals.count(message) > 0

    # Worker threads

    def returns_unsettled(self, delivery):
        """Whether `delivery` came back unsettled and must be counted
        (quarantined) before it is handled (see `classify`)."""
        return bool(gocept.amqprun.retry.returns(delivery)) \
            and not delivery.expected

    def refused_too_often(self, delivery):
        """Park `delivery` if the broker refused its commit, alone, more
        often than the policy retries; return whether it did."""
        refused = self.refusals.count(key(delivery))
        if refused <= self.retry_policy.retries:
            return False
        self.failed(delivery, BrokerRefused(
            f'the broker refused {refused} commit(s) of its handling'),
            park=True)
        self.refusals.forget(key(delivery))
        return True

    def count_refusal(self, delivery, error):
        """Count `error` against `delivery` if the broker refused its
        commit while it was alone (see `Refusals`)."""
        if getattr(error, 'refused', False) and not error.shared:
            self.refusals.add(key(delivery))

    def quarantine(self, delivery):
        """`delivery` came back unsettled: count it (see `retry`)."""
        self.commit(delivery, self.retry_policy.quarantine(delivery))

    def failed(self, delivery, error, park=False):
        """Settle a failed delivery as the retry policy says."""
        if tracing.ACTIVE:
            tracing.failed(delivery, error)
        self.commit(delivery, self.retry_policy.decide(
            delivery, error, park=park))

    def commit(self, delivery, decision):
        """Commit `decision` (a `retry.Decision`) for `delivery`: ACK it
        and publish the decision's copies, or reject it, in one commit on
        its channel."""
        message_id = delivery.header.message_id
        if not delivery.current:
            log.warning('Message %s from queue %r: its channel is gone; the '
                        'broker redelivers it.', message_id, delivery.queue,
                        extra=about(delivery))
            tracing.end(delivery, 'requeued')
            return
        if tracing.ACTIVE:
            tracing.publishing(decision.publishes)
        try:
            delivery.slot.commit(
                delivery.epoch, decision.publishes,
                ack=None if decision.reject else delivery.delivery_tag,
                reject=decision.reject, alone=delivery.alone)
        except gocept.amqprun.errors.CommitInDoubt as e:
            self.stats.commit_in_doubt()
            log.warning('Commit in doubt: message %s from queue %r, %s (%s); '
                        'the broker either has it or redelivers the message.',
                        message_id, delivery.queue, decision.description, e,
                        extra=about(delivery))
            tracing.end(delivery, 'in_doubt', e)
        except gocept.amqprun.errors.AMQPError as e:
            log.warning('Message %s from queue %r: could not commit its %s '
                        '(%s); the broker redelivers it.', message_id,
                        delivery.queue, decision.description, e,
                        extra=about(delivery))
            tracing.end(delivery, 'requeued', e)
        else:
            self.stats.message(delivery.queue, decision.outcome)
            level = logging.ERROR if decision.outcome == 'parked' \
                else logging.WARNING
            log.log(level, 'Message %s from queue %r: %s.', message_id,
                    delivery.queue, decision.description,
                    extra=about(delivery))
            tracing.end(delivery, decision.outcome)

    # Worker threads (a commit waited for) or the IO thread (not waited
    # for).

    def handled(self, delivery, error, seconds=None):
        """The commit of a handled delivery ended: `error` None
        (committed, in `seconds`), or the AMQPError it failed with."""
        stats = self.stats
        if error is None:
            stats.committed(delivery.queue, seconds)
            if tracing.ACTIVE:
                tracing.end(delivery, 'handled')
            return
        message_id = delivery.header.message_id
        if isinstance(error, gocept.amqprun.errors.CommitInDoubt):
            stats.commit_in_doubt()
            log.warning('Commit in doubt: message %s from queue %r (%s). The '
                        'broker either committed its ACK and messages or '
                        'redelivers it.', message_id, delivery.queue, error,
                        extra=about(delivery))
            tracing.end(delivery, 'in_doubt', error)
            return
        self.count_refusal(delivery, error)
        refused = getattr(error, 'refused', False)
        if delivery.current:
            # The channel lives (a NACK in confirm mode): the input is
            # not ACKed; settle it through the retry policy.
            log.warning('Message %s from queue %r: the broker did not take '
                        'its messages (%s).', message_id, delivery.queue,
                        error, extra=about(delivery))
            self.retry_later(Retry(delivery, error))
        elif refused and error.shared:
            log.warning('Message %s from queue %r: its commit failed '
                        'together with others\' (%s); the broker redelivers '
                        'it, to be committed alone.', message_id,
                        delivery.queue, error, extra=about(delivery))
            tracing.end(delivery, 'requeued', error)
        else:
            log.warning('Message %s from queue %r: its commit failed (%s); '
                        'the broker redelivers it.', message_id,
                        delivery.queue, error, extra=about(delivery))
            tracing.end(delivery, 'requeued', error)

    # The IO thread

    def returned(self, deliveries, reason, failed_tags, handling):
        """A channel went with `deliveries` not settled; they return to
        their queues. `failed_tags`: those of a refused group commit;
        `handling`: the deliveries workers are handling now."""
        if not gocept.amqprun.errors.closed_by_broker(reason):
            return      # the connection went: the returns count
        timed_out = gocept.amqprun.errors.timed_out(reason)
        if timed_out:
            log.error('A delivery stayed unacknowledged longer than its '
                      'consumer timeout. Being handled: %s. Their deliveries '
                      'return and count as unsettled; raise the broker\'s '
                      'consumer_timeout or shorten the handler.',
                      ', '.join(sorted(
                          f'{d.header.message_id} from {d.source!r}'
                          for d in handling)) or 'nothing')
        if failed_tags:
            log.warning('The broker refused a commit of %d messages together '
                        '(%s); they return and are committed alone.',
                        len(failed_tags), gocept.amqprun.errors.reason(reason))
        for delivery in deliveries:
            if timed_out and delivery in handling:
                continue
            message = key(delivery)
            self.expected.add(message, delivery.delivery_tag in failed_tags
                              or self.refusals.count(message) > 0)


def about(delivery):
    """The `extra` of a log record about `delivery` (see `log`; with
    its trace and span id while tracing)."""
    return {'message_id': delivery.header.message_id,
            'queue': delivery.queue, **tracing.ids_of(delivery)}


class Refusals:
    """Counts, per message, commits the broker refused by closing the
    channel (e.g. a reply to an exchange that does not exist) while the
    message was committed alone.

    Such a failure takes the channel with it, so the count cannot be
    committed with the message; the broker redelivers it. This in-memory
    count (per process, thread-safe, bounded) lets the worker park such a
    message after the policy's retries instead of looping.
    """

    def __init__(self, size=10000):
        self.size = size
        self._counts = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, key):
        with self._lock:
            self._counts[key] = self._counts.pop(key, 0) + 1
            while len(self._counts) > self.size:
                self._counts.popitem(last=False)
            return self._counts[key]

    def count(self, key):
        with self._lock:
            return self._counts.get(key, 0)

    def forget(self, key):
        with self._lock:
            self._counts.pop(key, None)


class Expected:
    """Messages expected back from the broker for a reason this process
    saw (see above), with whether each must be committed alone; per
    process, thread-safe, bounded (the oldest go first)."""

    def __init__(self, size=100000):
        self.size = size
        self._alone = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, key, alone):
        with self._lock:
            self._alone[key] = alone or self._alone.pop(key, False)
            while len(self._alone) > self.size:
                self._alone.popitem(last=False)

    def take(self, key):
        """Whether the message must be committed alone; None if it is
        not expected. Each `add` is taken once."""
        with self._lock:
            return self._alone.pop(key, None)
