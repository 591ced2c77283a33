"""AMQP 0-9-1 frames on the wire, and rules that pick one to cut at.

Used by `proxy.AMQPProxy`. A method is named by its (class id, method id)
pair, as in the constants below; a direction is `TO_BROKER` or
`TO_CLIENT`.
"""

import struct
import threading


TO_BROKER = 'to_broker'
TO_CLIENT = 'to_client'

TX_SELECT = (90, 10)
TX_SELECT_OK = (90, 11)
TX_COMMIT = (90, 20)
TX_COMMIT_OK = (90, 21)
TX_ROLLBACK = (90, 30)
TX_ROLLBACK_OK = (90, 31)
BASIC_PUBLISH = (60, 40)
BASIC_DELIVER = (60, 60)
BASIC_GET_OK = (60, 71)
BASIC_ACK = (60, 80)
BASIC_REJECT = (60, 90)
BASIC_NACK = (60, 120)
CONFIRM_SELECT = (85, 10)
CONFIRM_SELECT_OK = (85, 11)

_PROTOCOL_HEADER = b'AMQP\x00\x00\x09\x01'
_METHOD_FRAME = 1
_FRAME_TYPES = frozenset({1, 2, 3, 8})   # method, header, body, heartbeat
_FRAME_END = 0xCE
_FRAME_HEAD = struct.Struct('>BHI')     # type, channel, payload size
_METHOD_ID = struct.Struct('>HH')       # class id, method id


class FrameReader:
    """Splits one direction of an AMQP 0-9-1 connection into frames.

    `feed(data)` takes the bytes as they were read and returns the units
    completed by them, in order, as (bytes, channel, method): method is
    (class id, method id) for a method frame, else None; channel is None
    for the protocol header, which starts the stream if `header` is true
    (client to broker). A partial frame waits for the rest. Concatenated,
    the units are exactly the bytes fed so far (but for a partial frame).

    Bytes that are not AMQP 0-9-1 framing (another protocol header, an
    unknown frame type, a wrong frame end) turn the reader `opaque`: from
    there on everything is returned as it comes, unparsed, so that a proxy
    stays transparent to what it does not understand.
    """

    def __init__(self, header=False):
        self.opaque = False
        self._header = header
        self._buffer = bytearray()

    def feed(self, data):
        buffer = self._buffer
        buffer += data
        units = []
        if self._header:
            if len(buffer) < len(_PROTOCOL_HEADER):
                return units
            self._header = False
            units.append((self._take(len(_PROTOCOL_HEADER)), None, None))
            self.opaque = units[0][0] != _PROTOCOL_HEADER
        while not self.opaque and len(buffer) >= _FRAME_HEAD.size:
            kind, channel, size = _FRAME_HEAD.unpack_from(buffer)
            end = _FRAME_HEAD.size + size
            if kind not in _FRAME_TYPES or (
                    len(buffer) > end and buffer[end] != _FRAME_END):
                self.opaque = True
            elif len(buffer) > end:
                method = None
                if kind == _METHOD_FRAME and size >= _METHOD_ID.size:
                    method = _METHOD_ID.unpack_from(buffer, _FRAME_HEAD.size)
                units.append((self._take(end + 1), channel, method))
            else:
                break
        if self.opaque and buffer:
            units.append((self._take(len(buffer)), None, None))
        return units

    def _take(self, size):
        unit = bytes(self._buffer[:size])
        del self._buffer[:size]
        return unit


class Rule:
    """A fault armed on an `AMQPProxy`: cut a connection at a method frame.

    It matches method frames of one of `methods` ((class id, method id)
    pairs), going in `direction` (TO_BROKER, TO_CLIENT or None for both)
    on `channel` (None for any), on any connection of the proxy. It fires
    once, at the `nth` frame it matched since it was armed: with
    ``cut='before'`` that frame is dropped, with ``cut='after'`` it is
    passed on; the frames before it in its direction are passed on, then
    its connection is reset (TCP RST to both sides).

    `fired` (a threading.Event) is set once the connection was reset;
    `hit` is then (direction, channel, method) of the frame it fired at.
    """

    def __init__(self, methods, nth=1, cut='before', direction=None,
                 channel=None):
        methods = tuple(methods)
        if not methods or not all(
                isinstance(m, tuple) and len(m) == 2 for m in methods):
            raise TypeError(
                f'methods must be (class id, method id) pairs: {methods!r}')
        if cut not in ('before', 'after'):
            raise ValueError(f"cut must be 'before' or 'after': {cut!r}")
        if direction not in (None, TO_BROKER, TO_CLIENT):
            raise ValueError(f'unknown direction: {direction!r}')
        if nth < 1:
            raise ValueError(f'nth must be at least 1: {nth!r}')
        self.methods = frozenset(methods)
        self.nth = nth
        self.cut = cut
        self.direction = direction
        self.channel = channel
        self.matched = 0
        self.hit = None
        self.fired = threading.Event()

    def __repr__(self):
        methods = ', '.join(map(str, sorted(self.methods)))
        return (f'<Rule cut {self.cut} #{self.nth} of {methods}'
                f' {self.direction or "either way"}'
                f' matched={self.matched} fired={self.fired.is_set()}>')

    def match(self, direction, channel, method):
        """Count a method frame if it matches; true if the rule fires at
        it. (Called by the proxy only.)"""
        if method not in self.methods \
                or self.direction not in (None, direction) \
                or self.channel not in (None, channel):
            return False
        self.matched += 1
        if self.matched < self.nth:
            return False
        self.hit = (direction, channel, method)
        return True
