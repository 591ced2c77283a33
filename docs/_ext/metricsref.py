"""The monitor's reference: its HTTP routes and its metrics, generated
from `gocept.amqprun.monitor.ROUTES`, `gocept.amqprun.metrics.METRICS`
(the table `monitor.Collector` builds its metric families from) and the
process metrics of prometheus_client's ProcessCollector.

``.. amqprun-routes::`` renders the routes as a table,
``.. amqprun-metrics::`` every metric as an object ``metric``
(``:metric:`amqprun_messages_total```), named as /metrics shows it.
"""

import prometheus_client

import gocept.amqprun.metrics
import gocept.amqprun.monitor

from generated import GeneratedDirective
from generated import add_object_type
from generated import indent


def metric_lines(name, type_, labels, help_text):
    note = type_
    if labels:
        note += '; labels: ' + ', '.join(labels)
    lines = [f'.. metric:: {name} ({note})', '']
    lines += indent(help_text.replace('*', r'\*'))
    if type_ == 'histogram':
        lines += ['', f'   Samples: ``{name}_bucket`` (label ``le``), '
                  f'``{name}_count``, ``{name}_sum``.']
    return lines + ['']


def process_metrics():
    """The families of prometheus_client's process collector (none where
    it cannot read /proc)."""
    collector = prometheus_client.ProcessCollector(registry=None)
    for family in collector.collect():
        name = family.name
        if family.type == 'counter':
            name += '_total'
        yield name, family.type, (), family.documentation


class MetricsDirective(GeneratedDirective):

    def lines(self):
        result = []
        for metric in gocept.amqprun.metrics.METRICS:
            result += metric_lines(metric.exposed, metric.type,
                                   metric.labels, metric.help)
        process = list(process_metrics())
        if process:
            result += [
                'And prometheus_client\'s metrics of the process:', '']
            for name, type_, labels, help_text in process:
                result += metric_lines(name, type_, labels, help_text)
        return result


class RoutesDirective(GeneratedDirective):

    def lines(self):
        result = ['.. list-table::', '   :header-rows: 1', '',
                  '   * - request', '     - answer']
        for route in gocept.amqprun.monitor.ROUTES:
            path = route.path.replace('{id}', 'ID')
            result += [f'   * - ``{route.method} {path}``',
                       f'     - {route.summary}']
        return result + ['']


def setup(app):
    add_object_type(app, 'metric', 'metric')
    app.add_directive('amqprun-metrics', MetricsDirective)
    app.add_directive('amqprun-routes', RoutesDirective)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
