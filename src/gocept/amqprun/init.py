"""The `init` command: a new project of handlers, ready to run.

``server init DIR`` makes in DIR (new, or empty) a project whose
distribution is named after DIR and whose package is that name as a
Python identifier (``my-app`` -> ``my_app``):

- ``pyproject.toml`` (depends on gocept.amqprun; extra ``test``),
  ``README.txt`` (what to run), ``conftest.py``, ``.gitignore``;
- ``src/PACKAGE/``: ``handlers.py`` (a handler declared with
  ``@declare``), its ``configure.zcml`` and ``tests/test_handlers.py``
  (``call_handler``, the ZCML, the real daemon on the test broker);
- ``etc/server.conf`` (the local broker, a ``<monitor>``),
  ``etc/server.zcml`` (includes the package), ``etc/zdaemon.conf`` (runs
  the daemon with the Python that ran `init`; ``start`` waits until it
  consumes: ``server ready``) and ``var/`` for what zdaemon writes.

The files are the templates of ``skeleton/`` with their ``@name@``
placeholders filled in. Paths are absolute (ZConfig ``%define``), so the
configurations work from any working directory.

Exit codes: 0 made, 2 DIR cannot be used (not empty, no package name to
be had from its name, a path zdaemon cannot run) or the command line is
wrong. Nothing is written then.
"""

import importlib.metadata
import importlib.resources
import importlib.util
import keyword
import os
import pathlib
import re
import sys

from gocept.amqprun.interfaces import EXIT_CONFIG
from gocept.amqprun.interfaces import EXIT_OK
import gocept.amqprun.config


HELP = 'make a new project of handlers in DIR (see its README.txt)'
EPILOG = ('exit codes: 0 made, 2 DIR cannot be used (exists and is not '
          'empty, its name makes no Python package name, ...)')

# (file made, template in skeleton/); PACKAGE is the package's name.
FILES = [
    ('pyproject.toml', 'pyproject.toml.in'),
    ('README.txt', 'README.txt.in'),
    ('conftest.py', 'conftest.py.in'),
    ('.gitignore', 'gitignore.in'),
    ('src/PACKAGE/__init__.py', 'package_init.py.in'),
    ('src/PACKAGE/handlers.py', 'handlers.py.in'),
    ('src/PACKAGE/configure.zcml', 'configure.zcml.in'),
    ('src/PACKAGE/tests/__init__.py', 'tests_init.py.in'),
    ('src/PACKAGE/tests/test_handlers.py', 'test_handlers.py.in'),
    ('etc/server.conf', 'server.conf.in'),
    ('etc/server.zcml', 'server.zcml.in'),
    ('etc/zdaemon.conf', 'zdaemon.conf.in'),
    ('var/.gitignore', 'var_gitignore.in'),
]
DEFAULT_HOSTNAME = 'localhost'
DEFAULT_MONITOR = '127.0.0.1:8410'


class Unusable(ValueError):
    """DIR (or an option) cannot be used; the message says why."""


def package_name(directory):
    """The package name for a project in `directory`: its name in lower
    case with ``-``, ``.`` and spaces as ``_``. Raises Unusable when that
    is no Python identifier, or when a module of that name is importable
    already (the project's package would be shadowed or shadow it)."""
    name = pathlib.Path(directory).resolve().name
    package = re.sub(r'[-. ]', '_', name).lower()
    if not package.isidentifier() or keyword.iskeyword(package) \
            or not package.isascii():
        raise Unusable(
            f'{directory}: cannot make a Python package name of {name!r}; '
            'name the directory like one (letters, digits, _ and -, not '
            'starting with a digit), e.g. myapp')
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.origin is not None:
        raise Unusable(
            f'{directory}: a module named {package!r} exists already '
            f'({spec.origin}): the project\'s package would clash with '
            'it; choose another directory name')
    return package


