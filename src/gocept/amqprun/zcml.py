"""The ZCML directives of the ``http://namespaces.gocept.com/amqp``
namespace: ``writefiles``, ``readfiles`` and ``outbox``."""

import re

import zope.component.zcml
import zope.configuration.exceptions
import zope.configuration.fields
import zope.interface
import zope.schema

import gocept.amqprun.interfaces
import gocept.amqprun.writefiles


def parse_arguments(text):
    """Queue arguments from ``key = value`` (or ``key: value``) pairs.

    Pairs are separated by whitespace (an XML parser turns the newlines
    of an attribute into spaces), so values cannot contain whitespace.
    Integers become int, ``true``/``false`` bool, everything else stays a
    string. Raises ValueError on text that is not such pairs.
    """
    arguments = {}
    text = (text or '').strip()
    position = 0
    for match in _argument.finditer(text):
        if text[position:match.start()].strip():
            break
        key, value = match.groups()
        if re.fullmatch(r'[+-]?\d+', value):
            value = int(value)
        elif value.lower() in ('true', 'false'):
            value = value.lower() == 'true'
        arguments[key] = value
        position = match.end()
    if text[position:].strip():
        raise ValueError(
            f'Invalid queue arguments {text!r} at {text[position:]!r}: '
            'expected "key = value" pairs.')
    return arguments or None


_argument = re.compile(r'([^\s=:]+)\s*[=:]\s*(\S+)')


class IWriteFilesDirective(zope.interface.Interface):

    queue_name = zope.schema.TextLine(
        title='The queue to consume (declared durable).')
    routing_key = zope.configuration.fields.Tokens(
        title='Routing keys bound to the queue on amq.topic.',
        value_type=zope.schema.TextLine())
    directory = zope.configuration.fields.Path(
        title='The directory to write to (created if missing).')
    pattern = zope.schema.TextLine(
        title='string.Template of the body file path below directory.',
        required=False)
    arguments = zope.schema.Text(
        title='Queue arguments, one "key = value" per line.',
        required=False)


def writefiles(_context, queue_name, routing_key, directory, pattern=None,
               arguments=None):
    try:
        writer = gocept.amqprun.writefiles.FileWriter(
            queue_name, routing_key, directory,
            pattern or gocept.amqprun.writefiles.DEFAULT_PATTERN,
            parse_arguments(arguments))
    except ValueError as e:
        raise zope.configuration.exceptions.ConfigurationError(
            str(e)) from None
    provides = gocept.amqprun.interfaces.IHandler
    name = f'gocept.amqprun.writefiles.{queue_name}'
    _context.action(
        discriminator=('utility', provides, name),
        callable=zope.component.zcml.handler,
        args=('registerUtility', writer, provides, name, _context.info))


class IReadFilesDirective(zope.interface.Interface):

    directory = zope.configuration.fields.Path(
        title='The Maildir to read (new/, cur/, tmp/ created if missing).')
    routing_key = zope.schema.TextLine(
        title='The routing key to publish with on amq.topic.')
    content_type = zope.schema.TextLine(
        title='The content type of the messages.', required=False)
    poll_interval = zope.schema.Float(
        title='Seconds between two looks into new/.', required=False,
        min=0.01)


def readfiles(_context, directory, routing_key, content_type=None,
              poll_interval=None):
    # Imported here: gocept.filestore is the optional `readfiles` extra.
    import gocept.amqprun.readfiles
    reader = gocept.amqprun.readfiles.FileReader(
        directory, routing_key,
        content_type or gocept.amqprun.readfiles.DEFAULT_CONTENT_TYPE,
        1.0 if poll_interval is None else poll_interval)
    for method, event in (
            (reader.start, gocept.amqprun.interfaces.IProcessStarted),
            (reader.stop, gocept.amqprun.interfaces.IProcessStopping)):
        _context.action(
            discriminator=None,
            callable=zope.component.zcml.handler,
            args=('registerHandler', method, (event,), '', _context.info))
    _context.action(
        discriminator=('gocept.amqprun:readfiles', reader.directory),
        callable=lambda: None)


class IOutboxDirective(zope.interface.Interface):

    session = zope.configuration.fields.GlobalObject(
        title='The SQLAlchemy session of the handlers (a scoped_session, '
              'registered with zope.sqlalchemy).')
    queues = zope.configuration.fields.Tokens(
        title='The queues whose handlers use it (default: all).',
        value_type=zope.schema.TextLine(), required=False)
    retention = zope.schema.TextLine(
        title='How long handled message ids are kept (90s, 15m, 12h, 7d).',
        required=False)
    create_tables = zope.schema.Bool(
        title='Create the tables when the daemon starts.', required=False)


def outbox(_context, session, queues=None, retention=None,
           create_tables=True):
    # Imported here: SQLAlchemy and zope.sqlalchemy are the `sql` extra.
    import gocept.amqprun.outbox
    try:
        component = gocept.amqprun.outbox.Outbox(
            session, queues=queues or None, create=create_tables,
            retention=gocept.amqprun.outbox.parse_duration(
                retention or '7d'))
    except ValueError as e:
        raise zope.configuration.exceptions.ConfigurationError(
            str(e)) from None
    provides = gocept.amqprun.interfaces.IOutbox
    _context.action(
        discriminator=('utility', provides, ''),
        callable=zope.component.zcml.handler,
        args=('registerUtility', component, provides, '', _context.info))
