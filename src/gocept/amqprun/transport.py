"""One system call for all frames buffered on a plaintext connection.

pika's plaintext transport sends each buffered frame with a ``send()`` of
its own; a commit is four frames or more (publish method, header, body,
ack, tx.commit). `batch_writes` makes a connection's transport send what
is buffered with one ``sendmsg()`` instead: fewer system calls and TCP
segments per commit, which shows in the throughput and the CPU per
message of both commit modes (the figures:
docs/explanation/performance.rst).

This replaces a private method of one pika class and reads two of its
private attributes (`REQUIRED`). It applies only where those look exactly
as expected; anywhere else (TLS, another pika) pika's own code runs. The
test suite fails when pika's internals change (tests/test_transport.py),
and setup.py bounds pika's version.
"""

import logging
import socket
import types


log = logging.getLogger(__name__)

CLASS_NAME = '_AsyncPlaintextTransport'
# What a transport must have for `batch_writes` to apply.
REQUIRED = ('_sock', '_tx_buffers', '_tx_buffered_byte_count', '_produce')
MAX_CHUNKS = 512    # below IOV_MAX (1024 on Linux)


def applies(transport):
    """Whether `batch_writes` can take over `transport`'s writes."""
    return (type(transport).__name__ == CLASS_NAME
            and all(hasattr(transport, name) for name in REQUIRED)
            and isinstance(transport._sock, socket.socket))


def batch_writes(connection):
    """Make the plaintext transport of the open pika `connection` send
    its buffered frames with one ``sendmsg()``; return whether it did."""
    transport = getattr(connection, '_transport', None)
    if not applies(transport):
        log.debug('Not batching writes of %r', transport)
        return False
    sock = transport._sock
    buffers = transport._tx_buffers

    def _produce(self):
        while buffers:
            chunks = list(buffers) if len(buffers) <= MAX_CHUNKS else [
                buffers[i] for i in range(MAX_CHUNKS)]
            sent = sock.sendmsg(chunks)
            self._tx_buffered_byte_count -= sent
            while sent:
                chunk = buffers[0]
                if sent >= len(chunk):
                    buffers.popleft()
                    sent -= len(chunk)
                else:
                    buffers[0] = chunk[sent:]
                    sent = 0
    transport._produce = types.MethodType(_produce, transport)
    return True
