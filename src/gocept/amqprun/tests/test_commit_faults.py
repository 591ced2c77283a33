"""Faults at exact steps of the commit protocol (see `session`), with the
real daemon (a subprocess), the real broker, PostgreSQL and files.

An `AMQPProxy` between the daemon and the broker cuts the connection at
one AMQP method frame of a handler's commit:

- *Tx.Commit dropped*: the broker never saw the commit and rolls the
  transaction back (replies and ACK); it redelivers the input.
- *Tx.CommitOk dropped*: the broker committed, the daemon never heard.

Either way the daemon has sent ``Tx.Commit`` and cannot tell: the commit
is *in doubt*. It logs that, and the other data managers of the
transaction complete. The tests assert the exact end state once the
daemon reconnected and everything settled, per kind of handler: replies
only, ``<amqp:writefiles>``, SQL without and with ``<amqp:outbox>``; then
a database commit refused by a deferred constraint, and a stream with cuts
at random protocol steps.

Every wait is bounded; the end state is read after the daemon stopped
(SIGTERM, exit 0), when nothing can change any more.
"""

import collections
import os
import random
import time

import pytest
import sqlalchemy as sa

from gocept.amqprun.outbox import outbox as outbox_table
from gocept.amqprun.testing import AMQPProxy
from gocept.amqprun.testing import BASIC_ACK
from gocept.amqprun.testing import BASIC_DELIVER
from gocept.amqprun.testing import BASIC_PUBLISH
from gocept.amqprun.testing import TO_BROKER
from gocept.amqprun.testing import TO_CLIENT
from gocept.amqprun.testing import TX_COMMIT
from gocept.amqprun.testing import TX_COMMIT_OK
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.test_faults import CONNECTED
from gocept.amqprun.tests.test_faults import tally
from gocept.amqprun.tests.test_outbox import Database
import gocept.amqprun.properties
import gocept.amqprun.retry


# Reconnect quickly after a cut.
SERVER_EXTRA = '  retry_delay 0.1\n  max_retry_delay 0.5\n'

HANDLERS = '''\
import logging

import sqlalchemy as sa
import sqlalchemy.orm
import zope.sqlalchemy

import gocept.amqprun.handler
import gocept.amqprun.message

log = logging.getLogger('handlers')

Session = sqlalchemy.orm.scoped_session(sqlalchemy.orm.sessionmaker(
    bind=sa.create_engine({url!r})))
zope.sqlalchemy.register(Session)

INSERT = sa.text(
    'INSERT INTO {table} (message_id, body, code) '
    'VALUES (:message_id, :body, :code)')


def reply(message):
    return [gocept.amqprun.message.Message(
        {{}}, message.body, routing_key={out!r})]


@gocept.amqprun.handler.declare({queue!r}, {queue!r})
def echo(message):
    log.info('Handling %s', message.header.message_id)
    return reply(message)


@gocept.amqprun.handler.declare({queue!r}, {queue!r})
def insert(message):
    log.info('Handling %s', message.header.message_id)
    session = Session()
    session.execute(INSERT, dict(
        message_id=message.header.message_id, body=message.body.decode(),
        code=message.header.headers.get('code')))
    # A Core statement: else zope.sqlalchemy rolls back "no work".
    zope.sqlalchemy.mark_changed(session)
    return reply(message)
'''

HANDLER_ZCML = '''\
<utility component="handlers.{name}" name="{name}"
         provides="gocept.amqprun.interfaces.IHandler" />
'''

OUTBOX_ZCML = '<amqp:outbox session="handlers.Session" />\n'

WRITEFILES_ZCML = '''\
<amqp:writefiles queue_name="{queue}" routing_key="{queue}"
                 directory="{directory}" pattern="${{msgid}}" />
'''

# The two cuts (a) and (b), each at the first one after arming.
COMMIT_DROPPED = 'commit-dropped'
COMMIT_OK_DROPPED = 'commit-ok-dropped'
CUTS = {
    COMMIT_DROPPED: (TX_COMMIT, TO_BROKER),
    COMMIT_OK_DROPPED: (TX_COMMIT_OK, TO_CLIENT),
}
# How often the input is handled (and its commit succeeds or is in
# doubt): the broker rolled back and redelivers it, or it committed.
HANDLINGS = {COMMIT_DROPPED: 2, COMMIT_OK_DROPPED: 1}

REPLAYED = 'was handled before (outbox)'


