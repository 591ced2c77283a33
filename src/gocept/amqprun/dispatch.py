"""Handing deliveries to idle workers.

Every worker has a channel of its own (a consumer slot): commits of
different workers run concurrently on different channels. The broker
pushes deliveries to channels, not to idle workers, so a channel whose
worker is busy with a slow handler would keep its prefetched deliveries
waiting while other workers idle. The `Dispatcher` prevents that:

- a delivery goes into the backlog of the slot it came on;
- a worker takes from its own slot's backlog first (its commits then run
  on its own channel, concurrently with the others'), and when that is
  empty, from another slot's backlog -- the commit then goes on that
  slot's channel, as the ACK must go on the channel the delivery came on;
- a worker waits only while every backlog is empty.

So no delivery waits while a worker is idle. Two workers may then commit
on one channel; each commit's frames are sent together by the IO thread,
so the transactions follow each other and never mix.
"""

import _thread
import collections
import threading


class Dispatcher:
    """Backlogs per slot index and the workers waiting for them.

    `put` may be called from any thread (the IO thread does); `get` by
    the worker of the index it names. After `close`, `get` returns None.
    """

    def __init__(self, size):
        self._lock = threading.Lock()
        self._backlogs = [collections.deque() for _ in range(size)]
        # A worker waits on its bell: a lock that `put` releases.
        self._bells = [_thread.allocate_lock() for _ in range(size)]
        for bell in self._bells:
            bell.acquire()
        self._waiting = collections.OrderedDict()   # index -> True
        self._closed = False

    def put(self, index, item):
        """Queue `item` (a delivery) that came on slot `index` and wake a
        waiting worker: its own if it waits, else another."""
        with self._lock:
            self._backlogs[index].append(item)
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
        there is one; None once closed."""
        bell = self._bells[index]
        while True:
            with self._lock:
                if self._closed:
                    return None
                item = self._take(index)
                if item is None:
                    self._waiting[index] = True
            if item is not None:
                return item
            bell.acquire()

    def _take(self, index):
        backlogs = self._backlogs
        if backlogs[index]:
            return backlogs[index].popleft()
        size = len(backlogs)
        for offset in range(1, size):
            backlog = backlogs[(index + offset) % size]
            if backlog:
                return backlog.popleft()
        return None

    def close(self):
        """Make every `get` return None (now and from now on); return the
        items that were not taken."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = list(self._waiting), {}
            left = [item for backlog in self._backlogs for item in backlog]
            for backlog in self._backlogs:
                backlog.clear()
        for index in waiting:
            self._bells[index].release()
        return left

    def __len__(self):
        """The number of items waiting in all backlogs."""
        with self._lock:
            return sum(len(backlog) for backlog in self._backlogs)
