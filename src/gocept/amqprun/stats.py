"""What a Server counts while it runs.

Cheap enough for the hot path (a lock and a dict or list update per
call), thread-safe, and without dependencies: `monitor` exposes a
snapshot in Prometheus' format, the periodic log line reads it too.
"""

import bisect
import collections
import threading


# Every handler queue has these; 'quarantined' appears after crashes.
OUTCOMES = ('handled', 'retried', 'parked')
# Seconds; the upper bounds of the histogram buckets (+Inf is implied).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
           2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Histogram:
    """Observations counted into `BUCKETS`, with their sum (not
    thread-safe: `Stats` holds the lock)."""

    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)   # the last: above all
        self.sum = 0.0

    def observe(self, value):
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value

    def copy(self):
        copy = Histogram()
        copy.counts = list(self.counts)
        copy.sum = self.sum
        return copy

    @property
    def count(self):
        return sum(self.counts)

    def cumulative(self):
        """[(upper bound, observations <= it)], +Inf last."""
        result, total = [], 0
        for bound, count in zip(BUCKETS + (float('inf'),), self.counts):
            total += count
            result.append((bound, total))
        return result


class Stats:
    """The counters of one Server; every method is thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._messages = collections.Counter()   # (queue, outcome) -> n
        self._handler = collections.defaultdict(Histogram)  # queue ->
        self._commit = Histogram()
        self._in_doubt = 0
        self._transactions = 0
        self._reconnects = 0
        self._in_flight = 0

    def message(self, queue, outcome):
        """A message of `queue` was `outcome` (one of OUTCOMES)."""
        with self._lock:
            self._messages[queue, outcome] += 1

    def committed(self, queue, seconds=None):
        """A handled message of `queue` was committed (after `seconds`,
        if known): counted as handled once the commit is confirmed."""
        with self._lock:
            self._messages[queue, 'handled'] += 1
            if seconds is not None:
                self._commit.observe(seconds)

    def transaction(self):
        """The broker committed an AMQP transaction (of one commit or a
        group of them, see `commits`)."""
        with self._lock:
            self._transactions += 1

    def commit_in_doubt(self):
        with self._lock:
            self._in_doubt += 1

    def reconnected(self):
        with self._lock:
            self._reconnects += 1

    def started(self):
        """A message is being handled now (until `finished`)."""
        with self._lock:
            self._in_flight += 1

    def finished(self, queue=None, handler_seconds=None,
                 commit_seconds=None, outcome=None):
        """The message `started` is done: its handler call took
        `handler_seconds` (failed calls too), its commit
        `commit_seconds`, it was `outcome` (each None if it does not
        apply). One call on the hot path."""
        with self._lock:
            self._in_flight -= 1
            if handler_seconds is not None:
                self._handler[queue].observe(handler_seconds)
            if commit_seconds is not None:
                self._commit.observe(commit_seconds)
            if outcome is not None:
                self._messages[queue, outcome] += 1

    def snapshot(self):
        """A consistent copy: a dict with messages {(queue, outcome): n},
        handler_seconds {queue: Histogram}, commit_seconds (Histogram),
        commits_in_doubt, transactions, reconnects, in_flight."""
        with self._lock:
            return dict(
                messages=dict(self._messages),
                handler_seconds={q: h.copy()
                                 for q, h in self._handler.items()},
                commit_seconds=self._commit.copy(),
                commits_in_doubt=self._in_doubt,
                transactions=self._transactions,
                reconnects=self._reconnects,
                in_flight=self._in_flight)

    def totals(self):
        """{outcome: n} over all queues (at least the OUTCOMES)."""
        with self._lock:
            result = dict.fromkeys(OUTCOMES, 0)
            for (queue, outcome), n in self._messages.items():
                result[outcome] = result.get(outcome, 0) + n
            return result
