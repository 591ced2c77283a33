"""The thread boundary: the only module that touches pika.

Contract
--------
One *IO thread* -- the thread that calls `Connection.run` -- owns the pika
connection, its IO loop, every channel and every delivery tag. No other
thread calls pika. Other threads use only the methods marked *thread-safe*
below: they hand work to the IO thread with the IO loop's
``add_callback_threadsafe`` and, where they need the outcome, wait for a
`Outcome` that the IO thread resolves. Handlers never
run in the IO thread, so heartbeats flow while a handler works.

Channels are wrapped in `Slot` objects that outlive channels and
connections. A slot's `epoch` counts the pika channels it has had. A
delivery remembers the epoch it came with; settling it on a later epoch is
refused locally with `ChannelLost` (acking an old delivery tag on a new
channel would close that channel; the broker has already requeued it).

Every slot's channel is in transaction mode: what a `Slot.commit` publishes,
ACKs and rejects reaches the broker in one AMQP transaction. Different
slots commit concurrently. In the opt-in confirm mode the channels use
publisher confirms instead: a commit publishes, waits for the confirms and
only then ACKs -- at-least-once, as a crash in between repeats publishes.
"""

import _thread
import functools
import logging
import socket
import ssl
import threading
import types
import urllib.parse

import pika
import pika.exceptions
import pika.spec
from pika.adapters.select_connection import IOLoop
from pika.adapters.utils.connection_workflow import (
    AMQPConnectionWorkflowFailed)

import gocept.amqprun.message


log = logging.getLogger(__name__)


class AMQPError(Exception):
    """Base class of this module's errors."""


class ConnectionFailed(AMQPError):
    """The broker cannot be used (unreachable, refused credentials or
    vhost, or a queue it refuses to declare); the process must stop."""


class ChannelLost(AMQPError):
    """The channel of a delivery or of a commit went away before the
    commit was confirmed. The broker has rolled the transaction back (and
    requeued the delivery) -- unless the loss happened after the broker
    committed but before it confirmed, which cannot be told apart.

    `refused` is True when the broker closed the channel because of what
    was sent on it (e.g. a publish to an exchange that does not exist).
    """

    def __init__(self, message, refused=False):
        super().__init__(message)
        self.refused = refused


class ConnectionUnavailable(AMQPError):
    """No connection to the broker came up within the send timeout."""


class Outcome:
    """The one-shot result of work handed to the IO thread.

    Like a `concurrent.futures.Future` reduced to what a commit needs (on a
    bare lock: a commit's hand-back is on the hot path).
    """

    __slots__ = ('_done', '_state', '_value', '_error', 'log_errors')
    _guard = _thread.allocate_lock()
    PENDING, RUNNING, CANCELLED, DONE = range(4)

    def __init__(self):
        self._done = _thread.allocate_lock()
        self._done.acquire()
        self._state = self.PENDING
        self._value = self._error = None
        self.log_errors = False     # nobody waits: log a failure

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
        if self.log_errors:
            log.warning('A commit nobody waits for failed: %s', error)
        self._finish()

    def _finish(self):
        if self._state != self.DONE:
            self._state = self.DONE
            self._done.release()

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


