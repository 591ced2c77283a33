"""The `parked` command: the operator's tool for parked messages.

::

    server parked list [--queue QUEUE] [--json] CONFIG
    server parked show --id ID [--queue QUEUE] [--body] CONFIG
    server parked replay (--all | --id ID ...) [--queue QUEUE] [--dry-run]
                         CONFIG
    server parked drop (--all | --id ID ...) [--queue QUEUE] CONFIG

loads CONFIG and its ZCML for the broker and the handler queues and works
on their parked queues with `parked.Parked` (which says what each
operation guarantees). The daemon may run meanwhile.

Exit codes: 0 done; 1 an id that is not parked (nothing was changed),
the broker unreachable or the connection lost; 2 the configuration or the
command line is wrong, or the configuration parks without parked queues
(``park reject``, ``error-routing-key``).
"""

import contextlib
import json
import logging
import sys

from gocept.amqprun.interfaces import EXIT_CONFIG
from gocept.amqprun.interfaces import EXIT_FAILURE
from gocept.amqprun.interfaces import EXIT_OK
import gocept.amqprun.cli
import gocept.amqprun.config
import gocept.amqprun.parked
import gocept.amqprun.retry
import gocept.amqprun.server


HELP = 'list, show, replay or drop the parked messages of CONFIG'
DESCRIPTION = '''\
Work on the parked messages of CONFIG's handler queues (QUEUE.parked):
list them, show one, move them back into the queue they failed in
(replay), or delete them (drop). Works while the daemon runs.'''
EPILOG = '''\
exit codes: 0 done, 1 an id that is not parked (nothing changed), the
broker unreachable or the connection lost, 2 the configuration or the
command line is wrong (or CONFIG has no parked queues)

See the documentation, "Operate failures".'''

# Characters of a text body shown by `show` (--body: all of it, raw).
PREVIEW_CHARACTERS = 2000
PREVIEW_BYTES = 64


def add_arguments(parser, config_file=None):
    actions = parser.add_subparsers(
        dest='action', metavar='ACTION', required=True)

    def action(name, help):
        result = actions.add_parser(name, help=help, description=help)
        result.add_argument(
            '--queue', metavar='QUEUE', help='only the messages parked by '
            "this handler queue (default: all of CONFIG's handler queues)")
        return result

    def selection(sub, verb):
        group = sub.add_mutually_exclusive_group(required=True)
        group.add_argument('--all', action='store_true',
                           help=f'{verb} every parked message')
        group.add_argument('--id', dest='ids', metavar='ID',
                           action='append', help=f'{verb} the message with '
                           'this message-id (repeat for more)')

    sub = action('list', 'one line per parked message: message-id, queue, '
                 'when parked, attempts, body size, the first line of the '
                 'error')
    sub.add_argument('--json', action='store_true',
                     help='one JSON object per line instead')
    gocept.amqprun.cli.add_config_argument(sub, config_file)
    sub = action('show', 'one parked message: its headers, the whole error '
                 'with its traceback, a preview of its body')
    sub.add_argument('--id', required=True, metavar='ID',
                     help='the message-id')
    sub.add_argument('--body', action='store_true',
                     help='write the raw body to stdout, nothing else')
    gocept.amqprun.cli.add_config_argument(sub, config_file)
    sub = action('replay', 'move parked messages back into the queue they '
                 'failed in, their failure counts reset')
    selection(sub, 'replay')
    sub.add_argument('--dry-run', action='store_true',
                     help='only say what would be replayed')
    gocept.amqprun.cli.add_config_argument(sub, config_file)
    sub = action('drop', 'delete parked messages')
    selection(sub, 'drop')
    gocept.amqprun.cli.add_config_argument(sub, config_file)


def run(options, out=None):
    out = out or sys.stdout

    def say(text=''):
        print(text, file=out, flush=True)
    config = gocept.amqprun.config.load(options.config)
    queues = sorted(gocept.amqprun.server.collect_handlers())
    missing = no_parked_queues(config.retry_policy)
    if missing:
        say(f'ERROR: {options.config}: {missing}')
        return EXIT_CONFIG
    if options.queue is not None and options.queue not in queues:
        say(f'ERROR: {options.queue!r} is not a handler queue of '
            f'{options.config} (its handler queues: '
            f'{", ".join(queues) or "none"})')
        return EXIT_CONFIG
    with quiet_pika(), gocept.amqprun.parked.Parked(
            config.parameters, queues) as parked:
        try:
            return ACTIONS[options.action](parked, options, say, out)
        except gocept.amqprun.parked.NotParked as e:
            say(f'ERROR: {e}; nothing was changed.')
        except gocept.amqprun.parked.Interrupted as e:
            for message in e.done:
                say(done_line(e.action, message))
            say(f'ERROR: {e}')
        return EXIT_FAILURE


