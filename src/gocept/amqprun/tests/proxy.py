"""A TCP proxy for tests that need the broker to go away for a while."""

import contextlib
import socket
import threading

import gocept.amqprun.testing


class Proxy:
    """Forwards 127.0.0.1:`port` to `target` (host, port).

    `cut()` drops every connection and refuses new ones (like a broker
    that went down); `restore()` accepts again on the same port.
    """

    def __init__(self, target):
        self.target = target
        self.port = gocept.amqprun.testing.free_port()
        self._lock = threading.Lock()
        self._sockets = set()
        self._listener = None
        self.restore()

    def restore(self):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(('127.0.0.1', self.port))
        listener.listen(16)
        listener.settimeout(0.05)
        self._listener = listener
        self._acceptor = threading.Thread(
            target=self._accept, args=(listener,), daemon=True)
        self._acceptor.start()

    def cut(self):
        listener, self._listener = self._listener, None
        if listener is not None:
            # The socket only goes when no thread waits on it any more.
            self._acceptor.join(5)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    close = cut

    def _accept(self, listener):
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink),
                                 daemon=True).start()

    def _pump(self, source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
