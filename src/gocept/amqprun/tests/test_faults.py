"""Fault injection against real brokers: the daemon keeps running and loses
nothing.

The guarantee under test is *one reply per input*: an echo handler's reply
and the ACK of its input are committed in one AMQP transaction, so whatever
happens to the daemon or its connection, each input ends up with exactly one
reply. When a fault hits a commit between the broker committing and the
daemon seeing Commit-Ok, the daemon cannot tell whether the commit happened;
the broker either has the whole transaction (no redelivery) or none of it
(the input is redelivered). The tests count losses and duplicates precisely
and print them on failure.

Tests that stop or restart a broker use a private RabbitMQ node (never the
shared broker). Every wait is bounded.
"""

import collections
import concurrent.futures
import contextlib
import pathlib
import signal
import subprocess
import time

import pytest
import transaction

import gocept.amqprun.errors
import gocept.amqprun.parameters
import gocept.amqprun.connection
import gocept.amqprun.message
import gocept.amqprun.server
import gocept.amqprun.testing


Client = gocept.amqprun.testing.Client
PrivateBroker = gocept.amqprun.testing.PrivateBroker
Proxy = gocept.amqprun.testing.Proxy
ServerProcess = gocept.amqprun.testing.ServerProcess
wait_for = gocept.amqprun.testing.wait_for

STREAM = 1200

HANDLERS = '''\
import logging
import time
import gocept.amqprun.handler
import gocept.amqprun.message

log = logging.getLogger('handlers')


@gocept.amqprun.handler.declare({queue!r}, {queue!r})
def echo(message):
    log.info('Handling %s', message.body.decode())
    if {sleep!r}:
        time.sleep({sleep!r})
    return [gocept.amqprun.message.Message(
        {{}}, message.body, routing_key={out!r})]
'''

ZCML = '''\
<utility component="handlers.echo" name="echo"
         provides="gocept.amqprun.interfaces.IHandler" />
'''

LOST = 'Connection to the broker lost'
CONNECTED = 'Connected to '


class Echo:
    """An echo daemon (ServerProcess) on `parameters` and the queues of a
    test: `queue` (input), `out` (replies)."""

    def __init__(self, directory, parameters, client, prefix, sleep=0,
                 amount=2, server_extra='', worker_extra=''):
        self.directory = pathlib.Path(directory)
        self.parameters = parameters
        self.client = client
        self.queue = f'{prefix}.in'
        self.out = f'{prefix}.out'
        self.sleep = sleep
        self.amount = amount
        self.server_extra = server_extra
        self.worker_extra = worker_extra
        self.processes = []
        self.declare(client)

    def declare(self, client):
        client.declare(self.queue, [self.queue])
        client.declare(self.out, [self.out])
        # Declared by the daemon for retries and parking.
        client.forget(f'{self.queue}.retry')
        client.forget(f'{self.queue}.parked')
        client.forget(f'{self.queue}.quarantine')

    def process(self, start=True, timeout=30):
        process = ServerProcess(
            self.directory / f'server{len(self.processes)}',
            self.parameters, zcml=ZCML, amount=self.amount,
            handlers=HANDLERS.format(
                queue=self.queue, out=self.out, sleep=self.sleep),
            server_extra=self.server_extra, worker_extra=self.worker_extra)
        self.processes.append(process)
        if start:
            process.start(timeout=timeout)
        return process

    def cleanup(self):
        for process in self.processes:
            if process.process is not None \
                    and process.process.poll() is None:
                process.kill()

    def publish(self, count, client=None):
        """Publish `count` inputs numbered 0..count-1; wait until they are
        all in the input queue."""
        client = client or self.client
        for i in range(count):
            client.send(self.queue, b'%06d' % i)
        wait_for(lambda: client.count(self.queue) == count, timeout=30,
                 message=f'{count} inputs not in {self.queue}')

    def replies(self, client=None):
        """The number of replies waiting in the reply queue."""
        return (client or self.client).count(self.out) or 0


def drain(client, queue, timeout=60):
    """All message bodies in `queue` (consumed with auto-ack)."""
    bodies = []
    deadline = time.monotonic() + timeout
    for method, properties, body in client.channel.consume(
            queue, auto_ack=True, inactivity_timeout=0.5):
        if method is None:
            if client.count(queue) == 0:
                break
        else:
            bodies.append(body)
        if time.monotonic() > deadline:
            break
    client.channel.cancel()
    return bodies


