"""Handing deliveries to idle workers.

All deliveries, whichever channel they came on, go into one backlog,
oldest first; an idle worker takes the oldest. Workers do not own
channels: a worker's commit goes on the channel its delivery came on (the
ACK must), and commits of many workers on one channel go out together
(see `channel`). So no delivery waits while a worker is idle, and none is
overtaken by later ones.

An *isolated* delivery (one from a quarantine queue, see `retry`) runs
alone: when it is the next to take, no worker starts anything new until
every running handler has finished, and nothing else starts while it
runs. Should it kill the process, nothing else was running then.

Threads: `put` may be called from any thread (the IO thread does), `get`
only by the worker of the index it names. The common path takes one
small lock per `put` (to pick the worker to wake) and none per `get`:
the backlog is a deque (append and popleft are atomic in CPython and
documented thread-safe), each worker sleeps on a queue of its own, and a
worker records that it waits (under the lock) before it looks into the
backlog once more -- so a delivery put meanwhile is either seen by that
look or wakes it. Isolation, which is rare, takes a second lock; the
worker marks itself busy before it reads the isolation state, and the
isolating worker reads the busy marks after it set that state, so that
of the two at least one sees the other.
"""

import collections
import queue
import threading


# Seconds after which a waiting worker looks again on its own. Not needed
# for progress (a put always wakes a waiting worker); it bounds the harm
# of a bug in the wake-up protocol.
LOOK_AGAIN = 1.0


class Dispatcher:
    """The backlog of deliveries and the `size` workers taking them.

    `get(index)` by worker `index` also says that it finished what it got
    before. After `close`, `get` returns None.
    """

    def __init__(self, size):
        self._backlog = collections.deque()     # (item, isolated)
        self._bells = [queue.SimpleQueue() for _ in range(size)]
        self._wake_lock = threading.Lock()
        self._waiting = []        # indexes of waiting workers, under lock
        # Per worker: True while it handles what it took (written by
        # that worker only).
        self._busy = [False] * size
        self._closed = False
        self._isolation = threading.Lock()
        # An isolated item is waiting for the running handlers to finish
        # (nothing new starts meanwhile), or the index of the worker
        # running it.
        self._draining = False
        self._isolated = None

    def put(self, item, isolated=False):
        """Queue `item` and wake a waiting worker, if there is one."""
        self._backlog.append((item, isolated))
        with self._wake_lock:
            if self._waiting:
                self._bells[self._waiting.pop()].put(None)

    def get(self, index):
        """The next item for worker `index`: waits until there is one it
        may take; None once closed."""
        self._busy[index] = False
        if self._isolated == index:
            self._end_isolation()
        bell = self._bells[index]
        while not self._closed:
            item = self._take(index)
            if item is not None:
                return item
            with self._wake_lock:
                self._waiting.append(index)
            item = self._take(index)     # a put may have come meanwhile
            if item is not None:
                self._stop_waiting(index)
                return item
            try:
                bell.get(timeout=LOOK_AGAIN)
            except queue.Empty:
                pass
            self._stop_waiting(index)
        return None

    def _stop_waiting(self, index):
        with self._wake_lock:
            if index in self._waiting:
                self._waiting.remove(index)

    def _take(self, index):
        """The item for worker `index` now, or None; marks it busy."""
        # Busy before it looks at the isolation state (see above).
        self._busy[index] = True
        if self._draining or self._isolated is not None:
            return self._take_isolated(index)
        try:
            item, isolated = self._backlog.popleft()
        except IndexError:
            self._busy[index] = False
            return None
        if not isolated:
            return item
        # Back to the head: it waits for the running handlers.
        self._backlog.appendleft((item, isolated))
        with self._isolation:
            if self._isolated is None:
                self._draining = True
        return self._take_isolated(index)

    def _take_isolated(self, index):
        """While an isolated item waits or runs: the isolated item if
        nothing else runs (worker `index` then runs it), else None."""
        with self._isolation:
            if self._isolated is not None or not self._draining or any(
                    busy for i, busy in enumerate(self._busy)
                    if i != index):
                self._busy[index] = False
                return None
            try:
                item, isolated = self._backlog.popleft()
            except IndexError:      # closed meanwhile
                self._draining = False
                self._busy[index] = False
                return None
            if not isolated:     # (an isolated item must be first here)
                self._backlog.appendleft((item, isolated))
                self._busy[index] = False
                return None
            # Isolated before no longer draining: a worker reading both
            # without the lock sees one of them set.
            self._isolated = index
            self._draining = False
            return item

    def _end_isolation(self):
        with self._isolation:
            self._isolated = None
        with self._wake_lock:
            waiting, self._waiting = self._waiting, []
        for other in waiting:
            self._bells[other].put(None)

    def close(self):
        """Make every `get` return None (now and from now on); return the
        items that were not taken."""
        self._closed = True
        left = []
        while True:
            try:
                left.append(self._backlog.popleft()[0])
            except IndexError:
                break
        for bell in self._bells:
            bell.put(None)
        return left

    def __len__(self):
        """The number of items waiting in the backlog."""
        return len(self._backlog)
