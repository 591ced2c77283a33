"""The tutorial (docs/tutorial.rst) runs as it is written.

Its steps are read from the page, in order, and run in a temporary
directory against the test broker, as a reader would in a terminal: the
shell's working directory and environment carry over from one block to
the next. What a step is, the page says with the class of its code block
(prose examples have none and are not run):

``tutorial``
    Shell commands, run with bash (``set -e``).
``tutorial-start``
    One command that runs in the foreground until Ctrl-C: it is started
    in the background, and the next steps run once it logged
    ``Started.``.
``.. tutorial: interrupt`` (a comment)
    Ctrl-C for that command (SIGINT to its process group); it must exit
    with 0.
``tutorial-output``
    What the step before printed (or the started command has logged so
    far): the block, ``...`` matching anything, must be found in it.
``tutorial-file``
    A file to save, named by the block's caption.
``tutorial-file-shown``
    A file the steps made, named by the caption, shown as it is.

Two commands are stood in for: ``python3 -m venv venv`` makes a
virtualenv that sees this one's packages (without pip of its own; ``pip``,
``server``, ``pytest`` and ``zdaemon`` in its ``bin`` run them from this
one's), so that ``pip install gocept.amqprun`` needs nothing more -- the
checkout under test instead of a download. The project is named after
the test (``myapp`` is replaced, so that tests running at the same time
on one broker do not meet), ``server init`` is told the test broker and a
free monitor port. Skipped where the docs are not (an installed
package) and for a broker the generated configuration cannot reach
(another user or virtual host than guest on /).
"""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time

import pytest

import gocept.amqprun.testing


TUTORIAL = pathlib.Path(__file__).resolve().parents[4] / 'docs' / \
    'tutorial.rst'
# Seconds a step may take (pip builds the project: setuptools is fetched
# for its isolated build).
TIMEOUT = 300

_block = re.compile(
    r'^\.\. code-block:: *\S*\n'
    r'(?P<options>(?:   :[\w-]+:.*\n)*)'
    r'\n'
    r'(?P<body>(?:(?:   .*)?\n)+)', re.MULTILINE)
_comment = re.compile(r'^\.\. tutorial: (?P<what>[\w-]+) *$', re.MULTILINE)
_option = re.compile(r'^   :(?P<name>[\w-]+):(?P<value>.*)$', re.MULTILINE)


def steps(text):
    """[(kind, body, caption)] of the tutorial's marked blocks and
    comments, in the page's order."""
    found = []
    for match in _block.finditer(text):
        options = {m.group('name'): m.group('value').strip()
                   for m in _option.finditer(match.group('options'))}
        kind = options.get('class', '')
        if not kind.startswith('tutorial'):
            continue
        body = textwrap.dedent(match.group('body')).strip('\n') + '\n'
        found.append((match.start(), kind, body, options.get('caption')))
    for match in _comment.finditer(text):
        found.append((match.start(), match.group('what'), '', None))
    return [step[1:] for step in sorted(found)]


def matches(expected, output):
    """Whether `expected` (``...``: anything) is found in `output`;
    trailing whitespace of lines does not count."""
    def lines(text):
        return '\n'.join(line.rstrip() for line in text.splitlines())
    pattern = '.*?'.join(
        re.escape(part) for part in lines(expected).split('...'))
    return re.search(pattern, lines(output), re.DOTALL) is not None