def tally(bodies, count):
    """Check that `bodies` holds each of 0..count-1 exactly once."""
    seen = collections.Counter(int(b) for b in bodies)
    expected = set(range(count))
    lost = sorted(expected - set(seen))
    doubled = sorted(n for n, c in seen.items() if c > 1)
    unexpected = sorted(set(seen) - expected)
    report = (f'{count} inputs, {len(bodies)} replies: {len(lost)} lost '
              f'{lost[:20]}, {len(doubled)} doubled {doubled[:20]}, '
              f'{len(unexpected)} unexpected {unexpected[:20]}')
    print(report)
    assert not (lost or doubled or unexpected), report
    return report


def finish(echo, process, count, client=None, timeout=90):
    """Wait until all inputs are handled, stop `process` (SIGTERM, exit 0)
    and check one reply per input."""
    client = client or echo.client
    try:
        wait_for(lambda: echo.replies(client) >= count
                 and client.count(echo.queue) == 0,
                 timeout=timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(
            f'not all inputs handled within {timeout} s: '
            f'{echo.replies(client)} replies, '
            f'{client.count(echo.queue)} inputs left') from None
    assert process.stop() == 0
    # Nothing was left unacked: no input returned to the queue.
    assert client.count(echo.queue) == 0
    assert client.count(f'{echo.queue}.parked') in (0, None)
    tally(drain(client, echo.out), count)


@pytest.fixture
def echo(tmp_path, amqp_parameters, amqp_client, name_prefix):
    """A factory of `Echo`s on the shared broker (or, given `parameters`,
    elsewhere)."""
    made = []

    def factory(parameters=None, **kw):
        e = Echo(tmp_path, parameters or amqp_parameters, amqp_client,
                 name_prefix, **kw)
        made.append(e)
        return e
    yield factory
    for e in made:
        e.cleanup()


# SIGKILL, cuts, broker restart


@pytest.mark.slow
def test_sigkill_mid_stream_then_restart_gives_one_reply_per_input(echo):
    e = echo(amount=2, sleep=0.001)
    e.publish(STREAM)
    first = e.process()
    wait_for(lambda: e.replies() >= STREAM // 4, timeout=60, interval=0.01)
    first.kill()
    handled = e.replies()
    assert handled < STREAM, 'the daemon finished before it was killed'
    second = e.process()
    finish(e, second, STREAM)


@pytest.mark.slow
def test_connection_cuts_mid_stream_give_one_reply_per_input(
        echo, amqp_parameters):
    proxy = Proxy.to(amqp_parameters)
    try:
        e = echo(proxy.parameters(), amount=2, sleep=0.001,
                 server_extra='  retry_delay 0.1\n  max_retry_delay 0.5\n')
        e.publish(STREAM)
        process = e.process()
        cuts = 0
        for fraction in (0.2, 0.4, 0.6):
            wait_for(lambda: e.replies() >= STREAM * fraction,
                     timeout=60, interval=0.01)
            # Cut only a working connection (not one still reconnecting).
            wait_for(lambda: proxy.connections, timeout=30)
            cuts += proxy.cut()
            assert process.process.poll() is None
        assert cuts >= 3
        assert e.replies() < STREAM, 'the stream ended before the last cut'
        process.wait_for_log(LOST, count=3)
        process.wait_for_log(CONNECTED, count=4)
        assert process.process.poll() is None, 'the daemon stopped'
        finish(e, process, STREAM)
    finally:
        proxy.stop()


@pytest.fixture(scope='module')
def certificates(tmp_path_factory):
    """A CA, a broker certificate it signed (SAN localhost, 127.0.0.1)
    and another CA that did not sign it."""
    d = tmp_path_factory.mktemp('tls')

    def openssl(*args):
        subprocess.run(('openssl',) + args, cwd=d, check=True,
                       capture_output=True, timeout=60)
    for ca in ('ca', 'wrong-ca'):
        openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes',
                '-keyout', f'{ca}.key', '-out', f'{ca}.pem', '-days', '2',
                '-subj', f'/CN=amqprun test {ca}')
    openssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'broker.key',
            '-out', 'broker.csr', '-subj', '/CN=localhost')
    (d / 'san.ext').write_text(
        'subjectAltName = DNS:localhost, IP:127.0.0.1\n'
        'extendedKeyUsage = serverAuth\n')
    openssl('x509', '-req', '-in', 'broker.csr', '-CA', 'ca.pem',
            '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'broker.pem',
            '-days', '2', '-extfile', 'san.ext')
    return d


