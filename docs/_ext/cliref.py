"""The command line's reference, generated from its argparse parsers.

``.. amqprun-commands::`` renders the ``--help`` of the daemon form
(`gocept.amqprun.main.parser`), of every subcommand in
`gocept.amqprun.cli.COMMANDS` (`gocept.amqprun.cli.command_parser`) and
of every action of a subcommand that has actions (``server parked
list``, ...), at a fixed width of 79 columns.

Objects: ``command`` (``:command:`server parked replay```).
"""

import argparse
import contextlib
import os

import gocept.amqprun.cli
import gocept.amqprun.main

from generated import GeneratedDirective
from generated import add_object_type


WIDTH = 79


@contextlib.contextmanager
def columns(width):
    """argparse wraps to $COLUMNS (else the terminal's width)."""
    old = os.environ.get('COLUMNS')
    os.environ['COLUMNS'] = str(width)
    try:
        yield
    finally:
        if old is None:
            del os.environ['COLUMNS']
        else:
            os.environ['COLUMNS'] = old


def actions(parser):
    """The (name, parser) of the actions of `parser`'s subparsers."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def parsers():
    """(name, parser) of every command: ``server``, ``server check``,
    ..., ``server parked list``, ..."""
    yield 'server', gocept.amqprun.main.parser()
    for name in gocept.amqprun.cli.COMMANDS:
        parser = gocept.amqprun.cli.command_parser(name)
        yield f'server {name}', parser
        for action, subparser in actions(parser):
            yield f'server {name} {action}', subparser


def help_lines(name, parser):
    with columns(WIDTH):
        text = parser.format_help()
    lines = [f'.. command:: {name}', '', '   .. code-block:: none', '']
    lines += [f'      {line}' if line else '' for line in text.splitlines()]
    return lines + ['']


class CommandsDirective(GeneratedDirective):

    def lines(self):
        result = []
        for name, parser in parsers():
            result += help_lines(name, parser)
            if name == 'server':
                result += [
                    f'   ``server {alias}`` is ``server {command}``.'
                    for alias, command
                    in gocept.amqprun.cli.ALIASES.items()] + ['']
        return result


def setup(app):
    add_object_type(app, 'command', 'command', show=lambda name: name)
    app.add_directive('amqprun-commands', CommandsDirective)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
