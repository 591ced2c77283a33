"""The `check` command: does a configuration agree with the broker?

``server check CONFIG`` (or ``server --check CONFIG``)
loads the ZConfig file and the ZCML it names, lists the handlers (queue,
routing keys, arguments, principal, where they were registered), reports
queues consumed by more than one handler, then connects to the broker and
compares every queue the daemon would declare with the live one: missing,
or existing with other arguments. Nothing on the broker is changed.

Exit codes: 0 when everything agrees, 1 when a problem was found (or the
broker cannot be reached), 2 when the configuration cannot be loaded or
the command line is wrong.
"""

import collections
import logging
import sys

import zope.component

from gocept.amqprun.interfaces import EXIT_CONFIG
from gocept.amqprun.interfaces import EXIT_FAILURE
from gocept.amqprun.interfaces import EXIT_OK
import gocept.amqprun.cli
import gocept.amqprun.config
import gocept.amqprun.errors
import gocept.amqprun.handler
import gocept.amqprun.inspection
import gocept.amqprun.interfaces
import gocept.amqprun.monitor
import gocept.amqprun.server
import gocept.amqprun.topology


class Registration:
    """A handler as registered: its utility name, the handler and where
    the registration was made (file and line, if known)."""

    def __init__(self, name, handler, info):
        self.name = name
        self.handler = handler
        self.info = _where(info)


def _where(info):
    """The first line of a zope.configuration ParserInfo
    (``File "...", line 3.2-3.60``), or ''."""
    text = str(info or '').strip()
    return text.splitlines()[0] if text else ''


def registrations():
    """The IHandler registrations of the global registry, by name."""
    result = []
    for reg in zope.component.getGlobalSiteManager().registeredUtilities():
        if reg.provided.isOrExtends(gocept.amqprun.interfaces.IHandler):
            result.append(Registration(reg.name, reg.component, reg.info))
    return sorted(result, key=lambda r: r.name)


def duplicates(regs):
    """{queue name: [registrations]} for queues with several handlers."""
    by_queue = collections.defaultdict(list)
    for reg in regs:
        by_queue[reg.handler.queue_name].append(reg)
    return {queue: regs for queue, regs in by_queue.items()
            if len(regs) > 1}


def check(config_file, connect=True, out=None):
    """Run the check, printing to `out`; return the exit code."""
    def say(text=''):
        print(text, file=out or sys.stdout)

    try:
        config = gocept.amqprun.config.load(config_file)
    except gocept.amqprun.config.ConfigError as e:
        say(f'ERROR: {e}')
        return EXIT_CONFIG
    problems = 0
    regs = registrations()
    say(f'Configuration: {config_file}')
    say(f'Component configuration: '
        f'{config.worker.component_configuration}')
    if config.monitor is not None:
        host, port = config.monitor.address
        token = ('token-file given' if config.monitor.token
                 else 'no token-file: POST refused')
        say(f'Monitor: {host or "*"}:{port} '
            f'({gocept.amqprun.monitor.paths()}; {token})')
    say(f'Handlers: {len(regs)}')
    for reg in regs:
        h = reg.handler
        say(f'  {reg.name}')
        if reg.info:
            say(f'    registered: {reg.info}')
        say(f'    queue: {h.queue_name}')
        keys = gocept.amqprun.handler.routing_keys(h)
        say(f'    routing keys: {", ".join(keys) or "-"}')
        say(f'    arguments: {h.arguments or "-"}')
        say(f'    principal: {h.principal or "-"}')
    for queue, regs_ in sorted(duplicates(regs).items()):
        problems += 1
        say(f'ERROR: queue {queue!r} is consumed by '
            f'{len(regs_)} handlers:')
        for reg in regs_:
            say(f'    {reg.name} ({reg.info or "registered in Python"})')
    if problems:
        say(f'{problems} problem(s).')
        return EXIT_FAILURE
    parameters = gocept.amqprun.config.parameters_from(config)
    # The queues exactly as the daemon would declare them (handlers'
    # queues and the retry policy's auxiliary queues).
    queues = gocept.amqprun.topology.queues_for(
        gocept.amqprun.server.collect_handlers().values(),
        config.retry_policy)
    if not connect:
        say('Broker not contacted (--no-connect).')
        say('OK.')
        return EXIT_OK
    say(f'Broker: {parameters.describe()}')
    # pika logs connection failures with tracebacks; the check reports.
    pika_log = logging.getLogger('pika')
    level = pika_log.level
    pika_log.setLevel(logging.CRITICAL)
    try:
        states = gocept.amqprun.inspection.inspect_queues(
            parameters, queues)
    except gocept.amqprun.errors.ConnectionFailed as e:
        say(f'ERROR: {e}')
        return EXIT_FAILURE
    finally:
        pika_log.setLevel(level)
    for state in states:
        name = state.queue.name
        if state.status == 'ok':
            say(f'  {name}: ok ({state.messages} message(s), '
                f'{state.consumers} consumer(s))')
        elif state.status == 'missing':
            problems += 1
            say(f'  ERROR: {name}: missing on the broker (the daemon '
                'would create it)')
        else:
            problems += 1
            say(f'  ERROR: {name}: differs from the declaration with '
                f'arguments {state.queue.arguments or {}}: {state.detail}')
    if problems:
        say(f'{problems} problem(s).')
        return EXIT_FAILURE
    say('OK.')
    return EXIT_OK


HELP = 'list the handlers of CONFIG, compare their queues with the broker'
DESCRIPTION = ('Load CONFIG and its ZCML, list the handlers and compare '
               'their queues with the broker. Changes nothing.')
EPILOG = ('exit codes: 0 everything agrees, 1 problems found or the '
          'broker unreachable, 2 the configuration or the command line is '
          'wrong')


def add_arguments(parser, config_file=None):
    gocept.amqprun.cli.add_config_argument(parser, config_file)
    parser.add_argument(
        '--no-connect', dest='connect', action='store_false',
        help='only load and list, do not contact the broker')


def run(options):
    return check(options.config, options.connect)


def main(args=None, prog='python -m gocept.amqprun'):
    """Command line entry (``check`` and its `args`); returns the exit
    code."""
    return gocept.amqprun.cli.run_command(
        'check', sys.argv[1:] if args is None else args, prog)