class Scenario:
    """The queues, database table and daemon of one test.

    queue: the input queue, out: the replies, files: the directory of
    ``<amqp:writefiles>``, db: a `test_outbox.Database` or None, proxy:
    the `AMQPProxy` the daemon connects through.
    """

    def __init__(self, client, prefix, server_process, directory,
                 database_url, proxy, db=None):
        self.client = client
        self.proxy = proxy
        self.queue = client.declare(f'{prefix}.in', [f'{prefix}.in'])
        self.out = client.declare(f'{prefix}.out', [f'{prefix}.out'])
        self.parked = f'{self.queue}.parked'
        self.retry = f'{self.queue}.retry'
        # Declared by the daemon for retries, parking and quarantine.
        client.forget(self.retry)
        client.forget(self.parked)
        client.forget(f'{self.queue}.quarantine')
        self.server_process = server_process
        self.files = directory / 'files'
        self.database_url = database_url
        self.db = db
        self.process = None

    def start(self, handler='echo', outbox=False, amount=1,
              worker_extra=''):
        """Start the daemon with `handler` (echo, insert, writefiles),
        connected through the proxy."""
        if handler == 'writefiles':
            zcml = WRITEFILES_ZCML.format(
                queue=self.queue, directory=self.files)
        else:
            zcml = HANDLER_ZCML.format(name=handler)
        if outbox:
            zcml += OUTBOX_ZCML
        self.process = self.server_process(
            parameters=self.proxy.parameters(), zcml=zcml, amount=amount,
            handlers=HANDLERS.format(
                url=self.database_url, queue=self.queue, out=self.out,
                table=self.db.table.name if self.db else 'unused'),
            server_extra=SERVER_EXTRA, worker_extra=worker_extra)
        return self.process

    def send(self, body, **headers):
        """Publish an input; return its message-id."""
        return self.client.send(self.queue, body, headers)

    def log(self):
        return self.process.log_text()

    def calls(self, msgid):
        """How often the handler function ran for `msgid`."""
        return self.log().count(f'handlers Handling {msgid}\n')

    def handled(self, msgid):
        """How often the daemon finished handling `msgid`: its commit
        succeeded or is in doubt."""
        return self.log().count(
            f'Handled message {msgid} from queue {self.queue!r}')

    def wait_handled(self, msgid, count, timeout=30):
        wait_for(lambda: self.handled(msgid) >= count, timeout,
                 message=f'{msgid} not handled {count} time(s) within '
                 f'{timeout} s:\n{self.log()}')

    def stop(self):
        """SIGTERM: exit 0, and no input is left in the queue (an input
        not ACKed returns to it when the daemon's channels close) or
        waiting for a retry."""
        code = self.process.stop()
        assert code == 0, self.log()
        assert self.client.count(self.queue) == 0
        assert self.client.count(self.retry) in (0, None)

    def parked_count(self):
        return self.client.count(self.parked) or 0

    def replies(self, count, timeout=30):
        """Exactly `count` replies (after the daemon stopped)."""
        replies = self.client.wait_many(self.out, count, timeout)
        assert self.client.get(self.out) is None, \
            f'more than {count} replies'
        return replies

    def outbox_rows(self):
        """The recorded replies of the test's queue: (input id, the
        reply's message-id)."""
        with self.db.engine.connect() as connection:
            rows = connection.execute(sa.select(outbox_table).where(
                outbox_table.c.queue == self.queue)).all()
        return [(row.message_id, gocept.amqprun.properties.decode(
            row.properties).message_id) for row in rows]


@pytest.fixture
def db(sql_engine, name_prefix):
    """The test's table; it and the test queue's outbox records are
    deleted afterwards."""
    database = Database(sql_engine, name_prefix)
    yield database
    database.cleanup(f'{name_prefix}.in')


@pytest.fixture
def scenario(amqp_parameters, amqp_client, name_prefix, server_process,
             tmp_path, database_url, request):
    """A factory of the test's `Scenario` (`sql=True`: with its table);
    its proxy is stopped after the test."""
    proxies = []

    def factory(sql=False):
        proxies.append(AMQPProxy.to(amqp_parameters))
        return Scenario(
            amqp_client, name_prefix, server_process, tmp_path,
            database_url, proxies[-1],
            request.getfixturevalue('db') if sql else None)
    yield factory
    for proxy in proxies:
        proxy.stop()


