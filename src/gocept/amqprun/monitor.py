"""Metrics, probes, the status page and parked messages over HTTP (the
``<monitor>`` section).

`Monitor` serves the routes of `ROUTES` with the standard library's
ThreadingHTTPServer, in threads of its own; a poll thread reads the
queue depths from the broker (`depths`) every few seconds. Reads are
open; a POST needs ``Authorization: Bearer TOKEN`` (the ``token-file``).
The routes:
"""

import collections
import hashlib
import hmac
import http.server
import json
import logging
import operator
import re
import socket
import threading
import urllib.parse

import prometheus_client
import prometheus_client.utils

import gocept.amqprun.depths
import gocept.amqprun.metrics
import gocept.amqprun.parkedhttp
import gocept.amqprun.retry
import gocept.amqprun.stats
import gocept.amqprun.statuspage
import gocept.amqprun.watchdog


log = logging.getLogger(__name__)


class Route(collections.namedtuple('Route', 'method path action summary')):
    """A path (``{id}``: one URL-quoted path segment) answered by the
    Monitor's method `action` (a dotted name: ``parked.list`` is
    ``Monitor.parked.list``); a POST route needs the token."""

    @property
    def pattern(self):
        return re.compile(re.escape(self.path).replace(
            re.escape('{id}'), '(?P<id>[^/]+)') + '$')

    def __str__(self):
        shown = self.path.replace('{id}', 'ID')
        return shown if self.method == 'GET' else f'{self.method} {shown}'


ROUTES = (
    Route('GET', '/', 'page', 'The status page (HTML).'),
    Route('GET', '/metrics', 'metrics', "Prometheus' text format."),
    Route('GET', '/healthz', 'healthz', '200 while the IO loop and every '
          'worker run, else 503.'),
    Route('GET', '/readyz', 'readyz', '200 while connected and consuming '
          'every handler queue, else 503.'),
    Route('GET', '/parked', 'parked.list', 'The parked messages (JSON; '
          '?queue=Q: of one handler queue).'),
    Route('GET', '/parked/{id}', 'parked.show', 'One parked message '
          '(JSON).'),
    Route('POST', '/parked/replay', 'parked.replay', 'Replay parked '
          'messages: {"queue": Q, "ids": [...]} or {"queue": Q, "all": '
          'true} (token).'),
    Route('POST', '/parked/drop', 'parked.drop', 'Drop parked messages, '
          'the same body (token).'),
)
__doc__ += ''.join(f'\n``{r}``\n    {r.summary}\n' for r in ROUTES)
# The largest request body accepted (a list of ids).
MAX_BODY = 1024 * 1024


def paths():
    """The routes in short ('/, /metrics, ..., POST /parked/drop')."""
    return ', '.join(str(r) for r in ROUTES)


Response = collections.namedtuple(
    'Response', 'status content_type body headers')


def _text(status, text, headers=()):
    return Response(status, 'text/plain; charset=utf-8',
                    f'{text}\n'.encode(), list(headers))


def _json(status, data, headers=()):
    text = json.dumps(data, indent=1, sort_keys=True)
    return Response(status, 'application/json', f'{text}\n'.encode(),
                    list(headers))


