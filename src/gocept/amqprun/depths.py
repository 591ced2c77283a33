"""How many messages wait: the handler queues and their parked queues, as
the broker counts them (for /metrics and the status page).

`QueueDepths.poll()` asks the broker with a passive ``queue.declare`` per
queue (which changes nothing) on a pika BlockingConnection of its own,
kept open between polls; the monitor's poll thread calls it every few
seconds, and only that thread touches the connection. Readers get the
last values (`snapshot`), never a broker round trip.
"""

import collections
import logging
import threading
import time

import pika
import pika.exceptions

from gocept.amqprun.errors import reason


log = logging.getLogger(__name__)

# A name the broker's management UI shows for the connection.
CONNECTION_NAME = 'gocept.amqprun monitor'


class Depth(collections.namedtuple('Depth', 'messages consumers parked')):
    """A handler queue as the broker counts it: messages ready, its
    consumers, and the messages in its parked queue (None when it has
    none, or it could not be read)."""


class QueueDepths:
    """The depths of `queues` (handler queue names) and of their parked
    queues (`parked`: {handler queue: parked queue name}; a queue
    without an entry has none).

    `poll()` reads them all (blocking; from one thread only); `snapshot()`
    (any thread) answers the values of the last successful poll while
    that is at most `stale_after` seconds old, else nothing: a broker that
    cannot be asked keeps the last values for that long, then they are
    omitted rather than shown stale. `close()` closes the connection
    (from the polling thread).
    """

    def __init__(self, parameters, queues, parked=None, stale_after=30.0,
                 clock=time.monotonic):
        self.parameters = parameters
        self.queues = list(queues)
        self.parked = dict(parked or {})
        self.stale_after = stale_after
        self.clock = clock
        self._connection = None
        self._channel = None
        self._lock = threading.Lock()
        self._values = {}       # handler queue -> Depth
        self._read_at = None    # clock() of the last successful poll
        self._failing = False
        # Handler queues the last successful poll did not find (the
        # daemon has not declared them yet).
        self.missing = set(self.queues)

    def snapshot(self):
        """{handler queue: Depth} of the last successful poll, or {} when
        there was none within `stale_after` seconds."""
        with self._lock:
            if self._read_at is None \
                    or self.clock() - self._read_at > self.stale_after:
                return {}
            return dict(self._values)

    def poll(self):
        """Read every queue's depth; return True if the broker answered.
        A queue that does not exist (yet) is left out."""
        try:
            values = self._read()
        except (pika.exceptions.AMQPError, OSError) as e:
            self.close()
            if not self._failing:
                log.warning('Monitor: cannot read the queue depths from the '
                            'broker (%s); retrying.', reason(e))
            self._failing = True
            return False
        if self._failing:
            log.info('Monitor: reading the queue depths again.')
        self._failing = False
        self.missing = set(self.queues) - set(values)
        with self._lock:
            self._values = values
            self._read_at = self.clock()
        return True

    def close(self):
        connection, self._connection, self._channel = (
            self._connection, None, None)
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except (pika.exceptions.AMQPError, OSError):
                pass

    def _read(self):
        values = {}
        for queue in self.queues:
            messages, consumers = self._declare(queue)
            parked = self.parked.get(queue)
            if parked is not None:
                parked = self._declare(parked)[0]
            if messages is not None:
                values[queue] = Depth(messages, consumers, parked)
        return values

    def _declare(self, name):
        """(messages, consumers) of queue `name`, (None, None) if it does
        not exist."""
        if self._channel is None or not self._channel.is_open:
            if self._connection is None or not self._connection.is_open:
                self._connection = self._connect()
            self._channel = self._connection.channel()
        try:
            ok = self._channel.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            self._channel = None
            if e.reply_code == 404:
                return None, None
            raise
        return ok.method.message_count, ok.method.consumer_count

    def _connect(self):
        parameters = self.parameters.pika_parameters()
        for params in parameters:
            params.client_properties = {'connection_name': CONNECTION_NAME}
        return pika.BlockingConnection(parameters)
