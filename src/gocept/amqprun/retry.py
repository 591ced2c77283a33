"""What happens to a message whose handling failed or that came back
unsettled: retry, quarantine, park.

Failed handling. A failed message is ACKed and, in the same AMQP
transaction, republished with its failure count in the header
``amqprun-attempts`` -- either straight back to its queue, or (with a
delay) to a retry queue without consumers whose messages expire after the
delay and are dead-lettered back to the queue: ``<queue>.retry``, or with
growing delays one queue per delay (``<queue>.retry.10s`` ...). After
`retries` retries the message is parked: published to ``<queue>.parked``
(default), to amq.topic with `error_routing_key`, or rejected without
requeue so that the queue's own dead-letter exchange gets it.

Unsettled deliveries. A delivery the broker flags as redelivered was
delivered before and never settled: its consumer died (a crash, a
SIGKILL, the OOM killer -- perhaps because of this very message) or lost
its channel. Before such a delivery is handled, it is ACKed and, in the
same transaction, republished to ``<queue>.quarantine`` with
``amqprun-unsettled`` counting such returns; every process consumes its
quarantine queues with one consumer and one message at a time, so a
message that kills its process there takes only itself down, and the
messages that merely shared its process's crash are handled normally.
When failures and unsettled returns together exceed `retries`, the
message is parked instead: a message that kills its process cannot loop.

The counts travel in the message and change in the same transaction as
the ACK, so counting works on classic and quorum queues alike and
survives any crash. Header names of earlier versions (``x-amqprun-*``)
are still read.

A parked copy records why and when: ``amqprun-error`` (the error's class
and text), ``amqprun-traceback`` (the whole error with its traceback, at
most `TRACEBACK_LIMIT` bytes, when there is one), ``amqprun-parked-at``
(ISO 8601, UTC) and ``amqprun-queue`` (the handler queue it failed in);
the `parked` module reads them and replays parked messages.
"""

import collections
import datetime
import traceback

import gocept.amqprun.message
import gocept.amqprun.topology


ATTEMPTS = 'amqprun-attempts'
UNSETTLED = 'amqprun-unsettled'
ROUTING_KEY = 'amqprun-routing-key'
EXPIRATION = 'amqprun-expiration'
ERROR = 'amqprun-error'
QUEUE = 'amqprun-queue'
TRACEBACK = 'amqprun-traceback'
PARKED_AT = 'amqprun-parked-at'
LEGACY_PREFIX = 'x-'    # the names before 4.0 were x-amqprun-...

PARK_MODES = ('queue', 'reject')


def retry_queue(queue_name, delay=None):
    """The retry queue of `queue_name`; with `delay` (seconds), the one
    for that delay when delays grow."""
    if delay is None:
        return f'{queue_name}.retry'
    return f'{queue_name}.retry.{delay:g}s'


def parked_queue(queue_name):
    """The parked queue of `queue_name`."""
    return f'{queue_name}.parked'


def quarantine_queue(queue_name):
    """The quarantine queue of `queue_name`."""
    return f'{queue_name}.quarantine'


def header(headers, name):
    """The value of our header `name` (or of its legacy name), or None."""
    value = headers.get(name)
    if value is None:
        value = headers.get(LEGACY_PREFIX + name)
    return value


def _count(headers, name):
    try:
        return int(header(headers, name) or 0)
    except (TypeError, ValueError):
        return 0


def original_routing_key(delivery):
    """The routing key the message first arrived with."""
    key = header(delivery.header.headers, ROUTING_KEY)
    if isinstance(key, bytes):
        key = key.decode('utf-8', 'replace')
    return key or delivery.routing_key


def attempts(header):
    """How many times handling this message has failed before."""
    return _count(header.headers, ATTEMPTS)


def unsettled(header):
    """How many times this message was delivered and not settled."""
    return _count(header.headers, UNSETTLED)


def returns(delivery):
    """How many times the broker says `delivery` returned unsettled since
    it was last published: quorum queues count (``x-delivery-count``),
    classic queues only flag ``redelivered`` (counted as 1)."""
    count = delivery.header.headers.get('x-delivery-count')
    if isinstance(count, int) and count > 0:
        return count
    return 1 if delivery.redelivered else 0


class PolicyError(ValueError):
    """An argument of `RetryPolicy` is out of range.

    `argument` is its name; `problem(names)` says what is wrong with it,
    calling an argument it is compared with by its name in `names` (e.g.
    a configuration file's keys; default: the argument's own name).
    str(): the argument's name and the problem.
    """

    OTHER = '{other}'   # where `problem` names the argument compared with

    def __init__(self, argument, problem, other=None):
        self.argument = argument
        self.other = other
        self._problem = problem
        super().__init__(f'{argument} {self.problem()}')

    def problem(self, names=None):
        if self.other is None:
            return self._problem
        return self._problem.replace(
            self.OTHER, (names or {}).get(self.other, self.other))