def in_doubt(s, cut, body=b'input'):
    """Arm `cut`, publish one input; check that the commit was in doubt,
    the daemon reconnected and handled the input as often as the cut
    implies, then stop it. Return the input's message-id."""
    method, direction = CUTS[cut]
    rule = s.proxy.arm(method, direction=direction)
    msgid = s.send(body)
    assert rule.fired.wait(30), rule
    assert rule.hit[::2] == (direction, method)
    s.process.wait_for_log(CONNECTED, count=2)
    s.wait_handled(msgid, HANDLINGS[cut])
    s.stop()
    log = s.log()
    print(log)
    assert (f'Commit in doubt: message {msgid} from queue {s.queue!r}'
            in log)
    assert log.count('Commit in doubt') == 1
    assert log.count(CONNECTED) == 2
    # Exactly: a second handling after (b) would have been caught here or
    # left the input in the queue.
    assert s.handled(msgid) == HANDLINGS[cut]
    assert s.parked_count() == 0
    return msgid


parametrize_cut = pytest.mark.parametrize('cut', list(CUTS))


@parametrize_cut
def test_replies_only_one_reply_whatever_the_broker_decided(
        scenario, cut):
    # (a) the broker rolled back the reply and redelivered the input,
    # (b) it committed the reply and the ACK.
    s = scenario()
    s.start('echo')
    msgid = in_doubt(s, cut)
    [reply] = s.replies(1)
    assert reply.header.correlation_id == msgid
    assert reply.body == b'input'
    assert s.calls(msgid) == HANDLINGS[cut]


@parametrize_cut
def test_writefiles_stores_the_message_once(scenario, cut):
    # In doubt, the files are kept (renamed into place in the vote); a
    # redelivery (a) writes them again under the same ${msgid} name.
    s = scenario()
    s.start('writefiles')
    msgid = in_doubt(s, cut, body=b'file content')
    assert '/' not in msgid
    assert sorted(os.listdir(s.files)) == [msgid, f'{msgid}.header']
    assert (s.files / msgid).read_bytes() == b'file content'
    header = (s.files / f'{msgid}.header').read_text()
    assert f'"message_id": "{msgid}"' in header
    assert f'"routing_key": "{s.queue}"' in header


@parametrize_cut
def test_sql_without_outbox_never_loses_the_row(scenario, cut):
    # The database committed in its vote, before the AMQP commit: (a) the
    # redelivered input inserts again (at-least-once), (b) once.
    s = scenario(sql=True)
    s.start('insert')
    msgid = in_doubt(s, cut)
    [reply] = s.replies(1)
    assert reply.header.correlation_id == msgid
    assert s.db.rows() == [(msgid, 'input')] * HANDLINGS[cut]
    assert s.calls(msgid) == HANDLINGS[cut]
    assert REPLAYED not in s.log()


@parametrize_cut
def test_sql_with_outbox_one_row_one_reply(scenario, cut):
    # (a): the redelivered input is found in the inbox; the recorded
    # reply is sent again instead of calling the handler.
    s = scenario(sql=True)
    s.start('insert', outbox=True)
    msgid = in_doubt(s, cut)
    [reply] = s.replies(1)
    assert reply.header.correlation_id == msgid
    assert s.db.rows() == [(msgid, 'input')]
    assert s.db.records(s.queue) == 1
    assert s.outbox_rows() == [(msgid, reply.header.message_id)]
    assert s.calls(msgid) == 1
    replayed = (f'Message {msgid} from queue {s.queue!r} {REPLAYED}'
                in s.log())
    assert replayed == (cut == COMMIT_DROPPED)


@pytest.mark.parametrize('outbox', [False, True],
                         ids=['without-outbox', 'with-outbox'])
def test_a_refused_database_commit_parks_the_input_sends_nothing(
        scenario, outbox):
    # The second input's row violates a UNIQUE ... DEFERRABLE INITIALLY
    # DEFERRED constraint: its database commit fails in the vote, before
    # the AMQP commit. With retries 0 it is parked at once.
    s = scenario(sql=True)
    s.start('insert', outbox=outbox,
            worker_extra='  retries 0\n')
    first = s.send(b'first', code='same')
    s.wait_handled(first, 1)
    second = s.send(b'second', code='same')
    parked = s.client.wait(s.parked, timeout=30)
    s.stop()
    log = s.log()
    print(log)
    assert parked.header.message_id == second
    assert parked.body == b'second'
    error = parked.header.headers[gocept.amqprun.retry.ERROR]
    assert 'IntegrityError' in error and 'duplicate key' in error, error
    assert s.client.get(s.parked) is None
    [reply] = s.replies(1)
    assert reply.header.correlation_id == first
    assert s.db.rows() == [(first, 'first')]
    assert s.calls(second) == 1
    assert s.handled(second) == 0
    assert (f'Handling message {second} from queue {s.queue!r} failed'
            in log)
    assert 'Commit in doubt' not in log
    if outbox:
        assert s.db.records(s.queue) == 1
        assert s.outbox_rows() == [(first, reply.header.message_id)]


