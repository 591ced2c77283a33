"""Traces through the daemon (`tracing`), with the real broker.

The test process's TracerProvider (set once per process) records into
an in-memory exporter while a test of this module runs; the daemon runs
in-process (`ServerThread`), a second daemon in a subprocess continues
the trace on the other side of the broker. Outside these tests the
provider is OpenTelemetry's no-op one, as without an SDK.
"""

import json
import logging
import pathlib
import sys

from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import \
    InMemorySpanExporter
import pytest
import transaction

from gocept.amqprun import tracing
from gocept.amqprun.testing import AMQPProxy
from gocept.amqprun.testing import TO_CLIENT
from gocept.amqprun.testing import TX_COMMIT_OK
from gocept.amqprun.testing import ServerThread
from gocept.amqprun.testing import wait_for
import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.log
import gocept.amqprun.message
import gocept.amqprun.readfiles
import gocept.amqprun.retry
import gocept.amqprun.server


Message = gocept.amqprun.message.Message
RetryPolicy = gocept.amqprun.retry.RetryPolicy
CONSUMER = trace.SpanKind.CONSUMER
PRODUCER = trace.SpanKind.PRODUCER

# The trace of "service A": its span is the parent of the daemon's.
TRACE_ID = '4bf92f3577b34da6a3ce929d0e0e4736'
PARENT_ID = '00f067aa0ba902b7'
TRACEPARENT = f'00-{TRACE_ID}-{PARENT_ID}-01'


class Switched(trace.TracerProvider):
    """The process's TracerProvider: while `on` (a test of this module
    listens), the SDK's `sdk`; else OpenTelemetry's no-op one, so that
    the other modules' tests run as with the API alone."""

    on = False

    def __init__(self, sdk):
        self.sdk = sdk

    def get_tracer(self, *args, **kw):
        return SwitchedTracer(self, self.sdk.get_tracer(*args, **kw))


class SwitchedTracer(trace.Tracer):

    noop = trace.NoOpTracer()

    def __init__(self, provider, sdk):
        self.provider = provider
        self.sdk = sdk

    def _tracer(self):
        return self.sdk if self.provider.on else self.noop

    def start_span(self, *args, **kw):
        return self._tracer().start_span(*args, **kw)

    def start_as_current_span(self, *args, **kw):
        return self._tracer().start_as_current_span(*args, **kw)


class Ledger(SpanProcessor):
    """The ids of the CONSUMER spans started and, in order, ended."""

    def __init__(self):
        self.started = set()
        self.ended = []

    def on_start(self, span, parent_context=None):
        if span.kind == CONSUMER:
            self.started.add(span.context.span_id)

    def on_end(self, span):
        if span.kind == CONSUMER:
            self.ended.append(span.context.span_id)


class Recorder:
    """What a test sees of the process's tracing."""

    def __init__(self):
        self.exporter = InMemorySpanExporter()
        self.ledger = Ledger()
        sdk = TracerProvider()
        sdk.add_span_processor(self.ledger)
        sdk.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.provider = Switched(sdk)

    def reset(self, on):
        self.provider.on = on
        self.exporter.clear()
        self.ledger.started.clear()
        self.ledger.ended.clear()

    def spans(self, kind=None, name=None):
        return [span for span in self.exporter.get_finished_spans()
                if (kind is None or span.kind == kind)
                and (name is None or span.name == name)]

    def wait(self, kind, name, count=1, timeout=10):
        """The `count` finished spans of `kind` named `name`, waiting for
        them; at most `count`."""
        wait_for(lambda: len(self.spans(kind, name)) >= count, timeout,
                 message=f'{count} {kind} span(s) {name!r} not finished: '
                 f'{[s.name for s in self.spans()]}')
        found = self.spans(kind, name)
        assert len(found) == count, found
        return found

    def each_consumer_span_ended_once(self, timeout=10):
        ledger = self.ledger
        wait_for(lambda: ledger.started == set(ledger.ended), timeout,
                 message='a CONSUMER span did not end')
        assert len(ledger.ended) == len(set(ledger.ended))


