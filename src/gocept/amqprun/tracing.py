"""Traces through the daemon with OpenTelemetry (extra ``otel``).

Everything OpenTelemetry-specific lives here; the other modules call a
few hooks, each behind the module flag `ACTIVE` (or on a delivery that
has a span, which only happens while it is set):

- `enter` / `leave` (worker thread, around each delivery a worker takes):
  the CONSUMER span of the delivery, named ``process QUEUE``, continuing
  the W3C trace context (``traceparent``, ``tracestate``, ``baggage`` --
  whatever the global propagator reads) of the message's AMQP headers;
  it is the current span while the worker handles the delivery, so the
  handler's own spans are its children and log records carry its ids.
- `sending` (`Session.send`: replies, ``Server.send`` of an application,
  ``<amqp:readfiles>``) and `publishing` (the retry, quarantine and
  parked copies of `settlement`): a PRODUCER span ``send EXCHANGE``,
  child of the current span, whose context is injected into the
  message's headers -- the one who consumes it continues the trace.
  The span marks the hand-over of the message to the transaction and
  ends at once: the message goes out with the commit, whose outcome the
  CONSUMER span shows (outside a handler, the commit raises to the
  caller).
- `failed`, `end`, `handed_over`: the outcome. The CONSUMER span covers
  the handler and the commit: it ends exactly once, when what becomes of
  the delivery is known -- ``amqprun.outcome`` ``handled``, ``retried``,
  ``quarantined``, ``parked``, ``in_doubt`` or ``requeued`` (nothing was
  settled: the broker delivers the message again). A commit the worker
  does not wait for (see `session`) is *handed over*: the IO thread ends
  the span when the broker answered. A failure sets the status ERROR and
  records the exception.
- `serving` (a Server's IO thread, at its start): whether a
  TracerProvider is set (see below); and pika's own instrumentation
  (opentelemetry-instrumentation-pika) would make every publish of the
  IO thread the root of a new trace and overwrite the context injected
  above: OpenTelemetry's suppression key switches it off in that
  thread, where this module's spans already cover the publishes.
- `log_ids`, `ids_of`: the trace and span id of a log record (`log`).

The spans go to the global TracerProvider the application configured;
this module configures none. Without opentelemetry-api nothing here
runs (`ACTIVE` is False). With the API but no TracerProvider when the
server starts (`RECORDING` is False) spans would record nothing: the
hooks *pass on* instead -- the propagation fields of the message being
handled are copied as they are into the messages sent meanwhile (its
retry copies have them anyway), and log records get the ids they name
-- at a fraction of the cost of parsing and re-serialising them.
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` naming ``gocept.amqprun``
switches this module off (read at import).
"""

import contextvars
import importlib.metadata
import logging
import os

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate
    from opentelemetry import trace
    from opentelemetry.propagators.textmap import Getter
except ImportError:         # the extra ``otel`` is not installed
    trace = None
    Getter = object

import gocept.amqprun.retry


log = logging.getLogger(__name__)

NAME = 'gocept.amqprun'
# OpenTelemetry's variable to switch instrumentations off by name.
DISABLED = 'OTEL_PYTHON_DISABLED_INSTRUMENTATIONS'

# The attributes (messaging semantic conventions for RabbitMQ, and ours).
SYSTEM = 'messaging.system'
OPERATION_TYPE = 'messaging.operation.type'
OPERATION_NAME = 'messaging.operation.name'
DESTINATION = 'messaging.destination.name'
ROUTING_KEY = 'messaging.rabbitmq.destination.routing_key'
SUBSCRIPTION = 'messaging.destination.subscription.name'
DELIVERY_TAG = 'messaging.rabbitmq.message.delivery_tag'
MESSAGE_ID = 'messaging.message.id'
CONVERSATION_ID = 'messaging.message.conversation_id'
BODY_SIZE = 'messaging.message.body.size'
ERROR_TYPE = 'error.type'
QUEUE = 'amqprun.queue'
ATTEMPTS = 'amqprun.attempts'
OUTCOME = 'amqprun.outcome'


def enabled(environ=os.environ):
    """Whether to trace: opentelemetry-api is importable, and `environ`'s
    OTEL_PYTHON_DISABLED_INSTRUMENTATIONS does not name this one."""
    if trace is None:
        return False
    names = {name.strip() for name in environ.get(DISABLED, '').split(',')}
    return NAME not in names


ACTIVE = enabled()
# A TracerProvider that may record was set (see `serving`); until then
# the hooks pass on.
RECORDING = False

