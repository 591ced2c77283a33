"""The metrics of ``/metrics`` (the ``<monitor>`` section): one table.

`monitor.Collector` makes its metric families with `family`, so their
names, types, labels and help come from `METRICS` only; the
documentation's reference is generated from it too. Besides these,
/metrics has prometheus_client's ``process_*`` metrics.
"""

import collections

import prometheus_client.core


class Metric(collections.namedtuple('Metric', 'name type labels help')):
    """A metric family: `name` as prometheus_client takes it (a counter's
    samples get ``_total``), `type` (counter, gauge or histogram), the
    names of its `labels`, its `help` text."""

    @property
    def exposed(self):
        """The name of its samples in /metrics (a histogram's get
        ``_bucket``, ``_count`` and ``_sum``)."""
        return f'{self.name}_total' if self.type == 'counter' else self.name


METRICS = (
    Metric('amqprun_messages', 'counter', ('queue', 'outcome'),
           'Messages settled, by queue and outcome (handled: its '
           'transaction committed; retried: failed and sent to be tried '
           'again; parked: failed for the last time).'),
    Metric('amqprun_handler_seconds', 'histogram', ('queue',),
           'Duration of handler calls (failed ones too), by queue.'),
    Metric('amqprun_commit_seconds', 'histogram', (),
           'Duration of the commits of handled messages.'),
    Metric('amqprun_in_flight', 'gauge', (),
           'Messages being handled now.'),
    Metric('amqprun_oldest_handling_seconds', 'gauge', (),
           'How long the longest running handling has run so far (0 when '
           'all workers idle).'),
    Metric('amqprun_connected', 'gauge', (),
           '1 while connected to the broker, else 0.'),
    Metric('amqprun_ready', 'gauge', (),
           '1 while connected and consuming every handler queue, else 0.'),
    Metric('amqprun_reconnects', 'counter', (),
           'Connections re-established after a loss.'),
    Metric('amqprun_transactions', 'counter', (),
           'AMQP transactions the broker committed; a group commit holds '
           'the commits of several messages (handled / transactions is '
           'the mean group).'),
    Metric('amqprun_commits_in_doubt', 'counter', (),
           'Commits whose outcome is unknown (the connection died after '
           'Tx.Commit was sent).'),
    Metric('amqprun_queue_messages', 'gauge', ('queue',),
           'Messages ready in a handler queue, as the broker counted them '
           'at most a few seconds ago.'),
    Metric('amqprun_parked_messages', 'gauge', ('queue',),
           'Messages in the parked queue of a handler queue, as the broker '
           'counted them (none with park reject or error-routing-key).'),
)
BY_NAME = {metric.name: metric for metric in METRICS}

_FAMILIES = {
    'counter': prometheus_client.core.CounterMetricFamily,
    'gauge': prometheus_client.core.GaugeMetricFamily,
    'histogram': prometheus_client.core.HistogramMetricFamily,
}


def family(name, **kw):
    """The prometheus_client metric family of metric `name` (KeyError if
    it is not in `METRICS`); `kw` as the family class takes it (`value`
    of one without labels)."""
    metric = BY_NAME[name]
    if metric.labels:
        kw['labels'] = list(metric.labels)
    return _FAMILIES[metric.type](metric.name, metric.help, **kw)
