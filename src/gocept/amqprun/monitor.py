"""Metrics and health probes over HTTP (the ``<monitor>`` section).

`Monitor` serves, with the standard library's ThreadingHTTPServer in
threads of its own:

``/metrics``
    The Prometheus text format: what `Collector` reads from the Server's
    `stats.Stats` at scrape time (nothing is done per message) and
    prometheus_client's process metrics.
``/healthz``
    200 while the Server runs its IO loop and all its workers, else 503.
``/readyz``
    200 while connected and consuming every handler queue, else 503
    (start-up, an outage, shutdown).
"""

import http.server
import logging
import socket
import threading

import prometheus_client
import prometheus_client.core
import prometheus_client.utils

import gocept.amqprun.stats


log = logging.getLogger(__name__)


class Collector:
    """A prometheus_client collector of one Server's counters.

    Every (queue, outcome) counted is exported, and 0 for the standard
    outcomes (handled, retried, parked) of every handler queue.
    """

    def __init__(self, server):
        self.server = server

    def collect(self):
        core = prometheus_client.core
        snapshot = self.server.stats.snapshot()
        messages = core.CounterMetricFamily(
            'amqprun_messages', 'Messages settled, by queue and outcome '
            '(handled: its transaction committed; retried: failed and '
            'sent to be tried again; parked: failed for the last time).',
            labels=['queue', 'outcome'])
        counts = dict.fromkeys(
            ((queue, outcome) for queue in self.server.handlers
             for outcome in gocept.amqprun.stats.OUTCOMES), 0)
        counts.update(snapshot['messages'])
        for (queue, outcome), count in sorted(counts.items()):
            messages.add_metric([queue, outcome], count)
        yield messages
        handler = core.HistogramMetricFamily(
            'amqprun_handler_seconds', 'Duration of handler calls (failed '
            'ones too), by queue.', labels=['queue'])
        times = dict.fromkeys(
            self.server.handlers, gocept.amqprun.stats.Histogram())
        times.update(snapshot['handler_seconds'])
        for queue, histogram in sorted(times.items()):
            handler.add_metric([queue], *_buckets(histogram))
        yield handler
        commit = core.HistogramMetricFamily(
            'amqprun_commit_seconds',
            'Duration of the commits of handled messages.')
        commit.add_metric([], *_buckets(snapshot['commit_seconds']))
        yield commit
        yield core.GaugeMetricFamily(
            'amqprun_in_flight', 'Messages being handled now.',
            value=snapshot['in_flight'])
        yield core.GaugeMetricFamily(
            'amqprun_connected', '1 while connected to the broker, else 0.',
            value=int(self.server.connected))
        yield core.GaugeMetricFamily(
            'amqprun_ready', '1 while connected and consuming every '
            'handler queue, else 0.', value=int(self.server.running))
        yield core.CounterMetricFamily(
            'amqprun_reconnects', 'Connections re-established after a loss.',
            value=snapshot['reconnects'])
        yield core.CounterMetricFamily(
            'amqprun_transactions', 'AMQP transactions the broker '
            'committed; a group commit holds the commits of several '
            'messages (handled / transactions is the mean group).',
            value=snapshot['transactions'])
        yield core.CounterMetricFamily(
            'amqprun_commits_in_doubt', 'Commits whose outcome is unknown '
            '(the connection died after Tx.Commit was sent).',
            value=snapshot['commits_in_doubt'])


def _buckets(histogram):
    """The `buckets` and `sum_value` arguments of
    HistogramMetricFamily.add_metric for a `stats.Histogram`."""
    buckets = [(prometheus_client.utils.floatToGoString(bound), count)
               for bound, count in histogram.cumulative()]
    return buckets, histogram.sum


class Monitor:
    """Serves /metrics, /healthz and /readyz of `server` on `address`
    ((host, port); port 0: any free port, see `address` afterwards).

    The constructor binds the port (OSError when it cannot); `start()`
    serves in a daemon thread, `stop()` closes the port. Set `stopping`
    when the daemon shuts down: /readyz answers 503 from then on.
    """

    def __init__(self, server, address):
        self.server = server
        self.stopping = False
        self.registry = prometheus_client.CollectorRegistry()
        self.registry.register(Collector(server))
        prometheus_client.ProcessCollector(registry=self.registry)
        host, port = address
        httpd_class = (_HTTPServer6 if ':' in host else _HTTPServer)
        self._httpd = httpd_class((host, port), _Handler)
        self._httpd.monitor = self
        self.address = self._httpd.server_address[:2]
        self._thread = None

    @property
    def url(self):
        host, port = self.address
        if ':' in host:
            host = f'[{host}]'
        return f'http://{host or "0.0.0.0"}:{port}/'

    def start(self):
        # The poll interval bounds how long stop() waits.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.1,),
            name='amqprun-monitor', daemon=True)
        self._thread.start()
        log.info('Monitoring on %s (metrics, healthz, readyz).', self.url)

    def stop(self):
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def probe(self, path):
        """(status, content type, body) of a GET of `path`."""
        if path == '/metrics':
            return (200, prometheus_client.CONTENT_TYPE_LATEST,
                    prometheus_client.generate_latest(self.registry))
        if path == '/healthz':
            if self.server.alive:
                return _text(200, 'ok')
            return _text(503, 'not alive: the IO loop or a worker ended')
        if path == '/readyz':
            if self.stopping:
                return _text(503, 'not ready: shutting down')
            if not self.server.connected:
                return _text(503, 'not ready: not connected to the broker')
            if not self.server.running:
                return _text(503, 'not ready: not consuming every queue')
            return _text(200, 'ready')
        return _text(404, 'not found: try /metrics, /healthz, /readyz')


def _text(status, text):
    return status, 'text/plain; charset=utf-8', f'{text}\n'.encode()


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):

    def do_GET(self):
        self._answer(body=True)

    def do_HEAD(self):
        self._answer(body=False)

    def _answer(self, body):
        path = self.path.split('?', 1)[0]
        try:
            status, content_type, content = self.server.monitor.probe(path)
        except Exception:
            log.exception('Monitor: answering %s failed', path)
            status, content_type, content = _text(500, 'internal error')
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(content)))
        self.end_headers()
        if body:
            self.wfile.write(content)

    def log_message(self, format, *args):
        log.debug('Monitor: %s %s', self.address_string(), format % args)
