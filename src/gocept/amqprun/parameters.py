"""How to reach the broker: addresses, credentials, TLS, timeouts.

`Parameters` is the one place that knows the connection settings and
their defaults; the ``<amqp-server>`` section of the configuration file
passes its keys through unchanged.
"""

import ssl
import urllib.parse

import pika


class Parameters:
    """How to reach the broker.

    hostname: one host or several separated by spaces or commas (tried in
        turn; ``host:port`` is allowed).
    url: an ``amqp://`` or ``amqps://`` URL (pika's URL options work)
        instead of hostname, port, username, password and virtual_host;
        several URLs may be given separated by spaces.
    ssl, ssl_cafile, ssl_certfile, ssl_keyfile, ssl_verify: TLS; verification
        of the broker's certificate and hostname is on by default.
    heartbeat_interval: seconds (0 disables heartbeats).
    connection_attempts: attempts at start-up before giving up.
    retry_delay, max_retry_delay: reconnect backoff in seconds (doubling).
    blocked_connection_timeout: seconds a broker alarm may block the
        connection before it is dropped and re-established.
    socket_timeout: seconds for establishing a connection.
    send_timeout: seconds a commit waits for a connection.

    An unknown keyword is a TypeError; numbers may be given as strings.
    """

    defaults = dict(
        hostname=None,
        port=None,
        username='guest',
        password='guest',
        virtual_host='/',
        heartbeat_interval=60,
        url=None,
        ssl=False,
        ssl_cafile=None,
        ssl_certfile=None,
        ssl_keyfile=None,
        ssl_verify=True,
        connection_attempts=3,
        retry_delay=1.0,
        max_retry_delay=30.0,
        blocked_connection_timeout=300.0,
        socket_timeout=10.0,
        send_timeout=30.0,
    )
    _int = ('port', 'heartbeat_interval', 'connection_attempts')
    _float = ('retry_delay', 'max_retry_delay', 'blocked_connection_timeout',
              'socket_timeout', 'send_timeout')

    def __init__(self, **kw):
        unknown = set(kw) - set(self.defaults)
        if unknown:
            raise TypeError(
                f'Unknown connection parameters: {", ".join(sorted(unknown))}')
        values = dict(self.defaults, **kw)
        for name in self._int:
            if values[name] is not None:
                values[name] = int(values[name])
        for name in self._float:
            if values[name] is not None:
                values[name] = float(values[name])
        if not values['hostname'] and not values['url']:
            raise ValueError('Either hostname or url is required.')
        self.__dict__.update(values)

    def __repr__(self):
        return f'<Parameters {self.describe()}>'

    def backoff(self, attempt):
        """Seconds to wait before try `attempt` (1, 2, ...) of something
        that failed: `retry_delay`, doubling, at most `max_retry_delay`."""
        return min(self.retry_delay * 2 ** max(0, attempt - 1),
                   self.max_retry_delay)

    def describe(self):
        """The broker addresses, for log lines (never the password)."""
        return ', '.join(safe_url(p) for p in self.pika_parameters())

    def pika_parameters(self):
        """One pika parameters object per broker address, in order."""
        if self.url:
            result = []
            for url in self.url.replace(',', ' ').split():
                params = pika.URLParameters(url)
                if url.startswith('amqps:') and self._has_tls_settings():
                    params.ssl_options = self._ssl_options(params.host)
                self._set_common(params, from_url=url)
                result.append(params)
            return result
        result = []
        for host in self.hostname.replace(',', ' ').split():
            port = self.port
            if ':' in host:
                host, port = host.rsplit(':', 1)
                port = int(port)
            if port is None:
                port = 5671 if self.ssl else 5672
            params = pika.ConnectionParameters(
                host=host, port=port, virtual_host=self.virtual_host,
                credentials=pika.PlainCredentials(
                    self.username, self.password))
            if self.ssl:
                params.ssl_options = self._ssl_options(host)
            self._set_common(params)
            result.append(params)
        return result

    def _has_tls_settings(self):
        return any((self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile,
                    not self.ssl_verify))

    def _ssl_options(self, host):
        context = ssl.create_default_context(cafile=self.ssl_cafile)
        if not self.ssl_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return pika.SSLOptions(context, server_hostname=host)

    def _set_common(self, params, from_url=None):
        query = urllib.parse.parse_qs(
            urllib.parse.urlsplit(from_url).query) if from_url else {}
        if 'heartbeat' not in query:
            params.heartbeat = self.heartbeat_interval
        if 'blocked_connection_timeout' not in query:
            params.blocked_connection_timeout = (
                self.blocked_connection_timeout)
        if 'socket_timeout' not in query:
            params.socket_timeout = self.socket_timeout
        # Attempts and backoff are ours (several hosts, reconnects).
        params.connection_attempts = 1
        params.retry_delay = 0


def safe_url(params):
    """The address of pika connection parameters as a URL without the
    password."""
    scheme = 'amqps' if params.ssl_options else 'amqp'
    vhost = urllib.parse.quote(params.virtual_host, safe='')
    return (f'{scheme}://{params.credentials.username}@'
            f'{params.host}:{params.port}/{vhost}')