class Collector:
    """A prometheus_client collector of one Server's counters (and, with
    `depths` (a `depths.QueueDepths`), of its queues' depths): the
    metrics of `metrics.METRICS`.

    Every (queue, outcome) counted is exported, and 0 for the standard
    outcomes (handled, retried, parked) of every handler queue.
    """

    def __init__(self, server, depths=None):
        self.server = server
        self.depths = depths

    def collect(self):
        family = gocept.amqprun.metrics.family
        snapshot = self.server.stats.snapshot()
        messages = family('amqprun_messages')
        counts = dict.fromkeys(
            ((queue, outcome) for queue in self.server.handlers
             for outcome in gocept.amqprun.stats.OUTCOMES), 0)
        counts.update(snapshot['messages'])
        for (queue, outcome), count in sorted(counts.items()):
            messages.add_metric([queue, outcome], count)
        yield messages
        handler = family('amqprun_handler_seconds')
        times = dict.fromkeys(
            self.server.handlers, gocept.amqprun.stats.Histogram())
        times.update(snapshot['handler_seconds'])
        for queue, histogram in sorted(times.items()):
            handler.add_metric([queue], *_buckets(histogram))
        yield handler
        commit = family('amqprun_commit_seconds')
        commit.add_metric([], *_buckets(snapshot['commit_seconds']))
        yield commit
        yield family('amqprun_in_flight', value=snapshot['in_flight'])
        yield family(
            'amqprun_oldest_handling_seconds',
            value=gocept.amqprun.watchdog.oldest_handling(
                self.server.activity()))
        yield family('amqprun_connected', value=int(self.server.connected))
        yield family('amqprun_ready', value=int(self.server.running))
        yield family('amqprun_reconnects', value=snapshot['reconnects'])
        yield family('amqprun_transactions', value=snapshot['transactions'])
        yield family('amqprun_commits_in_doubt',
                     value=snapshot['commits_in_doubt'])
        yield from self._depths()

    def _depths(self):
        depths = self.depths.snapshot() if self.depths else {}
        queued = gocept.amqprun.metrics.family('amqprun_queue_messages')
        parked = gocept.amqprun.metrics.family('amqprun_parked_messages')
        for queue, depth in sorted(depths.items()):
            queued.add_metric([queue], depth.messages)
            if depth.parked is not None:
                parked.add_metric([queue], depth.parked)
        yield queued
        yield parked


def _buckets(histogram):
    """The `buckets` and `sum_value` arguments of
    HistogramMetricFamily.add_metric for a `stats.Histogram`."""
    buckets = [(prometheus_client.utils.floatToGoString(bound), count)
               for bound, count in histogram.cumulative()]
    return buckets, histogram.sum


