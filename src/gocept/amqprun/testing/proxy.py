"""TCP proxies between the daemon and the broker, to inject faults:
`Proxy` cuts connections when told, `AMQPProxy` at chosen protocol steps.
"""

import array
import collections
import contextlib
import fcntl
import selectors
import socket
import struct
import termios
import threading
import time

import gocept.amqprun.parameters
import gocept.amqprun.testing.frames


class Proxy:
    """A TCP proxy between a client and a broker, to cut connections.

    Listens on 127.0.0.1:`port` (a free one unless given) and forwards
    every connection to `target_host`:`target_port`. One thread of its
    own does all the forwarding. `cut()` resets all current connections
    abruptly (TCP RST to both sides, data in flight is lost), like a
    network failure; new connections are accepted afterwards.
    `accepted` counts the connections made so far.
    """

    BUFFER_LIMIT = 4 * 1024 * 1024

    def __init__(self, target_port, target_host='127.0.0.1', port=None):
        self.target = (target_host, target_port)
        self._listener = socket.create_server(('127.0.0.1', port or 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self.accepted = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._requests = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._peer = {}      # socket -> the socket at the other end
        self._outgoing = {}  # socket -> bytes waiting to be sent to it
        self._paused = set()  # sockets not read from (back-pressure)
        self._thread = threading.Thread(
            target=self._run, name=f'proxy-{self.port}', daemon=True)
        self._thread.start()

    def __repr__(self):
        return (f'<{type(self).__name__} :{self.port}'
                f' -> {self.target[0]}:{self.target[1]}>')

    @property
    def connections(self):
        """The number of connections currently forwarded."""
        with self._lock:
            return len(self._peer) // 2

    @classmethod
    def to(cls, parameters, port=None):
        """A proxy to the broker of `parameters` whose `parameters()` keep
        their username, password and virtual host."""
        proxy = cls(parameters.port or 5672, parameters.hostname, port=port)
        proxy.credentials = dict(
            username=parameters.username, password=parameters.password,
            virtual_host=parameters.virtual_host)
        return proxy

    credentials = {}

    def parameters(self, **kw):
        """connection.Parameters aimed at the proxy."""
        return gocept.amqprun.parameters.Parameters(
            hostname='127.0.0.1', port=self.port,
            **dict(self.credentials, **kw))

    def cut(self, timeout=10):
        """Reset all current connections; return their number."""
        return self._request('cut', timeout)

    def stop(self, timeout=10):
        """Reset all connections and stop listening."""
        if self._thread.is_alive():
            self._request('stop', timeout)
            self._thread.join(timeout)

    def _request(self, command, timeout):
        done = threading.Event()
        result = []
        with self._lock:
            self._requests.append((command, done, result))
        self._wake_w.send(b'x')
        if not done.wait(timeout):
            raise AssertionError(f'{self}: {command} not done in {timeout} s')
        return result[0]

    # The proxy's thread

    def _run(self):
        try:
            while True:
                for key, events in self._selector.select():
                    sock = key.fileobj
                    if sock is self._wake_r:
                        if not self._serve_requests():
                            return
                    elif sock is self._listener:
                        self._accept()
                    elif sock in self._peer:
                        if events & selectors.EVENT_WRITE:
                            self._write(sock)
                        if events & selectors.EVENT_READ \
                                and sock in self._peer:
                            self._read(sock)
        finally:
            for sock in list(self._peer):
                self._close(sock, reset=True)
            self._selector.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _serve_requests(self):
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        with self._lock:
            requests, self._requests = self._requests, []
        running = True
        for command, done, result in requests:
            if isinstance(command, tuple):
                # (function, argument): run it in this thread.
                result.append(command[0](command[1]))
                done.set()
                continue
            count = len(self._peer) // 2
            for sock in list(self._peer):
                self._close(sock, reset=True)
            if command == 'cut':
                self.cuts += 1
            else:
                running = False
            result.append(count)
            done.set()
        return running

    def _accept(self):
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            self._reset(client)
            return
        self.accepted += 1
        with self._lock:
            for a, b in ((client, upstream), (upstream, client)):
                a.setblocking(False)
                a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._peer[a] = b
                self._outgoing[a] = bytearray()
                self._selector.register(a, selectors.EVENT_READ)
        self._opened(client, upstream)

    def _opened(self, client, upstream):
        """Hook: `client` is now forwarded to `upstream`."""

    def _read(self, sock):
        peer = self._peer[sock]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = None
        if not data:
            # EOF or an error: pass what is left on, then close both.
            self._flush(peer)
            self._close(sock, reset=data is None)
            return
        self._forward(sock, data)
        if sock not in self._peer:
            return      # _forward cut the connection
        self._update(peer)
        if len(self._outgoing[peer]) > self.BUFFER_LIMIT:
            # Back-pressure: stop reading until the peer caught up.
            self._paused.add(sock)
            self._update(sock)

    def _forward(self, sock, data):
        """Hook: pass `data`, just read from `sock`, on to its peer."""
        self._outgoing[self._peer[sock]] += data

    def _flush(self, sock):
        """Send all that waits for `sock` (blocking, before a close)."""
        with contextlib.suppress(OSError):
            sock.setblocking(True)
            sock.settimeout(2)
            sock.sendall(self._outgoing[sock])

    def _write(self, sock):
        buffer = self._outgoing[sock]
        try:
            sent = sock.send(buffer)
        except BlockingIOError:
            return
        except OSError:
            self._close(sock, reset=True)
            return
        del buffer[:sent]
        self._update(sock)
        peer = self._peer[sock]
        if peer in self._paused and len(buffer) <= self.BUFFER_LIMIT // 2:
            self._paused.discard(peer)
            self._update(peer)

    def _update(self, sock):
        events = selectors.EVENT_WRITE if self._outgoing[sock] else 0
        if sock not in self._paused:
            events |= selectors.EVENT_READ
        try:
            key = self._selector.get_key(sock)
        except KeyError:
            if events:
                self._selector.register(sock, events)
            return
        if not events:
            self._selector.unregister(sock)
        elif key.events != events:
            self._selector.modify(sock, events)

    def _close(self, sock, reset=False):
        """Close `sock` and its peer (with a TCP RST if `reset`)."""
        with self._lock:
            peer = self._peer.pop(sock, None)
            self._peer.pop(peer, None)
        for s in (sock, peer):
            if s is None:
                continue
            self._outgoing.pop(s, None)
            self._paused.discard(s)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(s)
            if reset:
                self._reset(s)
            else:
                s.close()

    @staticmethod
    def _reset(sock):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                            struct.pack('ii', 1, 0))
        sock.close()


class AMQPProxy(Proxy):
    """A `Proxy` that follows the AMQP 0-9-1 frames and cuts at exact
    protocol steps.

    The bytes pass unchanged; each frame is passed on as soon as it is
    complete. `arm()` sets a `frames.Rule` (a cut at the nth frame of
    some methods); `seen()` counts the method frames passed on. Rules and
    counters span all connections of the proxy.
    """

    def __init__(self, target_port, target_host='127.0.0.1', port=None):
        self._readers = {}   # socket -> (direction, FrameReader) of its data
        self._rules = []
        self._holds = []     # armed or holding `Hold`s
        self._seen = collections.Counter()   # (direction, method) -> count
        super().__init__(target_port, target_host, port)

    def arm(self, *methods, nth=1, cut='before', direction=None,
            channel=None):
        """Arm and return a `frames.Rule`: at the `nth` method frame of one
        of `methods` from now on, drop it (``cut='before'``) or pass it on
        (``cut='after'``), then reset its connection.

        `direction` (TO_BROKER, TO_CLIENT, None: either) and `channel`
        (None: any) narrow what counts. Wait with ``rule.fired.wait(t)``.
        """
        rule = gocept.amqprun.testing.frames.Rule(
            methods, nth=nth, cut=cut, direction=direction, channel=channel)
        with self._lock:
            self._rules.append(rule)
        return rule

    def hold(self, method, direction=None):
        """Arm and return a `Hold`: hold back the method frames of
        `method` (in `direction`; None: either) on the connection of the
        next one until ``hold.release()``, letting the other frames pass
        -- as a broker slow to answer would (e.g. ``Tx.CommitOk``: the
        client keeps receiving deliveries meanwhile). Wait with
        ``hold.holding.wait(t)``."""
        hold = Hold(self, method, direction)
        with self._lock:
            self._holds.append(hold)
        return hold

    def seen(self, method, direction=None):
        """How many frames of `method` the proxy passed on (in `direction`;
        None: either). A frame dropped by a rule does not count."""
        with self._lock:
            return sum(count for (way, m), count in self._seen.items()
                       if m == method and direction in (None, way))

    # The proxy's thread

    def _opened(self, client, upstream):
        frames = gocept.amqprun.testing.frames
        self._readers[client] = (
            frames.TO_BROKER, frames.FrameReader(header=True))
        self._readers[upstream] = (frames.TO_CLIENT, frames.FrameReader())

    def _forward(self, sock, data):
        direction, reader = self._readers[sock]
        for frame, channel, method in reader.feed(data):
            hold = self._holding(sock, direction, method)
            if hold is not None:
                hold.frames.append((frame, channel, method))
            elif not self._pass(sock, direction, frame, channel, method):
                return

    def _pass(self, sock, direction, frame, channel, method):
        """Pass a frame of `sock` on, unless a rule drops it; return
        False when a rule cut the connection."""
        peer = self._peer[sock]
        fired, passed = (), True
        if method is not None:
            fired, passed = self._fire(direction, channel, method)
        if passed:
            self._outgoing[peer] += frame
        if fired:
            self._flush(peer)
            self._wait_sent(peer)
            self._close(sock, reset=True)
            for rule in fired:
                rule.fired.set()
            return False
        return True

    def _holding(self, sock, direction, method):
        """The Hold that holds back this frame of `sock`, or None."""
        with self._lock:
            for hold in self._holds:
                if method == hold.method and hold.sock in (None, sock) \
                        and hold.direction in (None, direction):
                    hold.sock = sock
                    hold.holding.set()
                    return hold
        return None

    def _release(self, hold):
        with self._lock:
            if hold in self._holds:
                self._holds.remove(hold)
        sock = hold.sock
        frames, hold.frames = hold.frames, []
        if sock is None or sock not in self._peer:
            return False
        direction, _ = self._readers[sock]
        peer = self._peer[sock]
        for frame, channel, method in frames:
            if not self._pass(sock, direction, frame, channel, method):
                return True
        self._update(peer)
        return True

    def _fire(self, direction, channel, method):
        """Count a method frame; return the rules that fire at it and
        whether it is passed on."""
        with self._lock:
            fired = [rule for rule in self._rules
                     if rule.match(direction, channel, method)]
            for rule in fired:
                self._rules.remove(rule)
            passed = all(rule.cut == 'after' for rule in fired)
            if passed:
                self._seen[direction, method] += 1
        return fired, passed

    @staticmethod
    def _wait_sent(sock, timeout=2):
        # A reset discards what the kernel has not sent yet: wait (a
        # little, on loopback) until the peer acknowledged all of it.
        if not hasattr(termios, 'TIOCOUTQ'):
            return
        deadline = time.monotonic() + timeout
        unsent = array.array('i', [0])
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                fcntl.ioctl(sock, termios.TIOCOUTQ, unsent)
                if not unsent[0]:
                    return
                time.sleep(0.001)

    def _close(self, sock, reset=False):
        self._readers.pop(self._peer.get(sock), None)
        self._readers.pop(sock, None)
        super()._close(sock, reset)


class Hold:
    """Frames an `AMQPProxy` holds back (see `AMQPProxy.hold`).

    `holding` is set once it holds the first frame; `release()` passes
    the held frames on (through the proxy's rules) and ends the hold.
    """

    def __init__(self, proxy, method, direction):
        self.proxy = proxy
        self.method = method
        self.direction = direction
        self.sock = None
        self.frames = []      # (frame, channel, method)
        self.holding = threading.Event()

    def release(self, timeout=10):
        self.proxy._request((self.proxy._release, self), timeout)