@pytest.fixture(scope='session')
def recorder():
    recorder = Recorder()
    trace.set_tracer_provider(recorder.provider)
    assert trace.get_tracer_provider() is recorder.provider, (
        'another TracerProvider was set in this process')
    return recorder


@pytest.fixture
def spans(recorder, caplog):
    recorder.reset(on=True)
    yield recorder
    recorder.reset(on=False)
    # An end() of an ended span, or a failing hook.
    assert not [r for r in caplog.records
                if r.name.startswith(('opentelemetry', 'gocept.amqprun.tr'))
                and r.levelno >= logging.WARNING]


@pytest.fixture
def start(amqp_parameters, amqp_client, zca, name_prefix):
    """Start an in-process Server consuming ``PREFIX.in`` with a handler
    (keywords: Server's; `parameters`: instead of the test broker's)."""
    runners = []

    def factory(function, parameters=None, **kw):
        handler = gocept.amqprun.handler.declare(
            f'{name_prefix}.in', f'{name_prefix}.in')(function)
        zca.registerUtility(handler, gocept.amqprun.interfaces.IHandler,
                            name='test')
        server = gocept.amqprun.server.Server(
            parameters or amqp_parameters, **kw)
        zca.registerUtility(server, gocept.amqprun.interfaces.ISender)
        for queue in server.connection.queues:
            amqp_client.forget(queue.name)
        runners.append(ServerThread(server).start())
        return server
    yield factory
    for runner in runners:
        runner.stop()


def hex_id(span):
    return trace.format_span_id(span.context.span_id)


def ids(span):
    """(trace id, span id) of `span` as a traceparent writes them."""
    context = span.context
    return (trace.format_trace_id(context.trace_id),
            trace.format_span_id(context.span_id))


def parent_of(message):
    """(trace id, parent id) of a received message's traceparent (its
    flags vary: SDKs set a "random" flag)."""
    version, trace_id, parent_id, flags = message.header.headers[
        'traceparent'].split('-')
    return trace_id, parent_id


class Lines(logging.Handler):
    """Formats records when they are emitted (in the thread that logs)."""

    def __init__(self, formatter):
        super().__init__(logging.INFO)
        self.setFormatter(formatter)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture
def handler_log():
    """The lines logger ``test.handler`` logs, in JSON and in the plain
    format with the ids appended."""
    logger = logging.getLogger('test.handler')
    json_lines = Lines(gocept.amqprun.log.JSONFormatter())
    plain = Lines(gocept.amqprun.log.TraceFormatter('%(message)s'))
    logger.addHandler(json_lines)
    logger.addHandler(plain)
    logger.setLevel(logging.INFO)
    yield json_lines.lines, plain.lines
    logger.removeHandler(json_lines)
    logger.removeHandler(plain)


