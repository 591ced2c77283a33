"""Handing deliveries to idle workers.

Every worker has a channel of its own (a consumer slot): commits of
different workers run concurrently on different channels. The broker
pushes deliveries to channels, not to idle workers, so a channel whose
worker is busy with a slow handler would keep its prefetched deliveries
waiting while other workers idle. The `Dispatcher` prevents that:

- a delivery goes into the backlog of the slot it came on;
- a worker takes the oldest of: its own slot's next delivery, and the
  next deliveries of slots whose worker has been busy for `STEAL_AFTER`
  seconds or more (or is not there); the commit then goes on that slot's
  channel, as the ACK must go on the channel the delivery came on;
- a worker with nothing to take waits, and looks again every
  `STEAL_AFTER` seconds.

So a delivery waits for a busy worker at most `STEAL_AFTER` (plus the
look) while another worker is idle, and is not overtaken by later ones
for longer because its channel's worker is slow. Below that, a worker
keeps its own channel's deliveries: moving them to another worker would
only queue their commit behind its own on the same channel and cost
thread switches. Two workers may commit on one channel; `channel.Slot`
sends one commit after the other, so the transactions never mix.

An *isolated* delivery (one from a quarantine queue, see `retry`) runs
alone: when it is the next to take, no worker starts anything new until
every running handler has finished, and nothing else starts while it
runs. Should it kill the process, nothing else was running then.

Why no lock on the common path: the IO thread puts every delivery and
each worker gets once per message, so this is the hot path: a version
with one lock shared by all of them cost 15-20 us of CPU per message
(confirm mode, 8 workers, benchmarks/echo.py: 0.11 instead of 0.09 ms);
this one costs what per-worker queues cost. The backlogs are deques (append and popleft are
atomic), each worker sleeps on a queue of its own, and the shared flags
are written before the state they guard is read (a worker says it waits
before it looks again; a producer appends before it looks who waits), so
that of two threads at least one sees the other. Isolation, which is
rare, takes a lock.
"""

import collections
import itertools
import queue
import threading
import time


STEAL_AFTER = 0.05    # seconds


class Dispatcher:
    """Backlogs per slot index and the workers waiting for them.

    `put` may be called from any thread (the IO thread does); `get` by
    the worker of the index it names, which thereby also says that it
    finished what it got before. After `close`, `get` returns None.
    `steal_after` (default `STEAL_AFTER`; 0: at once) is how long a
    worker must have been busy before others take its slot's deliveries.
    """

    def __init__(self, size, steal_after=None):
        self.steal_after = STEAL_AFTER if steal_after is None \
            else steal_after
        # Entries: (sequence number, item, isolated).
        self._backlogs = [collections.deque() for _ in range(size)]
        self._bells = [queue.SimpleQueue() for _ in range(size)]
        self._waiting = [False] * size
        # When each worker took what it handles now, or None.
        self._busy_since = [None] * size
        self._sequence = itertools.count()
        self._closed = False
        self._isolation = threading.Lock()
        # The backlog whose next item is isolated and waits for the
        # running handlers to finish (nothing new starts meanwhile).
        self._draining = None
        self._isolated = None     # the worker running an isolated item

    def put(self, index, item, isolated=False):
        """Queue `item` (a delivery) that came on slot `index` and wake a
        waiting worker: its own if it waits, else another if the own one
        has been busy for `steal_after`."""
        self._backlogs[index].append((next(self._sequence), item, isolated))
        if self._waiting[index]:
            self._wake(index)
        elif self._slow(index, time.monotonic()):
            for other, waiting in enumerate(self._waiting):
                if waiting:
                    self._wake(other)
                    break

    def _wake(self, index):
        self._waiting[index] = False
        self._bells[index].put(None)

    def _slow(self, index, now):
        """Whether others may take slot `index`'s deliveries: its worker
        has been busy for steal_after, or it neither works nor waits
        (it is between two items, or gone)."""
        since = self._busy_since[index]
        if since is None:
            return not self._waiting[index]
        return now - since >= self.steal_after

    def get(self, index):
        """The next item for the worker of slot `index`: waits until
        there is one it may take; None once closed."""
        self._busy_since[index] = None
        if self._isolated == index:
            # The isolated item is done: let everybody go on.
            with self._isolation:
                self._isolated = None
            for other, waiting in enumerate(self._waiting):
                if waiting:
                    self._wake(other)
        bell = self._bells[index]
        timeout = self.steal_after or None
        while True:
            if self._closed:
                return None
            item = self._take(index)
            if item is not None:
                return item
            self._waiting[index] = True
            item = self._take(index)    # a put may have missed the flag
            if item is not None:
                self._waiting[index] = False
                return item
            try:
                bell.get(timeout=timeout)
            except queue.Empty:
                pass
            self._waiting[index] = False

    def _take(self, index):
        """The item for worker `index` now, or None; marks it busy."""
        busy = self._busy_since
        now = time.monotonic()
        # Busy before it looks at the isolation state (see above).
        busy[index] = now
        if self._draining is not None or self._isolated is not None:
            item = self._take_isolated(index)
            if item is None:
                busy[index] = None
            return item
        backlogs = self._backlogs
        while True:
            # The oldest head among its own backlog and those it may take
            # from (_slow is asked only of heads older than the best).
            chosen = oldest = None
            for i, backlog in enumerate(backlogs):
                if not backlog:
                    continue
                try:
                    head = backlog[0][0]
                except IndexError:      # emptied meanwhile
                    continue
                if (oldest is None or head < oldest) and (
                        i == index or self._slow(i, now)):
                    chosen, oldest = backlog, head
            if chosen is None:
                busy[index] = None
                return None
            try:
                entry = chosen.popleft()
            except IndexError:
                continue        # taken by another worker meanwhile
            if not entry[2]:
                return entry[1]
            # Isolated: back to the head; it waits for the others.
            chosen.appendleft(entry)
            busy[index] = None
            with self._isolation:
                if self._draining is None and self._isolated is None:
                    self._draining = chosen
            item = self._take_isolated(index)
            if item is not None:
                busy[index] = now
            return item

    def _take_isolated(self, index):
        """While an isolated item waits or runs: the isolated item if
        nothing else runs (then worker `index` runs it), else None."""
        with self._isolation:
            if self._isolated is not None or self._draining is None:
                return None
            if any(since is not None for i, since in
                   enumerate(self._busy_since) if i != index):
                return None
            # Isolated before no longer draining: a worker reading both
            # without the lock sees one of them set.
            backlog = self._draining
            self._isolated = index
            self._draining = None
            try:
                entry = backlog.popleft()
            except IndexError:      # (closed meanwhile)
                self._isolated = None
                return None
            self._busy_since[index] = time.monotonic()
            return entry[1]

    def close(self):
        """Make every `get` return None (now and from now on); return the
        items that were not taken."""
        self._closed = True
        left = []
        for backlog in self._backlogs:
            while True:
                try:
                    left.append(backlog.popleft()[1])
                except IndexError:
                    break
        for index, bell in enumerate(self._bells):
            bell.put(None)
        return left

    def __len__(self):
        """The number of items waiting in all backlogs."""
        return sum(len(backlog) for backlog in self._backlogs)