def no_parked_queues(policy):
    """Why a configuration with retry `policy` parks in no queue (None
    when it parks in ``QUEUE.parked``)."""
    if policy.error_routing_key:
        return ('failed messages are parked by publishing them to amq.topic '
                f'with the routing key {policy.error_routing_key!r} '
                '(error-routing-key): there is no parked queue to work on')
    if policy.park != 'queue':
        return ('failed messages are rejected to their queue\'s '
                'dead-letter exchange (park reject): there is no parked '
                'queue to work on')
    return None


@contextlib.contextmanager
def quiet_pika():
    """pika logs a failed connection attempt with tracebacks; the command
    says why in one line."""
    logger = logging.getLogger('pika')
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def when(message):
    if message.parked_at is None:
        return '-'
    return message.parked_at.isoformat(timespec='seconds')


def list_(parked, options, say, out):
    messages = parked.list(options.queue)
    for message in messages:
        if options.json:
            say(json.dumps(message.as_dict(), sort_keys=True))
        else:
            say(f'{message.message_id or "-"}  {message.queue}  '
                f'{when(message)}  '
                f'{message.attempts} attempt(s)  {message.size} bytes  '
                f'{message.error_line or "-"}')
    print(f'{len(messages)} parked message(s).', file=sys.stderr)
    return EXIT_OK


def show(parked, options, say, out):
    message = parked.show(options.id, options.queue)
    if options.body:
        out.flush()
        buffer = getattr(out, 'buffer', None)
        if buffer is None:
            out.write(message.body.decode('latin-1'))
        else:
            buffer.write(message.body)
            buffer.flush()
        return EXIT_OK
    header = message.header
    say(f'Message-ID:  {message.message_id}')
    say(f'Queue:       {message.queue} (parked in '
        f'{gocept.amqprun.retry.parked_queue(message.queue)})')
    say(f'Parked at:   {when(message)}')
    say(f'Attempts:    {message.attempts} (unsettled returns: '
        f'{message.unsettled}, replays before: {message.replays})')
    say(f'Routing key: {message.routing_key or "-"}')
    say('Properties:')
    for name, value in sorted(header.as_dict().items()):
        if name != 'headers':
            say(f'  {name}: {value}')
    say('Headers:')
    for name, value in sorted(header.headers.items()):
        if name not in (gocept.amqprun.retry.ERROR,
                        gocept.amqprun.retry.TRACEBACK):
            say(f'  {name}: {gocept.amqprun.parked.jsonable(value)}')
    say('Error:')
    for line in (message.error or '(none recorded)').splitlines():
        say(f'  {line}'.rstrip())
    say(f'Body ({message.size} bytes):')
    for line in preview(message.body, header.content_encoding).splitlines():
        say(f'  {line}'.rstrip())
    return EXIT_OK


def preview(body, encoding=None):
    """A safe look at `body`: printable text up to PREVIEW_CHARACTERS,
    else a note with its first bytes in hex."""
    try:
        text = body.decode(encoding or 'utf-8')
    except (UnicodeDecodeError, LookupError):
        text = None
    if text is not None and all(
            c.isprintable() or c in '\n\r\t' for c in text):
        if len(text) <= PREVIEW_CHARACTERS:
            return text
        return (text[:PREVIEW_CHARACTERS] + '\n... ('
                f'{len(text) - PREVIEW_CHARACTERS} more characters; '
                '--body writes all of it)')
    head = body[:PREVIEW_BYTES].hex(' ')
    return (f'(binary, {len(body)} bytes; the first '
            f'{min(len(body), PREVIEW_BYTES)} in hex; --body writes all '
            f'of it)\n{head}')


def done_line(action, message, dry_run=False):
    if action == gocept.amqprun.parked.REPLAY:
        verb = 'would replay' if dry_run else 'replayed'
        return (f'{verb} {message.message_id} to {message.queue} '
                f'(routing key {message.routing_key or "-"})')
    return (f'dropped {message.message_id} from '
            f'{gocept.amqprun.retry.parked_queue(message.queue)}')


def replay(parked, options, say, out):
    messages = parked.replay(None if options.all else options.ids,
                             options.queue, options.dry_run)
    for message in messages:
        say(done_line(gocept.amqprun.parked.REPLAY, message,
                      options.dry_run))
    if options.dry_run:
        say(f'Dry run: {len(messages)} message(s) would be replayed; '
            'nothing was changed.')
    else:
        say(f'{len(messages)} message(s) replayed.')
    return EXIT_OK


def drop(parked, options, say, out):
    messages = parked.drop(None if options.all else options.ids,
                           options.queue)
    for message in messages:
        say(done_line(gocept.amqprun.parked.DROP, message))
    say(f'{len(messages)} message(s) dropped.')
    return EXIT_OK


ACTIONS = {'list': list_, 'show': show, 'replay': replay, 'drop': drop}


def main(args=None, prog='python -m gocept.amqprun'):
    """Command line entry (``parked`` and its `args`); returns the exit
    code."""
    return gocept.amqprun.cli.run_command(
        'parked', sys.argv[1:] if args is None else args, prog)
