"""The test database: the fixtures and a private PostgreSQL cluster."""

import uuid

import pytest
import sqlalchemy

from gocept.amqprun.testing import database
from gocept.amqprun.testing.broker import free_port
from gocept.amqprun.testing.broker import port_open


def test_database_url_fixture_gives_a_usable_database(database_url,
                                                      sql_engine):
    assert database.answers(database_url)
    assert str(sql_engine.url) == str(sqlalchemy.make_url(database_url))
    table = sqlalchemy.Table(
        f'test_{uuid.uuid4().hex}', sqlalchemy.MetaData(),
        sqlalchemy.Column('id', sqlalchemy.Integer, primary_key=True))
    with sql_engine.begin() as connection:
        assert connection.execute(sqlalchemy.text('SELECT 1')).scalar() == 1
        table.create(connection)
        connection.execute(table.insert().values(id=7))
        assert connection.execute(
            sqlalchemy.select(table.c.id)).scalar() == 7
        table.drop(connection)
    assert not sqlalchemy.inspect(sql_engine).has_table(table.name)


def test_answers_is_false_where_nothing_listens():
    assert not database.answers(
        f'postgresql://postgres@127.0.0.1:{free_port()}/test', timeout=1)


@pytest.mark.slow
def test_private_database_runs_on_its_own_port_until_cleanup():
    if not database.PrivateDatabase.available():
        pytest.skip('no PostgreSQL server binaries under /usr/lib/postgresql')
    db = database.PrivateDatabase()
    try:
        assert not port_open('127.0.0.1', db.port)
        db.start()
        assert db.running
        assert db.url.startswith(f'postgresql://postgres@127.0.0.1:{db.port}/')
        engine = sqlalchemy.create_engine(db.url)
        with engine.connect() as connection:
            assert connection.execute(sqlalchemy.text(
                'SELECT current_database(), inet_server_port()')).one() == (
                    'test', db.port)
        # An open connection does not hold up the (fast) shutdown.
        leaked = engine.connect()
    finally:
        db.cleanup()
    leaked.invalidate()
    engine.dispose()
    assert not db.running
    assert not port_open('127.0.0.1', db.port)
    assert not db.dir.exists()


@pytest.mark.slow
def test_ensure_database_starts_a_private_one_if_none_answers(monkeypatch):
    if database._database is not None:
        pytest.skip('a private database already serves this session')
    if not database.PrivateDatabase.available():
        pytest.skip('no PostgreSQL server binaries under /usr/lib/postgresql')
    nowhere = f'postgresql://postgres@127.0.0.1:{free_port()}/test'
    monkeypatch.setenv(database.VARIABLE, nowhere)
    try:
        url = database.ensure_database()
        assert url != nowhere
        assert database.environment_database_url() == url
        assert database.ensure_database() == url
        assert database.answers(url)
    finally:
        database.stop_private_database()
    assert database.environment_database_url() == nowhere
    assert not database.answers(url, timeout=1)


def test_ensure_database_skips_without_database_or_binaries(monkeypatch):
    if database._database is not None:
        pytest.skip('a private database already serves this session')
    monkeypatch.setenv(database.VARIABLE,
                       f'postgresql://postgres@127.0.0.1:{free_port()}/test')
    monkeypatch.setattr(database.PrivateDatabase, 'available',
                        classmethod(lambda cls: False))
    with pytest.raises(pytest.skip.Exception, match='no PostgreSQL answers'):
        database.ensure_database()
