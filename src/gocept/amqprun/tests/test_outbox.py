"""The outbox against the real broker and PostgreSQL (in-process server).

Handlers write rows through a zope.sqlalchemy session; the tests count
rows, replies and records. Faults at exact protocol steps are in
test_commit_faults.py.
"""

import datetime
import threading

import pytest
import sqlalchemy as sa
import sqlalchemy.orm
import transaction
import zope.configuration.config
import zope.configuration.xmlconfig
import zope.sqlalchemy

import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.outbox
import gocept.amqprun.retry
import gocept.amqprun.server
import gocept.amqprun.testing
from gocept.amqprun.outbox import inbox
from gocept.amqprun.outbox import outbox as outbox_table


Message = gocept.amqprun.message.Message


class Database:
    """A table of rows for one test, and a zope.sqlalchemy session."""

    def __init__(self, engine, prefix):
        self.engine = engine
        self.prefix = prefix
        self.table = sa.Table(
            prefix.replace('.', '_') + '_rows', sa.MetaData(),
            sa.Column('id', sa.Integer, primary_key=True),
            sa.Column('message_id', sa.String(255), nullable=False),
            sa.Column('body', sa.Text, nullable=False),
            sa.Column('code', sa.String(20)))
        self.table.create(engine)
        with engine.begin() as connection:
            # A duplicate `code` fails at COMMIT, not at the INSERT.
            connection.execute(sa.text(
                f'ALTER TABLE {self.table.name} ADD CONSTRAINT '
                f'{self.table.name}_code UNIQUE (code) '
                'DEFERRABLE INITIALLY DEFERRED'))
        self.Session = sqlalchemy.orm.scoped_session(
            sqlalchemy.orm.sessionmaker(bind=engine))
        zope.sqlalchemy.register(self.Session)

    def insert(self, message, code=None):
        session = self.Session()
        session.execute(self.table.insert().values(
            message_id=message.header.message_id,
            body=message.body.decode(), code=code))
        # Core statements: zope.sqlalchemy must be told of the change.
        zope.sqlalchemy.mark_changed(session)

    def rows(self):
        with self.engine.connect() as connection:
            return [tuple(r) for r in connection.execute(
                sa.select(self.table.c.message_id, self.table.c.body)
                .order_by(self.table.c.id))]

    def records(self, queue):
        with self.engine.connect() as connection:
            return connection.execute(
                sa.select(sa.func.count()).select_from(inbox)
                .where(inbox.c.queue == queue)).scalar()

    def cleanup(self, queue):
        self.Session.remove()
        self.table.drop(self.engine)
        with self.engine.begin() as connection:
            # A test without the outbox may run before any created them.
            existing = sa.inspect(connection).get_table_names()
            for table in (outbox_table, inbox):
                if table.name in existing:
                    connection.execute(table.delete().where(
                        table.c.queue == queue))


@pytest.fixture
def db(sql_engine, name_prefix):
    database = Database(sql_engine, name_prefix)
    yield database
    database.cleanup(f'{name_prefix}.in')


@pytest.fixture
def serve(amqp_parameters, amqp_client, zca, name_prefix):
    """Register `handler` (and an outbox), start a Server; stopped after
    the test."""
    runners = []

    def factory(handler, outbox=None, **kw):
        zca.registerUtility(handler, gocept.amqprun.interfaces.IHandler,
                            'handler')
        if outbox is not None:
            zca.registerUtility(outbox, gocept.amqprun.interfaces.IOutbox)
        for suffix in ('', '.retry', '.parked', '.quarantine'):
            amqp_client.forget(f'{handler.queue_name}{suffix}')
        kw.setdefault('retry_policy', gocept.amqprun.retry.RetryPolicy(
            retries=0))
        server = gocept.amqprun.server.Server(amqp_parameters, **kw)
        runners.append(gocept.amqprun.testing.ServerThread(server).start())
        return server
    yield factory
    for runner in runners:
        runner.stop()


def inserting_handler(db, name_prefix, calls):
    @gocept.amqprun.handler.declare(f'{name_prefix}.in', f'{name_prefix}.in')
    def handle(message):
        calls.append(message.body)
        code = message.header.headers.get('code')
        db.insert(message, code)
        return [Message({}, b'row for ' + message.body,
                        routing_key=f'{name_prefix}.out')]
    return handle


