"""Metrics and probes over HTTP: the real daemon, a real HTTP client."""

import signal
import urllib.error
import urllib.request

import prometheus_client.parser
import pytest

import gocept.amqprun.monitor
import gocept.amqprun.stats
import gocept.amqprun.testing
import gocept.amqprun.tests.test_main
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
'''

ZCML = '''
  <utility component="handlers.flaky" name="flaky" />
  <utility component="handlers.slow" name="slow" />
'''


def get(url):
    """(status, body) of a GET of `url`."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metrics(url):
    """{(sample name, ((label, value), ...)): value} of /metrics."""
    status, text = get(url + 'metrics')
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in prometheus_client.parser
            .text_string_to_metric_families(text)
            for s in family.samples}


@pytest.fixture
def daemon(server_process, amqp_client, name_prefix):
    """A factory of daemons with the handlers above and a monitor; the
    started ServerProcess gets `url` (of the monitor, ending in /)."""
    for queue in ('flaky', 'slow'):
        for suffix in ('', '.retry', '.parked'):
            amqp_client.forget(f'{name_prefix}.{queue}{suffix}')
    amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])

    def factory(**kw):
        port = gocept.amqprun.testing.free_port()
        process = server_process(
            handlers=HANDLERS.format(prefix=name_prefix), zcml=ZCML,
            worker_extra='  retry-delay 0.1\n',
            extra=f'<monitor>\n  address 127.0.0.1:{port}\n</monitor>\n',
            **kw)
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
    """What a Monitor reads of a Server."""

    def __init__(self, handlers=('q',)):
        self.stats = gocept.amqprun.stats.Stats()
        self.handlers = dict.fromkeys(handlers)
        self.connected = self.running = self.alive = True


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
