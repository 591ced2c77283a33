"""Helpers for testing handlers against a real broker.

Used by gocept.amqprun's own tests and meant for applications' tests too.
Activate the pytest fixtures in a ``conftest.py``::

    pytest_plugins = ['gocept.amqprun.testing']

The broker comes from the environment: AMQP_HOSTNAME (default localhost),
AMQP_PORT (5672), AMQP_USERNAME (guest), AMQP_PASSWORD (guest),
AMQP_VIRTUALHOST (``/``). When no broker answers there and Debian's
rabbitmq-server is installed, the test session starts a private node on a
free port and stops it at the end.

The `Client` here is test-side code: it owns a blocking pika connection of
its own, used only by the thread that made it.
"""

import contextlib
import os
import pathlib
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid

import pika
import pytest
import transaction

import gocept.amqprun.connection
import gocept.amqprun.message


def wait_for(condition, timeout=10, interval=0.02, message=None):
    """Poll `condition` until it returns a true value, which is returned.

    Raises AssertionError after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(
                message or f'{condition!r} not true within {timeout} s')
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def port_open(host, port, timeout=1):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class PrivateBroker:
    """A RabbitMQ node of its own in a temporary directory.

    `config` is extra rabbitmq.conf text (e.g. a TLS listener). Needs
    Debian's rabbitmq-server package.
    """

    SERVER = '/usr/lib/rabbitmq/bin/rabbitmq-server'
    CTL = '/usr/lib/rabbitmq/bin/rabbitmqctl'

    def __init__(self, config='', port=None):
        self.port = port or free_port()
        self.dist_port = free_port()
        self.name = f'amqprun{self.port}@localhost'
        self.config = config
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix='amqprun-broker-'))
        self.process = None

    @classmethod
    def available(cls):
        return os.path.exists(cls.SERVER)

    @property
    def env(self):
        d = self.dir
        env = dict(os.environ)
        env.update(
            HOME=str(d),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS='127.0.0.1',
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(d / 'mnesia'),
            RABBITMQ_LOG_BASE=str(d / 'log'),
            RABBITMQ_PID_FILE=str(d / 'pid'),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / 'enabled_plugins'),
            RABBITMQ_CONFIG_FILE=str(d / 'rabbitmq'),
        )
        return env

    def start(self, timeout=60):
        (self.dir / 'enabled_plugins').write_text('[].\n')
        (self.dir / 'rabbitmq.conf').write_text(
            f'listeners.tcp.default = {self.port}\n'
            'loopback_users = none\n' + self.config)
        self.process = subprocess.Popen(
            [self.SERVER], env=self.env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: port_open('127.0.0.1', self.port, 0.2)
                 or self.process.poll() is not None, timeout=timeout,
                 interval=0.2, message='private broker did not start')
        if self.process.poll() is not None:
            raise RuntimeError(
                f'private broker exited; see {self.dir}/log')

    def stop(self, timeout=30):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def restart(self):
        self.stop()
        self.start()

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def parameters(self, **kw):
        return gocept.amqprun.connection.Parameters(
            hostname='127.0.0.1', port=self.port, **kw)


def environment_parameters(**kw):
    """Parameters for the broker named by the AMQP_* variables."""
    values = dict(
        hostname=os.environ.get('AMQP_HOSTNAME', 'localhost'),
        port=int(os.environ.get('AMQP_PORT', 5672)),
        username=os.environ.get('AMQP_USERNAME', 'guest'),
        password=os.environ.get('AMQP_PASSWORD', 'guest'),
        virtual_host=os.environ.get('AMQP_VIRTUALHOST', '/'),
    )
    values.update(kw)
    return gocept.amqprun.connection.Parameters(**values)


class Received:
    """A message a `Client` got: header (message.Header), body (bytes),
    routing_key."""

    def __init__(self, method, properties, body):
        self.routing_key = method.routing_key
        self.redelivered = method.redelivered
        self.header = gocept.amqprun.connection._header_from(properties)
        self.body = body

    def __repr__(self):
        return f'<Received {self.routing_key} {self.body[:40]!r}>'


class Client:
    """A plain AMQP client for tests: declare queues, send, receive.

    Queues it declares are deleted by `close()`.
    """

    def __init__(self, parameters):
        self.parameters = parameters
        self.connection = pika.BlockingConnection(
            parameters.pika_parameters())
        self.channel = self.connection.channel()
        self.queues = []

    def declare(self, name, routing_keys=(), arguments=None):
        """Declare a (durable) queue bound to `routing_keys` on amq.topic;
        it is deleted on close()."""
        self.channel.queue_declare(name, durable=True, arguments=arguments)
        for key in routing_keys:
            self.channel.queue_bind(name, 'amq.topic', routing_key=key)
        self.forget(name)
        self.queues.append(name)
        return name

    def forget(self, name):
        """Delete `name` on close() (a queue the daemon declared)."""
        if name not in self.queues:
            self.queues.append(name)

    def send(self, routing_key, body=b'', header=None,
             exchange='amq.topic'):
        """Publish a message; return its message-id."""
        message = gocept.amqprun.message.Message(
            header or {}, body, routing_key=routing_key)
        self.channel.basic_publish(
            exchange, routing_key, message.body,
            gocept.amqprun.connection._properties_from(message.header))
        return message.header.message_id

    def get(self, queue):
        """One message from `queue` (ACKed), or None."""
        method, properties, body = self.channel.basic_get(
            queue, auto_ack=True)
        if method is None:
            return None
        return Received(method, properties, body)

    def wait(self, queue, timeout=10):
        """The next message on `queue`; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.get(queue)
            if message is not None:
                return message
            if time.monotonic() > deadline:
                raise AssertionError(
                    f'no message on {queue!r} within {timeout} s')
            self.connection.sleep(0.02)

    def wait_many(self, queue, count, timeout=30):
        """`count` messages from `queue`."""
        deadline = time.monotonic() + timeout
        result = []
        while len(result) < count:
            message = self.get(queue)
            if message is not None:
                result.append(message)
                continue
            if time.monotonic() > deadline:
                raise AssertionError(
                    f'{len(result)} of {count} messages on {queue!r} '
                    f'within {timeout} s')
            self.connection.sleep(0.02)
        return result

    def count(self, queue):
        """Messages ready in `queue` (None if it does not exist)."""
        try:
            ok = self.channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            self.channel = self.connection.channel()
            return None
        return ok.method.message_count

    def exists(self, queue):
        return self.count(queue) is not None

    def close(self):
        with contextlib.suppress(Exception):
            if not self.channel.is_open:
                self.channel = self.connection.channel()
            for name in self.queues:
                self.channel.queue_delete(name)
        with contextlib.suppress(Exception):
            self.connection.close()


