"""The buildout deployment, end to end: buildout in a copy of the checkout,
the example daemon under zdaemon (bin/serverctl) handles a message."""

import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

import gocept.amqprun.testing


CHECKOUT = pathlib.Path(__file__).resolve().parents[4]

# What a checkout may hold besides its sources (builds, caches).
IGNORE = shutil.ignore_patterns(
    '.git', '.venv', '.tox', 'bin', 'parts', 'eggs', 'develop-eggs', 'var',
    '.installed.cfg', '__pycache__', '*.egg-info', '.pytest_cache',
    'benchmarks')


def run(args, cwd, timeout=600, **kw):
    """Run a command; return the CompletedProcess (output as text).
    `kw` go to subprocess.run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    print('$', ' '.join(str(a) for a in args))
    start = time.monotonic()
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=timeout, **kw)
    print(f'  exit {result.returncode} after '
          f'{time.monotonic() - start:.1f} s')
    return result


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def buildout(tmp_path, name_prefix, amqp_parameters):
    """A copy of the checkout with buildout run in it. The example's queue
    and routing keys get the test's prefix; its broker is the test's."""
    if not (CHECKOUT / 'buildout.cfg').exists():
        pytest.skip('not running from a checkout')
    directory = tmp_path / 'checkout'
    shutil.copytree(CHECKOUT, directory, ignore=IGNORE)
    example = directory / 'etc' / 'example.py'
    text = example.read_text()
    assert text.count("'example.") == 3
    example.write_text(text.replace("'example.", f"'{name_prefix}."))
    conf = directory / 'etc' / 'server.conf'
    text = conf.read_text()
    assert text.count('  hostname localhost\n') == 1
    p = amqp_parameters
    conf.write_text(text.replace(
        '  hostname localhost\n',
        f'  hostname {p.hostname}:{p.port or 5672}\n'))

    venv = tmp_path / 'venv'
    ok(run([sys.executable, '-m', 'venv', venv], tmp_path))
    ok(run([venv / 'bin' / 'pip', 'install', '-q', 'zc.buildout'],
           tmp_path))
    ok(run([venv / 'bin' / 'buildout'], directory))
    yield directory
    if (directory / 'var' / 'serverctl.sock').exists():
        run([directory / 'bin' / 'serverctl', 'stop'], directory, 60)


@pytest.mark.slow
def test_buildout_serverctl_runs_the_example(
        buildout, name_prefix, amqp_client):
    d = buildout
    assert (d / 'var').is_dir()
    assert (d / 'bin' / 'test').exists()
    # The configuration file is bin/server's argument (buildout.cfg).
    assert f"main('{d}/etc/server.conf')" in (d / 'bin' / 'server').read_text()
    reply_queue = amqp_client.declare(
        f'{name_prefix}.replies', [f'{name_prefix}.reply'])
    for suffix in ('', '.retry', '.parked', '.quarantine'):
        amqp_client.forget(f'{name_prefix}.requests{suffix}')

    serverctl = d / 'bin' / 'serverctl'
    ok(run([serverctl, 'start'], d, 60))
    log = d / 'var' / 'server.log'
    gocept.amqprun.testing.wait_for(
        lambda: log.exists() and 'gocept.amqprun.main Started.'
        in log.read_text(), timeout=30,
        message='the daemon did not start; see var/server.log')
    assert 'program running' in ok(run([serverctl, 'status'], d, 60))

    message_id = amqp_client.send(f'{name_prefix}.request', b'hello')
    reply = amqp_client.wait(reply_queue, timeout=30)
    assert reply.body == b'HELLO'
    assert reply.header.correlation_id == message_id

    ok(run([serverctl, 'stop'], d, 90))
    status = run([serverctl, 'status'], d, 60)
    assert status.returncode == 3, status.stdout + status.stderr
    assert 'not running' in status.stdout
    assert 'gocept.amqprun.server Stopped.' in log.read_text()

    # The check command through bin/server: the daemon's queues exist.
    check = ok(run([d / 'bin' / 'server', '--check'], d, 60))
    assert check.endswith('OK.\n')
