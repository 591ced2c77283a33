"""The broker of a test run: the environment's, or a private node.

The broker comes from the environment: AMQP_HOSTNAME (default localhost),
AMQP_PORT (5672), AMQP_USERNAME (guest), AMQP_PASSWORD (guest),
AMQP_VIRTUALHOST (``/``). When no broker answers there and Debian's
rabbitmq-server is installed, `ensure_broker` starts a private node on a
free port.
"""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest

import gocept.amqprun.parameters
from gocept.amqprun.testing.wait import wait_for


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def port_open(host, port, timeout=1):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class PrivateBroker:
    """A RabbitMQ node of its own in a temporary directory.

    `config` is extra rabbitmq.conf text (e.g. a TLS listener). Needs
    Debian's rabbitmq-server package.
    """

    SERVER = '/usr/lib/rabbitmq/bin/rabbitmq-server'
    CTL = '/usr/lib/rabbitmq/bin/rabbitmqctl'

    def __init__(self, config='', port=None):
        self.port = port or free_port()
        self.dist_port = free_port()
        self.name = f'amqprun{self.port}@localhost'
        self.config = config
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix='amqprun-broker-'))
        self.process = None

    @classmethod
    def available(cls):
        return os.path.exists(cls.SERVER)

    @property
    def env(self):
        d = self.dir
        env = dict(os.environ)
        env.update(
            HOME=str(d),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS='127.0.0.1',
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(d / 'mnesia'),
            RABBITMQ_LOG_BASE=str(d / 'log'),
            RABBITMQ_PID_FILE=str(d / 'pid'),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / 'enabled_plugins'),
            RABBITMQ_CONFIG_FILE=str(d / 'rabbitmq'),
        )
        return env

    def start(self, timeout=60):
        (self.dir / 'enabled_plugins').write_text('[].\n')
        (self.dir / 'rabbitmq.conf').write_text(
            f'listeners.tcp.default = {self.port}\n'
            'loopback_users = none\n' + self.config)
        self.process = subprocess.Popen(
            [self.SERVER], env=self.env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: port_open('127.0.0.1', self.port, 0.2)
                 or self.process.poll() is not None, timeout=timeout,
                 interval=0.2, message='private broker did not start')
        if self.process.poll() is not None:
            raise RuntimeError(
                f'private broker exited; see {self.dir}/log')

    def stop(self, timeout=30):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

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
            pytest.skip(f'no broker at {params.hostname}:{params.port} and '
                        'no rabbitmq-server to start one')
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