if trace is not None:
    try:
        _version = importlib.metadata.version(NAME)
    except importlib.metadata.PackageNotFoundError:
        _version = None
    # A proxy until the application sets its provider, then that one's.
    _tracer = trace.get_tracer(NAME, _version)
    _CONSUMER = trace.SpanKind.CONSUMER
    _PRODUCER = trace.SpanKind.PRODUCER
    _NO_OP_PROVIDERS = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
    # OpenTelemetry's own key (what `is_instrumentation_enabled` asks).
    _SUPPRESS = getattr(otel_context, '_SUPPRESS_INSTRUMENTATION_KEY', None)


class HeaderGetter(Getter):
    """Reads the propagation fields from AMQP headers: values that came
    as byte strings are decoded, other types are not a context."""

    def get(self, carrier, key):
        value = carrier.get(key)
        if isinstance(value, bytes):
            value = value.decode('utf-8', 'replace')
        elif not isinstance(value, str):
            return None
        return [value]

    def keys(self, carrier):
        return list(carrier)


_getter = HeaderGetter()

# Passing on (see above): the headers of the message being handled.
_carrier = contextvars.ContextVar('gocept.amqprun.tracing.carrier',
                                  default=None)
# (the global propagator, the header names it writes)
_fields = (None, ())


class ConsumerSpan:
    """What travels with a delivery (`channel.Delivery.span`): its span,
    the context with the span current, and where its end stands.

    `ended` is set by the one `end` that ends it. `in_flight`: a commit
    nobody waits for was handed to the IO thread, which ends the span
    (the worker does not, see `leave`); it stays set.
    """

    __slots__ = ('span', 'context', 'ended', 'in_flight')

    def __init__(self, span, context):
        self.span = span
        self.context = context
        self.ended = False
        self.in_flight = False


# Worker threads

def enter(delivery):
    """Make the span of `delivery` the current one in this thread,
    starting it unless it has one (a delivery handed back to a worker to
    be retried has) -- or, without a TracerProvider, note its headers to
    pass its context on. Return the token for `leave`, or None when there
    is nothing to trace: the delivery's channel is gone (it is only
    dropped), or it has no context and the span would be the API's
    no-op one."""
    consumer = delivery.span
    if consumer is None:
        if not delivery.current:
            return None
        if not RECORDING:
            headers = delivery.header.headers
            return _carrier.set(headers) if headers else None
        try:
            consumer = _start(delivery)
        except Exception:
            log.exception('Cannot trace message %s from queue %r',
                          delivery.header.message_id, delivery.queue)
            return None
        if consumer is None:
            return None
        delivery.span = consumer
    return otel_context.attach(consumer.context)


def _start(delivery):
    header = delivery.header
    headers = header.headers
    parent = propagate.extract(headers, getter=_getter) if headers else None
    attributes = None
    if RECORDING:
        # Given at the start, the SDK takes them in one go.
        attributes = {
            SYSTEM: 'rabbitmq', OPERATION_TYPE: 'process',
            OPERATION_NAME: 'process', DESTINATION: delivery.exchange,
            SUBSCRIPTION: delivery.source, QUEUE: delivery.queue,
            DELIVERY_TAG: delivery.delivery_tag,
            BODY_SIZE: len(delivery.body)}
        if delivery.routing_key:
            attributes[ROUTING_KEY] = delivery.routing_key
        _message_attributes(attributes, header)
        attempts = gocept.amqprun.retry.attempts(header)
        if attempts:
            attributes[ATTEMPTS] = attempts
    span = _tracer.start_span(f'process {delivery.queue}', context=parent,
                              kind=_CONSUMER, attributes=attributes)
    if not span.is_recording() and not span.get_span_context().is_valid:
        return None     # the API's no-op span, and no incoming context
    return ConsumerSpan(span, trace.set_span_in_context(span, parent))


def leave(delivery, token):
    """The worker is done with `delivery`: restore the context it had
    (`token` from `enter`). A span nothing ended and no commit in flight
    will end ends now: nothing settled the delivery (its channel went
    while it waited), the broker delivers it again."""
    consumer = delivery.span
    if consumer is None:        # passed on
        _carrier.reset(token)
        return
    otel_context.detach(token)
    if not (consumer.ended or consumer.in_flight):
        end(delivery, 'requeued')


def handed_over(delivery):
    """The commit of `delivery` goes to the IO thread without a waiter:
    its outcome ends the span (`end`), the worker does not."""
    consumer = delivery.span
    if consumer is not None:
        consumer.in_flight = True


def failed(delivery, error):
    """Handling `delivery` failed with `error`: status ERROR, the
    exception recorded; the span goes on until the retry policy's
    commit."""
    consumer = delivery.span
    if consumer is not None and not consumer.ended \
            and consumer.span.is_recording():
        _record(consumer.span, error)


# Any thread (the IO thread for commits handed over)