def failures(log):
    return sum(' Handling message ' in line and line.endswith(' failed')
               for line in log.splitlines())


STREAM = 1000
# Replies (a fraction of the stream) after which a cut is armed.
CUT_AT = (0.10, 0.25, 0.45, 0.65, 0.85)
STEPS = {
    'Basic.Publish': (BASIC_PUBLISH, TO_BROKER),
    'Basic.Ack': (BASIC_ACK, TO_BROKER),
    'Tx.Commit': (TX_COMMIT, TO_BROKER),
    'Tx.CommitOk': (TX_COMMIT_OK, TO_CLIENT),
    'Basic.Deliver': (BASIC_DELIVER, TO_CLIENT),
}
SEED = 'AMQPRUN_FAULT_SEED'


@pytest.mark.slow
def test_stream_with_cuts_at_random_steps_one_row_and_reply_per_input(
        scenario):
    """1,000 inputs, SQL with outbox, 4 workers, 5 cuts at random steps
    (replay the steps with the printed AMQPRUN_FAULT_SEED)."""
    seed = int(os.environ.get(SEED) or random.SystemRandom().getrandbits(32))
    rng = random.Random(seed)
    print(f'{SEED}={seed}')
    s = scenario(sql=True)
    ids = [s.send(b'%06d' % i) for i in range(STREAM)]
    wait_for(lambda: s.client.count(s.queue) == STREAM, timeout=30)
    started = time.monotonic()
    process = s.start('insert', outbox=True, amount=4,
                      worker_extra='  retry-delay 0\n')
    for number, fraction in enumerate(CUT_AT, 1):
        wait_for(lambda: (s.client.count(s.out) or 0) >= STREAM * fraction,
                 timeout=60, interval=0.01)
        step = rng.choice(sorted(STEPS))
        nth = rng.randint(1, 20)
        cut = rng.choice(('before', 'after'))
        print(f'cut {number}: {cut} {step} #{nth}')
        method, direction = STEPS[step]
        rule = s.proxy.arm(method, nth=nth, cut=cut, direction=direction)
        assert rule.fired.wait(30), rule
        assert (s.client.count(s.out) or 0) < STREAM, \
            'the stream ended before the cut'
        process.wait_for_log(CONNECTED, count=number + 1)
        wait_for(lambda: s.proxy.connections, timeout=30)
    try:
        wait_for(lambda: s.client.count(s.out) == STREAM
                 and s.client.count(s.queue) == 0
                 and len(s.db.rows()) >= STREAM, timeout=60, interval=0.2)
    except AssertionError:
        raise AssertionError(
            f'not settled within 60 s: {s.client.count(s.out)} replies, '
            f'{len(s.db.rows())} rows, {s.client.count(s.queue)} inputs '
            'left') from None
    assert process.process.poll() is None, 'the daemon stopped'
    elapsed = time.monotonic() - started
    s.stop()
    log = s.log()
    print(f'{elapsed:.1f} s; {log.count(CONNECTED)} connections, '
          f'{log.count("Commit in doubt")} commit(s) in doubt, '
          f'{log.count(REPLAYED)} replayed from the outbox, '
          f'{failures(log)} failed handling(s)')
    assert log.count(CONNECTED) == len(CUT_AT) + 1
    assert s.parked_count() == 0
    replies = s.replies(STREAM)
    tally([r.body for r in replies], STREAM)
    expected = collections.Counter(ids)
    assert len(expected) == STREAM
    assert collections.Counter(
        r.header.correlation_id for r in replies) == expected
    rows = s.db.rows()
    assert collections.Counter(msgid for msgid, body in rows) == expected
    assert sorted(body for msgid, body in rows) == [
        '%06d' % i for i in range(STREAM)]
    assert s.db.records(s.queue) == STREAM
