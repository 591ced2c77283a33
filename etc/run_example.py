"""``make run``: the example daemon, with a broker even on a fresh machine.

Usage: python etc/run_example.py CONFIG

Runs ``server CONFIG`` in the foreground and exits with its exit code.
When nothing answers on the configured broker address (localhost) and
Debian's rabbitmq-server is installed, it first starts a private RabbitMQ
node on that address (``gocept.amqprun.testing.PrivateBroker``, its files
in a temporary directory) and stops it when the daemon has exited.
SIGINT and SIGTERM are passed on to the daemon, which stops gracefully.
"""

import os
import signal
import subprocess
import sys

import gocept.amqprun.config
import gocept.amqprun.testing.broker


LOCAL = ('localhost', '127.0.0.1')


def broker_address(config_file):
    """(host, port) of the first broker of `config_file`, or None if the
    configuration cannot be loaded (the daemon then says why)."""
    try:
        config = gocept.amqprun.config.load_config(config_file)
    except gocept.amqprun.config.ConfigError:
        return None
    params = config.parameters.pika_parameters()[0]
    return params.host, params.port


def start_private_broker(address):
    """A started PrivateBroker on `address` if nothing answers there and
    one can be started, else None."""
    broker = gocept.amqprun.testing.broker
    if address is None or broker.port_open(*address):
        return None
    host, port = address
    if host not in LOCAL or not broker.PrivateBroker.available():
        return None
    print(f'No broker answers on {host}:{port}: starting a private '
          f'RabbitMQ node there for the example ...', flush=True)
    node = broker.PrivateBroker(port=port)
    node.start()
    print(f'The private node {node.name} runs (files in {node.dir}); it '
          'stops when the daemon exits.', flush=True)
    return node


def stop_private_broker(node):
    print(f'Stopping the private RabbitMQ node {node.name}.', flush=True)
    node.cleanup()
    # The node's epmd outlives it; it has the node's environment.
    gocept.amqprun.testing.broker.kill_processes_with(
        f'RABBITMQ_NODENAME={node.name}')


def main(config_file):
    node = start_private_broker(broker_address(config_file))
    try:
        server = os.path.join(os.path.dirname(sys.executable), 'server')
        daemon = subprocess.Popen([server, config_file])

        def forward(signum, frame):
            daemon.send_signal(signum)
        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        return daemon.wait()
    finally:
        if node is not None:
            stop_private_broker(node)


if __name__ == '__main__':
    if len(sys.argv) != 2:
        print(__doc__.split('\n\n')[1], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
