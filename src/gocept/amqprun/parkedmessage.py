"""A parked message as read from its parked queue (`ParkedMessage`),
and the header it is replayed with. Used by `parked`."""

import datetime

from gocept.amqprun.retry import ATTEMPTS
from gocept.amqprun.retry import DELIVERY_COUNT
from gocept.amqprun.retry import ERROR
from gocept.amqprun.retry import EXPIRATION
from gocept.amqprun.retry import LEGACY_PREFIX
from gocept.amqprun.retry import PARKED_AT
from gocept.amqprun.retry import QUEUE
from gocept.amqprun.retry import ROUTING_KEY
from gocept.amqprun.retry import TRACEBACK
from gocept.amqprun.retry import UNSETTLED
import gocept.amqprun.message
import gocept.amqprun.retry

# Counts the replays of a message (kept through later failures).
REPLAYS = 'amqprun-replays'
# Removed from a replayed message: the failure counters and the records
# of its parking (current and legacy names), the broker's count.
RESET = frozenset(
    name for base in (ATTEMPTS, UNSETTLED, EXPIRATION, ERROR, QUEUE,
                      PARKED_AT, TRACEBACK)
    for name in (base, LEGACY_PREFIX + base)) | {DELIVERY_COUNT}


def _text(value):
    if isinstance(value, bytes):
        return value.decode('utf-8', 'replace')
    return None if value is None else str(value)


def _time(value):
    """An aware datetime of an ISO 8601 text, or None."""
    try:
        result = datetime.datetime.fromisoformat(_text(value))
    except (TypeError, ValueError):
        return None
    if result.tzinfo is None:
        result = result.replace(tzinfo=datetime.timezone.utc)
    return result


def jsonable(value):
    """`value` (a header value) made of JSON types only."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode('utf-8', 'replace')
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if value is None or isinstance(value, (bool, str, float)):
        return value
    if isinstance(value, int):
        return int(value)
    return str(value)


class ParkedMessage:
    """One parked message, as read from its parked queue.

    message_id; queue: the handler queue it failed in (whose parked queue
    holds it); parked_at: when (an aware datetime, None if not recorded);
    attempts: failed handlings counted; unsettled: unsettled returns
    counted; replays: times it was replayed before; error: the whole
    recorded error (class and text, then the traceback if recorded);
    size: bytes of the body; header: `message.Header`; body: bytes;
    routing_key: the one it first arrived with; redelivered: the broker's
    flag when it was read (True only after a tool lost its connection
    holding it); delivery_count: a quorum queue's ``x-delivery-count``
    when it was read (None for classic queues).
    """

    def __init__(self, queue, header, body, redelivered=False):
        headers = header.headers
        self.queue = queue
        self.header = header
        self.body = body
        self.redelivered = redelivered
        self.message_id = header.message_id
        self.routing_key = _text(
            gocept.amqprun.retry.header(headers, ROUTING_KEY))
        self.attempts = gocept.amqprun.retry.attempts(header)
        self.unsettled = gocept.amqprun.retry.unsettled(header)
        try:
            self.replays = int(headers.get(REPLAYS) or 0)
        except (TypeError, ValueError):
            self.replays = 0
        self.parked_at = _time(
            gocept.amqprun.retry.header(headers, PARKED_AT))
        count = headers.get(DELIVERY_COUNT)
        self.delivery_count = None if count is None else int(count)
        error = _text(gocept.amqprun.retry.header(headers, ERROR)) or ''
        trace = _text(gocept.amqprun.retry.header(headers, TRACEBACK))
        if trace:
            error = f'{error}\n\n{trace}' if error else trace
        self.error = error
        self.size = len(body)

    def __repr__(self):
        return f'<ParkedMessage {self.message_id} of {self.queue!r}>'

    @property
    def error_line(self):
        """The first line of the error ('' if none was recorded)."""
        return self.error.split('\n', 1)[0]

    def as_dict(self):
        """What describes the message, in JSON types (not the body)."""
        return dict(
            message_id=self.message_id, queue=self.queue,
            routing_key=self.routing_key,
            parked_at=self.parked_at.isoformat() if self.parked_at else None,
            attempts=self.attempts, unsettled=self.unsettled,
            replays=self.replays, error=self.error,
            error_line=self.error_line, size=self.size,
            content_type=self.header.content_type,
            redelivered=self.redelivered,
            delivery_count=self.delivery_count,
            headers=jsonable(self.header.headers))

    def replay_header(self):
        """The `message.Header` it is replayed with: as it arrived, with
        the failure counters reset, the records of its parking removed,
        the original routing key kept and `REPLAYS` counted."""
        data = self.header.as_dict()
        headers = {k: v for k, v in self.header.headers.items()
                   if k not in RESET and k != LEGACY_PREFIX + ROUTING_KEY}
        if self.routing_key:
            headers[ROUTING_KEY] = self.routing_key
        headers[REPLAYS] = self.replays + 1
        data['headers'] = headers
        return gocept.amqprun.message.Header(**data)
