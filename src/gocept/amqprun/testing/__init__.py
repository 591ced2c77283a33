"""Helpers for testing handlers against a real broker.

Used by gocept.amqprun's own tests and meant for applications' tests too.
Activate the pytest fixtures in a ``conftest.py``::

    pytest_plugins = ['gocept.amqprun.testing']

Every public name of the modules of this package is importable from here:

- `broker`: the broker of the test run (the environment's, or a private
  RabbitMQ node started on a free port): `environment_parameters`,
  `ensure_broker`, `PrivateBroker`, `free_port`, `port_open`;
- `client`: `Client`, a plain AMQP client for tests;
- `process`: `ServerProcess` (the real daemon in a subprocess) and
  `ServerThread` (a `server.Server` in a thread);
- `proxy`: `Proxy`, a TCP proxy that cuts connections;
- `offline`: `call_handler` and `LastVote`, without a broker;
- `wait`: `wait_for`, polling instead of sleeping;
- `plugin`: the pytest fixtures and `unique_name`.
"""

from gocept.amqprun.testing.broker import PrivateBroker
from gocept.amqprun.testing.broker import ensure_broker
from gocept.amqprun.testing.broker import environment_parameters
from gocept.amqprun.testing.broker import free_port
from gocept.amqprun.testing.broker import port_open
from gocept.amqprun.testing.client import Client
from gocept.amqprun.testing.client import Received
from gocept.amqprun.testing.offline import LastVote
from gocept.amqprun.testing.offline import call_handler
from gocept.amqprun.testing.plugin import amqp_client
from gocept.amqprun.testing.plugin import amqp_parameters
from gocept.amqprun.testing.plugin import name_prefix
from gocept.amqprun.testing.plugin import server_process
from gocept.amqprun.testing.plugin import unique_name
from gocept.amqprun.testing.plugin import zca
from gocept.amqprun.testing.process import ServerProcess
from gocept.amqprun.testing.process import ServerThread
from gocept.amqprun.testing.proxy import Proxy
from gocept.amqprun.testing.wait import wait_for


__all__ = [
    'Client', 'LastVote', 'PrivateBroker', 'Proxy', 'Received',
    'ServerProcess', 'ServerThread', 'amqp_client', 'amqp_parameters',
    'call_handler', 'ensure_broker', 'environment_parameters', 'free_port',
    'name_prefix', 'port_open', 'server_process', 'unique_name',
    'wait_for', 'zca',
]
