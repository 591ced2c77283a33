"""Helpers for testing handlers against a real broker.

Used by gocept.amqprun's own tests and meant for applications' tests too.
Activate the pytest fixtures in a ``conftest.py``::

    pytest_plugins = ['gocept.amqprun.testing']

Every public name of the modules of this package is importable from here:

- `broker`: the broker of the test run (the environment's, or a private
  RabbitMQ node started on a free port): `environment_parameters`,
  `ensure_broker`, `PrivateBroker`, `free_port`, `port_open`,
  `Unavailable`;
- `client`: `Client`, a plain AMQP client for tests;
- `cluster`: `PrivateCluster`, a private N-node RabbitMQ cluster;
- `database`: the PostgreSQL database of the test run (the environment's,
  AMQPRUN_TEST_DATABASE, or a private cluster started on a free port):
  `environment_database_url`, `ensure_database`, `PrivateDatabase`;
- `process`: `ServerProcess` (the real daemon in a subprocess) and
  `ServerThread` (a `server.Server` in a thread);
- `proxy`: `Proxy`, a TCP proxy that cuts connections, and `AMQPProxy`,
  which cuts them at exact AMQP protocol steps;
- `frames`: the AMQP frame reader of `AMQPProxy`, its `Rule` and the
  method constants (`TX_COMMIT`, `TX_COMMIT_OK`, ...);
- `offline`: `call_handler` and `FakeSession`, without a broker;
- `wait`: `wait_for`, polling instead of sleeping;
- `plugin`: the pytest fixtures and `unique_name`.

Only `plugin` needs pytest: without it (``pip install gocept.amqprun``
without the ``test`` extra) everything else is importable from here, e.g.
`Client` and `environment_parameters` to send a message to a daemon.
"""

from gocept.amqprun.testing.broker import PrivateBroker
from gocept.amqprun.testing.broker import Unavailable
from gocept.amqprun.testing.broker import ensure_broker
from gocept.amqprun.testing.broker import environment_parameters
from gocept.amqprun.testing.broker import free_port
from gocept.amqprun.testing.broker import port_open
from gocept.amqprun.testing.client import Client
from gocept.amqprun.testing.client import Received
from gocept.amqprun.testing.cluster import PrivateCluster
from gocept.amqprun.testing.database import PrivateDatabase
from gocept.amqprun.testing.database import ensure_database
from gocept.amqprun.testing.database import environment_database_url
from gocept.amqprun.testing.frames import BASIC_ACK
from gocept.amqprun.testing.frames import BASIC_DELIVER
from gocept.amqprun.testing.frames import BASIC_GET_OK
from gocept.amqprun.testing.frames import BASIC_NACK
from gocept.amqprun.testing.frames import BASIC_PUBLISH
from gocept.amqprun.testing.frames import BASIC_REJECT
from gocept.amqprun.testing.frames import CONFIRM_SELECT
from gocept.amqprun.testing.frames import CONFIRM_SELECT_OK
from gocept.amqprun.testing.frames import FrameReader
from gocept.amqprun.testing.frames import Rule
from gocept.amqprun.testing.frames import TO_BROKER
from gocept.amqprun.testing.frames import TO_CLIENT
from gocept.amqprun.testing.frames import TX_COMMIT
from gocept.amqprun.testing.frames import TX_COMMIT_OK
from gocept.amqprun.testing.frames import TX_ROLLBACK
from gocept.amqprun.testing.frames import TX_ROLLBACK_OK
from gocept.amqprun.testing.frames import TX_SELECT
from gocept.amqprun.testing.frames import TX_SELECT_OK
from gocept.amqprun.testing.offline import FakeSession
from gocept.amqprun.testing.offline import call_handler
from gocept.amqprun.testing.process import ServerProcess
from gocept.amqprun.testing.process import ServerThread
from gocept.amqprun.testing.proxy import AMQPProxy
from gocept.amqprun.testing.proxy import Proxy
from gocept.amqprun.testing.wait import wait_for

try:
    import pytest  # noqa: F401 (the fixtures need it, nothing else does)
except ImportError:
    pytest = None
else:
    from gocept.amqprun.testing.plugin import amqp_client
    from gocept.amqprun.testing.plugin import amqp_parameters
    from gocept.amqprun.testing.plugin import database_url
    from gocept.amqprun.testing.plugin import name_prefix
    from gocept.amqprun.testing.plugin import rabbitmq_cluster
    from gocept.amqprun.testing.plugin import server_process
    from gocept.amqprun.testing.plugin import sql_engine
    from gocept.amqprun.testing.plugin import unique_name
    from gocept.amqprun.testing.plugin import zca


__all__ = [
    'AMQPProxy', 'BASIC_ACK', 'BASIC_DELIVER', 'BASIC_GET_OK', 'BASIC_NACK',
    'BASIC_PUBLISH', 'BASIC_REJECT', 'CONFIRM_SELECT', 'CONFIRM_SELECT_OK',
    'Client', 'FakeSession', 'FrameReader', 'PrivateBroker', 'PrivateCluster',
    'PrivateDatabase', 'Proxy', 'Received', 'Rule', 'ServerProcess',
    'ServerThread', 'TO_BROKER', 'TO_CLIENT', 'TX_COMMIT', 'TX_COMMIT_OK',
    'TX_ROLLBACK', 'TX_ROLLBACK_OK', 'TX_SELECT', 'TX_SELECT_OK',
    'Unavailable', 'call_handler', 'ensure_broker', 'ensure_database',
    'environment_database_url', 'environment_parameters', 'free_port',
    'port_open', 'wait_for',
]
if pytest is not None:
    __all__ += [
        'amqp_client', 'amqp_parameters', 'database_url', 'name_prefix',
        'rabbitmq_cluster', 'server_process', 'sql_engine', 'unique_name',
        'zca',
    ]
del pytest