class Parameters:
    """How to reach the broker.

    hostname: one host or several separated by spaces or commas (tried in
        turn; ``host:port`` is allowed).
    url: an ``amqp://`` or ``amqps://`` URL (pika's URL options work)
        instead of hostname, port, username, password and virtual_host;
        several URLs may be given separated by spaces.
    ssl, ssl_cafile, ssl_certfile, ssl_keyfile, ssl_verify: TLS; verification
        of the broker's certificate and hostname is on by default.
    heartbeat_interval: seconds (0 disables heartbeats).
    connection_attempts: attempts at start-up before giving up.
    retry_delay, max_retry_delay: reconnect backoff in seconds (doubling).
    blocked_connection_timeout: seconds a broker alarm may block the
        connection before it is dropped and re-established.
    send_timeout: seconds a commit waits for a connection.
    """

    defaults = dict(
        hostname=None,
        port=None,
        username='guest',
        password='guest',
        virtual_host='/',
        heartbeat_interval=60,
        url=None,
        ssl=False,
        ssl_cafile=None,
        ssl_certfile=None,
        ssl_keyfile=None,
        ssl_verify=True,
        connection_attempts=3,
        retry_delay=1.0,
        max_retry_delay=30.0,
        blocked_connection_timeout=300.0,
        socket_timeout=10.0,
        send_timeout=30.0,
    )
    _int = ('port', 'heartbeat_interval', 'connection_attempts')
    _float = ('retry_delay', 'max_retry_delay', 'blocked_connection_timeout',
              'socket_timeout', 'send_timeout')

    def __init__(self, **kw):
        unknown = set(kw) - set(self.defaults)
        if unknown:
            raise TypeError(
                f'Unknown connection parameters: {", ".join(sorted(unknown))}')
        values = dict(self.defaults, **kw)
        for name in self._int:
            if values[name] is not None:
                values[name] = int(values[name])
        for name in self._float:
            if values[name] is not None:
                values[name] = float(values[name])
        if not values['hostname'] and not values['url']:
            raise ValueError('Either hostname or url is required.')
        self.__dict__.update(values)

    def __repr__(self):
        return f'<Parameters {self.describe()}>'

    def describe(self):
        """The broker addresses, for log lines (never the password)."""
        return ', '.join(_safe_url(p) for p in self.pika_parameters())

    def pika_parameters(self):
        """One pika parameters object per broker address, in order."""
        if self.url:
            result = []
            for url in self.url.replace(',', ' ').split():
                params = pika.URLParameters(url)
                if url.startswith('amqps:') and self._has_tls_settings():
                    params.ssl_options = self._ssl_options(params.host)
                self._set_common(params, from_url=url)
                result.append(params)
            return result
        result = []
        for host in self.hostname.replace(',', ' ').split():
            port = self.port
            if ':' in host:
                host, port = host.rsplit(':', 1)
                port = int(port)
            if port is None:
                port = 5671 if self.ssl else 5672
            params = pika.ConnectionParameters(
                host=host, port=port, virtual_host=self.virtual_host,
                credentials=pika.PlainCredentials(
                    self.username, self.password))
            if self.ssl:
                params.ssl_options = self._ssl_options(host)
            self._set_common(params)
            result.append(params)
        return result

    def _has_tls_settings(self):
        return any((self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile,
                    not self.ssl_verify))

    def _ssl_options(self, host):
        context = ssl.create_default_context(cafile=self.ssl_cafile)
        if not self.ssl_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return pika.SSLOptions(context, server_hostname=host)

    def _set_common(self, params, from_url=None):
        query = urllib.parse.parse_qs(
            urllib.parse.urlsplit(from_url).query) if from_url else {}
        if 'heartbeat' not in query:
            params.heartbeat = self.heartbeat_interval
        if 'blocked_connection_timeout' not in query:
            params.blocked_connection_timeout = (
                self.blocked_connection_timeout)
        if 'socket_timeout' not in query:
            params.socket_timeout = self.socket_timeout
        # Attempts and backoff are ours (several hosts, reconnects).
        params.connection_attempts = 1
        params.retry_delay = 0


def _safe_url(params):
    scheme = 'amqps' if params.ssl_options else 'amqp'
    vhost = urllib.parse.quote(params.virtual_host, safe='')
    return (f'{scheme}://{params.credentials.username}@'
            f'{params.host}:{params.port}/{vhost}')


class Queue:
    """A queue to declare (durable), bind to amq.topic with each routing
    key and, if `consume`, consume from."""

    def __init__(self, name, routing_keys=(), arguments=None, consume=True):
        self.name = name
        self.routing_keys = list(routing_keys)
        self.arguments = dict(arguments) if arguments else None
        self.consume = consume

    def __repr__(self):
        return f'<Queue {self.name!r} {self.routing_keys!r}>'


