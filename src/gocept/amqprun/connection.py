"""The IO thread: connect, reconnect, declare, and the thread boundary.

Contract
--------
One *IO thread* -- the thread that calls `Connection.run` -- owns the pika
connection, its IO loop, every channel and every delivery tag. No other
thread calls pika. Other threads use only the methods marked *thread-safe*
(here and in `channel`): they hand work to the IO thread with
`Connection.call`, which wakes the IO loop through pika's one thread-safe
entry (``add_callback_threadsafe``), and, where they need the outcome,
wait for an `outcome.Outcome` that the IO thread resolves (`calls`).
Handlers never run in the IO thread, so heartbeats flow while a handler
works. Every method not marked thread-safe runs in the IO thread.

Besides the IO thread, pika is used by tools with blocking connections
of their own, each used by one thread: `inspection` (``check``),
`parked` (``server parked``, ``/parked``), `depths` (the monitor's queue
depths) and the test client of `testing`.

`Parameters` is importable from here as it was in 0.x (its home is
`parameters`).
"""

import functools
import logging
import random
import threading
import time

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop

from gocept.amqprun.channel import Slot
from gocept.amqprun.errors import ConnectionFailed
from gocept.amqprun.errors import ConnectionUnavailable
from gocept.amqprun.errors import Refused
from gocept.amqprun.errors import reason
from gocept.amqprun.parameters import Parameters  # noqa: F401 (0.x API)
from gocept.amqprun.parameters import safe_url
import gocept.amqprun.calls
import gocept.amqprun.channel
import gocept.amqprun.declaration
import gocept.amqprun.errors
import gocept.amqprun.topology
import gocept.amqprun.transport


log = logging.getLogger(__name__)


