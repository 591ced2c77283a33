"""Messages and their headers (AMQP properties)."""

import itertools
import os
import socket
import time
import zope.interface
import gocept.amqprun.interfaces


PROPERTY_NAMES = (
    'content_type', 'content_encoding', 'headers', 'delivery_mode',
    'priority', 'correlation_id', 'reply_to', 'expiration', 'message_id',
    'timestamp', 'type', 'user_id', 'app_id', 'cluster_id')

PERSISTENT = 2

_counter = itertools.count()
_origin = None


def _reset_origin():
    global _origin
    _origin = None


os.register_at_fork(after_in_child=_reset_origin)


def make_message_id():
    """Return a new email-like message-id, unique across hosts,
    processes and threads: ``<time.pid.random.counter@host>`` (pid, random
    part and host fixed per process, the counter per message)."""
    global _origin
    if _origin is None:
        _origin = (f'{os.getpid()}.{os.urandom(4).hex()}',
                   socket.getfqdn())
    process, host = _origin
    return f'<{time.time_ns()}.{process}.{next(_counter)}@{host}>'


class Header:
    """The AMQP properties of a message; unset properties are None.

    `headers` is always a dict (empty when there are none).
    """

    __slots__ = PROPERTY_NAMES

    def __init__(self, **properties):
        for name in PROPERTY_NAMES:
            setattr(self, name, properties.pop(name, None))
        if properties:
            raise TypeError(
                f'Unknown AMQP properties: {", ".join(sorted(properties))}')
        if self.headers is None:
            self.headers = {}

    def as_dict(self):
        """Return the set properties as a dict."""
        return {name: getattr(self, name) for name in PROPERTY_NAMES
                if getattr(self, name) not in (None, {})}

    def __eq__(self, other):
        if not isinstance(other, Header):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __repr__(self):
        return f'<Header {self.as_dict()!r}>'


def make_header(data):
    """Turn a dict into a Header: AMQP property names become properties,
    every other key goes into `headers`. A Header passes unchanged."""
    if isinstance(data, Header):
        return data
    properties = {}
    headers = dict(data.get('headers') or {})
    for key, value in data.items():
        if key == 'headers':
            continue
        if key in PROPERTY_NAMES:
            properties[key] = value
        else:
            headers[key] = value
    return Header(headers=headers, **properties)


@zope.interface.implementer(gocept.amqprun.interfaces.IMessage)
class Message:
    """A message to send, or one received.

    `header` is a dict or a Header. A new message is persistent, has a
    timestamp and an email-like message-id unless `header` says otherwise.
    A str body is encoded with the header's content_encoding (utf-8 if
    unset, which is then recorded in the header).
    """

    exchange = 'amq.topic'

    def __init__(self, header, body, delivery_tag=None, routing_key=None,
                 redelivered=False):
        header = make_header(header)
        if delivery_tag is None:
            # Only defaults for messages to send; a received message keeps
            # what it came with.
            if header.delivery_mode is None:
                header.delivery_mode = PERSISTENT
            if header.timestamp is None:
                header.timestamp = int(time.time())
            if header.message_id is None:
                header.message_id = make_message_id()
        if isinstance(body, str):
            if header.content_encoding is None:
                header.content_encoding = 'utf-8'
            body = body.encode(header.content_encoding)
        elif not isinstance(body, bytes):
            body = bytes(body)
        self.header = header
        self.body = body
        self.delivery_tag = delivery_tag
        self.routing_key = routing_key
        self.redelivered = redelivered

    def __repr__(self):
        return (f'<Message {self.header.message_id} '
                f'routing_key={self.routing_key!r}>')