@pytest.fixture(scope='module')
def private_broker(certificates):
    """A private RabbitMQ node with a plain and a TLS listener."""
    if not PrivateBroker.available():
        pytest.skip('rabbitmq-server is not installed')
    tls_port = gocept.amqprun.testing.free_port()
    d = certificates
    broker = PrivateBroker(config=(
        f'listeners.ssl.default = {tls_port}\n'
        f'ssl_options.cacertfile = {d}/ca.pem\n'
        f'ssl_options.certfile = {d}/broker.pem\n'
        f'ssl_options.keyfile = {d}/broker.key\n'
        'ssl_options.verify = verify_none\n'
        'ssl_options.fail_if_no_peer_cert = false\n'))
    broker.tls_port = tls_port
    try:
        broker.start()
        wait_for(lambda: gocept.amqprun.testing.port_open(
            '127.0.0.1', tls_port, 0.2), timeout=30,
            message='TLS listener did not open')
        yield broker
    finally:
        broker.cleanup()


@contextlib.contextmanager
def client_of(parameters, keep=False):
    """A `Client` for the block; with `keep` it leaves its queues alone."""
    client = Client(parameters)
    try:
        yield client
    finally:
        if keep:
            client.queues = []
        client.close()


@pytest.mark.slow
def test_broker_restart_mid_stream_gives_one_reply_per_input(
        private_broker, tmp_path, name_prefix):
    broker = private_broker
    with client_of(broker.parameters(), keep=True) as client:
        e = Echo(tmp_path, broker.parameters(), client, name_prefix,
                 amount=2, sleep=0.001,
                 server_extra='  retry_delay 0.2\n  max_retry_delay 1\n')
        e.publish(STREAM)
    try:
        process = e.process()
        with client_of(broker.parameters(), keep=True) as client:
            wait_for(lambda: e.replies(client) >= STREAM // 4, timeout=60,
                     interval=0.01)
        broker.restart()
        with client_of(broker.parameters()) as client:
            assert e.replies(client) < STREAM, \
                'the stream ended before the restart'
            process.wait_for_log(LOST)
            process.wait_for_log(CONNECTED, count=2, timeout=60)
            assert process.process.poll() is None, 'the daemon stopped'
            finish(e, process, STREAM, client)
    finally:
        e.cleanup()


# TLS


@pytest.mark.slow
def test_tls_with_verification(private_broker, certificates, tmp_path,
                               name_prefix):
    broker = private_broker
    with client_of(broker.parameters()) as client:
        e = Echo(tmp_path, gocept.amqprun.parameters.Parameters(
            hostname='127.0.0.1', port=broker.tls_port), client,
            name_prefix, amount=1,
            server_extra=f'  ssl true\n  ssl_cafile {certificates}/ca.pem\n')
        try:
            process = e.process()
            assert f'Connected to amqps://guest@127.0.0.1:{broker.tls_port}' \
                in process.log_text()
            msgid = client.send(e.queue, b'000007')
            reply = client.wait(e.out)
            assert reply.body == b'000007'
            assert reply.header.correlation_id == msgid
            assert process.stop() == 0
        finally:
            e.cleanup()


@pytest.mark.slow
def test_tls_in_process_by_hostname(private_broker, certificates,
                                    amqp_client, name_prefix):
    """connection.Parameters with TLS work (hostname verification against
    the DNS name) for a client of the test process."""
    params = gocept.amqprun.parameters.Parameters(
        hostname='localhost', port=private_broker.tls_port, ssl=True,
        ssl_cafile=str(certificates / 'ca.pem'))
    with client_of(params) as client:
        queue = client.declare(f'{name_prefix}.tls', [f'{name_prefix}.tls'])
        client.send(queue, b'over tls')
        assert client.wait(queue).body == b'over tls'


@pytest.mark.slow
def test_tls_wrong_ca_is_refused_with_a_clear_error(
        private_broker, certificates, tmp_path, name_prefix):
    broker = private_broker
    with client_of(broker.parameters()) as client:
        e = Echo(tmp_path, gocept.amqprun.parameters.Parameters(
            hostname='127.0.0.1', port=broker.tls_port), client,
            name_prefix, amount=1,
            server_extra=(f'  ssl true\n'
                          f'  ssl_cafile {certificates}/wrong-ca.pem\n'
                          '  connection_attempts 2\n  retry_delay 0.2\n'))
        try:
            process = e.process(start=False)
            start = time.monotonic()
            process.start(wait=False)
            code = process.wait(timeout=30)
            elapsed = time.monotonic() - start
            log = process.log_text()
            print(log)
            assert code == 1
            assert elapsed < 20
            assert 'certificate verify failed' in log
            assert 'after 2 attempt(s)' in log
            assert 'Started.' not in log
        finally:
            e.cleanup()


# Start-up failures