def test_a_handled_message_is_recorded_with_its_replies(
        db, serve, amqp_client, name_prefix):
    calls = []
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    box = gocept.amqprun.outbox.Outbox(db.Session)
    serve(inserting_handler(db, name_prefix, calls), outbox=box)
    msgid = amqp_client.send(f'{name_prefix}.in', b'one')
    reply = amqp_client.wait(out)
    assert reply.body == b'row for one'
    assert db.rows() == [(msgid, 'one')]
    assert db.records(f'{name_prefix}.in') == 1
    with db.engine.connect() as connection:
        [row] = connection.execute(sa.select(outbox_table).where(
            outbox_table.c.message_id == msgid)).all()
    recorded = gocept.amqprun.properties.decode(row.properties)
    assert recorded == reply.header
    assert row.body == reply.body
    assert row.routing_key == f'{name_prefix}.out'


def test_a_recorded_message_is_answered_again_not_handled_again(
        db, serve, amqp_client, name_prefix):
    calls = []
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    serve(inserting_handler(db, name_prefix, calls),
          outbox=gocept.amqprun.outbox.Outbox(db.Session))
    msgid = amqp_client.send(f'{name_prefix}.in', b'once')
    first = amqp_client.wait(out)
    # The same message again (as after a commit in doubt, or a broker
    # resurrecting an ACKed message).
    amqp_client.send(f'{name_prefix}.in', b'once',
                     header={'message_id': msgid})
    second = amqp_client.wait(out)
    assert calls == [b'once']
    assert db.rows() == [(msgid, 'once')]
    assert second.header == first.header   # the same message-id too
    assert second.body == first.body
    assert amqp_client.get(out) is None
    assert amqp_client.count(f'{name_prefix}.in') == 0


def test_a_refused_database_commit_sends_nothing_and_records_nothing(
        db, serve, amqp_client, name_prefix):
    calls = []
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    parked = f'{name_prefix}.in.parked'
    serve(inserting_handler(db, name_prefix, calls),
          outbox=gocept.amqprun.outbox.Outbox(db.Session))
    first = amqp_client.send(f'{name_prefix}.in', b'a', {'code': 'x'})
    assert amqp_client.wait(out).body == b'row for a'
    refused = amqp_client.send(f'{name_prefix}.in', b'b', {'code': 'x'})
    assert amqp_client.wait(parked).header.message_id == refused
    assert amqp_client.get(out) is None
    assert db.rows() == [(first, 'a')]
    assert db.records(f'{name_prefix}.in') == 1


def test_without_outbox_a_refused_database_commit_sends_nothing(
        db, serve, amqp_client, name_prefix):
    """The database commits before the broker: a refused row gets no
    reply, its input is not ACKed away (issue: 20 of 200 refused)."""
    calls = []
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    parked = f'{name_prefix}.in.parked'
    serve(inserting_handler(db, name_prefix, calls), workers=4)
    refused = set()
    for i in range(200):
        code = 'dup' if i % 10 == 0 else f'c{i}'
        msgid = amqp_client.send(f'{name_prefix}.in', b'%03d' % i,
                                 {'code': code})
        if code == 'dup':
            refused.add(msgid)
    replies = amqp_client.wait_many(out, 181, timeout=60)
    parked_ids = {m.header.message_id
                  for m in amqp_client.wait_many(parked, 19, timeout=30)}
    assert amqp_client.get(out) is None
    rows = db.rows()
    assert len(rows) == 181
    stored = {message_id for message_id, body in rows}
    # The one 'dup' row that went in first got its reply; the other 19
    # were refused at COMMIT: parked, no reply, no row.
    assert len(refused & stored) == 1
    assert parked_ids == refused - stored
    assert {r.header.correlation_id for r in replies} == stored


def test_messages_without_id_and_other_queues_are_not_recorded(
        db, serve, amqp_client, name_prefix, caplog):
    calls = []
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    serve(inserting_handler(db, name_prefix, calls),
          outbox=gocept.amqprun.outbox.Outbox(
              db.Session, queues=['some.other.queue']))
    amqp_client.send(f'{name_prefix}.in', b'not recorded')
    assert amqp_client.wait(out).body == b'row for not recorded'
    assert db.records(f'{name_prefix}.in') == 0
    box = gocept.amqprun.outbox.Outbox(db.Session)
    assert not box.applies(f'{name_prefix}.in', None)
    assert box.applies(f'{name_prefix}.in', '<id@host>')
    assert 'are not recorded in the outbox' in caplog.text