class Connection:
    """Runs the pika connection in the thread calling `run`.

    queues: the `topology.Queue` objects to declare, bind and (with
        `consumers`) consume from.
    consumers: the number of consumer slots (one channel each).
    prefetch: unacked deliveries per consumer slot and queue (needed
        with consumers; the Server says how many).
    on_delivery: called with each `channel.Delivery` in the IO thread;
        must not block.
    on_ready: called in the IO thread each time the connection is up and
        all consumer slots consume; must not block.
    on_returned: called in the IO thread with (slot, deliveries, reason,
        failed tags) when a consumer channel went with deliveries that
        were not settled (they return to their queues); `failed tags`
        are those of a group commit the broker refused (see `commits`).
    confirm: commit with publisher confirms instead of AMQP transactions
        (publish, wait for the confirms, then ACK): at-least-once.
    stats: a `stats.Stats` that counts the reconnects, or None.
    """

    def __init__(self, parameters, queues=(), consumers=0, prefetch=None,
                 on_delivery=None, on_ready=None, confirm=False, stats=None,
                 on_returned=None):
        self.parameters = parameters
        self.stats = stats
        self.confirm = confirm
        self.on_ready = on_ready
        self.on_returned = on_returned
        self.queues = list(queues)
        self.prefetch = prefetch
        self.consumer_slots = [
            Slot(self, f'consumer-{i}', on_delivery)
            for i in range(consumers)]
        self.senders = gocept.amqprun.channel.Senders(self)
        self._ready = threading.Event()
        self._connected = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()     # not running
        self._failure = None
        self._closing = False
        self._ever_connected = False
        self._topology = gocept.amqprun.declaration.Topology(
            self.queues, self.open_channel, self.call_later,
            parameters.backoff, self._declared,
            self._fatal)
        self._attempt = 0
        # Several processes with the same addresses spread over them.
        self._start = random.randrange(
            len(parameters.pika_parameters()) or 1)
        self._current = 0
        self._pika = None
        self._ioloop = None
        # The broker address (a URL without the password) and the
        # time.time() of the current connection; None while there is none.
        self.address = None
        self.connected_since = None
        self._calls = gocept.amqprun.calls.Calls()
        self._idle_waiters = []     # called when no commit is left

    # Thread-safe API

    @property
    def ready(self):
        """True while connected and all consumer slots consume."""
        return self._ready.is_set()

    def wait_until_ready(self, timeout=None):
        """Wait until connected and consuming; return whether it is."""
        return self._ready.wait(timeout)

    @property
    def alive(self):
        """True while `run` runs its IO loop (also while reconnecting)."""
        return not self._stopped.is_set()

    @property
    def connected(self):
        """True while connected (the queues declared)."""
        return self._connected.is_set()

    @property
    def send_timeout(self):
        """Seconds a commit waits for a channel (the parameters')."""
        return self.parameters.send_timeout

    def wait_for_commits(self, timeout):
        """Wait until no consumer slot has a commit waiting or in flight
        (or the IO loop ended); return whether that happened within
        `timeout` seconds; thread-safe."""
        if self._stopped.is_set():
            return True
        idle = threading.Event()
        self.call(self._when_idle, idle.set)
        return idle.wait(timeout) or self._stopped.is_set()

    def wait_until_connected(self, timeout=None):
        """Wait until connected (the queues declared); return whether it
        is; thread-safe."""
        return self._connected.wait(timeout)

    def acquire_sender(self):
        """A sender Slot for the caller's exclusive use until
        `release_sender` (`channel.Senders`); thread-safe."""
        return self.senders.acquire()

    def release_sender(self, slot):
        """Give back a slot of `acquire_sender`; thread-safe."""
        self.senders.release(slot)

    def cancel_consumers(self, timeout=10):
        """Stop all deliveries; return when the broker confirmed (or the
        connection is gone, or `timeout` passed); thread-safe."""
        if self._stopped.is_set():
            return
        done = threading.Event()
        self.call(self._cancel_consumers, done.set)
        done.wait(timeout)

    def close(self):
        """Close the connection; `run` returns afterwards (or at once, if
        it is not running yet); thread-safe."""
        self._closing = True
        if not self._stopped.is_set():
            self.call(self._close)

    def wait_until_stopped(self, timeout=None):
        """Wait until `run` returned; thread-safe."""
        return self._stopped.wait(timeout)

    def call(self, function, *args):
        """Run `function(*args)` in the IO thread soon, after the calls
        made before (`calls.Calls`); thread-safe."""
        self._calls.call(function, *args)

    # IO thread

    def defer(self, function):
        """Run `function` after the calls at hand (`calls.Calls.defer`)."""
        self._calls.defer(function)

    def _when_idle(self, callback):
        self._idle_waiters.append(callback)
        self.check_idle()

    def check_idle(self):
        """A slot's commits settled: call those waiting for no commit
        being left, if none is."""
        if self._idle_waiters and not any(
                slot.busy for slot in self.consumer_slots):
            waiters, self._idle_waiters = self._idle_waiters, []
            for callback in waiters:
                callback()

    def returned(self, slot, deliveries, reason, failed_tags):
        """Consumer `slot` lost its channel with `deliveries` unsettled;
        they return to their queues (see `on_returned`)."""
        if self.on_returned is not None:
            try:
                self.on_returned(slot, deliveries, reason, failed_tags)
            except Exception:
                log.exception('Error in on_returned callback')

    def run(self):
        """Connect and run until `close()`. Reconnects on losses.

        Raises ConnectionFailed when no connection could be made at start-up
        within the configured attempts, or when the broker refuses the
        topology at start-up; its subclass `errors.Refused` when the
        refusal will not pass by itself (credentials, virtual host, a
        queue redeclared with other arguments).
        """
        self._stopped.clear()
        if self._closing:       # close() came first
            self._stopped.set()
            return
        try:
            self._ioloop = IOLoop()
            self._calls.attach(self._ioloop)
            self._connect()
            self._ioloop.start()
        finally:
            self._ready.clear()
            self._connected.clear()
            ioloop = self._calls.detach()
            error = ConnectionUnavailable('connection closed')
            for slot in self._all_slots():
                slot.fail_waiting(error)
            waiters, self._idle_waiters = self._idle_waiters, []
            for callback in waiters:
                callback()
            if ioloop is not None:
                ioloop.close()
            self._ioloop = None
            self._stopped.set()
        if self._failure is not None:
            raise self._failure

    def call_later(self, delay, function):
        """Run `function` in the IO thread after `delay` seconds."""
        self._ioloop.call_later(delay, function)

    def _pika_open(self):
        """Whether the pika connection is open (before the queues are
        declared, too)."""
        return self._pika is not None and self._pika.is_open

    def open_channel(self, on_open):
        """Open a pika channel; `on_open(channel)` gets it."""
        self._pika.channel(on_open_callback=on_open)

    def _connect(self):
        candidates = self.parameters.pika_parameters()
        self._current = (self._start + self._attempt) % len(candidates)
        params = candidates[self._current]
        self._attempt += 1
        log.info('Connecting to %s', safe_url(params))
        self._pika = pika.SelectConnection(
            params, on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_close,
            custom_ioloop=self._ioloop)

    def _on_open(self, connection):
        self.address = safe_url(connection.params)
        self.connected_since = time.time()
        log.info('Connected to %s', self.address)
        gocept.amqprun.transport.batch_writes(connection)
        if self._ever_connected and self.stats is not None:
            self.stats.reconnected()
        self._ever_connected = True
        self._attempt = 0
        connection.add_on_connection_blocked_callback(
            lambda *a: log.warning('The broker blocks publishing (alarm).'))
        connection.add_on_connection_unblocked_callback(
            lambda *a: log.info('The broker unblocked publishing.'))
        self._topology.start()

    def _on_open_error(self, connection, error):
        self._pika = None
        why = reason(error)
        fatal = isinstance(error, (
            pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.ProbableAccessDeniedError))
        attempts = self.parameters.connection_attempts
        if self._closing:
            self._ioloop.stop()
            return
        if not self._ever_connected and (
                fatal or self._attempt >= attempts):
            self._fatal((Refused if fatal else ConnectionFailed)(
                f'Cannot connect to {self.parameters.describe()} '
                f'(after {self._attempt} attempt(s)): {why}'))
            return
        delay = self.parameters.backoff(self._attempt)
        log.error('Connection to the broker failed: %s; retrying in %.1f s',
                  why, delay)
        self._ioloop.call_later(delay, self._connect)

    def _on_close(self, connection, why):
        self._ready.clear()
        self._connected.clear()
        self._pika = None
        self.address = self.connected_since = None
        self._topology.cancel()
        # Start again with the next address.
        self._start = self._current + 1
        for slot in self._all_slots():
            slot.lost(why)
        if self._closing or self._failure is not None:
            self._ioloop.stop()
            return
        delay = self.parameters.backoff(self._attempt)
        log.error('Connection to the broker lost: %s; reconnecting in '
                  '%.1f s', reason(why), delay)
        self._ioloop.call_later(delay, self._connect)

    def reconnect(self, why):
        """Drop the connection; `_on_close` reconnects."""
        if self._pika_open():
            log.error('Reconnecting: %s', why)
            self._pika.close(gocept.amqprun.errors.CONNECTION_FORCED,
                             'reconnecting')

    def _declared(self, declared, first):
        """The queues `declared` (the first time on this connection, or
        refused ones declared again later)."""
        if first:
            self._open_slots()
            return
        added = [q for q in declared if q.consume]
        for slot in self.consumer_slots:
            slot.consume_more(added)
        self._check_ready()

    def _open_slots(self):
        self._connected.set()
        for slot in self._all_slots():
            slot.new_channel()
        if not self.consumer_slots:
            self._set_ready()

    def _set_ready(self):
        if self._ready.is_set():
            return
        self._ready.set()
        if self.on_ready is not None:
            try:
                self.on_ready()
            except Exception:
                log.exception('Error in on_ready callback')

    def consumption(self, slot, queues=None):
        """[(prefetch or None, [queues])] that consumer `slot` consumes of
        `queues` (default: all declared; see `topology.consumption`)."""
        if queues is None:
            queues = self._topology.available
        return gocept.amqprun.topology.consumption(
            queues, first=slot is self.consumer_slots[0])

    def slot_ready(self, slot):
        """`slot` has opened its channel (and consumes, if it should)."""
        self._check_ready()

    def _check_ready(self):
        if self._topology.missing or not all(
                s.channel is not None and not s.opening
                for s in self.consumer_slots):
            return
        if not self._ready.is_set():
            log.info('Consuming from %d queue(s) on %d channel(s)',
                     len([q for q in self.queues
                          if q.consume and not q.single]),
                     len(self.consumer_slots))
        self._set_ready()

    def slot_closed(self, slot, why):
        """The broker closed the channel of `slot`: reopen it later, or
        redeclare everything if a queue went away."""
        if not self._pika_open() or self._closing:
            return
        self._ready.clear()
        if gocept.amqprun.errors.queue_deleted(why):
            # A queue went away under us: only a full redeclare helps.
            self.reconnect(f'{slot}: {reason(why)}')
            return
        delay = self.parameters.retry_delay
        log.warning('%s: channel closed by the broker (%s); reopening in '
                    '%.1f s', slot, reason(why), delay)
        self._ioloop.call_later(delay, functools.partial(
            self._reopen, slot))

    def _reopen(self, slot):
        if self._pika_open() and slot.channel is None and not self._closing:
            slot.new_channel()

    def slot_cancelled(self, slot):
        """The broker cancelled a consumer of `slot` (its queue was
        deleted): redeclare everything."""
        self.reconnect(
            f'{slot}: the broker cancelled consuming (queue deleted?)')

    def _all_slots(self):
        return self.consumer_slots + self.senders.all()

    def _cancel_consumers(self, done):
        slots = [s for s in self.consumer_slots if s.consumer_tags]
        remaining = set(slots)
        if not remaining:
            done()
            return

        def cancelled(slot):
            remaining.discard(slot)
            if not remaining:
                done()
        for slot in slots:
            slot.cancel(functools.partial(cancelled, slot))

    def _close(self):
        self._closing = True
        self._ready.clear()
        if self._pika is not None and not (
                self._pika.is_closing or self._pika.is_closed):
            self._pika.close()
        elif self._pika is None or self._pika.is_closed:
            self._ioloop.stop()

    def _fatal(self, error):
        # `run` raises it: whoever called it reports it (the daemon does).
        self._failure = error
        if self._pika is not None and self._pika.is_open:
            self._pika.close()
        else:
            self._ioloop.stop()
