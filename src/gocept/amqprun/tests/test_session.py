"""The commit protocol of `session.Session` (see its docstring).

The order of the phases is pure logic of the `transaction` package: these
tests drive a real transaction with a Session whose broker side is a
stand-in slot that records what it is asked to commit. The same protocol
against the real broker, PostgreSQL and cut connections is tested in
test_commit_faults.py.
"""

import pytest
import transaction

import gocept.amqprun.errors
import gocept.amqprun.message
import gocept.amqprun.retry
import gocept.amqprun.session
import gocept.amqprun.settlement
import gocept.amqprun.stats


class Recorder:
    """A data manager that records its calls in a shared journal."""

    def __init__(self, name, journal, sort_key, vote=None):
        self.name = name
        self.journal = journal
        self.key = sort_key
        self.vote = vote
        self.transaction_manager = transaction.manager

    def sortKey(self):
        return self.key

    def abort(self, txn):
        self.journal.append(f'{self.name} abort')

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        self.journal.append(f'{self.name} vote')
        if self.vote is not None:
            self.vote()

    def tpc_finish(self, txn):
        self.journal.append(f'{self.name} finish')

    def tpc_abort(self, txn):
        self.journal.append(f'{self.name} tpc_abort')


class StubConnection:

    def __init__(self, confirm=False):
        self.confirm = confirm


class StubSlot:
    """Records the commits asked of it; `error` makes the next fail."""

    def __init__(self, journal, confirm=False):
        self.journal = journal
        self.connection = StubConnection(confirm)
        self.epoch = 0
        self.error = None
        self.commits = []

    def commit(self, epoch=None, publishes=(), ack=None, reject=None,
               timeout=None, wait=True, callback=None, alone=False):
        self.journal.append('AMQP commit')
        self.commits.append(dict(publishes=len(publishes), ack=ack,
                                 wait=wait))
        if not wait:
            self.callback = callback
        elif self.error is not None:
            raise self.error


class StubDelivery:

    def __init__(self, slot):
        self.slot = slot
        self.epoch = 0
        self.delivery_tag = 7
        self.queue = 'q'
        self.alone = False
        self.header = gocept.amqprun.message.Header(message_id='<in@test>')
        self.span = None        # not traced

    @property
    def current(self):
        return self.epoch == self.slot.epoch


class StubServer:

    def __init__(self, slot):
        self.connection = slot.connection
        self.stats = gocept.amqprun.stats.Stats()
        self.retried = []
        self.settlement = gocept.amqprun.settlement.Settlement(
            gocept.amqprun.retry.RetryPolicy(), self.stats,
            self.retried.append)


@pytest.fixture
def journal():
    transaction.abort()
    yield []
    transaction.abort()


def handled(journal, confirm=False):
    """A transaction handling a delivery: (txn, session, slot)."""
    slot = StubSlot(journal, confirm)
    server = StubServer(slot)
    received = gocept.amqprun.message.Message(
        {'message_id': '<in@test>'}, b'', delivery_tag=7)
    txn = transaction.manager.begin()
    session = gocept.amqprun.session.Session.join(
        server, txn, StubDelivery(slot), received)
    session.send(gocept.amqprun.message.Message({}, b'reply'))
    session.stats = server.stats
    return txn, session, slot


def test_amqp_commit_after_every_vote_before_every_finish(journal):
    txn, session, slot = handled(journal)
    # Keys around every string that could sort early or late.
    for name, key in (('a', ' '), ('b', '!'), ('sql', '~sqlalchemy:1'),
                      ('files', 'gocept.amqprun.writefiles:1'),
                      ('z', '\U0010ffff')):
        txn.join(Recorder(name, journal, key))
    transaction.commit()
    commit = journal.index('AMQP commit')
    assert all(entry.endswith('vote') for entry in journal[:commit])
    assert len(journal[:commit]) == 5
    assert all(entry.endswith('finish') for entry in journal[commit + 1:])
    assert len(journal[commit + 1:]) == 5
    assert session.settled
    assert session.stats.snapshot()['commits_in_doubt'] == 0
    assert slot.commits == [dict(publishes=1, ack=7, wait=True)]


def test_a_failed_vote_sends_nothing(journal):
    txn, session, slot = handled(journal)

    def refuse():
        raise RuntimeError('deferred constraint violated at COMMIT')
    txn.join(Recorder('sql', journal, '~sqlalchemy:1', vote=refuse))
    with pytest.raises(RuntimeError):
        transaction.commit()
    transaction.abort()
    assert 'AMQP commit' not in journal
    assert 'sql tpc_abort' in journal
    assert not session.settled


def test_a_certain_amqp_failure_aborts_the_others(journal):
    txn, session, slot = handled(journal)
    slot.error = gocept.amqprun.errors.ChannelLost('refused', refused=True)
    txn.join(Recorder('files', journal, 'gocept.amqprun.writefiles:1'))
    with pytest.raises(gocept.amqprun.errors.ChannelLost):
        transaction.commit()
    transaction.abort()
    assert journal[:3] == ['files vote', 'AMQP commit', 'files tpc_abort']
    assert 'files finish' not in journal
    assert not session.settled