def test_handling_continues_the_incoming_trace_and_the_reply_carries_it(
        spans, start, amqp_client, name_prefix, handler_log):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])

    def handle(message):
        logging.getLogger('test.handler').info('handling')
        return [Message({}, b'reply', routing_key=f'{name_prefix}.out')]
    start(handle)
    message_id = amqp_client.send(f'{name_prefix}.in', b'hello', {
        'traceparent': TRACEPARENT, 'tracestate': 'a=b',
        'baggage': 'tenant=7', 'correlation_id': 'conversation-1'})
    reply = amqp_client.wait(out)

    [process] = spans.wait(CONSUMER, f'process {name_prefix}.in')
    assert trace.format_trace_id(process.context.trace_id) == TRACE_ID
    assert process.parent.is_remote
    assert trace.format_span_id(process.parent.span_id) == PARENT_ID
    attributes = dict(process.attributes)
    assert attributes.pop('messaging.rabbitmq.message.delivery_tag') >= 1
    assert attributes == {
        'messaging.system': 'rabbitmq',
        'messaging.operation.type': 'process',
        'messaging.operation.name': 'process',
        'messaging.destination.name': 'amq.topic',
        'messaging.rabbitmq.destination.routing_key': f'{name_prefix}.in',
        'messaging.destination.subscription.name': f'{name_prefix}.in',
        'amqprun.queue': f'{name_prefix}.in',
        'messaging.message.id': message_id,
        'messaging.message.conversation_id': 'conversation-1',
        'messaging.message.body.size': 5,
        'amqprun.outcome': 'handled',
    }
    assert process.status.status_code == trace.StatusCode.UNSET

    [send] = spans.wait(PRODUCER, 'send amq.topic')
    assert send.parent.span_id == process.context.span_id
    assert dict(send.attributes) == {
        'messaging.system': 'rabbitmq',
        'messaging.operation.type': 'send',
        'messaging.operation.name': 'send',
        'messaging.destination.name': 'amq.topic',
        'messaging.rabbitmq.destination.routing_key': f'{name_prefix}.out',
        'messaging.message.id': reply.header.message_id,
        'messaging.message.conversation_id': message_id,
        'messaging.message.body.size': 5,
    }
    # The send's context travels with the reply, next to what was there.
    headers = reply.header.headers
    assert parent_of(reply) == ids(send)
    assert headers['tracestate'] == 'a=b'
    assert headers['baggage'] == 'tenant=7'
    assert headers['references'] == message_id
    assert reply.header.correlation_id == message_id
    # The handler's log line names the trace and the handling span.
    json_lines, plain = handler_log
    [line] = [json.loads(line) for line in json_lines]
    assert line['message'] == 'handling'
    assert line['trace_id'] == TRACE_ID
    assert line['span_id'] == hex_id(process)
    assert plain == [
        f'handling trace_id={TRACE_ID} span_id={hex_id(process)}']
    spans.each_consumer_span_ended_once()


def test_a_message_without_context_starts_a_trace(
        spans, start, amqp_client, name_prefix):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    start(lambda m: [Message({}, b'r', routing_key=f'{name_prefix}.out')])
    amqp_client.send(f'{name_prefix}.in', b'x')
    reply = amqp_client.wait(out)
    [process] = spans.wait(CONSUMER, f'process {name_prefix}.in')
    assert process.parent is None
    [send] = spans.wait(PRODUCER, 'send amq.topic')
    assert parent_of(reply) == ids(send)
    assert send.context.trace_id == process.context.trace_id


def test_a_byte_string_traceparent_is_read(
        spans, start, amqp_client, name_prefix):
    start(lambda m: None)
    amqp_client.send(f'{name_prefix}.in', b'x',
                     {'traceparent': TRACEPARENT.encode()})
    [process] = spans.wait(CONSUMER, f'process {name_prefix}.in')
    assert trace.format_span_id(process.parent.span_id) == PARENT_ID


def test_a_failed_handling_is_an_error_and_its_retry_in_the_same_trace(
        spans, start, amqp_client, name_prefix):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    tries = []

    def handle(message):
        tries.append(message)
        if len(tries) == 1:
            raise RuntimeError('first try fails')
        return [Message({}, b'r', routing_key=f'{name_prefix}.out')]
    # With a delay: the copy takes the way through PREFIX.in.retry and
    # the broker's dead-lettering.
    start(handle, retry_policy=RetryPolicy(retries=3, delay=0.1))
    amqp_client.send(f'{name_prefix}.in', b'x', {'traceparent': TRACEPARENT})
    reply = amqp_client.wait(out)

    first, second = spans.wait(CONSUMER, f'process {name_prefix}.in', 2)
    assert first.status.status_code == trace.StatusCode.ERROR
    assert first.status.description == 'RuntimeError: first try fails'
    assert first.attributes['amqprun.outcome'] == 'retried'
    assert first.attributes['error.type'] == 'RuntimeError'
    [event] = first.events
    assert event.name == 'exception'
    assert event.attributes['exception.message'] == 'first try fails'
    assert 'in handle' in event.attributes['exception.stacktrace']
    [retry] = spans.wait(PRODUCER, f'send {name_prefix}.in.retry')
    assert retry.parent.span_id == first.context.span_id
    # The retry is handled in the same trace, continuing the copy's send.
    assert second.context.trace_id == first.context.trace_id
    assert second.parent.span_id == retry.context.span_id
    assert second.attributes['amqprun.outcome'] == 'handled'
    assert second.attributes['amqprun.attempts'] == 1
    assert second.status.status_code == trace.StatusCode.UNSET
    # The handler saw the copy's context, our headers as they were.
    headers = tries[1].header.headers
    assert parent_of(tries[1]) == ids(retry)
    assert headers['amqprun-attempts'] == 1
    assert headers['amqprun-routing-key'] == f'{name_prefix}.in'
    assert parent_of(reply)[0] == TRACE_ID
    spans.each_consumer_span_ended_once()


