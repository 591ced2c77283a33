"""Handing deliveries to idle workers.

Every worker has a channel of its own (a consumer slot): commits of
different workers run concurrently on different channels. The broker
pushes deliveries to channels, not to idle workers, so a channel whose
worker is busy with a slow handler would keep its prefetched deliveries
waiting while other workers idle. The `Dispatcher` prevents that:

- a delivery goes into the backlog of the slot it came on;
- a worker takes the oldest of: its own slot's next delivery, and the
  next deliveries of slots whose own worker is busy handling something
  (with its own backlog empty, any slot's); the commit then goes on that
  slot's channel, as the ACK must go on the channel the delivery came on;
- a worker waits only while there is nothing it may take.

So no delivery waits while a worker is idle, and none is overtaken for
long by later ones because its channel's worker is slow. Two workers may
then commit on one channel; `channel.Slot` sends one commit after the
other, so the transactions never mix.

An *isolated* delivery (one from a quarantine queue, see `retry`) runs
alone: when it is the next to take, no worker starts anything new until
every running handler has finished, and nothing else starts while it
runs. Should it kill the process, nothing else was running then.
"""

import _thread
import collections
import itertools
import threading


class Dispatcher:
    """Backlogs per slot index and the workers waiting for them.

    `put` may be called from any thread (the IO thread does); `get` by
    the worker of the index it names, which thereby also says that it
    finished what it got before. After `close`, `get` returns None.
    """

    def __init__(self, size):
        self._lock = threading.Lock()
        # Entries: (sequence number, item, isolated).
        self._backlogs = [collections.deque() for _ in range(size)]
        # A worker waits on its bell: a lock that `put` releases.
        self._bells = [_thread.allocate_lock() for _ in range(size)]
        for bell in self._bells:
            bell.acquire()
        self._waiting = collections.OrderedDict()   # index -> True
        self._busy = [False] * size
        self._sequence = itertools.count()
        # The backlog whose next item is isolated and waits for the
        # running handlers to finish (nothing new starts meanwhile).
        self._draining = None
        self._isolated = None     # the worker running an isolated item
        self._closed = False

    def put(self, index, item, isolated=False):
        """Queue `item` (a delivery) that came on slot `index` and wake a
        waiting worker: its own if it waits, else another."""
        with self._lock:
            self._backlogs[index].append(
                (next(self._sequence), item, isolated))
            if not self._waiting:
                return
            if index in self._waiting:
                del self._waiting[index]
                woken = index
            else:
                woken, _ = self._waiting.popitem(last=False)
        self._bells[woken].release()

    def get(self, index):
        """The next item for the worker of slot `index`: waits until
        there is one it may take; None once closed."""
        bell = self._bells[index]
        woken = []
        with self._lock:
            self._busy[index] = False
            if self._isolated == index:
                # The isolated item is done: let everybody go on.
                self._isolated = None
                woken, self._waiting = list(self._waiting), \
                    collections.OrderedDict()
        for other in woken:
            self._bells[other].release()
        while True:
            with self._lock:
                if self._closed:
                    return None
                item = self._take(index)
                if item is None:
                    self._waiting[index] = True
                else:
                    self._busy[index] = True
                    return item
            bell.acquire()

    def _take(self, index):
        """The item for worker `index` now, or None (lock held)."""
        if self._isolated is not None:
            return None
        if self._draining is not None:
            if any(self._busy):
                return None
            # The last running handler finished: this worker runs it.
            backlog, self._draining = self._draining, None
            self._isolated = index
            return backlog.popleft()[1]
        backlogs = self._backlogs
        own = backlogs[index]
        candidates = [b for i, b in enumerate(backlogs)
                      if b and (i == index or not own or self._busy[i])]
        if not candidates:
            return None
        backlog = min(candidates, key=lambda b: b[0][0])
        sequence, item, isolated = backlog[0]
        if isolated:
            if any(self._busy):
                self._draining = backlog
                return None
            self._isolated = index
        backlog.popleft()
        return item

    def close(self):
        """Make every `get` return None (now and from now on); return the
        items that were not taken."""
        with self._lock:
            self._closed = True
            waiting = list(self._waiting)
            self._waiting = collections.OrderedDict()
            left = [item for backlog in self._backlogs
                    for _, item, _ in backlog]
            for backlog in self._backlogs:
                backlog.clear()
        for index in waiting:
            self._bells[index].release()
        return left

    def __len__(self):
        """The number of items waiting in all backlogs."""
        with self._lock:
            return sum(len(backlog) for backlog in self._backlogs)