class Delivery:
    """A received message as the IO thread hands it to a worker."""

    __slots__ = ('slot', 'epoch', 'delivery_tag', 'routing_key', 'exchange',
                 'redelivered', 'header', 'body', 'queue')

    def __init__(self, slot, epoch, delivery_tag, routing_key, exchange,
                 redelivered, header, body, queue):
        self.slot = slot
        self.epoch = epoch
        self.delivery_tag = delivery_tag
        self.routing_key = routing_key
        self.exchange = exchange
        self.redelivered = redelivered
        self.header = header
        self.body = body
        self.queue = queue

    @property
    def current(self):
        """False once the channel it came on is gone (thread-safe)."""
        return self.epoch == self.slot.epoch


def _header_from(properties):
    header = gocept.amqprun.message.Header.__new__(
        gocept.amqprun.message.Header)
    for name in gocept.amqprun.message.PROPERTY_NAMES:
        setattr(header, name, getattr(properties, name))
    if header.headers is None:
        header.headers = {}
    return header


def _properties_from(header):
    properties = pika.BasicProperties()
    for name in gocept.amqprun.message.PROPERTY_NAMES:
        value = getattr(header, name)
        if value is not None:
            setattr(properties, name, value)
    if not header.headers:
        properties.headers = None
    return properties


def _produce_at_once(transport):
    """pika's plaintext transport sends each buffered frame with its own
    send(); a commit is 4+ frames. Send what is buffered with one
    sendmsg() instead (fewer system calls and TCP segments). Applied to
    our connections' transports only; left out where pika differs."""
    sock = getattr(transport, '_sock', None)
    buffers = getattr(transport, '_tx_buffers', None)
    if type(transport).__name__ != '_AsyncPlaintextTransport' \
            or not isinstance(sock, socket.socket) or buffers is None \
            or not hasattr(transport, '_tx_buffered_byte_count'):
        return

    def _produce(self):
        while buffers:
            chunks = list(buffers) if len(buffers) <= 512 else [
                buffers[i] for i in range(512)]
            sent = sock.sendmsg(chunks)
            self._tx_buffered_byte_count -= sent
            while sent:
                chunk = buffers[0]
                if sent >= len(chunk):
                    buffers.popleft()
                    sent -= len(chunk)
                else:
                    buffers[0] = chunk[sent:]
                    sent = 0
    transport._produce = types.MethodType(_produce, transport)


