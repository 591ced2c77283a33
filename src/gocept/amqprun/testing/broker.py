"""The broker of a test run: the environment's, or a private node.

The broker comes from the environment: AMQP_HOSTNAME (default localhost),
AMQP_PORT (5672), AMQP_USERNAME (guest), AMQP_PASSWORD (guest),
AMQP_VIRTUALHOST (``/``). When no broker answers there and Debian's
rabbitmq-server is installed, `ensure_broker` starts a private node on a
free port.
"""

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import gocept.amqprun.parameters
from gocept.amqprun.testing.wait import wait_for


def free_port():
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def processes_with(variable):
    """PIDs of the processes whose environment holds `variable`
    (``NAME=value``), read from /proc (Linux)."""
    entry = variable.encode() + b'\0'
    result = []
    for proc in pathlib.Path('/proc').iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / 'environ').read_bytes()
        except OSError:
            continue
        if environ.startswith(entry) or b'\0' + entry in environ:
            result.append(int(proc.name))
    return result


def kill_processes_with(variable, timeout=10):
    """SIGKILL the processes whose environment holds `variable`; return
    when none is left (AssertionError after `timeout`)."""
    def gone():
        for pid in processes_with(variable):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not processes_with(variable)
    wait_for(gone, timeout=timeout, interval=0.05,
             message=f'processes with {variable} outlived SIGKILL')


def port_open(host, port, timeout=1):
    """Whether something accepts TCP connections on `host`:`port`."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class PrivateBroker:
    """A RabbitMQ node of its own in a temporary directory.

    `config` is extra rabbitmq.conf text (e.g. a TLS listener),
    `advanced` the terms of an advanced.config (e.g. ``{rabbit,
    [{channel_tick_interval, 500}]}``). Needs Debian's rabbitmq-server
    package.

    For a node of a cluster (see `cluster.PrivateCluster`): `directory`
    is the node's directory (created; default: a new temporary one),
    `home` its HOME, where Erlang finds ``.erlang.cookie`` (default: the
    directory), and `env` extra environment variables of the node and of
    the rabbitmqctl calls made for it.
    """

    SERVER = '/usr/lib/rabbitmq/bin/rabbitmq-server'
    CTL = '/usr/lib/rabbitmq/bin/rabbitmqctl'

    def __init__(self, config='', port=None, *, directory=None, home=None,
                 env=None, advanced=''):
        self.port = port or free_port()
        self.dist_port = free_port()
        self.name = f'amqprun{self.port}@localhost'
        self.config = config
        self.advanced = advanced
        if directory is None:
            directory = tempfile.mkdtemp(prefix='amqprun-broker-')
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.home = pathlib.Path(home or self.dir)
        self.extra_env = dict(env or {})
        self.process = None

    @classmethod
    def available(cls):
        return os.path.exists(cls.SERVER)

    @property
    def env(self):
        d = self.dir
        env = dict(os.environ)
        env.update(
            HOME=str(self.home),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS='127.0.0.1',
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(d / 'mnesia'),
            RABBITMQ_LOG_BASE=str(d / 'log'),
            RABBITMQ_PID_FILE=str(d / 'pid'),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / 'enabled_plugins'),
            RABBITMQ_CONFIG_FILE=str(d / 'rabbitmq'),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / 'advanced.config'),
        )
        env.update(self.extra_env)
        return env

    @property
    def running(self):
        """Whether the node's server process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout=60):
        """Start the node; return when its AMQP port accepts connections.

        RuntimeError (naming the log directory) if it exits first,
        AssertionError if the port does not open within `timeout`."""
        self.launch()
        self.wait_started(timeout)

    def launch(self):
        """Start the server process without waiting for it."""
        (self.dir / 'enabled_plugins').write_text('[].\n')
        (self.dir / 'rabbitmq.conf').write_text(
            f'listeners.tcp.default = {self.port}\n'
            'loopback_users = none\n' + self.config)
        (self.dir / 'advanced.config').write_text(
            f'[{self.advanced}].\n')
        self.process = subprocess.Popen(
            [self.SERVER], env=self.env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)

    def wait_started(self, timeout=60):
        """Wait for a launched node as `start` does."""
        wait_for(lambda: port_open('127.0.0.1', self.port, 0.2)
                 or self.process.poll() is not None, timeout=timeout,
                 interval=0.2,
                 message=f'private broker did not start; see {self.log}')
        if self.process.poll() is not None:
            raise RuntimeError(f'private broker exited; see {self.log}')

    @property
    def log(self):
        """The node's log directory."""
        return self.dir / 'log'

    def stop(self, timeout=30):
        """Stop the node gracefully (SIGTERM; SIGKILL after `timeout`)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self, timeout=10):
        """SIGKILL the node: the server script and the Erlang VM (its
        process group), then whatever else still runs with the node's
        environment (e.g. erl_child_setup, in a session of its own).
        Returns when none of them is left."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None
        kill_processes_with(f'RABBITMQ_NODENAME={self.name}', timeout)

    def ctl(self, *args, program=CTL, timeout=60):
        """Run rabbitmqctl (or another CLI tool: `program`) with ``-n`` and
        the environment of this node; return its stdout. RuntimeError
        (with its output and the log directory) if it fails."""
        command = [program, '-n', self.name, *args]
        try:
            result = subprocess.run(
                command, env=self.env, capture_output=True, text=True,
                timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f'{" ".join(command)} took more than {timeout} s; '
                f'see {self.log}') from None
        if result.returncode:
            raise RuntimeError(
                f'{" ".join(command)} failed ({result.returncode}): '
                f'{result.stdout}{result.stderr}see {self.log}')
        return result.stdout

    def restart(self):
        self.stop()
        self.start()

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def parameters(self, **kw):
        return gocept.amqprun.parameters.Parameters(
            hostname='127.0.0.1', port=self.port, **kw)


def environment_parameters(**kw):
    """Parameters for the broker named by the AMQP_* variables."""
    values = dict(
        hostname=os.environ.get('AMQP_HOSTNAME', 'localhost'),
        port=int(os.environ.get('AMQP_PORT', 5672)),
        username=os.environ.get('AMQP_USERNAME', 'guest'),
        password=os.environ.get('AMQP_PASSWORD', 'guest'),
        virtual_host=os.environ.get('AMQP_VIRTUALHOST', '/'),
    )
    values.update(kw)
    return gocept.amqprun.parameters.Parameters(**values)


class Unavailable(RuntimeError):
    """A service the helpers need (broker, database) is not there, and
    none can be started (outside pytest; in a test, `unavailable`
    skips it)."""


def unavailable(why):
    """Skip the running test because of `why`; outside pytest (which
    these helpers do not need) raise Unavailable."""
    pytest = sys.modules.get('pytest')
    if pytest is None:
        raise Unavailable(why)
    pytest.skip(why)


_broker = None


def ensure_broker():
    """Parameters of a reachable broker (starting a private one if none
    answers and rabbitmq-server is installed)."""
    global _broker
    params = environment_parameters()
    if port_open(params.hostname, params.port):
        return params
    if _broker is None:
        if not PrivateBroker.available():
            unavailable(f'no broker at {params.hostname}:{params.port} '
                        'and no rabbitmq-server to start one')
        _broker = PrivateBroker()
        _broker.start()
    os.environ['AMQP_HOSTNAME'] = '127.0.0.1'
    os.environ['AMQP_PORT'] = str(_broker.port)
    return environment_parameters()


def stop_private_broker():
    """Stop the node `ensure_broker` started, if any."""
    global _broker
    if _broker is not None:
        _broker.cleanup()
        _broker = None
