"""The `ready` command: does the daemon of a configuration consume?

``server ready [--wait SECONDS] CONFIG`` asks the daemon that runs with
CONFIG, at the address of CONFIG's ``<monitor>`` section, for
``/readyz``. It answers 200 while the daemon is connected and consumes
every handler queue.

zdaemon runs it as ``start-test-program`` (the ``etc/zdaemon.conf`` that
``server init`` writes): ``zdaemon start`` then returns "daemon process
started" only once the daemon consumes, and fails ("daemon manager not
running", exit 1) when the daemon exits instead -- rather than reporting
a process as started that is about to fail. Deployment scripts can run
``server ready --wait 60 CONFIG`` after a start.

Exit codes: 0 ready, 1 not ready (not running, starting, reconnecting,
shutting down -- within --wait), 2 CONFIG cannot be loaded, has no
``<monitor>`` section, or the command line is wrong.
"""

import time
import urllib.error
import urllib.request

from gocept.amqprun.interfaces import EXIT_CONFIG
from gocept.amqprun.interfaces import EXIT_FAILURE
from gocept.amqprun.interfaces import EXIT_OK
import gocept.amqprun.cli
import gocept.amqprun.config


HELP = 'ask the daemon of CONFIG (its <monitor>) whether it consumes'
EPILOG = ('exit codes: 0 ready, 1 not ready (within --wait), 2 CONFIG '
          'cannot be loaded or has no <monitor> section')
# Seconds one request may take.
TIMEOUT = 2
# Seconds between requests while waiting.
INTERVAL = 0.5


def readyz_url(address):
    """The URL of /readyz for a monitor listening on `address` ((host,
    port)); a wildcard address is asked on the loopback interface."""
    host, port = address
    if host in ('', '0.0.0.0'):
        host = '127.0.0.1'
    elif host == '::':
        host = '::1'
    if ':' in host:
        host = f'[{host}]'
    return f'http://{host}:{port}/readyz'


def ask(url, timeout=TIMEOUT):
    """(ready, what the daemon said) for a GET of `url`."""
    # Never through a proxy of the environment: the daemon is local.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return True, _said(response.read())
    except urllib.error.HTTPError as e:
        return False, f'{e.code}: {_said(e.read())}'
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, 'reason', None) or e
        return False, f'no answer ({why})'


def _said(body):
    return body.decode('utf-8', 'replace').strip()


def ready(config_file, wait=0, out=print):
    """Ask until the daemon is ready or `wait` seconds have passed;
    report with `out`; return the exit code."""
    config = gocept.amqprun.config.load_config(config_file)
    if config.monitor is None:
        out(f'ERROR: {config_file} has no <monitor> section: there is '
            'nobody to ask')
        return EXIT_CONFIG
    url = readyz_url(config.monitor.address)
    deadline = time.monotonic() + wait
    while True:
        is_ready, said = ask(url)
        if is_ready or time.monotonic() + INTERVAL > deadline:
            break
        time.sleep(INTERVAL)
    out(f'{url}: {said}')
    return EXIT_OK if is_ready else EXIT_FAILURE


def add_arguments(parser, config_file=None):
    gocept.amqprun.cli.add_config_argument(parser, config_file)
    parser.add_argument(
        '--wait', metavar='SECONDS', type=float, default=0,
        help='ask again until ready, at most this long (default: ask once)')


def run(options):
    return ready(options.config, options.wait)