SECRET = 'Pa55-never-logged-7f3e'


def failed_start(echo, parameters, server_extra=''):
    """Start a daemon that cannot connect; return (exit code, seconds,
    log + output)."""
    e = echo(parameters, amount=1, server_extra=server_extra)
    process = e.process(start=False)
    start = time.monotonic()
    process.start(wait=False)
    code = process.wait(timeout=30)
    elapsed = time.monotonic() - start
    text = process.log_text() + process.output_text()
    print(text)
    assert 'Started.' not in text
    assert SECRET not in text
    return code, elapsed, text


def test_wrong_credentials_exit_with_a_clear_error(echo, amqp_parameters):
    code, elapsed, text = failed_start(
        echo, gocept.amqprun.testing.environment_parameters(
            password=SECRET))
    assert code == 2   # refused: restarting does not help
    assert 'refused the credentials' in text
    assert elapsed < 20


def test_wrong_password_in_url_is_not_logged(echo, amqp_parameters):
    host = amqp_parameters.hostname
    port = amqp_parameters.port or 5672
    code, elapsed, text = failed_start(
        echo, amqp_parameters,
        server_extra=f'  url amqp://guest:{SECRET}@{host}:{port}/%2F\n')
    assert code == 2   # refused: restarting does not help
    assert 'refused the credentials' in text
    assert elapsed < 20


def test_unknown_vhost_exits_with_a_clear_error(echo, amqp_parameters):
    code, elapsed, text = failed_start(
        echo, gocept.amqprun.testing.environment_parameters(
            virtual_host='no-such-vhost-amqprun', password='guest'))
    assert code == 2   # refused: restarting does not help
    assert 'unknown virtual host' in text
    assert elapsed < 20


def test_unreachable_broker_exits_after_the_configured_attempts(echo):
    port = gocept.amqprun.testing.free_port()
    code, elapsed, text = failed_start(
        echo, gocept.amqprun.parameters.Parameters(
            hostname='127.0.0.1', port=port, password=SECRET),
        server_extra='  connection_attempts 3\n  retry_delay 0.2\n')
    assert code == 1
    assert text.count('Connecting to amqp://guest@127.0.0.1') == 3
    assert 'after 3 attempt(s)' in text
    assert elapsed < 20


def fatal_error(text):
    """The daemon's own line saying why it stops."""
    lines = [line for line in text.splitlines()
             if 'gocept.amqprun.main Stopping after a fatal error' in line]
    assert lines, text
    return lines[-1]


@pytest.mark.parametrize('case', ['unreachable', 'wrong CA'])
def test_start_up_error_names_the_cause(
        case, echo, request, certificates):
    if case == 'unreachable':
        parameters = gocept.amqprun.parameters.Parameters(
            hostname='127.0.0.1', port=gocept.amqprun.testing.free_port())
        extra = ''
        cause = 'refused'
    else:
        broker = request.getfixturevalue('private_broker')
        parameters = gocept.amqprun.parameters.Parameters(
            hostname='127.0.0.1', port=broker.tls_port)
        extra = f'  ssl true\n  ssl_cafile {certificates}/wrong-ca.pem\n'
        cause = 'certificate verify failed'
    code, elapsed, text = failed_start(
        echo, parameters, server_extra=extra +
        '  connection_attempts 1\n  retry_delay 0.2\n')
    assert code == 1
    assert cause in fatal_error(text).lower()


# Heartbeats and shutdown


@pytest.mark.slow
def test_handler_longer_than_heartbeat_keeps_the_connection(echo):
    e = echo(amount=1, sleep=6, server_extra='  heartbeat_interval 2\n')
    process = e.process()
    msgid = e.client.send(e.queue, b'000001')
    reply = e.client.wait(e.out, timeout=30)
    assert reply.header.correlation_id == msgid
    log = process.log_text()
    assert LOST not in log
    assert log.count(CONNECTED) == 1
    assert process.stop() == 0


@pytest.mark.slow
def test_sigterm_commits_running_handlers_rest_stays_queued(echo):
    e = echo(amount=2, sleep=2)
    process = e.process()
    for i in range(10):
        e.client.send(e.queue, b'%06d' % i)
    process.wait_for_log('handlers Handling', count=2)
    started = time.monotonic()
    assert process.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 15
    handled = [line.rsplit(' ', 1)[1] for line in
               process.log_text().splitlines()
               if 'handlers Handling' in line]
    assert len(handled) == 2
    bodies = drain(e.client, e.out)
    assert sorted(b.decode() for b in bodies) == sorted(handled)
    # The other 8 (some prefetched, never started) are back in the queue.
    wait_for(lambda: e.client.count(e.queue) == 8, timeout=10)


