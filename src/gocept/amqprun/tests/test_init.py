"""`server init`: the files it makes, what it refuses, and the new
project end to end -- installed, its tests run, its configuration run by
hand and under the real zdaemon, a broken configuration under zdaemon."""

import importlib.metadata
import os
import pathlib
import re
import signal
import subprocess
import sys
import sysconfig

import pytest
import ZConfig
import zdaemon

import gocept.amqprun.cli
import gocept.amqprun.config
import gocept.amqprun.testing
import gocept.amqprun.tests.test_buildout


def init(capsys, *args):
    code = gocept.amqprun.cli.run_command('init', [str(a) for a in args])
    return code, capsys.readouterr().out


def test_makes_a_project_named_after_the_directory(tmp_path, capsys):
    directory = tmp_path / 'my-app'
    code, out = init(capsys, directory)
    assert code == 0, out
    assert f'Made the project my-app in {directory}:' in out
    assert f"{sys.executable} -m pip install -e '.[test]'" in out
    made = sorted(str(p.relative_to(directory))
                  for p in directory.rglob('*'))
    assert made == [
        '.gitignore', 'README.txt', 'conftest.py', 'etc', 'etc/server.conf',
        'etc/server.zcml', 'etc/zdaemon.conf', 'pyproject.toml', 'src',
        'src/my_app', 'src/my_app/__init__.py', 'src/my_app/configure.zcml',
        'src/my_app/handlers.py', 'src/my_app/tests',
        'src/my_app/tests/__init__.py', 'src/my_app/tests/test_handlers.py',
        'var', 'var/.gitignore']
    for path in directory.rglob('*'):
        if path.is_file():   # every placeholder filled in
            assert not re.search(r'@[a-z]+@', path.read_text()), path
    pyproject = (directory / 'pyproject.toml').read_text()
    assert 'name = "my-app"' in pyproject
    version = importlib.metadata.version('gocept.amqprun')
    assert f'"gocept.amqprun >= {version}"' in pyproject
    assert '"my_app" = ["*.zcml"]' in pyproject
    assert "@gocept.amqprun.handler.declare('my_app.requests', " \
        "'my_app.request')" in (directory / 'src/my_app/handlers.py'
                                ).read_text()
    assert '<include package="gocept.amqprun" />' in (
        directory / 'src/my_app/configure.zcml').read_text()
    # The configuration is valid and names absolute paths.
    config = gocept.amqprun.config.load_config(directory / 'etc/server.conf')
    assert config.worker.component_configuration == str(
        directory / 'etc/server.zcml')
    assert config.amqp_server.hostname == 'localhost'
    assert config.monitor.address == ('127.0.0.1', 8410)
    # zdaemon's configuration too, with the Python that ran `init`.
    schema = ZConfig.loadSchema(os.path.join(
        os.path.dirname(zdaemon.__file__), 'schema.xml'))
    runner = ZConfig.loadConfig(
        schema, str(directory / 'etc/zdaemon.conf'))[0].runner
    assert runner.program == [sys.executable, '-m', 'gocept.amqprun',
                              f'{directory}/etc/server.conf']
    assert runner.start_test_program[-2:] == [
        'ready', f'{directory}/etc/server.conf']
    assert runner.exit_codes == [0, 2]
    assert runner.transcript == f'{directory}/var/server.log'


def test_options_set_broker_and_monitor(tmp_path, capsys):
    directory = tmp_path / 'app'
    code, out = init(capsys, '--hostname', 'rabbit:5673',
                     '--monitor', ':9000', directory)
    assert code == 0, out
    config = gocept.amqprun.config.load_config(directory / 'etc/server.conf')
    assert config.amqp_server.hostname == 'rabbit:5673'
    assert config.monitor.address == ('', 9000)


@pytest.mark.parametrize('name, problem', [
    ('1app', 'cannot make a Python package name of '),
    ('class', 'cannot make a Python package name of '),
    ('json', "a module named 'json' exists already"),
])
def test_refuses_a_name_that_makes_no_package(
        tmp_path, capsys, name, problem):
    code, out = init(capsys, tmp_path / name)
    assert code == 2
    assert out.startswith(f'ERROR: {tmp_path / name}: {problem}')
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize('option, value, problem', [
    ('--monitor', '8410', 'expected HOST:PORT'),
    ('--hostname', 'a b', 'expected HOST or HOST:PORT'),
])
def test_refuses_bad_options(tmp_path, capsys, option, value, problem):
    code, out = init(capsys, option, value, tmp_path / 'app')
    assert code == 2
    assert out.startswith(f'ERROR: {option} {value!r}: {problem}')
    assert not (tmp_path / 'app').exists()


def test_refuses_a_directory_that_is_not_empty(tmp_path, capsys):
    directory = tmp_path / 'app'
    directory.mkdir()
    (directory / 'notes.txt').write_text('mine')
    code, out = init(capsys, directory)
    assert code == 2
    assert out == f'ERROR: {directory} exists and is not empty: nothing ' \
        'written (choose a new directory)\n'
    assert [p.name for p in directory.iterdir()] == ['notes.txt']
    # An empty one is fine.
    (directory / 'notes.txt').unlink()
    assert init(capsys, directory)[0] == 0


def test_refuses_a_path_zdaemon_cannot_run(tmp_path, capsys):
    code, out = init(capsys, tmp_path / 'with space' / 'app')
    assert code == 2
    assert 'contains whitespace or "$"' in out
    assert not (tmp_path / 'with space').exists()


# End to end: a new project in a virtualenv of its own.

def run(args, cwd, timeout=120, **kw):
    return gocept.amqprun.tests.test_buildout.run(args, cwd, timeout, **kw)