def test_a_parked_copy_carries_the_trace(
        spans, start, amqp_client, name_prefix):
    start(lambda m: 1 / 0, retry_policy=RetryPolicy(retries=0))
    message_id = amqp_client.send(f'{name_prefix}.in', b'x',
                                  {'traceparent': TRACEPARENT})
    parked = amqp_client.wait(f'{name_prefix}.in.parked')
    [process] = spans.wait(CONSUMER, f'process {name_prefix}.in')
    assert process.attributes['amqprun.outcome'] == 'parked'
    assert process.status.status_code == trace.StatusCode.ERROR
    [send] = spans.wait(PRODUCER, f'send {name_prefix}.in.parked')
    assert send.parent.span_id == process.context.span_id
    headers = parked.header.headers
    assert parent_of(parked) == ids(send)
    assert headers['amqprun-error'].startswith('ZeroDivisionError')
    assert parked.header.message_id == message_id
    spans.each_consumer_span_ended_once()


def test_a_quarantined_copy_carries_the_trace(
        spans, start, amqp_client, name_prefix):
    queue = amqp_client.declare(f'{name_prefix}.in', [f'{name_prefix}.in'])
    amqp_client.send(queue, b'x', {'traceparent': TRACEPARENT})
    # Delivered and not settled: it comes back flagged redelivered.
    channel = amqp_client.connection.channel()
    method, properties, body = next(
        channel.consume(queue, inactivity_timeout=10))
    assert method is not None
    channel.close()
    start(lambda m: None)
    first, second = spans.wait(CONSUMER, f'process {queue}', 2)
    assert first.attributes['amqprun.outcome'] == 'quarantined'
    assert first.attributes['messaging.destination.subscription.name'] == \
        queue
    [send] = spans.wait(PRODUCER, f'send {queue}.quarantine')
    assert send.parent.span_id == first.context.span_id
    assert second.attributes['messaging.destination.subscription.name'] == \
        f'{queue}.quarantine'
    assert second.parent.span_id == send.context.span_id
    assert second.attributes['amqprun.outcome'] == 'handled'
    spans.each_consumer_span_ended_once()


class Joined:
    """A data manager that makes the worker wait for the AMQP commit."""

    transaction_manager = transaction.manager

    def __init__(self):
        self.finished = []

    def abort(self, txn):
        pass

    tpc_begin = commit = tpc_vote = tpc_abort = abort

    def tpc_finish(self, txn):
        self.finished.append(trace.get_current_span())

    def sortKey(self):
        return '~joined'


