"""Metrics and probes over HTTP: the real daemon, a real HTTP client."""

import http.client
import json
import logging
import signal
import urllib.error
import urllib.request

import prometheus_client.parser
import pytest

import gocept.amqprun.monitor
import gocept.amqprun.retry
import gocept.amqprun.stats
import gocept.amqprun.testing
import gocept.amqprun.tests.test_main
import gocept.amqprun.worker
from gocept.amqprun.testing import wait_for


# The handlers of test_main (flaky fails once per message) and one that
# runs until the file `go` exists.
HANDLERS = gocept.amqprun.tests.test_main.HANDLERS + '''

@gocept.amqprun.handler.declare(PREFIX + '.slow', PREFIX + '.slow')
def slow(message):
    import time
    deadline = time.monotonic() + 30
    while not pathlib.Path('go').exists() and time.monotonic() < deadline:
        time.sleep(0.02)


@gocept.amqprun.handler.declare(PREFIX + '.failing', PREFIX + '.failing')
def failing(message):
    if not pathlib.Path('fixed').exists():
        raise RuntimeError('not fixed yet')
    return [out(b'fixed: ' + message.body)]
'''

ZCML = '''
  <utility component="handlers.flaky" name="flaky" />
  <utility component="handlers.slow" name="slow" />
  <utility component="handlers.failing" name="failing" />
'''


def get(url):
    """(status, body) of a GET of `url`."""
    status, body, _ = request(url)
    return status, body


def request(url, method='GET', body=None, token=None, headers=None):
    """(status, body text, response headers) of an HTTP request; `body`
    is sent as JSON unless it is bytes."""
    headers = dict(headers or {})
    if token is not None:
        headers['Authorization'] = f'Bearer {token}'
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        headers['Content-Type'] = 'application/json'
    req = urllib.request.Request(url, data=body, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return (response.status, response.read().decode(),
                    response.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


def metrics(url):
    """{(sample name, ((label, value), ...)): value} of /metrics."""
    status, text = get(url + 'metrics')
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in prometheus_client.parser
            .text_string_to_metric_families(text)
            for s in family.samples}


@pytest.fixture
def daemon(server_process, amqp_client, name_prefix, tmp_path):
    """A factory of daemons with the handlers above and a monitor; the
    started ServerProcess gets `url` (of the monitor, ending in /)."""
    for queue in ('flaky', 'slow', 'failing'):
        amqp_client.forget(f'{name_prefix}.{queue}')
    amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])

    def factory(worker_extra='', token=None, **kw):
        port = gocept.amqprun.testing.free_port()
        monitor = f'  address 127.0.0.1:{port}\n'
        if token is not None:
            token_file = tmp_path / f'token-{port}'
            token_file.write_text(token + '\n')
            token_file.chmod(0o600)
            monitor += f'  token-file {token_file}\n'
        process = server_process(
            handlers=HANDLERS.format(prefix=name_prefix), zcml=ZCML,
            worker_extra='  retry-delay 0.1\n' + worker_extra,
            extra=f'<monitor>\n{monitor}</monitor>\n', **kw)
        process.url = f'http://127.0.0.1:{port}/'
        return process
    return factory


def test_counts_a_handler_that_fails_once_per_message(
        daemon, amqp_client, name_prefix):
    process = daemon()
    for i in range(3):
        amqp_client.send(f'{name_prefix}.flaky', b'%d' % i)
    amqp_client.wait_many(f'{name_prefix}.out', 3)
    flaky = (('queue', f'{name_prefix}.flaky'),)

    def counted():
        values = metrics(process.url)
        handled = values['amqprun_messages_total',
                         tuple(sorted(flaky + (('outcome', 'handled'),)))]
        return values if handled == 3 else None
    values = wait_for(counted, timeout=10)
    for outcome, count in [('handled', 3), ('retried', 3), ('parked', 0)]:
        labels = tuple(sorted(flaky + (('outcome', outcome),)))
        assert values['amqprun_messages_total', labels] == count
    # Zeros for a queue without messages.
    slow = (('outcome', 'handled'), ('queue', f'{name_prefix}.slow'))
    assert values['amqprun_messages_total', slow] == 0
    # Every handler call, the failed ones too.
    assert values['amqprun_handler_seconds_count', flaky] == 6
    assert values['amqprun_handler_seconds_bucket',
                  (('le', '+Inf'),) + flaky] == 6
    assert values['amqprun_handler_seconds_sum', flaky] > 0
    assert values['amqprun_commit_seconds_count', ()] >= 3
    assert values['amqprun_in_flight', ()] == 0
    assert values['amqprun_connected', ()] == 1
    assert values['amqprun_ready', ()] == 1
    assert values['amqprun_reconnects_total', ()] == 0
    assert values['amqprun_commits_in_doubt_total', ()] == 0
    assert values['process_resident_memory_bytes', ()] > 0
    assert get(process.url + 'healthz') == (200, 'ok\n')
    assert get(process.url + 'readyz') == (200, 'ready\n')
    assert get(process.url + 'nonesuch')[0] == 404
    assert process.stop() == 0
    # The probes are gone with the process.
    with pytest.raises(urllib.error.URLError):
        get(process.url + 'healthz')