@pytest.mark.slow
def test_sigterm_while_the_broker_is_unreachable_does_not_hang(
        echo, amqp_parameters):
    proxy = Proxy.to(amqp_parameters)
    e = echo(proxy.parameters(), amount=1,
             server_extra='  retry_delay 0.2\n  max_retry_delay 0.5\n')
    process = e.process()
    proxy.stop()    # connections reset, new ones refused
    process.wait_for_log(LOST)
    started = time.monotonic()
    assert process.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_sigterm_returns_handlers_running_past_the_shutdown_timeout(echo):
    e = echo(amount=3, sleep=60, worker_extra='  shutdown-timeout 2\n')
    process = e.process()
    for i in range(3):
        e.client.send(e.queue, b'%06d' % i)
    process.wait_for_log('handlers Handling', count=3)
    started = time.monotonic()
    code = process.stop(signal.SIGTERM, timeout=30)
    elapsed = time.monotonic() - started
    print(f'exit {code} after {elapsed:.1f} s')
    print(process.log_text())
    assert code == 0
    assert e.client.get(e.out) is None
    wait_for(lambda: e.client.count(e.queue) == 3, timeout=10)
    assert elapsed < 2 + 3


POISON_HANDLERS = '''\
import gocept.amqprun.handler
import gocept.amqprun.message


@gocept.amqprun.handler.declare({queue!r}, {queue!r})
def echo(message):
    reply = gocept.amqprun.message.Message(
        {{}}, message.body, routing_key={out!r})
    if message.body == b'poison':
        reply.exchange = 'amqprun-no-such-exchange'
    return [reply]
'''


@pytest.mark.slow
def test_reply_the_broker_refuses_is_parked_not_looping(echo):
    """A poison message of another kind: its reply is refused by the
    broker. It must be parked after the configured tries while the other
    messages pass."""
    e = echo(amount=2, worker_extra='  retries 1\n  retry-delay 0\n')
    process = e.process(start=False)
    (process.directory / 'handlers.py').write_text(
        POISON_HANDLERS.format(queue=e.queue, out=e.out))
    process.start()
    e.client.send(e.queue, b'poison')
    for i in range(20):
        e.client.send(e.queue, b'%06d' % i)
    try:
        wait_for(lambda: e.replies() >= 20
                 and e.client.count(f'{e.queue}.parked'), timeout=20)
    except AssertionError:
        raise AssertionError(
            f'{e.replies()} of 20 replies, '
            f'{e.client.count(e.queue + ".parked")} parked') from None
    finally:
        log = process.log_text()
        print(log)
    # retries 1: two refused commits, then parked. A redelivery may be
    # handled before the refusal that caused it is counted: one more.
    closures = log.count('channel closed by the broker (404')
    assert 2 <= closures <= 3, closures
    parked = e.client.wait(f'{e.queue}.parked')
    assert parked.body == b'poison'
    assert e.client.get(f'{e.queue}.parked') is None
    assert process.stop() == 0


# Sending outside handlers during an outage


@pytest.mark.slow
def test_send_during_outage_waits_or_raises_never_loses(
        amqp_parameters, amqp_client, name_prefix, zca):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    proxy = Proxy.to(amqp_parameters)
    server = gocept.amqprun.server.Server(
        proxy.parameters(send_timeout=1.5, retry_delay=0.1,
                         max_retry_delay=0.3),
        setup_handlers=False)
    runner = gocept.amqprun.testing.ServerThread(server).start()
    second = None

    def send(body):
        server.send(gocept.amqprun.message.Message(
            {}, body, routing_key=f'{name_prefix}.out'))
        try:
            transaction.commit()
        finally:
            transaction.abort()
    try:
        send(b'before')
        assert amqp_client.wait(out).body == b'before'
        proxy.stop()    # the broker is unreachable from now on
        wait_for(lambda: not server.running, timeout=10)
        started = time.monotonic()
        with pytest.raises(gocept.amqprun.errors.ConnectionUnavailable):
            send(b'during')
        assert time.monotonic() - started < 10
        # A commit waiting for the connection goes through once it is back.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # Slot.commit reads the send timeout from the Parameters.
            server.parameters.send_timeout = 30
            future = pool.submit(send, b'after')
            second = Proxy.to(amqp_parameters, port=proxy.port)
            future.result(timeout=40)
        assert amqp_client.wait(out).body == b'after'
        assert amqp_client.get(out) is None
    finally:
        runner.stop()
        proxy.stop()
        if second is not None:
            second.stop()