@pytest.mark.parametrize('confirm', [False, True], ids=['tx', 'confirm'])
def test_a_commit_waited_for_ends_the_span_once(
        spans, start, amqp_client, name_prefix, confirm):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    joined = Joined()

    def handle(message):
        transaction.get().join(joined)
        return [Message({}, b'r', routing_key=f'{name_prefix}.out')]
    start(handle, confirm=confirm)
    amqp_client.send(f'{name_prefix}.in', b'x', {'traceparent': TRACEPARENT})
    amqp_client.wait(out)
    [process] = spans.wait(CONSUMER, f'process {name_prefix}.in')
    assert process.attributes['amqprun.outcome'] == 'handled'
    # The other manager finished in the handling's span.
    [span] = joined.finished
    assert span.get_span_context().span_id == process.context.span_id
    spans.each_consumer_span_ended_once()


def test_a_nacked_reply_is_retried_then_parked_in_one_trace(
        spans, start, amqp_client, name_prefix):
    # The broker NACKs every publish to `full` (confirm mode): the IO
    # thread hands the delivery back to a worker, which retries it.
    full = amqp_client.declare(
        f'{name_prefix}.full', [f'{name_prefix}.full'],
        arguments={'x-max-length': 0, 'x-overflow': 'reject-publish'})
    start(lambda m: [Message({}, b'r', routing_key=full)], confirm=True,
          retry_policy=RetryPolicy(retries=1, delay=0))
    amqp_client.send(f'{name_prefix}.in', b'x', {'traceparent': TRACEPARENT})
    amqp_client.wait(f'{name_prefix}.in.parked', timeout=15)
    first, second = spans.wait(CONSUMER, f'process {name_prefix}.in', 2)
    assert first.attributes['amqprun.outcome'] == 'retried'
    assert first.status.status_code == trace.StatusCode.ERROR
    assert 'basic.nack' in first.status.description
    assert second.attributes['amqprun.outcome'] == 'parked'
    assert second.context.trace_id == first.context.trace_id
    spans.each_consumer_span_ended_once()


def test_a_commit_the_broker_refuses_is_requeued_then_parked(
        spans, start, amqp_client, name_prefix):
    # A reply to an exchange that does not exist: the broker closes the
    # channel, the message comes back and is parked (no retries).
    def handle(message):
        reply = Message({}, b'r', routing_key='nowhere')
        reply.exchange = f'{name_prefix}.no-such-exchange'
        return [reply]
    start(handle, retry_policy=RetryPolicy(retries=0))
    amqp_client.send(f'{name_prefix}.in', b'x', {'traceparent': TRACEPARENT})
    amqp_client.wait(f'{name_prefix}.in.parked', timeout=15)
    first, second = spans.wait(CONSUMER, f'process {name_prefix}.in', 2)
    assert first.attributes['amqprun.outcome'] == 'requeued'
    assert first.attributes['error.type'] == 'ChannelLost'
    assert first.status.status_code == trace.StatusCode.ERROR
    # Delivered again by the broker: continuing the same incoming context.
    assert second.parent.span_id == first.parent.span_id
    assert second.attributes['amqprun.outcome'] == 'parked'
    assert second.attributes['error.type'] == 'BrokerRefused'
    spans.each_consumer_span_ended_once()


def test_a_commit_in_doubt_ends_the_span_in_doubt(
        spans, start, amqp_client, amqp_parameters, name_prefix):
    proxy = AMQPProxy.to(amqp_parameters)
    try:
        out = amqp_client.declare(f'{name_prefix}.out',
                                  [f'{name_prefix}.out'])
        rule = proxy.arm(TX_COMMIT_OK, direction=TO_CLIENT)
        start(lambda m: [Message({}, b'r', routing_key=f'{name_prefix}.out')],
              parameters=proxy.parameters(retry_delay=0.1))
        amqp_client.send(f'{name_prefix}.in', b'x',
                         {'traceparent': TRACEPARENT})
        assert rule.fired.wait(10)
        [process] = spans.wait(CONSUMER, f'process {name_prefix}.in')
        assert process.attributes['amqprun.outcome'] == 'in_doubt'
        assert process.status.status_code == trace.StatusCode.ERROR
        assert process.attributes['error.type'] == 'CommitInDoubt'
        # The broker had committed: the reply is there, in the trace.
        assert parent_of(amqp_client.wait(out))[0] == TRACE_ID
        spans.each_consumer_span_ended_once()
    finally:
        proxy.stop()