def test_readyz_is_503_while_the_broker_is_cut_off(
        daemon, amqp_parameters):
    proxy = gocept.amqprun.testing.Proxy.to(amqp_parameters)
    process = daemon(
        parameters=proxy.parameters(),
        server_extra='  retry_delay 0.1\n  max_retry_delay 0.5\n')
    try:
        assert get(process.url + 'readyz') == (200, 'ready\n')
        proxy.stop()
        wait_for(lambda: get(process.url + 'readyz')[0] == 503,
                 message='/readyz still 200 without a broker')
        assert get(process.url + 'readyz') == (
            503, 'not ready: not connected to the broker\n')
        # Alive: the IO loop reconnects.
        assert get(process.url + 'healthz') == (200, 'ok\n')
        assert metrics(process.url)['amqprun_connected', ()] == 0
        proxy = gocept.amqprun.testing.Proxy.to(
            amqp_parameters, port=proxy.port)
        wait_for(lambda: get(process.url + 'readyz')[0] == 200,
                 timeout=15, message='/readyz not 200 after the outage')
        values = metrics(process.url)
        assert values['amqprun_connected', ()] == 1
        assert values['amqprun_reconnects_total', ()] == 1
        assert process.stop() == 0
    finally:
        proxy.stop()


def test_readyz_is_503_during_shutdown(daemon, amqp_client, name_prefix):
    process = daemon()
    amqp_client.send(f'{name_prefix}.slow', b'')
    wait_for(lambda: metrics(process.url)['amqprun_in_flight', ()] == 1)
    process.process.send_signal(signal.SIGTERM)
    # The running handler holds up the shutdown until `go` exists.
    wait_for(lambda: get(process.url + 'readyz')[0] == 503)
    assert get(process.url + 'readyz') == (
        503, 'not ready: shutting down\n')
    (process.directory / 'go').touch()
    assert process.wait() == 0


class FakeServer:
    """What a Monitor reads of a Server (without a broker: no queue
    depths)."""

    parameters = None
    retry_policy = gocept.amqprun.retry.RetryPolicy()

    class connection:
        address = 'amqp://guest@broker.example:5672/%2F'
        connected_since = 1e9

    def __init__(self, handlers=('q',)):
        self.stats = gocept.amqprun.stats.Stats()
        self.handlers = dict.fromkeys(handlers)
        self.connected = self.running = self.alive = True
        self.activities = []

    def activity(self):
        return self.activities


def test_exports_every_outcome_counted():
    server = FakeServer()
    server.stats.message('q', 'handled')
    server.stats.message('other', 'parked')
    server.stats.message('q', 'crash-looped')
    server.stats.started()
    server.stats.finished('q', handler_seconds=0.003)
    monitor = gocept.amqprun.monitor.Monitor(server, ('127.0.0.1', 0))
    monitor.start()
    try:
        url = f'http://127.0.0.1:{monitor.address[1]}/'
        values = metrics(url)
        counted = {labels: value for (name, labels), value in values.items()
                   if name == 'amqprun_messages_total'}
        assert counted == {
            (('outcome', 'handled'), ('queue', 'q')): 1,
            (('outcome', 'retried'), ('queue', 'q')): 0,
            (('outcome', 'parked'), ('queue', 'q')): 0,
            (('outcome', 'crash-looped'), ('queue', 'q')): 1,
            (('outcome', 'parked'), ('queue', 'other')): 1,
        }
        buckets = {labels: value for (name, labels), value in values.items()
                   if name == 'amqprun_handler_seconds_bucket'}
        assert buckets[('le', '0.0025'), ('queue', 'q')] == 0
        assert buckets[('le', '0.005'), ('queue', 'q')] == 1
        server.alive = server.running = False
        assert get(url + 'healthz')[0] == 503
        assert get(url + 'readyz')[0] == 503
    finally:
        monitor.stop()


