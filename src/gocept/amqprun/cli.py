"""The command line's subcommands: their table and what they share.

Every subcommand of ``server`` is a module named in `COMMANDS` that has

- `HELP`: one short line, shown in ``server --help`` (and as its
  description, unless it has a `DESCRIPTION`);
- `add_arguments(parser, config_file)`: its options on an argparse
  parser; commands that read the daemon's configuration add it with
  `add_config_argument`, so that a buildout script's built-in
  configuration (`config_file`) is their default too;
- `run(options)`: do it, return the exit code (`interfaces`).

Commands load the configuration with `config.load`. What they let
through is reported in one line and mapped to an exit code by
`exit_code`: the same codes for every command.
"""

import argparse
import importlib
import sys

from gocept.amqprun.interfaces import EXIT_CONFIG
from gocept.amqprun.interfaces import EXIT_FAILURE
from gocept.amqprun.interfaces import EXIT_OK
import gocept.amqprun.config
import gocept.amqprun.errors


# name -> module of the subcommand.
COMMANDS = {
    'check': 'gocept.amqprun.check',
    'parked': 'gocept.amqprun.parkedcli',
}
# Other spellings of a subcommand (``server --check CONFIG``).
ALIASES = {'--check': 'check'}


def command(name):
    """The module of subcommand `name` (or of its alias)."""
    return importlib.import_module(COMMANDS[ALIASES.get(name, name)])


def add_config_argument(parser, config_file=None):
    """Add the positional CONFIG; `config_file` (a buildout script's
    built-in configuration) is its default."""
    parser.add_argument(
        'config', metavar='CONFIG', nargs='?' if config_file else None,
        default=config_file, help='the ZConfig file' + (
            f' (default: {config_file})' if config_file else ''))


def command_parser(name, prog='server', config_file=None):
    """The argument parser of subcommand `name`."""
    module = command(name)
    result = argparse.ArgumentParser(
        prog=f'{prog} {ALIASES.get(name, name)}',
        description=getattr(module, 'DESCRIPTION', module.HELP),
        epilog=getattr(module, 'EPILOG', None),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(result, config_file)
    return result


def usages(prog='server'):
    """The usage line of every subcommand."""
    return [command_parser(name, prog).format_usage()[len('usage: '):]
            .strip() for name in COMMANDS]


def exit_code(error):
    """The exit code for an error a command let through: EXIT_CONFIG for
    a configuration that cannot be used, EXIT_FAILURE for the rest."""
    import gocept.amqprun.server
    if isinstance(error, (gocept.amqprun.config.ConfigError,
                          gocept.amqprun.server.DuplicateQueueError)):
        return EXIT_CONFIG
    return EXIT_FAILURE


# What a command may let through; anything else is a bug (traceback).
REPORTED = (gocept.amqprun.config.ConfigError,
            gocept.amqprun.errors.AMQPError, ValueError)


def run_command(name, args, prog='server', config_file=None, out=None):
    """Run subcommand `name` with `args`; return its exit code. A usage
    error is EXIT_CONFIG, ``--help`` EXIT_OK; an error the command lets
    through is printed as ``ERROR: ...`` to `out` (stdout)."""
    try:
        options = command_parser(name, prog, config_file).parse_args(args)
    except SystemExit as e:
        return EXIT_CONFIG if e.code else EXIT_OK
    try:
        return command(name).run(options)
    except REPORTED as e:
        print(f'ERROR: {e}', file=out or sys.stdout)
        return exit_code(e)