def check_directory(directory):
    """Raise Unusable unless `directory` is new or an empty directory."""
    path = pathlib.Path(directory)
    if path.exists() and not path.is_dir():
        raise Unusable(f'{directory} exists and is not a directory')
    if path.is_dir() and any(path.iterdir()):
        raise Unusable(f'{directory} exists and is not empty: nothing '
                       'written (choose a new directory)')


def check_path(path, what):
    """Raise Unusable when `path` cannot stand in a ZConfig value that
    zdaemon splits at whitespace (or that ZConfig substitutes `$` in)."""
    if re.search(r'[\s$]', str(path)):
        raise Unusable(f'{what} {str(path)!r} contains whitespace or "$", '
                       'which zdaemon cannot run a program from: choose '
                       'another place')


def check_option(value, datatype, option):
    """`value` of `option` checked with a ZConfig `datatype` function."""
    try:
        datatype(value)
    except ValueError as e:
        raise Unusable(f'{option} {value!r}: {e}') from None
    return value


def hostname(value):
    """``HOST`` or ``HOST:PORT``, as `<amqp-server> hostname` takes."""
    if not re.fullmatch(r'[^\s:]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?',
                        value):
        raise ValueError('expected HOST or HOST:PORT')
    return value


def placeholders(directory, package, options):
    """{@name@: value} for the templates."""
    directory = pathlib.Path(directory).resolve()
    python = sys.executable
    check_path(directory, 'The directory')
    check_path(python, 'The Python')
    project = directory.name
    return {
        '@project@': project,
        '@underline@': '=' * len(project),
        '@package@': package,
        '@directory@': str(directory),
        '@python@': python,
        '@bindir@': os.path.dirname(python),
        '@version@': importlib.metadata.version('gocept.amqprun'),
        '@hostname@': check_option(options.hostname, hostname,
                                   '--hostname'),
        '@monitor@': check_option(
            options.monitor, gocept.amqprun.config.monitor_address,
            '--monitor'),
    }


def render(template, values):
    """The text of skeleton/`template` with `values` filled in."""
    text = (importlib.resources.files('gocept.amqprun') / 'skeleton'
            / template).read_text(encoding='utf-8')
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def make(directory, options):
    """Make the project in `directory`; return the files made (paths
    relative to it). Raises Unusable before writing anything (and when
    writing fails)."""
    check_directory(directory)
    package = package_name(directory)
    values = placeholders(directory, package, options)
    texts = [(name.replace('PACKAGE', package), render(template, values))
             for name, template in FILES]
    root = pathlib.Path(directory)
    try:
        for name, text in texts:
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding='utf-8')
    except OSError as e:
        raise Unusable(f'{e.filename}: cannot write: {e.strerror}') from None
    return [name for name, _ in texts]


def next_steps(directory, files, out=print):
    """Say what was made and what to run next."""
    root = pathlib.Path(directory).resolve()
    python = sys.executable
    out(f'Made the project {root.name} in {root}:')
    for name in files:
        out(f'  {name}')
    out('Next (README.txt in it says more):')
    out(f'  cd {root}')
    out(f"  {python} -m pip install -e '.[test]'")
    out(f'  {python} -m pytest')
    out(f'  {python} -m gocept.amqprun etc/server.conf')


def add_arguments(parser, config_file=None):
    parser.add_argument('directory', metavar='DIR',
                        help='where to make it (new, or empty)')
    parser.add_argument(
        '--hostname', default=DEFAULT_HOSTNAME, metavar='HOST[:PORT]',
        help=f'the broker of etc/server.conf (default {DEFAULT_HOSTNAME})')
    parser.add_argument(
        '--monitor', default=DEFAULT_MONITOR, metavar='HOST:PORT',
        help='the <monitor> address of etc/server.conf (default '
             f'{DEFAULT_MONITOR}; every daemon on a host needs its own)')


def run(options, out=print):
    try:
        files = make(options.directory, options)
    except Unusable as e:
        out(f'ERROR: {e}')
        return EXIT_CONFIG
    next_steps(options.directory, files, out)
    return EXIT_OK