def test_binds_its_port_when_made():
    first = gocept.amqprun.monitor.Monitor(FakeServer(), ('127.0.0.1', 0))
    try:
        with pytest.raises(OSError):
            gocept.amqprun.monitor.Monitor(FakeServer(), first.address)
    finally:
        first.stop()


@pytest.fixture
def fake_monitor():
    """A factory of started Monitors of a FakeServer; yields (monitor,
    url)."""
    monitors = []

    def factory(server=None, **kw):
        monitor = gocept.amqprun.monitor.Monitor(
            server or FakeServer(), ('127.0.0.1', 0), **kw)
        monitor.start()
        monitors.append(monitor)
        return monitor, f'http://127.0.0.1:{monitor.address[1]}/'
    yield factory
    for monitor in monitors:
        monitor.stop()


def test_answers_the_routes_of_its_table(fake_monitor):
    monitor, url = fake_monitor()
    status, body, _ = request(url + 'nonesuch')
    assert (status, body) == (404, (
        'not found: try /, /metrics, /healthz, /readyz, /parked, '
        '/parked/ID, POST /parked/replay, POST /parked/drop\n'))
    assert gocept.amqprun.monitor.paths() in body
    status, body, headers = request(url + 'metrics', method='POST', body={})
    assert (status, headers['Allow']) == (405, 'GET, HEAD')
    status, body, headers = request(url + 'parked/x', method='POST', body={})
    assert (status, headers['Allow']) == (405, 'GET, HEAD')
    status, body, headers = request(url + 'healthz', method='HEAD')
    assert (status, body) == (200, '')
    assert headers['Content-Length'] == '3'
    status, body, headers = request(url + 'healthz?verbose=1')
    assert (status, body) == (200, 'ok\n')
    assert headers['Cache-Control'] == 'no-store'
    status, body, headers = request(url)
    assert status == 200
    assert headers['Content-Type'] == 'text/html; charset=utf-8'
    assert "script-src 'sha256-" in headers['Content-Security-Policy']
    assert body.startswith('<!DOCTYPE html>')
    # The module's documentation is made from the same table.
    for route in gocept.amqprun.monitor.ROUTES:
        assert f'``{route}``\n    {route.summary}' in \
            gocept.amqprun.monitor.__doc__


def test_post_needs_the_token(fake_monitor, caplog):
    caplog.set_level(logging.DEBUG)
    token = 'tok-' + 'x' * 40
    monitor, url = fake_monitor(token=token)
    replay = url + 'parked/replay'
    # Missing, wrong, other scheme: 401.
    for auth in [None, 'Bearer wrong', f'Basic {token}', f'Bearer {token}x',
                 'Bearer']:
        headers = {} if auth is None else {'Authorization': auth}
        status, body, response_headers = request(
            replay, 'POST', {'queue': 'q', 'all': True}, headers=headers)
        assert status == 401, auth
        assert response_headers['WWW-Authenticate'] == 'Bearer'
        assert json.loads(body) == {
            'error': 'a valid "Authorization: Bearer TOKEN" header is '
                     'required'}
    # The right token gets past: then the body is checked.
    status, body, _ = request(replay, 'POST', b'{', token=token)
    assert status == 400
    assert json.loads(body)['error'].startswith('the body is not JSON')
    for bad, error in [
            ({'all': True}, '"queue" (the handler queue) is required'),
            ({'queue': 'q'}, 'give either "ids" (a list) or "all": true'),
            ({'queue': 'q', 'ids': ['a'], 'all': True},
             'give either "ids" (a list) or "all": true'),
            ({'queue': 'q', 'ids': []}, '"ids" must be a non-empty list'),
            ({'queue': 'q', 'ids': [1]}, '"ids" must be a non-empty list'),
            ({'queue': 'q', 'all': 'yes'}, '"all" must be true or false'),
            ({'queue': 'q', 'all': True, 'limit': 3}, 'unknown key(s): '
             'limit'),
            ([], 'expected a JSON object')]:
        status, body, _ = request(url + 'parked/drop', 'POST', bad,
                                  token=token)
        assert status == 400, bad
        assert json.loads(body)['error'].startswith(error), bad
    # A queue that is not one of the daemon's: 404, nothing asked.
    status, body, _ = request(replay, 'POST', {'queue': 'nonesuch',
                                               'all': True}, token=token)
    assert status == 404
    assert json.loads(body) == {
        'error': "'nonesuch' is not a handler queue of this daemon",
        'queues': ['q']}
    # Too large a body is refused before it is read.
    connection = http.client.HTTPConnection(*monitor.address, timeout=10)
    connection.putrequest('POST', '/parked/drop')
    connection.putheader('Authorization', f'Bearer {token}')
    connection.putheader('Content-Length', str(1024 * 1024 + 1))
    connection.endheaders()
    assert connection.getresponse().status == 413
    connection.close()
    # The token is in no log line, page or metric.
    assert token not in caplog.text
    assert token not in get(url)[1]
    assert token not in get(url + 'metrics')[1]