ok = gocept.amqprun.tests.test_buildout.ok


def project_venv(directory):
    """A virtualenv that sees this one's packages (gocept.amqprun, its
    dependencies, pytest) through a .pth file instead of installing them
    again (~13 s more here), and has no pip of its own (this one's
    installs into it)."""
    ok(run([sys.executable, '-m', 'venv', '--without-pip', directory],
           directory.parent))
    python = directory / 'bin' / 'python'
    purelib = ok(run([python, '-c', 'import sysconfig; '
                      'print(sysconfig.get_path("purelib"))'],
                     directory)).strip()
    ours = sysconfig.get_path('purelib')
    pathlib.Path(purelib, 'amqprun_test_deps.pth').write_text(
        f'import site; site.addsitedir({ours!r})\n')
    return python


class Project:
    """A project made by `server init` in `directory` for the package
    `package`, its virtualenv's `python`."""

    def __init__(self, directory, package, python):
        self.directory = directory
        self.package = package
        self.python = python
        self.server_conf = directory / 'etc' / 'server.conf'
        self.transcript = directory / 'var' / 'server.log'
        self.zdaemon_log = directory / 'var' / 'zdaemon.log'

    def zdaemon(self, command):
        # This virtualenv's zdaemon: the project's has the same.
        zdaemon = pathlib.Path(sys.executable).parent / 'zdaemon'
        return run([zdaemon, '-C', self.directory / 'etc' / 'zdaemon.conf',
                    command], self.directory.parent)

    def answers(self, client, replies):
        message_id = client.send(f'{self.package}.request', b'hello')
        reply = client.wait(replies, timeout=30)
        assert reply.body == b'HELLO'
        assert reply.header.correlation_id == message_id


@pytest.fixture
def project(tmp_path, name_prefix, amqp_parameters, amqp_client):
    """A new project, its package unique to the test (its queues and
    routing keys are named after it), for the test's broker."""
    p = amqp_parameters
    if (p.username, p.password, p.virtual_host) != ('guest', 'guest', '/'):
        pytest.skip('the generated configuration uses guest on /')
    package = name_prefix.replace('.', '_')
    python = project_venv(tmp_path / 'venv')
    directory = tmp_path / package
    ok(run([python, '-m', 'gocept.amqprun', 'init',
            '--hostname', f'{p.hostname}:{p.port or 5672}', '--monitor',
            f'127.0.0.1:{gocept.amqprun.testing.free_port()}', directory],
           tmp_path))
    for suffix in ('', '.retry', '.parked', '.quarantine'):
        amqp_client.forget(f'{package}.requests{suffix}')
    project = Project(directory, package, python)
    yield project
    if (directory / 'var' / 'server.sock').exists():
        project.zdaemon('stop')


@pytest.mark.slow
def test_new_project_installs_tests_runs_and_deploys(project, amqp_client):
    p = project
    outside = p.directory.parent   # the commands work from anywhere
    # Install (this virtualenv's pip; build isolation: setuptools with
    # its wheel support), then the generated tests pass.
    ok(run([sys.executable, '-m', 'pip', '--python', p.python, 'install',
            '-q', '--no-deps', '-e', f'{p.directory}[test]'], outside,
           timeout=300))
    # Before the first start, nothing is wrong: the queues will be created.
    check = ok(run([p.python, '-m', 'gocept.amqprun', 'check',
                    p.server_conf], outside))
    assert f'{p.package}.requests: will be created' in check
    assert check.endswith('OK.\n')

    tests = run([p.python, '-m', 'pytest', '-p', 'no:cacheprovider'],
                p.directory)
    assert ' 3 passed' in ok(tests), tests.stdout

    replies = amqp_client.declare(f'{p.package}.replies',
                                  [f'{p.package}.reply'])
    # By hand: it consumes and answers, SIGTERM stops it with 0.
    with open(p.directory / 'by-hand.log', 'w+') as output:
        daemon = subprocess.Popen(
            [p.python, '-m', 'gocept.amqprun', p.server_conf],
            cwd=outside, stdout=output, stderr=subprocess.STDOUT)
        try:
            gocept.amqprun.testing.wait_for(
                lambda: 'Started.' in pathlib.Path(output.name).read_text(),
                timeout=30, message='the daemon did not start')
            p.answers(amqp_client, replies)
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(60) == 0

    # Under zdaemon: `start` returns once it consumes.
    start = ok(p.zdaemon('start'))
    assert 'daemon process started' in start
    assert 'program running' in ok(p.zdaemon('status'))
    p.answers(amqp_client, replies)
    ok(p.zdaemon('stop'))
    status = p.zdaemon('status')
    assert status.returncode == 3, status.stdout
    assert 'daemon manager not running' in status.stdout

    # What does not pass by itself: `start` says so, nothing loops.
    conf = p.server_conf.read_text()
    for broken, cause in [
            (conf.replace('  amount 4', '  amont 4'),
             "'amont' is not a known key name; did you mean amount?"),
            (conf.replace('  password guest', '  password wrong'),
             'the broker refused the credentials')]:
        p.server_conf.write_text(broken)
        spawned = p.zdaemon_log.read_text().count('spawned process')
        start = p.zdaemon('start')
        assert start.returncode == 1, start.stdout
        assert 'daemon manager not running' in start.stdout
        assert cause in p.transcript.read_text()
        log = p.zdaemon_log.read_text()
        assert log.count('spawned process') == spawned + 1
        assert log.rstrip().endswith('exit status 2; exiting now')
        assert p.zdaemon('status').returncode == 3
