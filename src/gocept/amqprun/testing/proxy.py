"""TCP proxies between the daemon and the broker, to inject faults."""

import contextlib
import selectors
import socket
import struct
import threading

import gocept.amqprun.parameters


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
        return f'<Proxy :{self.port} -> {self.target[0]}:{self.target[1]}>'

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
            with contextlib.suppress(OSError):
                peer.setblocking(True)
                peer.settimeout(2)
                peer.sendall(self._outgoing[peer])
            self._close(sock, reset=data is None)
            return
        self._outgoing[peer] += data
        self._update(peer)
        if len(self._outgoing[peer]) > self.BUFFER_LIMIT:
            # Back-pressure: stop reading until the peer caught up.
            self._paused.add(sock)
            self._update(sock)

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