class Slot:
    """A logical channel in transaction mode that survives reconnects.

    Consumer slots consume from every queue and pass deliveries to
    `on_delivery` (called in the IO thread; it must not block). Sender
    slots only publish.
    """

    def __init__(self, connection, name, on_delivery=None):
        self.connection = connection
        self.name = name
        self.on_delivery = on_delivery
        self.epoch = 0
        # IO thread only:
        self._channel = None
        self._pending = []        # futures awaiting Commit-Ok, in order
        self._waiting = []        # commits waiting for the channel to open
        self._consumer_tags = []
        self._opening = False
        self._sequence = 0        # confirm mode: publishes on the channel
        self._unconfirmed = set()
        self._confirms = []       # (first, last, future, ack, reject)

    def __repr__(self):
        return f'<Slot {self.name} epoch={self.epoch}>'

    # Thread-safe API

    def commit(self, epoch=None, publishes=(), ack=None, reject=None,
               timeout=None, wait=True):
        """Publish, ACK and reject in one AMQP transaction; thread-safe.

        epoch: the epoch of the delivery to ack/reject; None to use
            whatever channel the slot has (waiting for one if necessary).
        publishes: (exchange, routing_key, Header, body) tuples.
        ack: a delivery tag to ACK.
        reject: (delivery tag, requeue) to reject.

        Returns when the broker confirmed the commit. Raises ChannelLost
        when the channel went before that (or `epoch` is stale), and
        ConnectionUnavailable when no channel came up within `timeout`
        (default: the send_timeout parameter). With `wait=False` it returns
        at once; the outcome is then only logged (confirm mode's handlers:
        an input that is not ACKed is redelivered).
        """
        if epoch is not None and epoch != self.epoch:
            raise ChannelLost(f'{self}: channel of epoch {epoch} is gone')
        if timeout is None:
            timeout = self.connection.parameters.send_timeout
        future = Outcome()
        future.log_errors = not wait
        self.connection._call(
            self._commit, future, epoch, tuple(publishes), ack, reject)
        if not wait:
            return None
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.cancel():
                raise ConnectionUnavailable(
                    f'{self}: no connection to the broker within '
                    f'{timeout} s') from None
            # Already handed to the broker: its outcome is what counts.
            return future.result()

    # IO thread

    def _commit(self, future, epoch, publishes, ack, reject):
        if epoch is not None and epoch != self.epoch:
            if future.set_running_or_notify_cancel():
                future.set_exception(ChannelLost(
                    f'{self}: channel of epoch {epoch} is gone'))
            return
        channel = self._channel
        if channel is None or not channel.is_open or self._opening:
            if epoch is not None:
                if future.set_running_or_notify_cancel():
                    future.set_exception(ChannelLost(
                        f'{self}: channel is closed'))
                return
            self._waiting.append(
                (future, epoch, publishes, ack, reject))
            return
        if not future.set_running_or_notify_cancel():
            return
        if self.connection.confirm:
            self._commit_confirmed(future, channel, publishes, ack, reject)
            return
        try:
            for exchange, routing_key, header, body in publishes:
                channel.basic_publish(
                    exchange, routing_key, body, _properties_from(header))
            if ack is not None:
                channel.basic_ack(ack)
            if reject is not None:
                channel.basic_reject(reject[0], requeue=reject[1])
            self._pending.append(future)
            channel.tx_commit(callback=functools.partial(
                self._committed, future))
        except Exception as e:
            if future in self._pending:
                self._pending.remove(future)
            future.set_exception(ChannelLost(f'{self}: {e}'))

    def _commit_confirmed(self, future, channel, publishes, ack, reject):
        """Confirm mode: publish, wait for the broker's confirms, then
        ACK/reject (at-least-once: a crash in between repeats the
        publishes)."""
        try:
            first = self._sequence + 1
            for exchange, routing_key, header, body in publishes:
                channel.basic_publish(
                    exchange, routing_key, body, _properties_from(header))
                self._sequence += 1
                self._unconfirmed.add(self._sequence)
            if not publishes:
                self._settle(channel, ack, reject)
                future.set_result(None)
                return
        except Exception as e:
            future.set_exception(ChannelLost(f'{self}: {e}'))
            return
        self._pending.append(future)
        self._confirms.append((first, self._sequence, future, ack, reject))

    def _settle(self, channel, ack, reject):
        if ack is not None:
            channel.basic_ack(ack)
        if reject is not None:
            channel.basic_reject(reject[0], requeue=reject[1])

    def _on_confirm(self, frame):
        method = frame.method
        if method.multiple:
            confirmed = {n for n in self._unconfirmed
                         if n <= method.delivery_tag}
        else:
            confirmed = {method.delivery_tag}
        self._unconfirmed -= confirmed
        nacked = confirmed if isinstance(
            method, pika.spec.Basic.Nack) else set()
        remaining = []
        for entry in self._confirms:
            first, last, future, ack, reject = entry
            if any(first <= n <= last for n in nacked):
                self._pending.remove(future)
                future.set_exception(ChannelLost(
                    f'{self}: the broker did not accept a publish '
                    '(basic.nack)'))
            elif any(first <= n <= last for n in self._unconfirmed):
                remaining.append(entry)
            else:
                self._pending.remove(future)
                try:
                    self._settle(self._channel, ack, reject)
                except Exception as e:
                    future.set_exception(ChannelLost(f'{self}: {e}'))
                else:
                    future.set_result(None)
        self._confirms = remaining

    def _committed(self, future, frame):
        if future in self._pending:
            self._pending.remove(future)
            future.set_result(None)

    def _open(self):
        """Open a new channel (a new epoch) on the current connection."""
        self._opening = True
        self._channel = None
        self.connection._pika.channel(on_open_callback=self._on_open)

    def _on_open(self, channel):
        self._channel = channel
        channel.add_on_close_callback(self._on_close)
        channel.add_on_cancel_callback(self._on_cancelled_by_broker)
        if self.connection.confirm:
            self._sequence = 0
            self._unconfirmed = set()
            self._confirms = []
            channel.confirm_delivery(
                self._on_confirm, callback=self._on_tx_select)
        else:
            channel.tx_select(callback=self._on_tx_select)

    def _on_tx_select(self, frame):
        if self.on_delivery is None:
            self._on_ready()
            return
        self._channel.basic_qos(
            prefetch_count=self.connection.prefetch,
            callback=self._on_qos)

    def _on_qos(self, frame):
        self._consumer_tags = []
        remaining = [q for q in self.connection.queues if q.consume]

        def consume_next(frame=None):
            if not remaining:
                self._on_ready()
                return
            queue = remaining.pop(0)
            tag = self._channel.basic_consume(
                queue.name, functools.partial(self._on_message, queue.name),
                callback=consume_next)
            self._consumer_tags.append(tag)
        consume_next()

    def _on_ready(self):
        self._opening = False
        log.debug('%s ready', self)
        waiting, self._waiting = self._waiting, []
        for item in waiting:
            self._commit(*item)
        self.connection._slot_ready(self)

    def _on_message(self, queue, channel, method, properties, body):
        if channel is not self._channel:
            return
        self.on_delivery(Delivery(
            self, self.epoch, method.delivery_tag, method.routing_key,
            method.exchange, method.redelivered, _header_from(properties),
            body, queue))

    def _on_close(self, channel, reason):
        if channel is not self._channel:
            return
        self._lost(reason)
        connection = self.connection
        if not connection._pika_open() or connection._closing:
            return
        connection._ready.clear()
        if getattr(reason, 'reply_code', None) == 404 \
                and 'no queue' in str(getattr(reason, 'reply_text', '')):
            # A queue went away under us: only a full redeclare helps.
            connection._reconnect(f'{self}: {_describe(reason)}')
            return
        delay = connection.parameters.retry_delay
        log.warning('%s: channel closed by the broker (%s); reopening in '
                    '%.1f s', self, _describe(reason), delay)
        connection._ioloop.call_later(delay, self._reopen)

    def _reopen(self):
        if self.connection._pika_open() and self._channel is None \
                and not self.connection._closing:
            self._open()

    def _on_cancelled_by_broker(self, frame):
        # The broker cancels a consumer when its queue is deleted.
        self.connection._reconnect(
            f'{self}: the broker cancelled consuming (queue deleted?)')

    def _lost(self, reason):
        """The current channel is gone: fail what waits on it."""
        self.epoch += 1
        self._channel = None
        self._consumer_tags = []
        self._confirms = []
        self._unconfirmed = set()
        pending, self._pending = self._pending, []
        refused = isinstance(reason, pika.exceptions.ChannelClosedByBroker)
        for future in pending:
            future.set_exception(ChannelLost(
                f'{self}: {_describe(reason)}', refused=refused))

    def _cancel(self, done):
        channel = self._channel
        if channel is None or not channel.is_open or not self._consumer_tags:
            done()
            return
        tags = list(self._consumer_tags)
        self._consumer_tags = []
        remaining = set(tags)

        def cancelled(tag, frame=None):
            remaining.discard(tag)
            if not remaining:
                done()
        for tag in tags:
            channel.basic_cancel(tag, callback=functools.partial(
                cancelled, tag))


