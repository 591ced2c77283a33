"""The pytest fixtures of gocept.amqprun.testing.

Activate them with ``pytest_plugins = ['gocept.amqprun.testing']`` in a
``conftest.py``.
"""

import uuid

import pytest

from gocept.amqprun.testing.broker import ensure_broker
from gocept.amqprun.testing.broker import stop_private_broker
from gocept.amqprun.testing.client import Client
from gocept.amqprun.testing.cluster import PrivateCluster
from gocept.amqprun.testing.database import ensure_database
from gocept.amqprun.testing.database import stop_private_database
from gocept.amqprun.testing.process import ServerProcess


def unique_name(prefix='test'):
    """`prefix`, a dot and random hex digits: a name no other test run
    uses."""
    return f'{prefix}.{uuid.uuid4().hex[:12]}'


@pytest.fixture(scope='session')
def amqp_parameters():
    """parameters.Parameters of the test broker."""
    params = ensure_broker()
    yield params
    stop_private_broker()


@pytest.fixture(scope='session')
def database_url():
    """The SQLAlchemy URL of the test database (`ensure_database`: the
    environment's or a private cluster, stopped after the session)."""
    url = ensure_database()
    yield url
    stop_private_database()


@pytest.fixture(scope='session')
def sql_engine(database_url):
    """An SQLAlchemy engine of the test database, disposed after the
    session."""
    import sqlalchemy
    engine = sqlalchemy.create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope='module')
def rabbitmq_cluster():
    """A started 3-node `PrivateCluster` shared by the tests of a module
    (starting one takes ~15 s), cleaned up after them. Tests that stop
    or kill a node start it again. Skipped without rabbitmq-server."""
    if not PrivateCluster.available():
        pytest.skip('rabbitmq-server is not installed: no private cluster')
    with PrivateCluster(3) as cluster:
        yield cluster


@pytest.fixture
def amqp_client(amqp_parameters):
    """A `Client`; the queues it declared are deleted afterwards."""
    client = Client(amqp_parameters)
    yield client
    client.close()


@pytest.fixture
def name_prefix():
    """A prefix unique to the test, for queue names and routing keys."""
    return unique_name()


@pytest.fixture
def zca():
    """A clean component registry for the test (handlers, utilities)."""
    import zope.component.testing
    zope.component.testing.setUp()
    yield zope.component.getGlobalSiteManager()
    zope.component.testing.tearDown()


@pytest.fixture
def server_process(tmp_path, amqp_parameters):
    """A factory of started `ServerProcess` objects, all stopped
    afterwards.

    `parameters` (default: the test broker's) and the keywords of
    ServerProcess configure it; `start=False` leaves it unstarted."""
    started = []

    def factory(start=True, parameters=None, **kw):
        process = ServerProcess(
            tmp_path / f'server{len(started)}',
            parameters or amqp_parameters, **kw)
        started.append(process)
        if start:
            process.start()
        return process
    yield factory
    for process in started:
        if process.process is not None and process.process.poll() is None:
            process.kill()
