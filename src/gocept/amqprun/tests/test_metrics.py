"""The metrics table: what /metrics exports is what it (and so the
documentation) lists."""

import prometheus_client.parser
import pytest

import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.metrics
import gocept.amqprun.monitor
import gocept.amqprun.retry
import gocept.amqprun.server
from gocept.amqprun.testing import wait_for


METRICS = gocept.amqprun.metrics.METRICS


@pytest.fixture
def server(zca, amqp_parameters, amqp_client, name_prefix):
    """A Server (not started) with one handler whose queue and parked
    queue exist on the broker, each with a message, so that every metric
    of the table has samples."""
    queue = f'{name_prefix}.metrics'

    @gocept.amqprun.handler.declare(queue, queue)
    def handler(message):
        pass
    zca.registerUtility(handler, gocept.amqprun.interfaces.IHandler,
                        name='metrics')
    parked = gocept.amqprun.retry.parked_queue(queue)
    amqp_client.declare(queue, [queue])
    amqp_client.declare(parked, [parked])
    amqp_client.send(queue, b'waiting')
    amqp_client.send(parked, b'parked')
    for name in (queue, parked):
        wait_for(lambda: amqp_client.count(name) == 1)
    server = gocept.amqprun.server.Server(amqp_parameters)
    server.stats.message(queue, 'handled')
    server.stats.started()
    server.stats.finished(queue, handler_seconds=0.01)
    server.queue = queue
    return server


def test_the_collector_yields_the_families_of_the_table(server):
    monitor = gocept.amqprun.monitor.Monitor(server, ('127.0.0.1', 0))
    try:
        assert monitor.depths.poll()
        families = list(gocept.amqprun.monitor.Collector(
            server, monitor.depths).collect())
    finally:
        monitor.stop()
    assert [f.name for f in families] == [m.name for m in METRICS]
    for family, metric in zip(families, METRICS):
        assert family.type == metric.type, metric.name
        assert family.documentation == metric.help
        assert family.samples, f'{metric.name} has no samples'
        for sample in family.samples:
            assert set(sample.labels) - {'le'} == set(metric.labels), (
                metric.name, sample)


def test_metrics_page_has_exactly_the_table_and_process_metrics(server):
    monitor = gocept.amqprun.monitor.Monitor(server, ('127.0.0.1', 0))
    try:
        monitor.depths.poll()
        text = monitor.metrics().body.decode()
    finally:
        monitor.stop()
    families = list(
        prometheus_client.parser.text_string_to_metric_families(text))
    ours = [f for f in families if not f.name.startswith('process_')]
    assert {f.name for f in ours} == {m.name for m in METRICS}
    assert len(ours) < len(families), 'no process_* metrics'
    exposed = {s.name for f in ours for s in f.samples}
    for metric in METRICS:
        if metric.type == 'histogram':
            assert f'{metric.exposed}_count' in exposed
        else:
            assert metric.exposed in exposed
    value = {(s.name, s.labels.get('queue')): s.value
             for f in ours for s in f.samples}
    assert value['amqprun_queue_messages', server.queue] == 1
    assert value['amqprun_parked_messages', server.queue] == 1


def test_family_refuses_a_name_not_in_the_table():
    with pytest.raises(KeyError):
        gocept.amqprun.metrics.family('amqprun_unknown')