class Connection:
    """Runs the pika connection in the thread calling `run`.

    queues: the `Queue` objects to declare, bind and (with `consumers`)
        consume from.
    consumers: the number of consumer slots (one channel each).
    prefetch: unacked deliveries per consumer slot and queue.
    on_delivery: a function(index) returning the delivery callback of
        consumer slot `index`.
    on_ready: called in the IO thread each time the connection is up and
        all consumer slots consume; must not block.
    confirm: commit with publisher confirms instead of AMQP transactions
        (publish, wait for the confirms, then ACK): at-least-once.
    """

    def __init__(self, parameters, queues=(), consumers=0, prefetch=2,
                 on_delivery=None, on_ready=None, confirm=False):
        self.parameters = parameters
        self.confirm = confirm
        self.on_ready = on_ready
        self.queues = list(queues)
        self.prefetch = prefetch
        self.consumer_slots = [
            Slot(self, f'consumer-{i}', on_delivery(i))
            for i in range(consumers)]
        self._sender_slots = []
        self._free_senders = []
        self._sender_lock = threading.Lock()
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()     # not running
        self._failure = None
        self._closing = False
        self._ever_connected = False
        self._attempt = 0
        self._pika = None
        self._ioloop = None
        self._ioloop_ready = threading.Event()
        self._pending_calls = []
        self._calls_lock = threading.Lock()

    # Thread-safe API

    @property
    def ready(self):
        """True while connected and all consumer slots consume."""
        return self._ready.is_set()

    def wait_until_ready(self, timeout=None):
        """Wait until connected and consuming; return whether it is."""
        return self._ready.wait(timeout)

    def acquire_sender(self):
        """Return a sender Slot for the caller's exclusive use until
        `release_sender`; thread-safe."""
        with self._sender_lock:
            if self._free_senders:
                return self._free_senders.pop()
            slot = Slot(self, f'sender-{len(self._sender_slots)}')
            self._sender_slots.append(slot)
        self._call(self._open_sender, slot)
        return slot

    def release_sender(self, slot):
        with self._sender_lock:
            self._free_senders.append(slot)

    def cancel_consumers(self, timeout=10):
        """Stop all deliveries; return when the broker confirmed (or the
        connection is gone, or `timeout` passed); thread-safe."""
        if self._stopped.is_set():
            return
        done = threading.Event()
        self._call(self._cancel_consumers, done.set)
        done.wait(timeout)

    def close(self):
        """Close the connection; `run` returns afterwards (or at once, if
        it is not running yet); thread-safe."""
        self._closing = True
        if not self._stopped.is_set():
            self._call(self._close)

    def wait_until_stopped(self, timeout=None):
        return self._stopped.wait(timeout)

    # Handing work to the IO thread

    def _call(self, function, *args):
        callback = functools.partial(function, *args)
        with self._calls_lock:
            self._pending_calls.append(callback)
            if self._ioloop is None or len(self._pending_calls) > 1:
                # Not running yet (run() picks it up), or a wake-up of
                # the IO loop is on its way already.
                return
            # Under the lock: run() closes the loop only after taking it.
            self._ioloop.add_callback_threadsafe(self._run_calls)

    def _run_calls(self):
        with self._calls_lock:
            calls, self._pending_calls = self._pending_calls, []
        for callback in calls:
            callback()

    # IO thread

    def run(self):
        """Connect and run until `close()`. Reconnects on losses.

        Raises ConnectionFailed when no connection could be made at start-up
        within the configured attempts, or when the broker refuses the
        topology (e.g. a queue redeclared with other arguments).
        """
        self._stopped.clear()
        if self._closing:       # close() came first
            self._stopped.set()
            return
        try:
            ioloop = IOLoop()
            with self._calls_lock:
                self._ioloop = ioloop
            ioloop.add_callback_threadsafe(self._run_calls)
            self._connect()
            self._ioloop.start()
        finally:
            self._ready.clear()
            with self._calls_lock:
                ioloop, self._ioloop = self._ioloop, None
            self._fail_all(ConnectionUnavailable('connection closed'))
            if ioloop is not None:
                ioloop.close()
            self._stopped.set()
        if self._failure is not None:
            raise self._failure

    def _pika_open(self):
        return self._pika is not None and self._pika.is_open

    def _connect(self):
        candidates = self.parameters.pika_parameters()
        params = candidates[self._attempt % len(candidates)]
        self._attempt += 1
        log.info('Connecting to %s', _safe_url(params))
        self._pika = pika.SelectConnection(
            params, on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_close,
            custom_ioloop=self._ioloop)

    def _on_open(self, connection):
        log.info('Connected to %s', _safe_url(connection.params))
        _produce_at_once(getattr(connection, '_transport', None))
        self._ever_connected = True
        self._attempt = 0
        connection.add_on_connection_blocked_callback(
            lambda *a: log.warning('The broker blocks publishing (alarm).'))
        connection.add_on_connection_unblocked_callback(
            lambda *a: log.info('The broker unblocked publishing.'))
        connection.channel(on_open_callback=self._declare)

    def _on_open_error(self, connection, error):
        self._pika = None
        reason = _describe(error)
        fatal = isinstance(error, (
            pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.ProbableAccessDeniedError))
        attempts = self.parameters.connection_attempts
        if self._closing:
            self._ioloop.stop()
            return
        if not self._ever_connected and (
                fatal or self._attempt >= attempts):
            self._fatal(ConnectionFailed(
                f'Cannot connect to {self.parameters.describe()} '
                f'(after {self._attempt} attempt(s)): {reason}'))
            return
        delay = self._backoff()
        log.error('Connection to the broker failed: %s; retrying in %.1f s',
                  reason, delay)
        self._ioloop.call_later(delay, self._connect)

    def _backoff(self):
        return min(self.parameters.retry_delay * 2 ** max(
            0, self._attempt - 1), self.parameters.max_retry_delay)

    def _on_close(self, connection, reason):
        self._ready.clear()
        self._pika = None
        for slot in self._all_slots():
            slot._lost(reason)
        if self._closing or self._failure is not None:
            self._ioloop.stop()
            return
        delay = self._backoff()
        log.error('Connection to the broker lost: %s; reconnecting in '
                  '%.1f s', _describe(reason), delay)
        self._ioloop.call_later(delay, self._connect)

    def _reconnect(self, reason):
        """Drop the connection; `_on_close` reconnects."""
        if self._pika_open():
            log.error('Reconnecting: %s', reason)
            self._pika.close(320, 'reconnecting')

    def _declare(self, channel):
        steps = []
        for queue in self.queues:
            steps.append((
                f'declaring queue {queue.name!r} with arguments '
                f'{queue.arguments!r}',
                functools.partial(
                    channel.queue_declare, queue.name, durable=True,
                    arguments=queue.arguments)))
            for key in queue.routing_keys:
                steps.append((
                    f'binding queue {queue.name!r} to {key!r}',
                    functools.partial(
                        channel.queue_bind, queue.name, 'amq.topic',
                        routing_key=key)))
        current = [None]

        def on_close(channel, reason):
            if current[0] is not None and not self._closing:
                self._fatal(ConnectionFailed(
                    f'The broker refused {current[0]}: {_describe(reason)}'))

        def next_step(frame=None):
            if not steps:
                current[0] = None
                channel.close()
                self._open_slots()
                return
            current[0], step = steps.pop(0)
            step(callback=next_step)
        channel.add_on_close_callback(on_close)
        next_step()

    def _open_slots(self):
        for slot in self._all_slots():
            slot._open()
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

    def _open_sender(self, slot):
        if self._pika_open() and slot._channel is None \
                and not slot._opening:
            slot._open()

    def _slot_ready(self, slot):
        if all(s._channel is not None and not s._opening
               for s in self.consumer_slots):
            if not self._ready.is_set():
                log.info('Consuming from %d queue(s) on %d channel(s)',
                         len([q for q in self.queues if q.consume]),
                         len(self.consumer_slots))
            self._set_ready()

    def _all_slots(self):
        with self._sender_lock:
            senders = list(self._sender_slots)
        return self.consumer_slots + senders

    def _cancel_consumers(self, done):
        slots = [s for s in self.consumer_slots if s._consumer_tags]
        remaining = set(slots)
        if not remaining:
            done()
            return

        def cancelled(slot):
            remaining.discard(slot)
            if not remaining:
                done()
        for slot in slots:
            slot._cancel(functools.partial(cancelled, slot))

    def _close(self):
        self._closing = True
        self._ready.clear()
        if self._pika is not None and not (
                self._pika.is_closing or self._pika.is_closed):
            self._pika.close()
        elif self._pika is None or self._pika.is_closed:
            self._ioloop.stop()

    def _fatal(self, error):
        log.error('%s', error)
        self._failure = error
        if self._pika is not None and self._pika.is_open:
            self._pika.close()
        else:
            self._ioloop.stop()

    def _fail_all(self, error):
        for slot in self._all_slots():
            waiting, slot._waiting = slot._waiting, []
            for future, *rest in waiting:
                if future.set_running_or_notify_cancel():
                    future.set_exception(error)
            slot._lost(error)


