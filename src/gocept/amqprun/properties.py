"""Between `message.Header` and pika's `BasicProperties` (and bytes).

The AMQP layer converts at its edge so that handlers and application
code never see a pika object.
"""

import pika

import gocept.amqprun.message


def header_from(properties):
    """A `message.Header` with the values of pika `properties`."""
    header = gocept.amqprun.message.Header.__new__(
        gocept.amqprun.message.Header)
    for name in gocept.amqprun.message.PROPERTY_NAMES:
        setattr(header, name, getattr(properties, name))
    if header.headers is None:
        header.headers = {}
    return header


def properties_from(header):
    """pika BasicProperties with the set values of `header`."""
    properties = pika.BasicProperties()
    for name in gocept.amqprun.message.PROPERTY_NAMES:
        value = getattr(header, name)
        if value is not None:
            setattr(properties, name, value)
    if not header.headers:
        properties.headers = None
    return properties


def encode(header):
    """`header` as the bytes AMQP carries it in (its properties as in a
    content header frame): a lossless way to store a Header."""
    return b''.join(properties_from(header).encode())


def decode(data):
    """The Header that `encode` made `data` of."""
    properties = pika.BasicProperties()
    properties.decode(data)
    return header_from(properties)
