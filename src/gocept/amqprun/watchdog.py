"""Stuck handlers: a warning with the stack while a handler runs long.

`Watchdog` looks at `Server.activity()` in a thread of its own. A message
handled for longer than `interval` seconds is logged as a WARNING with its
message id, queue, the seconds so far and the current stack of the worker
thread (where it hangs), again after every further `interval` while it
runs, and not after it returned. It reads; it never interrupts a handler.
"""

import logging
import sys
import threading
import traceback


log = logging.getLogger(__name__)


class Watchdog:
    """Warns about the handlings of `server` (a `server.Server`, or
    anything with its `activity()`) that run longer than `interval`
    seconds (> 0), every `interval`.

    `start()` runs it in a daemon thread, `stop()` ends that thread;
    `check()` is one look (the thread calls it several times per
    interval) and returns the activities it warned about.
    """

    def __init__(self, server, interval):
        if interval <= 0:
            raise ValueError(f'interval must be positive, not {interval!r}')
        self.server = server
        self.interval = interval
        # Looks per interval: a warning comes at most a quarter of an
        # interval (at most 1 s) late.
        self.period = min(interval / 4, 1.0)
        # thread id -> (message id, seconds at the last look, warnings)
        self._seen = {}
        self._stopping = threading.Event()
        self._thread = None

    def start(self):
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name='amqprun-watchdog', daemon=True)
        self._thread.start()

    def stop(self):
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self):
        while not self._stopping.wait(self.period):
            try:
                self.check()
            except Exception:
                # Watching must not end because one look failed.
                log.exception('Watchdog: looking at the workers failed')

    def check(self):
        """Warn about every handling now due a warning; return their
        `worker.Activity` objects."""
        warned = []
        seen = {}
        frames = None
        for activity in self.server.activity():
            if activity.seconds is None or activity.thread_id is None:
                continue
            message_id, last, count = self._seen.get(
                activity.thread_id, (None, None, 0))
            if message_id != activity.message_id or last is None \
                    or activity.seconds < last:
                count = 0   # another handling in that thread
            if activity.seconds >= self.interval * (count + 1):
                count = int(activity.seconds // self.interval)
                if frames is None:
                    frames = sys._current_frames()
                self._warn(activity, frames.get(activity.thread_id))
                warned.append(activity)
            seen[activity.thread_id] = (
                activity.message_id, activity.seconds, count)
        self._seen = seen
        return warned

    def _warn(self, activity, frame):
        if frame is None:
            stack = '  (its stack is gone: it has just finished)\n'
        else:
            stack = ''.join(traceback.format_stack(frame))
        log.warning(
            'Message %s from queue %r: its handling has run for %.1f s '
            '(slow-handler-warning %g s) in %s, which is at:\n%s',
            activity.message_id, activity.queue, activity.seconds,
            self.interval, activity.worker, stack.rstrip('\n'),
            extra={'message_id': activity.message_id,
                   'queue': activity.queue})


def oldest_handling(activities):
    """The seconds of the longest-running handling among `activities`
    (`worker.Activity` objects), 0.0 when all are idle."""
    return max((a.seconds for a in activities if a.seconds is not None),
               default=0.0)
