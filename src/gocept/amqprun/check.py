"""The `check` command: does a configuration agree with the broker?

``server check CONFIG`` (or ``server --check CONFIG``)
loads the ZConfig file and the ZCML it names, lists the handlers (queue,
routing keys, arguments, principal, where they were registered), reports
queues consumed by more than one handler, then connects to the broker and
compares every queue the daemon would declare with the live one, and
looks for the exchanges those queues depend on. Nothing on the broker is
changed.

What it finds:

- a queue that does not exist yet: the daemon creates it (and its
  bindings) when it starts -- reported, not a problem;
- a queue that exists with other arguments (the daemon would not start),
  a missing exchange (``amq.topic``, or a queue's
  ``x-dead-letter-exchange``), an unreachable broker, two handlers on one
  queue: problems;
- messages waiting in a ``.parked`` queue: a warning.

Exit codes: 0 when there is no problem (warnings allowed), 1 when there
is one (or the broker cannot be reached), 2 when the configuration cannot
be loaded or the command line is wrong.
"""

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
import gocept.amqprun.retry
import gocept.amqprun.monitor
import gocept.amqprun.server
import gocept.amqprun.topology


# The exchange every handler queue is bound to (and replies go to).
TOPIC = 'amq.topic'


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
    """{queue name: [registrations]} for queues with several handlers
    (as the daemon finds them: `server.duplicate_queues`)."""
    by_name = {reg.name: reg for reg in regs}
    found = gocept.amqprun.server.duplicate_queues(
        (reg.name, reg.handler) for reg in regs)
    return {queue: [by_name[name] for name in names]
            for queue, names in found.items()}


class Report:
    """The check's output (to `out`, default stdout) with its problems
    and warnings counted."""

    def __init__(self, out=None):
        self.out = out
        self.problems = 0
        self.warnings = 0

    def say(self, text=''):
        print(text, file=self.out or sys.stdout)

    def problem(self, text, indent='  '):
        self.problems += 1
        self.say(f'{indent}ERROR: {text}')

    def warning(self, text, indent='  '):
        self.warnings += 1
        self.say(f'{indent}WARNING: {text}')

    def result(self):
        """Say the summary; return the exit code."""
        if self.problems:
            self.say(f'{self.problems} problem(s).')
            return EXIT_FAILURE
        if self.warnings:
            self.say(f'{self.warnings} warning(s).')
        self.say('OK.')
        return EXIT_OK


def describe(config, config_file, regs, report):
    """List the configuration's files, monitor and handlers."""
    say = report.say
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


def report_duplicates(regs, report):
    """A problem for every queue that several handlers consume."""
    for queue, regs_ in sorted(duplicates(regs).items()):
        report.problem(f'queue {queue!r} is consumed by {len(regs_)} '
                       'handlers:', indent='')
        for reg in regs_:
            where = reg.info or 'registered in Python'
            report.say(f'    {reg.name} ({where})')


def exchanges_for(queues):
    """{exchange: why the daemon needs it} for `queues`: amq.topic and
    every queue's ``x-dead-letter-exchange`` (but the default one)."""
    result = {TOPIC: 'the handler queues are bound to it'}
    for queue in queues:
        name = (queue.arguments or {}).get('x-dead-letter-exchange')
        if name and name not in result:
            result[name] = (f'the x-dead-letter-exchange of queue '
                            f'{queue.name!r}')
    return result


def compare_with_broker(config, report):
    """Compare the queues the daemon would declare (handlers' queues and
    the retry policy's auxiliary queues) and the exchanges they need with
    the broker."""
    parameters = gocept.amqprun.config.parameters_from(config)
    handlers = gocept.amqprun.server.collect_handlers()
    queues = gocept.amqprun.topology.queues_for(
        handlers.values(), config.retry_policy)
    exchanges = exchanges_for(queues)
    report.say(f'Broker: {parameters.describe()}')
    # pika logs connection failures with tracebacks; the check reports.
    pika_log = logging.getLogger('pika')
    level = pika_log.level
    pika_log.setLevel(logging.CRITICAL)
    try:
        states, exchange_problems = gocept.amqprun.inspection.inspect(
            parameters, queues, exchanges)
    except gocept.amqprun.errors.ConnectionFailed as e:
        report.problem(str(e), indent='')
        return
    finally:
        pika_log.setLevel(level)
    for name, why in exchanges.items():
        if exchange_problems[name] is None:
            report.say(f'  exchange {name}: ok')
        else:
            report.problem(
                f'exchange {name!r} {exchange_problems[name]} ({why})')
    parked = {gocept.amqprun.retry.parked_queue(name) for name in handlers}
    for state in states:
        report_queue(state, state.queue.name in parked, report)


def report_queue(state, parked, report):
    """Say what `state` (an inspection.QueueState) means; `parked`: it
    is a queue of parked messages."""
    name, queue = state.queue.name, state.queue
    if state.status == 'missing':
        bound = (f' and bound to {TOPIC} with '
                 f'{", ".join(queue.routing_keys)}' if queue.routing_keys
                 else '')
        report.say(f'  {name}: will be created{bound} when the daemon '
                   'starts')
    elif state.status == 'different':
        report.problem(f'{name}: differs from the declaration with '
                       f'arguments {queue.arguments or {}}: {state.detail}')
    else:
        report.say(f'  {name}: ok ({state.messages} message(s), '
                   f'{state.consumers} consumer(s))')
        if parked and state.messages:
            report.warning(f'{name}: {state.messages} parked message(s) '
                           'wait (they failed for the last time; see '
                           '"server parked list CONFIG")')


def check(config_file, connect=True, out=None):
    """Run the check, printing to `out`; return the exit code."""
    report = Report(out)
    try:
        config = gocept.amqprun.config.load(config_file)
    except gocept.amqprun.config.ConfigError as e:
        report.say(f'ERROR: {e}')
        return EXIT_CONFIG
    regs = registrations()
    describe(config, config_file, regs, report)
    report_duplicates(regs, report)
    if report.problems:
        return report.result()
    if connect:
        compare_with_broker(config, report)
    else:
        report.say('Broker not contacted (--no-connect).')
    return report.result()


HELP = 'list the handlers of CONFIG, compare their queues with the broker'
DESCRIPTION = ('Load CONFIG and its ZCML, list the handlers and compare '
               'their queues and exchanges with the broker. Queues that do '
               'not exist yet are created by the daemon when it starts. '
               'Changes nothing.')
EPILOG = ('exit codes: 0 nothing wrong (warnings, e.g. parked messages, '
          'allowed), 1 problems found or the broker unreachable, 2 the '
          'configuration or the command line is wrong')


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
