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
    """Store every message of a queue as files: the body, and beside
    it a header file with the AMQP properties as JSON (a handler, the
    named `IHandler` utility ``gocept.amqprun.writefiles.QUEUE``; see
    `gocept.amqprun.writefiles`). The files are in place before the
    message is ACKed."""

    queue_name = zope.schema.TextLine(
        title='The queue to consume (declared durable).')
    routing_key = zope.configuration.fields.Tokens(
        title='Routing keys bound to the queue on amq.topic.',
        description='One or more, separated by whitespace.',
        value_type=zope.schema.TextLine())
    directory = zope.configuration.fields.Path(
        title='The directory to write to (created if missing).')
    pattern = zope.schema.TextLine(
        title='string.Template of the body file path below directory.',
        description='Default: ``${routing_key}-${unique}``. Variables: '
        '``date``, ``msgid``, ``routing_key``, ``unique`` (unique in its '
        'directory) and every application header (lower-cased, letters, '
        'digits and _ only); ``{name}`` may be written for ``${name}``. '
        'Slashes make subdirectories.',
        required=False)
    arguments = zope.schema.Text(
        title='Queue arguments, one "key = value" per line.',
        description='Pairs separated by whitespace or newlines; values '
        'are single words. Integers become int, true/false bool (see '
        '`parse_arguments`). Default: none.',
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
    """Publish the files put into a Maildir's ``new/`` (each in a
    transaction of its own; moved to ``cur/`` after the AMQP commit),
    with the header ``X-Filename``; see `gocept.amqprun.readfiles`.
    Needs the extra ``readfiles``."""

    directory = zope.configuration.fields.Path(
        title='The Maildir to read (new/, cur/, tmp/ created if missing).',
        description='Two readfiles for one directory are a configuration '
        'conflict.')
    routing_key = zope.schema.TextLine(
        title='The routing key to publish with on amq.topic.')
    content_type = zope.schema.TextLine(
        title='The content type of the messages.',
        description='Default: ``application/octet-stream``.',
        required=False)
    poll_interval = zope.schema.Float(
        title='Seconds between two looks into new/.',
        description='Default: 1.', required=False, min=0.01)


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
    """Exactly-once SQL effects: record every handled message's id and
    the messages its transaction sends in the handler's own database
    transaction (the `IOutbox` utility, see `gocept.amqprun.outbox`). A
    message whose id is recorded is not handled again; its recorded
    messages are sent again. Needs the extra ``sql``."""

    session = zope.configuration.fields.GlobalObject(
        title='The SQLAlchemy session of the handlers (a scoped_session, '
              'registered with zope.sqlalchemy).',
        description='The dotted name of a callable that returns the '
        "thread's session.")
    queues = zope.configuration.fields.Tokens(
        title='The queues whose handlers use it (default: all).',
        description='Separated by whitespace.',
        value_type=zope.schema.TextLine(), required=False)
    retention = zope.schema.TextLine(
        title='How long handled message ids are kept (90s, 15m, 12h, 7d).',
        description='Default: ``7d``. Older records are deleted, at most '
        'once an hour; a duplicate arriving later is handled again.',
        required=False)
    create_tables = zope.schema.Bool(
        title='Create the tables when the daemon starts.',
        description='Default: true. With false, create them yourself: '
        '``python -m gocept.amqprun.outbox DIALECT`` prints the '
        'statements.',
        required=False)


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