def _one_of(choices):
    quoted = [f'"{choice}"' for choice in choices]
    return ' or '.join([', '.join(quoted[:-1])] + quoted[-1:]) \
        if len(quoted) > 1 else quoted[0]


Decision = collections.namedtuple(
    'Decision', 'outcome description publishes reject')
Decision.__doc__ = """What to commit for a delivery: `outcome` is
'retried', 'quarantined' or 'parked'; `publishes` and `reject` are for
`Slot.commit`, which ACKs the delivery unless `reject` is given."""


class RetryPolicy:
    """retries: retries after the first failure (0: park at once); also
        the number of unsettled returns and failures together after which
        a message is parked.
    delay: seconds before the first retry (0: straight back to the queue).
    backoff: the factor by which the delay grows from try to try (1:
        constant).
    max_delay: the largest delay (seconds).
    park: 'queue' (``<queue>.parked``) or 'reject' (the queue's
        dead-letter exchange); ignored when error_routing_key is set.
    error_routing_key: park by publishing to amq.topic with this key.

    Raises PolicyError for an argument out of range (the configuration
    file's checks are these).
    """

    def __init__(self, retries=3, delay=5.0, park='queue',
                 error_routing_key=None, backoff=1.0, max_delay=300.0):
        if park not in PARK_MODES:
            raise PolicyError(
                'park', f'must be {_one_of(PARK_MODES)}, not {park!r}')
        for argument, value, minimum in (
                ('retries', retries, 0), ('delay', delay, 0),
                ('backoff', backoff, 1)):
            if value < minimum:
                raise PolicyError(
                    argument, f'must be at least {minimum}, not {value:g}')
        if max_delay < delay:
            raise PolicyError(
                'max_delay', f'must not be less than {PolicyError.OTHER} '
                f'({delay:g})', other='delay')
        self.retries = retries
        self.delay = delay
        self.backoff = backoff
        self.max_delay = max_delay
        self.park = park
        self.error_routing_key = error_routing_key

    def delay_of(self, tries):
        """Seconds before retry number `tries` (1 is the first)."""
        return min(self.delay * self.backoff ** (tries - 1), self.max_delay)

    @property
    def delays(self):
        """The distinct retry delays, in order."""
        if not self.retries or not self.delay:
            return []
        return sorted({self.delay_of(n) for n in range(1, self.retries + 1)})

    def _retry_queue(self, queue_name, delay):
        if len(self.delays) == 1:
            return retry_queue(queue_name)
        return retry_queue(queue_name, delay)

    def auxiliary_queues(self, queue):
        """The `topology.Queue` objects this policy needs beside `queue`
        (a topology.Queue); they have the type of `queue`."""
        name = queue.name
        typed = gocept.amqprun.topology.same_type(queue.arguments)
        result = [gocept.amqprun.topology.Queue(
            quarantine_queue(name), arguments=typed or None, prefetch=1,
            single=True, handler_queue=name)]
        dead_lettering = {'x-dead-letter-exchange': '',
                          'x-dead-letter-routing-key': name}
        if typed.get('x-queue-type') == 'quorum':
            # Dead-lettering is at-most-once unless the source is a quorum
            # queue that asks for at-least-once (which needs this
            # overflow mode): then no retry is lost when a node goes.
            dead_lettering.update({
                'x-dead-letter-strategy': 'at-least-once',
                'x-overflow': 'reject-publish'})
        for delay in self.delays:
            result.append(gocept.amqprun.topology.Queue(
                self._retry_queue(name, delay), consume=False,
                arguments=dict(typed, **dead_lettering)))
        if self.park == 'queue' and not self.error_routing_key:
            result.append(gocept.amqprun.topology.Queue(
                parked_queue(name), arguments=typed or None, consume=False))
        return result

    def decide(self, delivery, error, park=False):
        """The `Decision` for a failed delivery (`park`: no more
        retries)."""
        tries = attempts(delivery.header) + 1
        header, headers = _copy(delivery)
        headers[ATTEMPTS] = tries
        queue = delivery.queue
        if tries + unsettled(delivery.header) <= self.retries and not park:
            delay = self.delay_of(tries)
            if delay:
                if header.expiration is not None:
                    headers[EXPIRATION] = header.expiration
                header.expiration = str(int(delay * 1000))
                target = ('', self._retry_queue(queue, delay))
                description = (f'retry {tries} of {self.retries} in '
                               f'{delay:g} s')
            else:
                target = ('', queue)
                description = f'retry {tries} of {self.retries} now'
            return Decision('retried', description,
                            [target + (header, delivery.body)], None)
        return self._park(delivery, header, error_text(error),
                          f'after {tries} failure(s)',
                          trace=traceback_text(error))

    def quarantine(self, delivery):
        """The `Decision` for a delivery that returned unsettled (see
        `returns`): republish it to the quarantine queue, counted, or
        park it."""
        count = unsettled(delivery.header) + returns(delivery)
        header, headers = _copy(delivery)
        headers[UNSETTLED] = count
        if count + attempts(delivery.header) > self.retries:
            return self._park(
                delivery, header,
                f'delivered {count} time(s) without being settled (its '
                'process died or lost its connection while it had it)',
                f'after {count} unsettled deliveries')
        return Decision(
            'quarantined', f'returned unsettled {count} time(s); handled '
            f'in {quarantine_queue(delivery.queue)!r}',
            [('', quarantine_queue(delivery.queue), header, delivery.body)],
            None)

    def _park(self, delivery, header, error, why, trace=None):
        headers = header.headers
        headers[ERROR] = error
        headers[QUEUE] = queue = delivery.queue
        headers[PARKED_AT] = parked_at()
        # A traceback of an earlier parking must not pass for this one.
        headers.pop(TRACEBACK, None)
        if trace:
            headers[TRACEBACK] = trace
        if self.error_routing_key:
            return Decision(
                'parked', f'parked {why} with routing key '
                f'{self.error_routing_key!r}',
                [('amq.topic', self.error_routing_key, header,
                  delivery.body)], None)
        if self.park == 'reject':
            return Decision(
                'parked', f'rejected {why} (to the queue\'s dead-letter '
                'exchange, if any)', [], (delivery.delivery_tag, False))
        return Decision(
            'parked', f'parked {why} in queue {parked_queue(queue)!r}',
            [('', parked_queue(queue), header, delivery.body)], None)