def _root_cause(error):
    """Unwrap pika's connection workflow exceptions down to the error
    that says why (refused, certificate verify failed, ...)."""
    for _ in range(10):
        inner = None
        if isinstance(error, AMQPConnectionWorkflowFailed) \
                and error.exceptions:
            inner = error.exceptions[-1]
        elif isinstance(getattr(error, 'exception', None), BaseException):
            inner = error.exception
        elif isinstance(error, pika.exceptions.AMQPConnectionError) \
                and len(error.args) == 1 \
                and isinstance(error.args[0], BaseException):
            inner = error.args[0]
        if inner is None:
            break
        error = inner
    return error


def _describe(error):
    """A log-friendly reason (pika's exceptions print poorly)."""
    if isinstance(error, pika.exceptions.ProbableAuthenticationError):
        return ('the broker refused the credentials '
                '(wrong username or password?)')
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError):
        return 'access refused (unknown virtual host or no permission?)'
    if isinstance(error, (pika.exceptions.ChannelClosed,
                          pika.exceptions.ConnectionClosed)):
        return f'{error.reply_code} {error.reply_text}'
    cause = _root_cause(error)
    if cause is not error:
        return _describe(cause)
    name = error.__class__.__name__
    text = str(error) or repr(error)
    return text if text.startswith(name) else f'{name}: {text}'