class RendezvousSet(set):
    """A set whose first membership test waits (up to `patience`
    seconds) until a second thread tests membership too: two threads
    that check it without a lock both find what the other is about to
    add missing."""

    def __init__(self, patience):
        super().__init__()
        self.patience = patience
        self.entered = threading.Semaphore(0)
        self.first = threading.Event()

    def __contains__(self, item):
        found = super().__contains__(item)
        if not self.first.is_set():
            self.first.set()
            self.entered.acquire(timeout=self.patience)
        else:
            self.entered.release()
        return found


def test_a_queue_without_message_ids_is_logged_once_by_concurrent_workers(
        caplog):
    box = gocept.amqprun.outbox.Outbox(lambda: None)
    box._without_id = RendezvousSet(patience=2)
    barrier = threading.Barrier(2)
    answers = []

    def worker():
        barrier.wait(timeout=10)
        answers.append(box.applies('q', None))
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert answers == [False, False]
    assert [r.getMessage() for r in caplog.records] == [
        "Messages without message-id in queue 'q' are not recorded in the "
        'outbox (handled at-least-once).']
    assert set(box._without_id) == {'q'}


def test_prune_forgets_records_older_than_the_retention(db, name_prefix):
    queue = f'{name_prefix}.in'
    box = gocept.amqprun.outbox.Outbox(db.Session, retention=3600)
    box.prepare()
    old = gocept.amqprun.outbox.now() - datetime.timedelta(hours=2)
    with transaction.manager:
        box.record(queue, '<new@test>', [Message({}, b'reply')])
        box.record(queue, '<old@test>', [Message({}, b'old reply')])
        db.Session().execute(inbox.update().where(
            inbox.c.message_id == '<old@test>').values(handled_at=old))
        db.Session().execute(outbox_table.update().where(
            outbox_table.c.message_id == '<old@test>').values(
                handled_at=old))
    assert db.records(queue) == 2
    assert box.prune(transaction.manager) == 1
    with transaction.manager:
        assert box.recorded(queue, '<old@test>') is None
        [reply] = box.recorded(queue, '<new@test>')
        assert reply.body == b'reply'
    assert not box.prune_due()     # the first prune is an interval away


def test_duration_parsing():
    parse = gocept.amqprun.outbox.parse_duration
    assert parse('90') == 90
    assert parse('15m') == 900
    assert parse('12h') == 43200
    assert parse('7d') == 7 * 86400
    for bad in ('', 'x', '-1h', '0'):
        with pytest.raises(ValueError):
            parse(bad)


ZCML = '''
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:amqp="http://namespaces.gocept.com/amqp">
  <include package="gocept.amqprun" file="meta.zcml" />
  <amqp:outbox session="{session}" queues="a b" retention="{retention}"
               create_tables="false" />
</configure>
'''


Session = sqlalchemy.orm.scoped_session(sqlalchemy.orm.sessionmaker())


def test_zcml_directive_registers_the_outbox(zca):
    zope.configuration.xmlconfig.string(ZCML.format(
        session=f'{__name__}.Session', retention='12h'))
    box = zca.getUtility(gocept.amqprun.interfaces.IOutbox)
    assert box.queues == {'a', 'b'}
    assert box.retention == 43200
    assert box.create is False
    assert box.session is Session()


def test_zcml_directive_refuses_a_bad_retention(zca):
    with pytest.raises(zope.configuration.config.ConfigurationError,
                       match='not a duration'):
        zope.configuration.xmlconfig.string(ZCML.format(
            session=f'{__name__}.Session', retention='soon'))


@pytest.mark.parametrize('dialect', ['postgresql', 'sqlite'])
def test_ddl_creates_both_tables_and_their_indexes(dialect):
    statements = gocept.amqprun.outbox.ddl(dialect)
    text = '\n'.join(statements)
    assert len(statements) == 4
    assert 'CREATE TABLE amqprun_inbox' in text
    assert 'CREATE TABLE amqprun_outbox' in text
    assert 'PRIMARY KEY (queue, message_id, position)' in text
    assert text.count('CREATE INDEX') == 2


def test_prepare_creates_the_tables_ddl_describes(sql_engine):
    session = sqlalchemy.orm.scoped_session(
        sqlalchemy.orm.sessionmaker(bind=sql_engine))
    gocept.amqprun.outbox.Outbox(session).prepare()   # idempotent
    session.remove()
    inspector = sa.inspect(sql_engine)
    for table in gocept.amqprun.outbox.metadata.sorted_tables:
        columns = {c['name'] for c in inspector.get_columns(table.name)}
        assert columns == set(table.columns.keys())
        indexes = {i['name'] for i in inspector.get_indexes(table.name)}
        assert f'ix_{table.name}_handled_at' in indexes
