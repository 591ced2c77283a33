"""What the daemon's log offers a person: the progress line and JSON.

`Progress` logs one INFO line every few seconds with the messages
handled, retried and parked since the start and the rate since the last
line. `JSONFormatter` writes one JSON object per log record, for log
collectors; use it in the configuration file::

    <eventlog>
      <logfile>
        path STDOUT
        formatter gocept.amqprun.log.JSONFormatter
      </logfile>
    </eventlog>

While tracing (`tracing`), both `JSONFormatter` and `TraceFormatter` (the
plain format with the ids appended) name the trace and span a record
was logged in.
"""

import contextvars
import datetime
import json
import logging
import threading
import time

import zope.exceptions.log

from gocept.amqprun import tracing
import gocept.amqprun.stats


log = logging.getLogger(__name__)

# The message id and queue of the message being handled, as the worker
# thread binds them with `handling` (None outside a handler).
_current = contextvars.ContextVar('gocept.amqprun.log.current',
                                  default=None)

class handling:
    """``with handling(message_id, queue):`` -- within the block, log
    records of this thread (or context) are about the message
    `message_id` of `queue` (`JSONFormatter` shows them). A class, not a
    generator: it wraps every handled message."""

    __slots__ = ('_about', '_token')

    def __init__(self, message_id, queue):
        self._about = (message_id, queue)

    def __enter__(self):
        self._token = _current.set(self._about)

    def __exit__(self, *exc_info):
        _current.reset(self._token)


def message_of(record):
    """(message id, queue) a log record is about, or (None, None).

    Sources, first found wins: the record's attributes ``message_id``
    and ``queue`` (``log.info(..., extra={...})``: the daemon's own lines
    about a message logged outside a worker's handling pass them so),
    and the block of `handling` the record was made in.
    """
    message_id = getattr(record, 'message_id', None)
    queue = getattr(record, 'queue', None)
    if message_id is not None or queue is not None:
        return message_id, queue
    current = _current.get()
    if current is not None:
        return current
    return None, None


class JSONFormatter(logging.Formatter):
    """One JSON object per line (newlines inside are escaped): ``time``
    (ISO 8601, local time with offset, milliseconds), ``level``,
    ``logger``, ``message``, ``thread``; ``message_id`` and ``queue``
    when the record is about a message (see `message_of`); ``trace_id``
    and ``span_id`` when it was logged in a trace (`tracing.log_ids`);
    ``exception`` (the traceback) when there is one.

    Takes the arguments of logging.Formatter (ZConfig passes its
    ``format`` and ``dateformat`` keys) and ignores them: the fields are
    fixed.
    """

    def __init__(self, fmt=None, datefmt=None, style='%', validate=True,
                 **kw):
        super().__init__(None, None, **kw)

    def format(self, record):
        entry = {
            'time': datetime.datetime.fromtimestamp(
                record.created).astimezone().isoformat(
                    timespec='milliseconds'),
            'level': record.levelname,
            'logger': record.name,
            'message': record.getMessage(),
            'thread': record.threadName,
        }
        message_id, queue = message_of(record)
        if message_id is not None:
            entry['message_id'] = str(message_id)
        if queue is not None:
            entry['queue'] = str(queue)
        ids = tracing.log_ids(record)
        if ids is not None:
            entry['trace_id'], entry['span_id'] = ids
        if record.exc_info:
            entry['exception'] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry['exception'] = record.exc_text
        if record.stack_info:
            entry['stack'] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TraceFormatter(zope.exceptions.log.Formatter):
    """zope.exceptions' formatter (the plain format of the configuration
    file, tracebacks with their ``__traceback_info__``) that appends
    `` trace_id=... span_id=...`` to the message of a record logged in a
    trace (see `JSONFormatter`)."""

    def formatMessage(self, record):
        text = super().formatMessage(record)
        ids = tracing.log_ids(record)
        if ids is None:
            return text
        return f'{text} trace_id={ids[0]} span_id={ids[1]}'


class Progress:
    """Logs at INFO every `interval` seconds what `stats` (a
    `stats.Stats`) counted: the messages handled, retried and parked
    since the start (every other outcome too, once it occurred) and the
    rate of handled messages since the previous line.

    `start()` begins (a daemon thread), `stop()` ends it; a `stop()`
    after a `start()` logs a last line. An interval of 0 logs nothing.
    """

    def __init__(self, stats, interval, clock=time.monotonic):
        self.stats = stats
        self.interval = interval
        self.clock = clock
        self._stop = threading.Event()
        self._thread = None
        self._last = None   # (time, handled) of the previous line

    def start(self):
        if not self.interval:
            return
        self._last = (self.clock(), 0)
        self._thread = threading.Thread(
            target=self._run, name='amqprun-progress', daemon=True)
        self._thread.start()

    def stop(self):
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        log.info('%s', self.line())

    def _run(self):
        while not self._stop.wait(self.interval):
            log.info('%s', self.line())

    def line(self):
        """The text of the next line (and remember it as the last)."""
        totals = self.stats.totals()
        now = self.clock()
        handled = totals['handled']
        since, before = self._last or (now, 0)
        self._last = (now, handled)
        outcomes = list(gocept.amqprun.stats.OUTCOMES) + sorted(
            set(totals) - set(gocept.amqprun.stats.OUTCOMES))
        counts = ', '.join(
            f'{totals[outcome]} {outcome}' for outcome in outcomes)
        elapsed = now - since
        rate = (handled - before) / elapsed if elapsed > 0 else 0.0
        transactions = self.stats.snapshot()['transactions']
        return (f'Progress: {counts} since start; {rate:.2f} handled/s '
                f'in the last {elapsed:.0f} s; {transactions} AMQP '
                'transaction(s).')