class Terminal:
    """A shell session in `directory`: the working directory and the
    environment carry over from one command to the next."""

    def __init__(self, directory, env):
        self.cwd = directory
        self.env = env
        self.state = directory / '.terminal'
        self.state.mkdir()
        self.background = None

    def run(self, script):
        """Run `script` with bash; return its output (stdout and stderr)."""
        print(f'$ {script.rstrip()}')
        state = (f'\necho "$PWD" > {self.state}/cwd'
                 f'\nenv -0 > {self.state}/env\n')
        result = subprocess.run(
            ['bash', '-c', 'set -e\n' + script + state], cwd=self.cwd,
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=TIMEOUT)
        print(result.stdout)
        assert result.returncode == 0, (
            f'exit code {result.returncode} of\n{script}\n{result.stdout}')
        self.cwd = pathlib.Path(
            (self.state / 'cwd').read_text().strip())
        self.env = dict(
            item.split('=', 1)
            for item in (self.state / 'env').read_text().split('\0')
            if '=' in item)
        return result.stdout

    def start(self, command):
        """Run `command` until `interrupt`; return what it logged once
        it logged ``Started.``."""
        print(f'$ {command.rstrip()}  (in the background)')
        self.log = self.state / 'background.log'
        with open(self.log, 'w') as output:
            self.background = subprocess.Popen(
                ['bash', '-c', 'exec ' + command.strip()], cwd=self.cwd,
                env=self.env, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True)
        gocept.amqprun.testing.wait_for(
            lambda: 'Started.' in self.log.read_text()
            or self.background.poll() is not None,
            timeout=60, message=f'{command} did not start')
        assert self.background.poll() is None, self.log.read_text()
        return self.log.read_text()

    def interrupt(self):
        """Ctrl-C: SIGINT to the background command's process group."""
        os.killpg(self.background.pid, signal.SIGINT)
        code = self.background.wait(60)
        self.background = None
        assert code == 0, self.log.read_text()
        return self.log.read_text()

    def kill(self):
        if self.background is not None:
            os.killpg(self.background.pid, signal.SIGKILL)
            self.background.wait()


def make_venv(terminal):
    """``python3 -m venv venv``: a virtualenv that sees this one's
    packages through a .pth file (instead of installing them again), with
    commands that run them."""
    directory = terminal.cwd / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip',
                    directory], check=True, timeout=TIMEOUT)
    python = directory / 'bin' / 'python'
    purelib = subprocess.run(
        [python, '-c', 'import sysconfig; '
         'print(sysconfig.get_path("purelib"))'],
        capture_output=True, text=True, check=True).stdout.strip()
    ours = sysconfig.get_path('purelib')
    pathlib.Path(purelib, 'amqprun_tutorial_deps.pth').write_text(
        f'import site; site.addsitedir({ours!r})\n')
    for command, module in [('pip', 'pip'), ('server', 'gocept.amqprun'),
                            ('pytest', 'pytest'), ('zdaemon', 'zdaemon')]:
        script = directory / 'bin' / command
        script.write_text(f'#!/bin/sh\nexec "{python}" -m {module} "$@"\n')
        script.chmod(0o755)
    print(f'(made {directory} seeing {ours})')