class Monitor:
    """Serves `ROUTES` for `server` on `address` ((host, port); port 0:
    any free port, see `address` afterwards).

    token: what a POST must send as ``Authorization: Bearer TOKEN``;
        None refuses every POST (403).
    poll_interval: seconds between reads of the queue depths (and of
        the samples of the status page's "last minute").

    The constructor binds the port (OSError when it cannot); `start()`
    serves in daemon threads, `stop()` closes the port. Set `stopping`
    when the daemon shuts down: /readyz answers 503 from then on.
    """

    def __init__(self, server, address, token=None, poll_interval=5.0):
        self.server = server
        self.stopping = False
        self._token_digest = (
            None if token is None else hashlib.sha256(token.encode()).digest())
        self.poll_interval = poll_interval
        self.recent = gocept.amqprun.statuspage.Recent(server.stats)
        self.depths = None
        if server.handlers and server.parameters is not None:
            policy = server.retry_policy
            parks = policy.park == 'queue' and not policy.error_routing_key
            self.depths = gocept.amqprun.depths.QueueDepths(
                server.parameters, sorted(server.handlers),
                {q: gocept.amqprun.retry.parked_queue(q)
                 for q in server.handlers} if parks else {},
                stale_after=max(30.0, 3 * poll_interval))
        self.registry = prometheus_client.CollectorRegistry()
        self.registry.register(Collector(server, self.depths))
        prometheus_client.ProcessCollector(registry=self.registry)
        host, port = address
        httpd_class = (_HTTPServer6 if ':' in host else _HTTPServer)
        self._httpd = httpd_class((host, port), _Handler)
        self._httpd.monitor = self
        self.address = self._httpd.server_address[:2]
        self._thread = self._poller = None
        self._stop_polling = threading.Event()
        self.parked = gocept.amqprun.parkedhttp.ParkedHTTP(server, self.depths)

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
        self._stop_polling.clear()
        self._poller = threading.Thread(
            target=self._poll, name='amqprun-monitor-poll', daemon=True)
        self._poller.start()
        log.info('Monitoring on %s (%s).', self.url, paths())

    def stop(self):
        self._stop_polling.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        if self._poller is not None:
            # A broker that does not answer must not hold up the exit.
            self._poller.join(5)
            self._poller = None

    def _poll(self):
        try:
            while True:
                self.recent.sample()
                interval = self.poll_interval
                if self.depths is not None and self.depths.poll() \
                        and self.depths.missing:
                    # Starting up: show the queues as soon as declared.
                    interval = min(interval, 1.0)
                if self._stop_polling.wait(interval):
                    return
        finally:
            if self.depths is not None:
                self.depths.close()

    def answer(self, method, target, headers=None, body=b'', client=None):
        """The `Response` to a request (HEAD is answered as GET); `client`
        names the requester in the log of a POST."""
        split = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(split.query))
        method = 'GET' if method == 'HEAD' else method
        allowed = []
        for route in ROUTES:
            match = route.pattern.match(split.path)
            if match is None:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            if method == 'POST':
                refused = self._refused(headers or {})
                if refused is not None:
                    return refused
            arguments = {k: urllib.parse.unquote(v)
                         for k, v in match.groupdict().items()}
            result = operator.attrgetter(route.action)(self)(
                query=query, body=body, client=client, **arguments)
            return result if isinstance(result, Response) else _json(*result)
        if allowed:
            allow = ', '.join(sorted(set(allowed) | (
                {'HEAD'} if 'GET' in allowed else set())))
            return _text(405, f'method not allowed: {allow}',
                         [('Allow', allow)])
        return _text(404, f'not found: try {paths()}')

    def _refused(self, headers):
        """A 403/401 Response unless the request carries the token."""
        if self._token_digest is None:
            return _json(403, {'error': 'no token-file is configured: '
                               'replay and drop are off'})
        scheme, _, given = headers.get('Authorization', '').partition(' ')
        if scheme.lower() != 'bearer' or not hmac.compare_digest(
                hashlib.sha256(given.strip().encode()).digest(),
                self._token_digest):
            return _json(401, {'error': 'a valid "Authorization: Bearer '
                               'TOKEN" header is required'},
                         [('WWW-Authenticate', 'Bearer')])
        return None

    def page(self, **kw):
        return Response(
            200, 'text/html; charset=utf-8',
            gocept.amqprun.statuspage.render(self),
            [('Content-Security-Policy', gocept.amqprun.statuspage.CSP)])

    def metrics(self, **kw):
        return Response(200, prometheus_client.CONTENT_TYPE_LATEST,
                        prometheus_client.generate_latest(self.registry), [])

    def healthz(self, **kw):
        if self.server.alive:
            return _text(200, 'ok')
        return _text(503, 'not alive: the IO loop or a worker ended')

    def readyz(self, **kw):
        if self.stopping:
            return _text(503, 'not ready: shutting down')
        if not self.server.connected:
            return _text(503, 'not ready: not connected to the broker')
        if not self.server.running:
            return _text(503, 'not ready: not consuming every queue')
        return _text(200, 'ready')


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):

    def do_GET(self):
        self._answer(body=True)

    def do_HEAD(self):
        self._answer(body=False)

    def do_POST(self):
        self._answer(body=True)

    def _answer(self, body):
        try:
            length = int(self.headers.get('Content-Length') or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._send(_text(413 if length > 0 else 400,
                             'bad or too large Content-Length'), body)
            return
        data = self.rfile.read(length) if length else b''
        try:
            response = self.server.monitor.answer(
                self.command, self.path, self.headers, data,
                client=self.address_string())
        except Exception:
            log.exception('Monitor: answering %s %s failed', self.command,
                          self.path.split('?', 1)[0])
            response = _text(500, 'internal error')
        self._send(response, body)

    def _send(self, response, body):
        self.send_response(response.status)
        self.send_header('Content-Type', response.content_type)
        self.send_header('Content-Length', str(len(response.body)))
        self.send_header('Cache-Control', 'no-store')
        self.send_header('X-Content-Type-Options', 'nosniff')
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(response.body)

    def log_message(self, format, *args):
        log.debug('Monitor: %s %s', self.address_string(), format % args)
