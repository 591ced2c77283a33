"""The real gocept.amqprun daemon as a consumer of the benchmarks.

Owns `Daemon`: a directory of its own with a ZConfig file, a ZCML file and
a generated handler module that answers each message of a workload's input
queue (declared with the workload's queue arguments: classic or quorum)
with one reply (after what the benchmark adds: a sleep, an INSERT),
and `python -m gocept.amqprun server.conf` run there as a subprocess,
stopped with SIGTERM. Its log (server.log) tells when it consumes; its
stdout/stderr go to output.txt in the same directory.
"""

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import uuid


STARTED = 'gocept.amqprun.main Started.'

DAEMON_CONF = """\
<eventlog>
  level INFO
  <logfile>
    path {log}
    format %(asctime)s %(levelname)s %(name)s %(message)s
  </logfile>
</eventlog>
<logger>
  name pika
  level WARNING
</logger>
<amqp-server>
  hostname {host}
  port {port}
  username guest
  password guest
{server_extra}</amqp-server>
<worker>
  amount {workers}
  component-configuration {zcml}
{worker_extra}</worker>
"""

DAEMON_ZCML = """\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:amqp="http://namespaces.gocept.com/amqp">
  <include package="gocept.amqprun" />
  <utility component="{module}.echo" name="benchmark.echo" />
{zcml}</configure>
"""

# `setup` (module level) and `work` (the handler's first statements,
# indented by 4) are the benchmark's; `work` sees `message`.
HANDLER = """\
import gocept.amqprun.handler
import gocept.amqprun.message
{setup}

@gocept.amqprun.handler.declare({input!r}, {input_key!r},
                                arguments={arguments!r})
def echo(message):
{work}    return [gocept.amqprun.message.Message(
        {{'content_type': message.header.content_type}}, message.body,
        routing_key={output_key!r})]
"""


# The handler module's set-up for tracing='sdk': OpenTelemetry's SDK as
# the global TracerProvider with a batch processor and an exporter that
# discards what it gets (the daemon's cost of tracing, not an exporter's).
SDK_SETUP = """\
from opentelemetry import trace as _trace
from opentelemetry.sdk.trace import TracerProvider as _TracerProvider
from opentelemetry.sdk.trace import export as _export


class _Discard(_export.SpanExporter):

    def export(self, spans):
        return _export.SpanExportResult.SUCCESS


_provider = _TracerProvider()
_provider.add_span_processor(_export.BatchSpanProcessor(_Discard()))
_trace.set_tracer_provider(_provider)
"""

# tracing='off': OpenTelemetry's variable names gocept.amqprun.
OFF_ENVIRON = {'OTEL_PYTHON_DISABLED_INSTRUMENTATIONS': 'gocept.amqprun'}


class Daemon:
    """The real daemon in a subprocess, with an echo handler.

    Its files go to a fresh directory under `workdir`. `args` supplies
    host, port, workers, prefetch, confirm_prefetch and worker_extra (the
    benchmark's options); `confirm` selects `commit-mode confirm`. The
    handler sleeps `sleep` seconds, or runs `work` (see HANDLER; `setup`
    goes before it, and `{module}` in both and in `zcml` names the
    handler's module); `zcml` are more directives (prefix amqp:).
    `baseline`: run the sources of the checkout `args.baseline`;
    `settings`: (key, value) pairs for its <worker> section.
    `tracing`: None (as installed; with the ``otel`` extra and no
    TracerProvider: the API's no-op spans), 'off' (switched off, as
    without the extra) or 'sdk' (the SDK, spans discarded: `SDK_SETUP`).
    """

    def __init__(self, workload, args, workdir, sleep=0.0, confirm=False,
                 setup='', work='', zcml='', baseline=False, settings=(),
                 tracing=None):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix='daemon-',
                                                 dir=workdir))
        module = 'bench_' + uuid.uuid4().hex[:8]
        if sleep:
            setup, work = 'import time\n' + setup, \
                f'    time.sleep({sleep})\n' + work
        if tracing == 'sdk':
            setup = SDK_SETUP + setup
        self.environ = OFF_ENVIRON if tracing == 'off' else {}
        (self.dir / f'{module}.py').write_text(HANDLER.format(
            input=workload.input, input_key=workload.input_key,
            arguments=workload.arguments, output_key=workload.output_key,
            setup=setup.replace('{module}', module),
            work=work.replace('{module}', module)))
        (self.dir / 'server.zcml').write_text(DAEMON_ZCML.format(
            module=module, zcml=zcml.replace('{module}', module)))
        self.log = self.dir / 'server.log'
        prefetch = args.confirm_prefetch if confirm else args.prefetch
        worker_extra = f'  prefetch {prefetch}\n' if prefetch else ''
        if confirm:
            worker_extra += '  commit-mode confirm\n'
        worker_extra += ''.join(f'  {key} {value}\n'
                                for key, value in settings)
        (self.dir / 'server.conf').write_text(DAEMON_CONF.format(
            log=self.log, host=args.host, port=args.port,
            workers=args.workers, zcml=self.dir / 'server.zcml',
            server_extra='', worker_extra=worker_extra + args.worker_extra))
        self.process = None
        # An earlier checkout's sources instead of this one's.
        self.source = [str(pathlib.Path(args.baseline) / 'src')] \
            if baseline else []

    def start(self, wrapper=()):
        env = dict(os.environ, **self.environ)
        env['PYTHONPATH'] = os.pathsep.join(
            [str(self.dir)] + self.source + [p for p in sys.path if p])
        self.output = open(self.dir / 'output.txt', 'wb')
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            list(wrapper) + [sys.executable, '-m', 'gocept.amqprun',
                             str(self.dir / 'server.conf')],
            cwd=self.dir, env=env, stdout=self.output,
            stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self):
        return self.process.pid

    def logged(self, text):
        try:
            return text in self.log.read_text()
        except FileNotFoundError:
            return False

    def wait_for_log(self, text, timeout=30):
        """Wait until `text` is in the log; return time.monotonic() then.
        Raises RuntimeError if the daemon exits or `timeout` passes first.
        """
        deadline = time.monotonic() + timeout
        while not self.logged(text):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f'daemon exited ({self.process.returncode}); see '
                    f'{self.dir}')
            if time.monotonic() > deadline:
                raise RuntimeError(f'{text!r} not logged; see {self.dir}')
            time.sleep(0.005)
        return time.monotonic()

    def wait_started(self):
        """Wait until the daemon consumes (main() logged "Started.")."""
        return self.wait_for_log(STARTED)

    def note(self, count):
        """{'per_commit': messages per AMQP transaction} from the last
        progress line of the log (logged at the stop), or {}."""
        lines = [line for line in self.log.read_text().splitlines()
                 if 'Progress: ' in line and 'AMQP transaction' in line]
        if not lines:
            return {}
        transactions = int(lines[-1].rsplit('; ', 1)[1].split()[0])
        return {'per_commit': count / transactions} if transactions else {}

    def stop(self, timeout=60):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.output.close()
        return self.process.returncode


def variant_settings(name):
    """The <worker> settings in a variant's name: ``daemon/channels=2/
    prefetch=40`` is the daemon with ``channels 2`` and ``prefetch 40``
    (one run can so compare configurations side by side)."""
    return [tuple(part.split('=', 1)) for part in name.split('/')[1:]]