def install_gocept_amqprun(terminal):
    """``pip install gocept.amqprun``: the virtualenv sees it already."""
    result = subprocess.run(
        ['python', '-c', 'import gocept.amqprun.main'], cwd=terminal.cwd,
        env=terminal.env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# The commands stood in for (each must be in the tutorial, on a line of
# its own).
STAND_INS = {
    'python3 -m venv venv': make_venv,
    'pip install gocept.amqprun': install_gocept_amqprun,
}


def run_block(terminal, body):
    """Run a ``tutorial`` block, the stand-ins in their place; return
    its output."""
    output = []
    script = []
    for line in body.splitlines(keepends=True):
        stand_in = STAND_INS.get(line.strip())
        if stand_in is None:
            script.append(line)
            continue
        if ''.join(script).strip():
            output.append(terminal.run(''.join(script)))
        script = []
        stand_in(terminal)
    if ''.join(script).strip():
        output.append(terminal.run(''.join(script)))
    return ''.join(output)


@pytest.fixture
def tutorial():
    if not TUTORIAL.exists():
        pytest.skip(f'no {TUTORIAL} (not a checkout)')
    return TUTORIAL.read_text(encoding='utf-8')


def test_steps_are_read_in_order():
    text = textwrap.dedent('''\
        Prose.

        .. code-block:: shell
           :class: tutorial

           cd a
           ls

        ::

           not run

        .. code-block:: python
           :class: tutorial-file
           :caption: send.py

           print(1)

        .. tutorial: interrupt

        .. code-block:: text

           an example, not run
        ''')
    assert steps(text) == [
        ('tutorial', 'cd a\nls\n', None),
        ('tutorial-file', 'print(1)\n', 'send.py'),
        ('interrupt', '', None)]
    assert matches('a...c\nd', 'xx abc  \nd\n')
    assert not matches('a...c\nd', 'abc\ne\n')


@pytest.fixture
def short_tmp_path():
    """A temporary directory with a short path: zdaemon's socket is
    ``PROJECT/var/server.sock``, and a Unix socket's path must stay below
    108 bytes (pytest's tmp_path is too deep for that)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix='amqprun-'))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_tutorial_runs_as_written(
        tutorial, short_tmp_path, amqp_parameters, amqp_client,
        name_prefix):
    tmp_path = short_tmp_path
    p = amqp_parameters
    if (p.username, p.password, p.virtual_host) != ('guest', 'guest', '/'):
        pytest.skip('the configuration server init makes uses guest on /')
    package = name_prefix.replace('.', '_')
    broker = f'{p.hostname}:{p.port or 5672}'
    monitor = gocept.amqprun.testing.free_port()
    substitutions = [
        (r'\bmyapp\b', package),
        (r'\blocalhost:5672\b', broker),
        (r'\b8410\b', str(monitor)),
        (r'\bserver init ',
         f'server init --hostname {broker} --monitor 127.0.0.1:{monitor} '),
    ]

    def ours(text):
        for pattern, replacement in substitutions:
            text = re.sub(pattern, replacement, text)
        return text

    for suffix in ('', '.retry', '.parked', '.quarantine'):
        amqp_client.forget(f'{package}.requests{suffix}')
    amqp_client.forget(f'{package}.replies')
    env = {k: v for k, v in os.environ.items()
           if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    env.update(AMQP_HOSTNAME=p.hostname, AMQP_PORT=str(p.port or 5672),
               AMQP_USERNAME=p.username, AMQP_PASSWORD=p.password,
               AMQP_VIRTUALHOST=p.virtual_host)
    terminal = Terminal(tmp_path, env)
    seen = []
    output = ''
    start = time.monotonic()
    try:
        for kind, body, caption in steps(tutorial):
            seen.append(kind)
            body = ours(body)
            if kind == 'tutorial':
                seen += [line.strip() for line in body.splitlines()
                         if line.strip() in STAND_INS]
                output = run_block(terminal, body)
            elif kind == 'tutorial-start':
                output = terminal.start(body)
            elif kind == 'interrupt':
                output = terminal.interrupt()
            elif kind == 'tutorial-output':
                assert matches(body, output), (
                    f'expected:\n{body}\nin the output:\n{output}')
            elif kind == 'tutorial-file':
                (terminal.cwd / ours(caption)).write_text(body)
            elif kind == 'tutorial-file-shown':
                shown = (terminal.cwd / ours(caption)).read_text()
                assert shown.strip() == body.strip(), ours(caption)
            else:
                pytest.fail(f'unknown step {kind!r} in {TUTORIAL}')
    finally:
        terminal.kill()
        project = tmp_path / 'amqprun-tutorial' / package
        if (project / 'var' / 'server.sock').exists():
            subprocess.run([sys.executable, '-m', 'zdaemon', '-C',
                            project / 'etc' / 'zdaemon.conf', 'stop'],
                           cwd=project, timeout=120)
    print(f'the tutorial took {time.monotonic() - start:.1f} s')
    # Everything the tutorial promises was run.
    for kind in ['tutorial-start', 'interrupt', 'tutorial-file',
                 'tutorial-file-shown', *STAND_INS]:
        assert kind in seen, kind
    assert seen.count('tutorial-output') >= 6