def test_an_amqp_commit_in_doubt_lets_the_others_finish(journal, caplog):
    txn, session, slot = handled(journal)
    slot.error = gocept.amqprun.errors.CommitInDoubt('connection lost')
    txn.join(Recorder('sql', journal, 'sqlalchemy.twophase:1'))
    transaction.commit()
    assert journal == ['sql vote', 'AMQP commit', 'sql finish']
    assert session.settled
    assert session.stats.snapshot()['commits_in_doubt'] == 1
    assert 'Commit in doubt: message <in@test> from queue' in caplog.text


def test_alone_the_commit_does_not_hold_the_worker(journal):
    txn, session, slot = handled(journal)
    transaction.commit()
    assert slot.commits == [dict(publishes=1, ack=7, wait=False)]
    assert session.settled
    stats = session.stats
    assert stats.snapshot()['messages'] == {}
    slot.callback(None)     # the IO thread: Tx.CommitOk came
    assert stats.snapshot()['messages'] == {('q', 'handled'): 1}
    assert stats.snapshot()['commit_seconds'].count == 1


def test_alone_a_commit_in_doubt_is_counted_when_it_is_known(
        journal, caplog):
    txn, session, slot = handled(journal)
    transaction.commit()
    slot.callback(gocept.amqprun.errors.CommitInDoubt('connection lost'))
    assert session.stats.snapshot()['commits_in_doubt'] == 1
    assert session.stats.snapshot()['messages'] == {}
    assert 'Commit in doubt: message <in@test> from queue' in caplog.text


def test_alone_a_refused_commit_counts_against_its_message_only_alone(
        journal):
    for shared, counted in ((True, 0), (False, 1)):
        txn, session, slot = handled(journal)
        transaction.commit()
        slot.epoch += 1     # the broker closed the channel
        slot.callback(gocept.amqprun.errors.ChannelLost(
            'refused', refused=True, shared=shared))
        refusals = session.settlement.refusals
        assert refusals.count('<in@test>') == counted
        assert session.stats.snapshot()['messages'] == {}


def test_an_after_commit_hook_makes_the_worker_wait_for_the_outcome(
        journal):
    txn, session, slot = handled(journal)
    outcomes = []
    txn.addAfterCommitHook(outcomes.append)
    slot.error = gocept.amqprun.errors.ChannelLost('refused', refused=True)
    with pytest.raises(gocept.amqprun.errors.ChannelLost):
        transaction.commit()
    transaction.abort()
    assert slot.commits == [dict(publishes=1, ack=7, wait=True)]
    assert outcomes == [False]


def test_a_delivery_of_a_lost_channel_fails_the_vote(journal):
    txn, session, slot = handled(journal)
    txn.join(Recorder('sql', journal, '~sqlalchemy:1'))
    slot.epoch += 1
    with pytest.raises(gocept.amqprun.errors.ChannelLost):
        transaction.commit()
    transaction.abort()
    assert 'AMQP commit' not in journal
    assert 'sql vote' not in journal    # the session votes first


def test_confirm_mode_alone_does_not_wait(journal):
    txn, session, slot = handled(journal, confirm=True)
    transaction.commit()
    assert slot.commits == [dict(publishes=1, ack=7, wait=False)]


def test_confirm_mode_with_others_waits_and_acks_after_they_finished(
        journal):
    txn, session, slot = handled(journal, confirm=True)
    txn.join(Recorder('sql', journal, 'sqlalchemy.twophase:1'))
    transaction.commit()
    # (After-commit hooks are followed by abort() calls, see transaction.)
    assert journal[:4] == ['sql vote', 'AMQP commit', 'sql finish',
                           'AMQP commit']
    assert slot.commits == [dict(publishes=1, ack=None, wait=True),
                            dict(publishes=0, ack=7, wait=False)]


def test_waits_for_commit_reads_what_transaction_joined():
    # session.waits_for_commit reads a private attribute of
    # `transaction`: this fails when it changes.
    txn = transaction.TransactionManager().begin()
    assert isinstance(txn._resources, list)
    first = Recorder('a', [], 'a')
    txn.join(first)
    assert txn._resources == [first]
    assert not gocept.amqprun.session.waits_for_commit(txn, first)
    txn.join(Recorder('b', [], 'b'))
    assert gocept.amqprun.session.waits_for_commit(txn, first)
    txn.abort()


def test_waits_for_commit_when_an_after_commit_hook_waits():
    txn = transaction.TransactionManager().begin()
    first = Recorder('a', [], 'a')
    txn.join(first)
    txn.addAfterCommitHook(lambda status: None)
    assert gocept.amqprun.session.waits_for_commit(txn, first)
    txn.abort()


def test_waits_for_commit_says_yes_when_it_cannot_tell():
    class Opaque:
        pass
    assert gocept.amqprun.session.waits_for_commit(Opaque(), object())