def test_server_send_continues_the_application_span(
        spans, amqp_parameters, amqp_client, zca, name_prefix):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    server = gocept.amqprun.server.Server(amqp_parameters,
                                          setup_handlers=False)
    runner = ServerThread(server).start()
    try:
        tracer = trace.get_tracer('test')
        with tracer.start_as_current_span('web request') as request:
            server.send(Message({}, b'x', routing_key=f'{name_prefix}.out'))
            transaction.commit()
    finally:
        runner.stop()
    [send] = spans.wait(PRODUCER, 'send amq.topic')
    assert send.parent.span_id == request.get_span_context().span_id
    assert send.context.trace_id == request.get_span_context().trace_id
    assert parent_of(amqp_client.wait(out)) == ids(send)


def test_readfiles_starts_a_trace_per_file(
        spans, amqp_parameters, amqp_client, zca, name_prefix, tmp_path):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    server = gocept.amqprun.server.Server(amqp_parameters,
                                          setup_handlers=False)
    zca.registerUtility(server, gocept.amqprun.interfaces.ISender)
    runner = ServerThread(server).start()
    try:
        reader = gocept.amqprun.readfiles.FileReader(
            str(tmp_path), f'{name_prefix}.out')
        reader.store.prepare()
        (tmp_path / 'new' / 'a.txt').write_bytes(b'file')
        assert reader.send(str(tmp_path / 'new' / 'a.txt'))
    finally:
        runner.stop()
    [send] = spans.wait(PRODUCER, 'send amq.topic')
    assert send.parent is None
    message = amqp_client.wait(out)
    assert parent_of(message) == ids(send)
    assert message.header.headers['X-Filename'] == 'a.txt'


def test_without_tracing_nothing_is_added(
        spans, start, amqp_client, name_prefix, monkeypatch):
    monkeypatch.setattr(tracing, 'ACTIVE', False)
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    start(lambda m: [Message({}, b'r', routing_key=f'{name_prefix}.out')])
    message_id = amqp_client.send(f'{name_prefix}.in', b'x',
                                  {'traceparent': TRACEPARENT})
    reply = amqp_client.wait(out)
    assert reply.header.headers == {'references': message_id}
    assert spans.spans() == []


def test_the_variable_of_opentelemetry_switches_it_off():
    variable = 'OTEL_PYTHON_DISABLED_INSTRUMENTATIONS'
    assert tracing.enabled({})
    assert tracing.enabled({variable: 'pika, requests'})
    assert not tracing.enabled({variable: 'pika, gocept.amqprun'})


# A second process on the other side of the broker.

INSTRUMENT = pathlib.Path(sys.executable).parent / 'opentelemetry-instrument'

FORWARD = '''\
import logging

import pika

import gocept.amqprun.handler
import gocept.amqprun.message


@gocept.amqprun.handler.declare({queue!r}, {queue!r})
def forward(message):
    # opentelemetry-instrumentation-pika wraps this method (with wrapt);
    # recent versions (0.66b1) that of pika.connection.Connection, which
    # the daemon's channels come from, too.
    logging.getLogger('handlers').info(
        'pika instrumented: %s',
        hasattr(pika.BlockingConnection.channel, '__wrapped__'))
    return [gocept.amqprun.message.Message(
        {{}}, message.body, routing_key={target!r})]
'''


def forwarding_daemon(server_process, amqp_client, queue, target,
                      extra=''):
    """A daemon (not started) that answers each message of `queue` with
    one to `target`."""
    process = server_process(
        start=False, amount=1, handlers=FORWARD.format(
            queue=queue, target=target),
        zcml='<utility component="handlers.forward" name="forward" />',
        extra=extra)
    for suffix in ('', '.quarantine', '.retry', '.parked'):
        amqp_client.forget(queue + suffix)
    return process


