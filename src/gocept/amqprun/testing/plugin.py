"""The pytest fixtures of gocept.amqprun.testing.

Activate them with ``pytest_plugins = ['gocept.amqprun.testing']`` in a
``conftest.py``.
"""

import uuid

import pytest

from gocept.amqprun.testing.broker import ensure_broker
from gocept.amqprun.testing.broker import stop_private_broker
from gocept.amqprun.testing.client import Client
from gocept.amqprun.testing.process import ServerProcess


def unique_name(prefix='test'):
    return f'{prefix}.{uuid.uuid4().hex[:12]}'


@pytest.fixture(scope='session')
def amqp_parameters():
    """parameters.Parameters of the test broker."""
    params = ensure_broker()
    yield params
    stop_private_broker()


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
    """A factory of started `ServerProcess`es, all stopped afterwards.

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