class ServerProcess:
    """The real `server` entry point in a subprocess.

    `zcml` is the body of a ZCML file (inside <configure>, gocept.amqprun's
    configure.zcml included); `handlers` a Python module's source that it
    may name as `handlers.<name>`; `settings` a dict for <settings>;
    `extra` more configuration text.
    """

    def __init__(self, directory, parameters, zcml='', handlers='',
                 amount=2, settings=None, extra='', server_extra='',
                 worker_extra=''):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = self.directory / 'server.log'
        self.process = None
        (self.directory / 'handlers.py').write_text(
            textwrap.dedent(handlers))
        (self.directory / 'server.zcml').write_text(
            '<configure xmlns="http://namespaces.zope.org/zope"\n'
            '           xmlns:amqp="http://namespaces.gocept.com/amqp">\n'
            '  <include package="gocept.amqprun" />\n'
            f'{textwrap.dedent(zcml)}\n</configure>\n')
        settings_text = ''
        if settings:
            settings_text = '<settings>\n' + ''.join(
                f'  {k} {v}\n' for k, v in settings.items()) + '</settings>\n'
        p = parameters
        (self.directory / 'server.conf').write_text(
            '<eventlog>\n  level DEBUG\n  <logfile>\n'
            f'    path {self.log}\n'
            '    formatter zope.exceptions.log.Formatter\n'
            '    format %(asctime)s %(levelname)s %(name)s %(message)s\n'
            '  </logfile>\n</eventlog>\n'
            '<logger>\n  name pika\n  level WARNING\n</logger>\n'
            '<amqp-server>\n'
            f'  hostname {p.hostname}\n'
            f'  port {p.port or 5672}\n'
            f'  username {p.username}\n'
            f'  password {p.password}\n'
            f'  virtual_host {p.virtual_host}\n'
            f'{server_extra}'
            '</amqp-server>\n'
            '<worker>\n'
            f'  amount {amount}\n'
            f'  component-configuration {self.directory}/server.zcml\n'
            f'{worker_extra}'
            '</worker>\n' + settings_text + extra)

    @property
    def config(self):
        return self.directory / 'server.conf'

    def start(self, wait=True, timeout=30):
        env = dict(os.environ)
        env['PYTHONPATH'] = os.pathsep.join(
            [str(self.directory)] + sys.path)
        self.output = open(self.directory / 'output.txt', 'ab')
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'gocept.amqprun', str(self.config)],
            cwd=self.directory, env=env, stdout=self.output,
            stderr=subprocess.STDOUT)
        if wait:
            self.wait_for_log('gocept.amqprun.main Started.', timeout)
        return self

    def log_text(self):
        try:
            return self.log.read_text()
        except FileNotFoundError:
            return ''

    def output_text(self):
        return (self.directory / 'output.txt').read_text()

    def wait_for_log(self, text, timeout=30, count=1):
        """Wait until `text` is in the log `count` times."""
        def found():
            if self.log_text().count(text) >= count:
                return True
            if self.process.poll() is not None:
                raise AssertionError(
                    f'server exited with {self.process.returncode} before '
                    f'logging {text!r}:\n{self.output_text()}\n'
                    f'{self.log_text()}')
        wait_for(found, timeout, interval=0.05,
                 message=f'{text!r} not logged within {timeout} s:\n'
                 f'{self.log_text()}')

    def stop(self, signum=signal.SIGTERM, timeout=30):
        """Send `signum`, wait for the exit, return the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f'server did not exit within {timeout} s')
        self.output.close()
        return self.process.returncode

    def kill(self):
        self.process.kill()
        self.process.wait()
        self.output.close()

    def wait(self, timeout=30):
        """Wait for the process to exit by itself; return the exit code."""
        code = self.process.wait(timeout)
        self.output.close()
        return code


class ServerThread:
    """A `server.Server` running in a thread of the test process."""

    def __init__(self, server):
        self.server = server
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.server.start()
        except Exception as e:
            self.error = e

    def start(self, timeout=30):
        self.thread.start()
        if not self.server.wait_until_running(timeout):
            raise AssertionError(f'server not running: {self.error!r}')
        return self

    def stop(self):
        self.server.stop()
        self.thread.join(30)


class LastVote:
    """A stand-in for the AMQP session in unit tests of data managers:
    sorts like it (votes last) and calls `vote()` in tpc_vote, which may
    raise to simulate a failed AMQP commit."""

    transaction_manager = transaction.manager

    def __init__(self, vote):
        self.vote = vote

    def sortKey(self):
        return f'~gocept.amqprun.session:test{id(self)}'

    def abort(self, txn):
        pass

    tpc_begin = commit = tpc_finish = tpc_abort = abort

    def tpc_vote(self, txn):
        self.vote()


def unique_name(prefix='test'):
    return f'{prefix}.{uuid.uuid4().hex[:12]}'


def call_handler(handler, body=b'', header=None, routing_key=None,
                 commit=False):
    """Call `handler` with a fake incoming message, without a broker;
    return its replies as the daemon would send them.

    handler: an IHandler, or the name of a registered one.
    body, header (a dict or message.Header), routing_key (default: the
        handler's first routing key) make the incoming message; it gets a
        message-id unless `header` has one.
    The handler runs as the daemon runs it: inside a transaction, as its
    principal. Its replies pass through `session.Session.send`, so they
    carry correlation_id and the ``references`` header. The transaction
    is aborted afterwards (data managers the handler joined do nothing)
    unless `commit` is true. Exceptions of the handler propagate (the
    transaction is aborted).
    """
    import transaction
    import zope.component
    import gocept.amqprun.interfaces
    import gocept.amqprun.security
    import gocept.amqprun.session
    if isinstance(handler, str):
        handler = zope.component.getUtility(
            gocept.amqprun.interfaces.IHandler, name=handler)
    header = gocept.amqprun.message.make_header(dict(
        header.as_dict() if isinstance(header, gocept.amqprun.message.Header)
        else header or {}))
    if header.message_id is None:
        header.message_id = gocept.amqprun.message.make_message_id()
    if routing_key is None:
        keys = handler.routing_key
        routing_key = keys if isinstance(keys, str) else list(keys)[0]
    message = gocept.amqprun.message.Message(
        header, body, delivery_tag=1, routing_key=routing_key)
    session = gocept.amqprun.session.Session(None, received=message)
    replies = []
    manager = transaction.manager
    manager.begin()
    try:
        with gocept.amqprun.security.interaction(handler.principal):
            for reply in handler(message) or ():
                session.send(reply)
                replies.append(reply)
    except BaseException:
        manager.abort()
        raise
    if commit:
        manager.commit()
    else:
        manager.abort()
    return replies


_broker = None


def ensure_broker():
    """Parameters of a reachable broker (starting a private one if none
    answers and rabbitmq-server is installed)."""
    global _broker
    params = environment_parameters()
    if port_open(params.hostname, params.port):
        return params
    if _broker is None:
        if not PrivateBroker.available():
            pytest.skip(f'no broker at {params.hostname}:{params.port} and '
                        'no rabbitmq-server to start one')
        _broker = PrivateBroker()
        _broker.start()
    os.environ['AMQP_HOSTNAME'] = '127.0.0.1'
    os.environ['AMQP_PORT'] = str(_broker.port)
    return environment_parameters()


@pytest.fixture(scope='session')
def amqp_parameters():
    """connection.Parameters of the test broker."""
    params = ensure_broker()
    yield params
    global _broker
    if _broker is not None:
        _broker.cleanup()
        _broker = None


@pytest.fixture
def amqp_client(amqp_parameters):
    """A `Client`; the queues it declared are deleted afterwards."""
    client = Client(amqp_parameters)
    yield client
    client.close()


@pytest.fixture
def name_prefix():
    """A prefix unique to the test, for queue names and routing keys."""
    return unique_name()


@pytest.fixture
def zca():
    """A clean component registry for the test (handlers, utilities)."""
    import zope.component.testing
    zope.component.testing.setUp()
    yield zope.component.getGlobalSiteManager()
    zope.component.testing.tearDown()


@pytest.fixture
def server_process(tmp_path, amqp_parameters):
    """A factory of started `ServerProcess`es, all stopped afterwards."""
    started = []

    def factory(start=True, **kw):
        process = ServerProcess(
            tmp_path / f'server{len(started)}', amqp_parameters, **kw)
        started.append(process)
        if start:
            process.start()
        return process
    yield factory
    for process in started:
        if process.process is not None and process.process.poll() is None:
            process.kill()


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
        return gocept.amqprun.connection.Parameters(
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