def console_spans(text):
    """The spans ConsoleSpanExporter wrote into `text` (JSON objects,
    one after the other), by name."""
    decoder = json.JSONDecoder()
    found = {}
    position = text.find('{')
    while position >= 0:
        try:
            span, end = decoder.raw_decode(text, position)
        except ValueError:
            position = text.find('{', position + 1)
            continue
        if isinstance(span, dict) and 'context' in span:
            found.setdefault(span['name'], []).append(span)
        position = text.find('{', end)
    return found


@pytest.mark.slow
def test_a_daemon_under_opentelemetry_instrument_continues_the_reply(
        spans, start, amqp_client, server_process, name_prefix):
    # This process handles PREFIX.in and replies to PREFIX.mid; a daemon
    # run by `opentelemetry-instrument` (the SDK configured from OTEL_*
    # variables, pika's own instrumentation active) forwards PREFIX.mid
    # to PREFIX.out. One trace from end to end.
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    start(lambda m: [Message({}, m.body, routing_key=f'{name_prefix}.mid')])
    other = forwarding_daemon(server_process, amqp_client,
                              f'{name_prefix}.mid', f'{name_prefix}.out')
    other.start(wrapper=[str(INSTRUMENT)], environ={
        'OTEL_SERVICE_NAME': 'forwarder', 'OTEL_TRACES_EXPORTER': 'console',
        'OTEL_METRICS_EXPORTER': 'none', 'OTEL_LOGS_EXPORTER': 'none',
        'OTEL_BSP_SCHEDULE_DELAY': '50', 'PYTHONUNBUFFERED': '1'})
    amqp_client.send(f'{name_prefix}.in', b'x', {'traceparent': TRACEPARENT})
    final = amqp_client.wait(out, timeout=20)
    [send] = spans.wait(PRODUCER, 'send amq.topic')
    assert other.stop() == 0
    found = console_spans(other.output_text())
    [process] = found[f'process {name_prefix}.mid']
    assert process['kind'] == 'SpanKind.CONSUMER'
    assert process['context']['trace_id'] == f'0x{TRACE_ID}'
    assert process['parent_id'] == f'0x{hex_id(send)}'
    assert process['attributes']['amqprun.outcome'] == 'handled'
    [forwarded] = found['send amq.topic']
    assert forwarded['parent_id'] == process['context']['span_id']
    # pika's instrumentation did not replace the context of the publish.
    assert parent_of(final) == (
        TRACE_ID, forwarded['context']['span_id'][2:])
    assert 'pika instrumented: True' in other.log_text()


@pytest.mark.slow
def test_without_an_sdk_the_context_passes_through(
        amqp_client, server_process, name_prefix, tmp_path):
    # opentelemetry-api without a TracerProvider: no spans; the incoming
    # context is passed on unchanged, and the handler's log lines name it.
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    json_log = tmp_path / 'handlers.json'
    other = forwarding_daemon(
        server_process, amqp_client, f'{name_prefix}.mid',
        f'{name_prefix}.out', extra=(
            '<logger>\n  name handlers\n  <logfile>\n'
            f'    path {json_log}\n'
            '    formatter gocept.amqprun.log.JSONFormatter\n'
            '  </logfile>\n</logger>\n'))
    other.start()
    amqp_client.send(f'{name_prefix}.mid', b'x', {
        'traceparent': TRACEPARENT.encode(), 'baggage': 'tenant=7',
        'references': 'earlier'})
    final = amqp_client.wait(out)
    headers = final.header.headers
    assert headers['traceparent'] == TRACEPARENT
    assert headers['baggage'] == 'tenant=7'
    assert headers['references'].startswith('earlier\n')
    assert other.stop() == 0
    [line] = [json.loads(line) for line in json_log.read_text().splitlines()]
    assert line['message'] == 'pika instrumented: False'
    assert (line['trace_id'], line['span_id']) == (TRACE_ID, PARENT_ID)