def end(delivery, outcome, error=None):
    """End the span of `delivery` with `outcome` (see above) -- the first
    call does, later ones do nothing. `error`: what the commit failed
    with."""
    consumer = delivery.span
    if consumer is None or consumer.ended:
        return
    consumer.ended = True
    span = consumer.span
    if span.is_recording():
        span.set_attribute(OUTCOME, outcome)
        if error is not None:
            _record(span, error)
    span.end()


def _record(span, error):
    span.record_exception(error)
    span.set_attribute(ERROR_TYPE, type(error).__qualname__)
    span.set_status(trace.Status(
        trace.StatusCode.ERROR, f'{type(error).__name__}: {error}'))


# Sending (worker threads, application threads)

def sending(message):
    """`message` (an IMessage) joins a transaction: a PRODUCER span,
    its context injected into the message's headers (or the context of
    the message being handled passed on)."""
    if not RECORDING:
        carrier = _carrier.get()
        if carrier is not None:
            _pass_on(carrier, message.header.headers)
            return
    _produce(message.exchange, message.routing_key, message.header,
             message.body)


def publishing(publishes):
    """The (exchange, routing key, Header, body) tuples are about to be
    committed: a PRODUCER span for each, injected (see `sending`)."""
    if not RECORDING and _carrier.get() is not None:
        return      # copies of the message being handled: they have it
    for exchange, routing_key, header, body in publishes:
        _produce(exchange, routing_key, header, body)


def _pass_on(source, target):
    global _fields
    textmap = propagate.get_global_textmap()
    if _fields[0] is not textmap:
        _fields = (textmap, tuple(textmap.fields))
    for field in _fields[1]:
        value = source.get(field)
        if isinstance(value, bytes):
            value = value.decode('utf-8', 'replace')
        if isinstance(value, str):
            target[field] = value


def _produce(exchange, routing_key, header, body):
    try:
        attributes = None
        if RECORDING:
            attributes = {
                SYSTEM: 'rabbitmq', OPERATION_TYPE: 'send',
                OPERATION_NAME: 'send', DESTINATION: exchange,
                BODY_SIZE: len(body)}
            if routing_key:
                attributes[ROUTING_KEY] = routing_key
            _message_attributes(attributes, header)
        span = _tracer.start_span(f'send {exchange or routing_key}',
                                  kind=_PRODUCER, attributes=attributes)
        if not span.is_recording():
            # No TracerProvider (or not sampled): the current context,
            # if there is one, passes on unchanged.
            if span.get_span_context().is_valid:
                propagate.inject(header.headers)
            return
        propagate.inject(header.headers,
                         context=trace.set_span_in_context(span))
        span.end()
    except Exception:
        log.exception('Cannot trace sending message %s', header.message_id)


def _message_attributes(attributes, header):
    if header.message_id:
        attributes[MESSAGE_ID] = str(header.message_id)
    if header.correlation_id:
        attributes[CONVERSATION_ID] = str(header.correlation_id)


# The IO thread

def serving():
    """A Server starts, in this thread, its IO thread: note whether the
    application has set a TracerProvider that may record (not the API's
    proxy or no-op one; one set later is used from the next start on),
    and switch other OpenTelemetry instrumentations (pika's) off in this
    thread. Return the token for `restore` (None: nothing to restore)."""
    global RECORDING
    RECORDING = RECORDING or not isinstance(
        trace.get_tracer_provider(), _NO_OP_PROVIDERS)
    if _SUPPRESS is None:
        return None
    return otel_context.attach(otel_context.set_value(_SUPPRESS, True))


def restore(token):
    if token is not None:
        otel_context.detach(token)


# Log correlation

def log_ids(record):
    """(trace id, span id) as hex strings for a log record, or None: the
    record's own ``trace_id`` and ``span_id`` (see `ids_of`), else those
    of the span current where it was logged, else (passing on) those the
    message being handled names."""
    trace_id = getattr(record, 'trace_id', None)
    if trace_id is not None:
        return trace_id, getattr(record, 'span_id', None)
    if not ACTIVE:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        carrier = _carrier.get()
        if carrier is None:
            return None
        context = trace.get_current_span(propagate.extract(
            carrier, getter=_getter)).get_span_context()
        if not context.is_valid:
            return None
    return (trace.format_trace_id(context.trace_id),
            trace.format_span_id(context.span_id))


def ids_of(delivery):
    """The ``extra`` of a log record about `delivery` logged outside its
    handling (the IO thread): its span's ids, if it has one."""
    consumer = delivery.span
    if consumer is None:
        return {}
    context = consumer.span.get_span_context()
    if not context.is_valid:
        return {}
    return {'trace_id': trace.format_trace_id(context.trace_id),
            'span_id': trace.format_span_id(context.span_id)}