NAMES = (ATTEMPTS, UNSETTLED, ROUTING_KEY, EXPIRATION, ERROR, QUEUE,
         TRACEBACK, PARKED_AT)
# Set by quorum queues on each delivery; meaningless in a new message.
DELIVERY_COUNT = 'x-delivery-count'


def _copy(delivery):
    """A copy of the delivery's header to republish it with: our headers
    under their current names, the original routing key kept, the
    original expiration restored, the delivery count dropped."""
    data = delivery.header.as_dict()
    old = delivery.header.headers
    dropped = {LEGACY_PREFIX + name for name in NAMES} | {DELIVERY_COUNT}
    headers = {k: v for k, v in old.items() if k not in dropped}
    for name in NAMES:
        value = header(old, name)
        if value is not None:
            headers[name] = value
    headers.setdefault(ROUTING_KEY, delivery.routing_key)
    data['headers'] = headers
    copy = gocept.amqprun.message.Header(**data)
    if EXPIRATION in headers:
        copy.expiration = headers.pop(EXPIRATION)
    return copy, headers


def republished(delivery):
    """(exchange, routing key, header, body) that puts `delivery` back
    into the queue it came from as it is (not counted)."""
    data = delivery.header.as_dict()
    data['headers'] = {k: v for k, v in delivery.header.headers.items()
                       if k != DELIVERY_COUNT}
    return ('', delivery.source, gocept.amqprun.message.Header(**data),
            delivery.body)


def error_text(error):
    """The ``amqprun-error`` header of a parked message: the error's
    class and text, at most 1000 characters."""
    text = f'{error.__class__.__name__}: {error}'
    return text[:1000]


# Bytes of the ``amqprun-traceback`` header at most (UTF-8).
TRACEBACK_LIMIT = 16 * 1024
_CUT = '  ... ({} bytes of the traceback left out) ...\n'


def traceback_text(error, limit=TRACEBACK_LIMIT):
    """The ``amqprun-traceback`` header of a parked message: `error` as
    Python prints it, with its traceback and the errors it came from;
    None when it was never raised (no traceback). Longer than `limit`
    bytes, its middle is left out: the first line and the innermost
    frames with the error itself are kept."""
    if getattr(error, '__traceback__', None) is None:
        return None
    text = ''.join(traceback.format_exception(error))
    data = text.encode('utf-8')
    if len(data) <= limit:
        return text
    first = text.splitlines(keepends=True)[0].encode('utf-8')[:limit // 4]
    room = limit - len(first) - len(_CUT.format(len(data)).encode())
    tail = data[-room:] if room > 0 else b''
    cut = len(data) - len(first) - len(tail)
    return (first.decode('utf-8', 'ignore') + _CUT.format(cut)
            + tail.decode('utf-8', 'ignore'))


def parked_at(now=None):
    """The ``amqprun-parked-at`` header: `now` (default: the current
    time) in ISO 8601, UTC, to the millisecond."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.astimezone(datetime.timezone.utc).isoformat(
        timespec='milliseconds')