def test_without_a_token_file_every_post_is_refused(fake_monitor):
    monitor, url = fake_monitor()
    for path in ('parked/replay', 'parked/drop'):
        for token in (None, '', 'anything'):
            status, body, _ = request(url + path, 'POST',
                                      {'queue': 'q', 'all': True},
                                      token=token)
            assert status == 403
            assert json.loads(body) == {
                'error': 'no token-file is configured: replay and drop '
                         'are off'}


def test_oldest_handling_seconds(fake_monitor):
    Activity = gocept.amqprun.worker.Activity
    server = FakeServer()
    monitor, url = fake_monitor(server)
    assert metrics(url)['amqprun_oldest_handling_seconds', ()] == 0
    server.activities = [Activity('w0', 1, None, None, None),
                         Activity('w1', 2, 'm', 'q', 12.5)]
    assert metrics(url)['amqprun_oldest_handling_seconds', ()] == 12.5
    # Without a broker: no depths (rather than made-up values).
    assert not any(name in ('amqprun_queue_messages',
                            'amqprun_parked_messages')
                   for name, _ in metrics(url))


@pytest.mark.slow   # waits for the depths polled every 5 s: ~12 s
def test_queue_depths_and_oldest_handling_of_a_daemon(
        daemon, amqp_client, name_prefix):
    # Prefetch 1: the handlers hold two slow messages, the rest waits.
    process = daemon(worker_extra='  retries 0\n  prefetch 1\n')
    slow, failing = f'{name_prefix}.slow', f'{name_prefix}.failing'
    for i in range(3):
        amqp_client.send(failing, b'%d' % i)

    def settled():
        values = metrics(process.url)
        parked = values.get(('amqprun_parked_messages',
                             (('queue', failing),)))
        return values if parked == 3 else None
    values = wait_for(settled, timeout=30,
                      message='3 parked messages not in /metrics')
    assert values['amqprun_messages_total', (
        ('outcome', 'parked'), ('queue', failing))] == 3
    assert values['amqprun_queue_messages', (('queue', failing),)] == 0
    assert values['amqprun_parked_messages', (('queue', slow),)] == 0
    assert values['amqprun_oldest_handling_seconds', ()] == 0
    # The slow messages wait: the backlog is what the broker counts
    # (the handlers hold the others, unacked).
    for i in range(8):
        amqp_client.send(slow, b'%d' % i)

    def waiting():
        values = metrics(process.url)
        backlog = values.get(('amqprun_queue_messages', (('queue', slow),)))
        return values if backlog and values['amqprun_in_flight', ()] == 2 \
            else None
    values = wait_for(waiting, timeout=30)
    backlog = values['amqprun_queue_messages', (('queue', slow),)]
    assert 0 < backlog < 8
    assert backlog == amqp_client.count(slow)
    assert values['amqprun_oldest_handling_seconds', ()] > 0
    (process.directory / 'go').touch()
    wait_for(lambda: metrics(process.url)[
        'amqprun_queue_messages', (('queue', slow),)] == 0, timeout=30)
    wait_for(lambda: metrics(process.url)[
        'amqprun_oldest_handling_seconds', ()] == 0)
    assert process.stop() == 0


def test_refuses_to_start_with_a_token_file_others_can_read(
        daemon, tmp_path):
    process = daemon(token='s3cret-token', start=False)
    [token_file] = tmp_path.glob('token-*')
    token_file.chmod(0o644)
    process.start(wait=False)
    assert process.wait() == 2
    output = process.output_text()
    assert (f'{process.config}, line ' in output
            and f', section <monitor>, key token-file: {token_file} is '
            'accessible by group or others (mode 0644)' in output), output
    assert 's3cret-token' not in output + process.log_text()