# Inspection (the check command)

class QueueState:
    """What the broker says about a declared `Queue` (see inspect_queues).

    status: 'ok', 'missing' (no such queue) or 'different' (it exists,
        but a declaration with our arguments is refused; `detail` has
        the broker's reason).
    messages, consumers: counts while the queue exists, else None.
    """

    def __init__(self, queue, status, detail=None, messages=None,
                 consumers=None):
        self.queue = queue
        self.status = status
        self.detail = detail
        self.messages = messages
        self.consumers = consumers

    def __repr__(self):
        return f'<QueueState {self.queue.name!r} {self.status}>'


def inspect_queues(parameters, queues):
    """Compare `queues` with the broker's live queues, changing nothing.

    A passive declare tells whether a queue exists. An existing one is then
    declared with our durability and arguments: the broker accepts that
    without change when they are equal and refuses it (406
    PRECONDITION_FAILED) when they differ. Bindings cannot be inspected
    over AMQP and are not compared. Blocking; its own short-lived
    connection. Returns a QueueState per queue; raises ConnectionFailed.
    """
    try:
        connection = pika.BlockingConnection(parameters.pika_parameters())
    except pika.exceptions.AMQPError as e:
        reason = _describe(e)
        if reason == e.__class__.__name__ and e.args:
            reason = str(e.args[-1])  # pika's connection workflow error
        raise ConnectionFailed(
            f'Cannot connect to {parameters.describe()}: {reason}') from None
    result = []
    try:
        channel = connection.channel()
        for queue in queues:
            try:
                ok = channel.queue_declare(queue.name, passive=True)
            except pika.exceptions.ChannelClosedByBroker as e:
                channel = connection.channel()
                if e.reply_code != 404:
                    result.append(QueueState(queue, 'different',
                                             _describe(e)))
                else:
                    result.append(QueueState(queue, 'missing'))
                continue
            try:
                channel.queue_declare(queue.name, durable=True,
                                      arguments=queue.arguments)
            except pika.exceptions.ChannelClosedByBroker as e:
                channel = connection.channel()
                result.append(QueueState(
                    queue, 'different', _describe(e),
                    ok.method.message_count, ok.method.consumer_count))
                continue
            result.append(QueueState(
                queue, 'ok', None, ok.method.message_count,
                ok.method.consumer_count))
    except pika.exceptions.AMQPError as e:
        raise ConnectionFailed(
            f'Lost the connection to {parameters.describe()}: '
            f'{_describe(e)}') from None
    finally:
        if connection.is_open:
            connection.close()
    return result
