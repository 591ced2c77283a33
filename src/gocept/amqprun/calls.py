"""Handing work to the IO thread: the one way across the thread boundary
(see `connection`)."""

import collections
import functools
import threading


class Calls:
    """Functions to run in the IO thread, in the order they were handed
    over.

    `call` is thread-safe; everything else runs in the IO thread. Many
    calls made while the IO thread is busy cost one wake-up of its loop
    (pika's one thread-safe entry, ``add_callback_threadsafe``). Every
    commit passes here, so only the wake-up takes a lock (a lock per call
    cost several us of CPU per message in contention): append and popleft
    of a deque are atomic, a caller appends before it looks whether a
    wake-up is on its way, the IO thread clears that flag before it takes
    the calls.
    """

    def __init__(self):
        self._pending = collections.deque()
        self._wake_pending = False
        self._lock = threading.Lock()
        self._ioloop = None
        self._running = False
        self._deferred = []

    def call(self, function, *args):
        """Run `function(*args)` in the IO thread soon; thread-safe. Calls
        made before `attach` run once it is attached."""
        self._pending.append(functools.partial(function, *args))
        if self._wake_pending:
            return
        self._wake_pending = True
        with self._lock:
            # Under the lock: detach() takes the loop away only under it.
            if self._ioloop is not None:
                self._ioloop.add_callback_threadsafe(self._run)

    def attach(self, ioloop):
        """Run calls in `ioloop` (pika's) from now on, those made before,
        too."""
        with self._lock:
            self._ioloop = ioloop
            ioloop.add_callback_threadsafe(self._run)

    def detach(self):
        """Stop using the IO loop; return it."""
        with self._lock:
            ioloop, self._ioloop = self._ioloop, None
        return ioloop

    def _run(self):
        self._wake_pending = False
        pending = self._pending
        self._running = True
        try:
            while pending:
                pending.popleft()()
        finally:
            self._running = False
            deferred, self._deferred = self._deferred, []
            for function in deferred:
                function()

    def defer(self, function):
        """Run `function` after the calls at hand, or now when there are
        none: what they hand over meanwhile is then seen by it as one
        batch (e.g. the commits of one group, see `commits`)."""
        if self._running:
            self._deferred.append(function)
        else:
            function()
