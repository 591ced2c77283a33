"""What happens to a message whose handling failed: retry, then park.

A failed message is ACKed and, in the same AMQP transaction, republished
with its try count in the header ``x-amqprun-attempts`` -- either straight
back to its queue, or (with a delay) to ``<queue>.retry``, a queue without
consumers whose messages expire after the delay and are dead-lettered back
to ``<queue>``. After `retries` retries the message is parked: published
to ``<queue>.parked`` (default), to amq.topic with `error_routing_key`, or
rejected without requeue so that the queue's own dead-letter exchange gets
it. Because the count travels with the message and changes in the same
transaction as the ACK, counting works on classic queues and is
exactly-once with the ACK.
"""

import collections
import threading

import gocept.amqprun.message


ATTEMPTS = 'x-amqprun-attempts'
ROUTING_KEY = 'x-amqprun-routing-key'
EXPIRATION = 'x-amqprun-expiration'
ERROR = 'x-amqprun-error'
QUEUE = 'x-amqprun-queue'

PARK_MODES = ('queue', 'reject')


def retry_queue(queue_name):
    return f'{queue_name}.retry'


def parked_queue(queue_name):
    return f'{queue_name}.parked'


def original_routing_key(delivery):
    """The routing key the message first arrived with."""
    return delivery.header.headers.get(ROUTING_KEY) or delivery.routing_key


def attempts(header):
    """How many times handling this message has failed before."""
    try:
        return int(header.headers.get(ATTEMPTS, 0))
    except (TypeError, ValueError):
        return 0


Decision = collections.namedtuple(
    'Decision', 'outcome description publishes reject')
Decision.__doc__ = """What to commit for a failed delivery: `outcome` is
'retried' or 'parked'; `publishes` and `reject` are for `Slot.commit`,
which ACKs the delivery unless `reject` is given."""


class RetryPolicy:
    """retries: retries after the first failure (0: park at once).
    delay: seconds before a retry (0: straight back to the queue).
    park: 'queue' (``<queue>.parked``) or 'reject' (the queue's
        dead-letter exchange); ignored when error_routing_key is set.
    error_routing_key: park by publishing to amq.topic with this key.
    """

    def __init__(self, retries=3, delay=5.0, park='queue',
                 error_routing_key=None):
        if park not in PARK_MODES:
            raise ValueError(
                f'park must be one of {", ".join(PARK_MODES)}, not {park!r}')
        if retries < 0 or delay < 0:
            raise ValueError('retries and delay must not be negative')
        self.retries = retries
        self.delay = delay
        self.park = park
        self.error_routing_key = error_routing_key

    def auxiliary_queues(self, queue_name):
        """(name, arguments) of the queues this policy needs beside
        `queue_name`."""
        result = []
        if self.retries and self.delay:
            result.append((retry_queue(queue_name), {
                'x-dead-letter-exchange': '',
                'x-dead-letter-routing-key': queue_name}))
        if self.park == 'queue' and not self.error_routing_key:
            result.append((parked_queue(queue_name), None))
        return result

    def decide(self, delivery, error, park=False):
        """The `Decision` for a failed delivery (`park`: no more
        retries)."""
        tries = attempts(delivery.header) + 1
        header = _copy(delivery.header)
        headers = header.headers
        headers[ATTEMPTS] = tries
        headers.setdefault(ROUTING_KEY, delivery.routing_key)
        if EXPIRATION in headers:
            header.expiration = headers.pop(EXPIRATION)
        queue = delivery.queue
        if tries <= self.retries and not park:
            if self.delay:
                if header.expiration is not None:
                    headers[EXPIRATION] = header.expiration
                header.expiration = str(int(self.delay * 1000))
                target = ('', retry_queue(queue))
                description = (f'retry {tries} of {self.retries} in '
                               f'{self.delay:g} s')
            else:
                target = ('', queue)
                description = f'retry {tries} of {self.retries} now'
            return Decision('retried', description,
                            [target + (header, delivery.body)], None)
        headers[ERROR] = error_text(error)
        headers[QUEUE] = queue
        if self.error_routing_key:
            return Decision(
                'parked', f'parked after {tries} failure(s) with routing '
                f'key {self.error_routing_key!r}',
                [('amq.topic', self.error_routing_key, header,
                  delivery.body)], None)
        if self.park == 'reject':
            return Decision(
                'parked', f'rejected after {tries} failure(s) (to the '
                'queue\'s dead-letter exchange, if any)', [],
                (delivery.delivery_tag, False))
        return Decision(
            'parked', f'parked after {tries} failure(s) in queue '
            f'{parked_queue(queue)!r}',
            [('', parked_queue(queue), header, delivery.body)], None)


def _copy(header):
    data = header.as_dict()
    data['headers'] = dict(header.headers)
    return gocept.amqprun.message.Header(**data)


def error_text(error):
    """The ``x-amqprun-error`` header of a parked message: the error's
    class and text, at most 1000 characters."""
    text = f'{error.__class__.__name__}: {error}'
    return text[:1000]


class Refusals:
    """Counts, per message, commits the broker refused by closing the
    channel (e.g. a reply to an exchange that does not exist).

    Such a failure takes the channel with it, so the retry count cannot be
    committed with the message; the broker redelivers it. This in-memory
    count (per process, thread-safe, bounded) lets the worker park such a
    message after the policy's retries instead of looping.
    """

    def __init__(self, size=10000):
        self.size = size
        self._counts = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, key):
        with self._lock:
            self._counts[key] = self._counts.pop(key, 0) + 1
            while len(self._counts) > self.size:
                self._counts.popitem(last=False)
            return self._counts[key]

    def count(self, key):
        with self._lock:
            return self._counts.get(key, 0)

    def forget(self, key):
        with self._lock:
            self._counts.pop(key, None)
