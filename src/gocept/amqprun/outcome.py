"""The hand-back of work between a thread and the IO thread."""

import _thread
import logging


log = logging.getLogger(__name__)


class Outcome:
    """The one-shot result of work handed to the IO thread.

    Like a `concurrent.futures.Future` reduced to what a commit needs (on a
    bare lock: a commit's hand-back is on the hot path). A waiter calls
    `result`; work nobody waits for has a `callback`, called with the
    error (or None) in the thread that sets the outcome -- the IO thread.
    """

    __slots__ = ('_done', '_state', '_value', '_error', 'callback')
    _guard = _thread.allocate_lock()
    PENDING, RUNNING, CANCELLED, DONE = range(4)

    def __init__(self, callback=None):
        self._done = _thread.allocate_lock()
        self._done.acquire()
        self._state = self.PENDING
        self._value = self._error = None
        self.callback = callback

    def set_running_or_notify_cancel(self):
        """IO thread: False if the waiter gave up (then do nothing)."""
        with self._guard:
            if self._state == self.CANCELLED:
                return False
            self._state = self.RUNNING
            return True

    def cancel(self):
        """Waiter: give up unless the IO thread started; True if so."""
        with self._guard:
            if self._state == self.PENDING:
                self._state = self.CANCELLED
            return self._state == self.CANCELLED

    def set_result(self, value):
        self._value = value
        self._finish()

    def set_exception(self, error):
        self._error = error
        self._finish()

    def _finish(self):
        if self._state == self.DONE:
            return
        self._state = self.DONE
        self._done.release()
        if self.callback is not None:
            try:
                self.callback(self._error)
            except Exception:
                log.exception('Error in the callback of a commit')

    def result(self, timeout=None):
        """Wait for the outcome; raise TimeoutError after `timeout`."""
        if self._state != self.DONE:
            if not self._done.acquire(
                    timeout=-1 if timeout is None else timeout):
                raise TimeoutError()
            self._done.release()
        if self._error is not None:
            raise self._error
        return self._value
