"""Faults at exact AMQP protocol steps, for what is not a handler's commit
in transaction mode: `Server.send` outside handlers, ``<amqp:readfiles>``
and confirm mode.

An `AMQPProxy` between the daemon and the broker drops one method frame
and cuts the connection there: dropping ``Tx.Commit`` makes the broker roll
back, dropping ``Tx.CommitOk`` leaves it committed -- either way the client
is *in doubt*. The rules (see `session`): a commit in doubt is logged and
counted; messages sent outside a handler are then sent once more before
the commit returns, and the other data managers finish; a commit that
certainly failed raises and the others abort; nothing is lost, and where
a duplicate is the price of that the tests pin it exactly.

The test client (`amqp_client`) talks to the broker directly, not through
the proxy, so only the daemon's frames count and get cut.
"""

import concurrent.futures
import time

import pytest
import transaction

import gocept.amqprun.errors
import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.retry
import gocept.amqprun.server
from gocept.amqprun.testing import AMQPProxy
from gocept.amqprun.testing import BASIC_ACK
from gocept.amqprun.testing import BASIC_PUBLISH
from gocept.amqprun.testing import Client
from gocept.amqprun.testing import ServerThread
from gocept.amqprun.testing import TO_BROKER
from gocept.amqprun.testing import TO_CLIENT
from gocept.amqprun.testing import TX_COMMIT
from gocept.amqprun.testing import TX_COMMIT_OK
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.test_faults import ZCML
from gocept.amqprun.tests.test_readfiles import names
from gocept.amqprun.tests.test_readfiles import put
from gocept.amqprun.tests.test_session import Recorder


Message = gocept.amqprun.message.Message

# Reconnect at once after a cut (the defaults wait 1 s and more).
FAST = dict(retry_delay=0.1, max_retry_delay=0.2)
FAST_EXTRA = ''.join(f'  {key} {value}\n' for key, value in FAST.items())

# The two ways to leave a transaction-mode commit in doubt, and how many
# copies of what it published the broker then has.
IN_DOUBT = {
    'Tx.Commit dropped': (TX_COMMIT, TO_BROKER, 0),
    'Tx.CommitOk dropped': (TX_COMMIT_OK, TO_CLIENT, 1),
}

# A handler for the daemon: it answers to the input's reply_to.
REPLY_TO_HANDLERS = '''\
import gocept.amqprun.handler
import gocept.amqprun.message


@gocept.amqprun.handler.declare({queue!r}, {queue!r})
def echo(message):
    return [gocept.amqprun.message.Message(
        {{}}, message.body, routing_key=message.header.reply_to)]
'''

# The publish of a send never reaches the broker, or its confirm never
# reaches the client; and how many copies the broker then has.
CONFIRM_SEND_CUTS = {
    'publish dropped': (BASIC_PUBLISH, TO_BROKER, 0),
    'confirm dropped': (BASIC_ACK, TO_CLIENT, 1),
}
CHANNEL_OPEN = (20, 10)

CONFIRM_EXTRA = '  commit-mode confirm\n'
# A queue that makes the broker NACK every publish to it.
REJECTING = {'x-max-length': 0, 'x-overflow': 'reject-publish'}


@pytest.fixture
def proxy(amqp_parameters):
    """An AMQPProxy to the test broker."""
    proxy = AMQPProxy.to(amqp_parameters)
    yield proxy
    proxy.stop()


@pytest.fixture
def journal():
    """Where `Recorder` data managers write what happened to them."""
    return []


@pytest.fixture
def in_process(proxy, zca, amqp_client):
    """A factory of started in-process `server.Server`s connected through
    `proxy` (keywords: Server's; `parameters`: more Parameters), stopped
    afterwards."""
    runners = []

    def factory(parameters=None, **kw):
        server = gocept.amqprun.server.Server(
            proxy.parameters(**dict(FAST, **(parameters or {}))), **kw)
        for queue in server.connection.queues:
            amqp_client.forget(queue.name)
        runners.append(ServerThread(server).start())
        return server
    yield factory
    for runner in runners:
        runner.stop()


def send(server, routing_key, body, *managers, exchange=None):
    """Send a message with `server` outside a handler, join `managers` to
    the transaction and commit it; return the message-id."""
    message = Message({}, body, routing_key=routing_key)
    if exchange is not None:
        message.exchange = exchange
    server.send(message)
    for manager in managers:
        transaction.get().join(manager)
    try:
        transaction.commit()
    finally:
        transaction.abort()
    return message.header.message_id


def bodies(client, queue, count):
    """The bodies of the `count` messages in `queue`, checking that there
    are no more."""
    result = [m.body for m in client.wait_many(queue, count, timeout=10)]
    assert client.get(queue) is None, f'more than {count} in {queue}'
    return result


def logged(caplog, logger, text):
    """The messages `logger` logged that contain `text`."""
    return [r.getMessage() for r in caplog.records
            if r.name == logger and text in r.getMessage()]


def only_later_sends_arrive(amqp_parameters, proxy, server, client, key,
                            out):
    """Make the broker reachable again at the port of the stopped `proxy`;
    check that `server` reconnects and that a later send is all that
    arrives in `out` (nothing refused before is sent late)."""
    again = AMQPProxy.to(amqp_parameters, port=proxy.port)
    try:
        wait_for(lambda: server.running, timeout=10)
        send(server, key, b'after')
        assert bodies(client, out, 1) == [b'after']
    finally:
        again.stop()


# Server.send outside handlers


@pytest.mark.parametrize('step', sorted(IN_DOUBT))
def test_send_commit_in_doubt_returns_and_the_others_finish(
        step, proxy, in_process, amqp_client, name_prefix, journal, caplog):
    method, direction, copies = IN_DOUBT[step]
    key = f'{name_prefix}.out'
    out = amqp_client.declare(key, [key])
    server = in_process(setup_handlers=False)
    rule = proxy.arm(method, direction=direction)
    # In doubt: sent once more after the reconnect, then commit() returns
    # normally and the other manager finishes.
    msgid = send(server, key, b'in doubt', Recorder('other', journal, 'z'))
    assert rule.fired.wait(5)
    assert journal == ['other vote', 'other finish']
    [line] = logged(caplog, 'gocept.amqprun.session', 'Commit in doubt')
    assert msgid in line
    assert logged(caplog, 'gocept.amqprun.session', 'Sent 1 message(s) '
                  'again after a commit in doubt')
    assert server.stats.snapshot()['commits_in_doubt'] == 1
    # The broker has what it committed (nothing when it rolled back, the
    # message when it committed) plus the second copy: never a loss.
    send(server, key, b'later')
    assert bodies(amqp_client, out, copies + 2) == (
        [b'in doubt'] * (copies + 1) + [b'later'])
    assert server.stats.snapshot()['commits_in_doubt'] == 1


def test_send_refused_by_the_broker_raises_and_the_others_abort(
        proxy, in_process, amqp_client, name_prefix, journal, caplog):
    key = f'{name_prefix}.out'
    out = amqp_client.declare(key, [key])
    server = in_process(setup_handlers=False)
    # A publish to an exchange that does not exist: the broker closes the
    # channel (404) before it gets Tx.Commit -- certainly not committed.
    with pytest.raises(gocept.amqprun.errors.ChannelLost) as info:
        send(server, key, b'refused', Recorder('other', journal, 'z'),
             exchange=f'{name_prefix}.no-such-exchange')
    assert info.value.refused
    assert '404' in str(info.value)
    # (The abort after the failed commit adds 'other abort'.)
    assert journal[:2] == ['other vote', 'other tpc_abort']
    assert 'other finish' not in journal
    assert proxy.seen(TX_COMMIT_OK) == 0
    assert server.stats.snapshot()['commits_in_doubt'] == 0
    assert not logged(caplog, 'gocept.amqprun.session', 'Commit in doubt')
    # The sender's channel comes back; only the later message arrives.
    send(server, key, b'later')
    assert bodies(amqp_client, out, 1) == [b'later']


def test_send_while_the_broker_is_unreachable_raises_in_time(
        amqp_parameters, proxy, in_process, amqp_client, name_prefix,
        journal):
    key = f'{name_prefix}.out'
    out = amqp_client.declare(key, [key])
    server = in_process(setup_handlers=False,
                        parameters=dict(send_timeout=1))
    send(server, key, b'before')
    assert bodies(amqp_client, out, 1) == [b'before']
    proxy.stop()        # connections reset, new ones refused
    wait_for(lambda: not server.connected, timeout=5)
    started = time.monotonic()
    with pytest.raises(gocept.amqprun.errors.ConnectionUnavailable):
        send(server, key, b'during', Recorder('other', journal, 'z'))
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.5, elapsed
    # Refused in the Session's vote, before the other manager voted.
    assert journal[:2] == ['other abort', 'other tpc_abort']
    assert 'other vote' not in journal
    only_later_sends_arrive(amqp_parameters, proxy, server, amqp_client,
                            key, out)


def test_send_waiting_for_its_channel_times_out_and_is_not_sent_later(
        amqp_parameters, proxy, in_process, amqp_client, name_prefix,
        journal):
    """A commit handed to the IO thread while the connection goes (so it
    waits for a channel) raises after send_timeout and is dropped: the
    reconnect does not send it behind the caller's back."""
    key = f'{name_prefix}.out'
    out = amqp_client.declare(key, [key])
    server = in_process(setup_handlers=False, parameters=dict(
        send_timeout=1, retry_delay=1, max_retry_delay=1))
    # The first send opens the sender's channel: cut there (after the
    # Session's vote saw the connection open) and keep the broker away.
    rule = proxy.arm(CHANNEL_OPEN, direction=TO_BROKER)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        future = pool.submit(send, server, key, b'during',
                             Recorder('other', journal, 'z'))
        assert rule.fired.wait(5)
        proxy.stop()
        with pytest.raises(gocept.amqprun.errors.ConnectionUnavailable):
            future.result(timeout=10)
        elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.5, elapsed
    assert journal[:2] == ['other vote', 'other tpc_abort']
    only_later_sends_arrive(amqp_parameters, proxy, server, amqp_client,
                            key, out)


@pytest.mark.parametrize('step', sorted(CONFIRM_SEND_CUTS))
def test_send_in_confirm_mode_without_its_confirm_is_sent_again(
        step, proxy, in_process, amqp_client, name_prefix, journal, caplog):
    """Confirm mode: a send whose confirm does not arrive is in doubt (the
    broker may have routed it): it is sent once more, then the others
    finish -- a duplicate when the broker had it, never a loss."""
    method, direction, copies = CONFIRM_SEND_CUTS[step]
    key = f'{name_prefix}.out'
    out = amqp_client.declare(key, [key])
    server = in_process(setup_handlers=False, confirm=True)
    rule = proxy.arm(method, direction=direction)
    send(server, key, b'unconfirmed', Recorder('other', journal, 'z'))
    assert rule.fired.wait(5)
    assert journal == ['other vote', 'other finish']
    assert server.stats.snapshot()['commits_in_doubt'] == 1
    assert logged(caplog, 'gocept.amqprun.session', 'Commit in doubt')
    send(server, key, b'later')
    assert bodies(amqp_client, out, copies + 2) == (
        [b'unconfirmed'] * (copies + 1) + [b'later'])


# <amqp:readfiles>


@pytest.mark.parametrize('step', sorted(IN_DOUBT))
def test_readfiles_commit_in_doubt_sends_the_file_again(
        step, proxy, server_process, amqp_client, name_prefix, tmp_path):
    method, direction, copies = IN_DOUBT[step]
    maildir = tmp_path / 'in'
    key = f'{name_prefix}.r'
    queue = amqp_client.declare(f'{name_prefix}.q', [key])
    process = server_process(
        parameters=proxy.parameters(), server_extra=FAST_EXTRA,
        zcml=f'<amqp:readfiles directory="{maildir}" routing_key="{key}"'
             ' poll_interval="0.05" />')
    wait_for(lambda: names(maildir) == ['cur', 'new', 'tmp'])
    rule = proxy.arm(method, direction=direction)
    put(maildir, 'data', b'content')
    assert rule.fired.wait(10)
    process.wait_for_log('Commit in doubt: 1 message(s)', timeout=10)
    # Sent again after the reconnect, then moved.
    wait_for(lambda: names(maildir / 'cur') == ['data'], timeout=10)
    assert names(maildir / 'new') == []
    assert process.stop() == 0
    log = process.log_text()
    assert log.count('Commit in doubt: 1 message(s)') == 1
    assert log.count(f'Sent {maildir}/new/data') == 1
    # Rolled back: once; committed and sent again: twice (a duplicate,
    # never a loss).
    assert bodies(amqp_client, queue, copies + 1) == [b'content'] * (
        copies + 1)


# Confirm mode


def reply_to_daemon(server_process, amqp_client, name_prefix, **kw):
    """The daemon answering `NAME_PREFIX.in` to each input's reply_to;
    return it and the input queue."""
    queue = f'{name_prefix}.in'
    for name in (queue, f'{queue}.retry', f'{queue}.parked',
                 f'{queue}.quarantine'):
        amqp_client.forget(name)
    process = server_process(
        handlers=REPLY_TO_HANDLERS.format(queue=queue), zcml=ZCML, **kw)
    return process, queue


def test_confirm_nack_retries_then_parks_while_others_flow(
        server_process, amqp_client, name_prefix):
    full = amqp_client.declare(f'{name_prefix}.full', [f'{name_prefix}.full'],
                               arguments=REJECTING)
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    process, queue = reply_to_daemon(
        server_process, amqp_client, name_prefix, amount=2,
        worker_extra=CONFIRM_EXTRA + '  retries 1\n  retry-delay 0\n')
    nacked = amqp_client.send(queue, b'nacked', {'reply_to': full})
    for i in range(20):
        amqp_client.send(queue, b'%d' % i, {'reply_to': out})
    parked = amqp_client.wait(f'{queue}.parked', timeout=15)
    assert parked.header.message_id == nacked
    assert parked.body == b'nacked'
    assert parked.header.headers['amqprun-attempts'] == 2
    assert 'basic.nack' in parked.header.headers['amqprun-error']
    assert sorted(bodies(amqp_client, out, 20)) == sorted(
        b'%d' % i for i in range(20))
    assert process.stop() == 0
    log = process.log_text()
    assert log.count(f'Message {nacked} from queue {queue!r}: retry 1 of 1 '
                     'now') == 1
    assert log.count(f'Message {nacked} from queue {queue!r}: parked') == 1
    # ACKed with its parked copy: not left unacked (it would be back in
    # the queue after the stop).
    assert amqp_client.count(queue) == 0
    assert amqp_client.count(full) == 0
    assert amqp_client.get(f'{queue}.parked') is None


CONFIRM_CUTS = {
    # The daemon's publish of the reply never reaches the broker.
    'reply publish dropped': (BASIC_PUBLISH, TO_BROKER, 1),
    # The broker has the reply, its confirm never reaches the daemon.
    'confirm dropped': (BASIC_ACK, TO_CLIENT, 2),
}


@pytest.mark.parametrize('step', sorted(CONFIRM_CUTS))
def test_confirm_connection_lost_before_the_confirm_redelivers_the_input(
        step, proxy, server_process, amqp_client, name_prefix):
    method, direction, replies = CONFIRM_CUTS[step]
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    process, queue = reply_to_daemon(
        server_process, amqp_client, name_prefix, amount=1,
        parameters=proxy.parameters(), server_extra=FAST_EXTRA,
        worker_extra=CONFIRM_EXTRA)
    rule = proxy.arm(method, direction=direction)
    msgid = amqp_client.send(queue, b'input', {'reply_to': out})
    assert rule.fired.wait(10)
    # Not ACKed before the cut: redelivered, moved to the quarantine
    # queue (one ACK) and answered (again) from there (another).
    wait_for(lambda: amqp_client.count(out) == replies
             and amqp_client.count(queue) == 0
             and proxy.seen(BASIC_ACK, TO_BROKER) == 2, timeout=10)
    assert process.stop() == 0
    assert amqp_client.count(queue) == 0
    assert amqp_client.count(f'{queue}.parked') == 0
    received = amqp_client.wait_many(out, replies)
    assert {r.header.correlation_id for r in received} == {msgid}
    assert amqp_client.get(out) is None
    assert 'Connection to the broker lost' in process.log_text()


class ConfirmWitness(Recorder):
    """A data manager whose tpc_finish notes what the broker has by then:
    `proxy`'s publisher confirms to the daemon, the messages in `queue`
    (asked on a connection of its own), the ACKs from the daemon."""

    def __init__(self, journal, proxy, parameters, queue):
        super().__init__('witness', journal, 'witness')
        self.proxy = proxy
        self.parameters = parameters
        self.queue = queue

    def tpc_finish(self, txn):
        confirms = self.proxy.seen(BASIC_ACK, TO_CLIENT)
        client = Client(self.parameters)
        try:
            replies = client.count(self.queue)
        finally:
            client.close()
        # After a round trip to the broker: an ACK sent before this
        # tpc_finish has passed the proxy by now.
        acks = self.proxy.seen(BASIC_ACK, TO_BROKER)
        self.journal.append(
            f'finish: {confirms} confirm(s), {replies} reply(ies), '
            f'{acks} ACK(s)')


def confirm_server(in_process, zca, name_prefix, out, witness=None, **kw):
    """An in-process confirm-mode Server whose handler answers
    `NAME_PREFIX.in` to `out`, with `witness()` (a data manager) joined
    to its transaction if given."""
    @gocept.amqprun.handler.declare(f'{name_prefix}.in', f'{name_prefix}.in')
    def handle(message):
        if witness is not None:
            transaction.get().join(witness())
        return [Message({}, message.body, routing_key=out)]
    zca.registerUtility(handle, gocept.amqprun.interfaces.IHandler,
                        name='confirmed')
    return in_process(confirm=True, **kw)


def test_confirm_other_manager_finishes_after_the_confirm_before_the_ack(
        in_process, zca, proxy, amqp_parameters, amqp_client, name_prefix,
        journal):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    server = confirm_server(in_process, zca, name_prefix, out, lambda: (
        ConfirmWitness(journal, proxy, amqp_parameters, out)))
    amqp_client.send(f'{name_prefix}.in', b'input')
    wait_for(lambda: proxy.seen(BASIC_ACK, TO_BROKER) == 1, timeout=10)
    # (Then `transaction` calls abort() on every manager, after the
    # after-commit hook that ACKs.)
    assert journal[:2] == [
        'witness vote', 'finish: 1 confirm(s), 1 reply(ies), 0 ACK(s)']
    assert 'witness tpc_abort' not in journal
    server.stop()
    assert amqp_client.count(f'{name_prefix}.in') == 0
    assert bodies(amqp_client, out, 1) == [b'input']


def test_confirm_nack_aborts_the_other_manager_and_parks(
        in_process, zca, proxy, amqp_parameters, amqp_client, name_prefix,
        journal):
    full = amqp_client.declare(f'{name_prefix}.full', [f'{name_prefix}.full'],
                               arguments=REJECTING)
    server = confirm_server(
        in_process, zca, name_prefix, full, lambda: (
            ConfirmWitness(journal, proxy, amqp_parameters, full)),
        retry_policy=gocept.amqprun.retry.RetryPolicy(retries=1, delay=0))
    msgid = amqp_client.send(f'{name_prefix}.in', b'input')
    parked = amqp_client.wait(f'{name_prefix}.in.parked', timeout=10)
    assert parked.header.message_id == msgid
    assert parked.header.headers['amqprun-attempts'] == 2
    # Both tries: voted, then aborted when the reply was NACKed (and the
    # worker's abort() after the failed commit).
    assert journal == ['witness vote', 'witness tpc_abort',
                       'witness abort'] * 2
    server.stop()
    assert amqp_client.count(f'{name_prefix}.in') == 0
    assert amqp_client.count(full) == 0



def test_confirm_nacked_input_is_not_counted_as_handled(
        in_process, zca, amqp_client, name_prefix):
    full = amqp_client.declare(f'{name_prefix}.full', [f'{name_prefix}.full'],
                               arguments=REJECTING)
    server = confirm_server(
        in_process, zca, name_prefix, full,
        retry_policy=gocept.amqprun.retry.RetryPolicy(retries=1, delay=0))
    amqp_client.send(f'{name_prefix}.in', b'input')
    amqp_client.wait(f'{name_prefix}.in.parked', timeout=10)
    wait_for(lambda: server.stats.totals()['parked'] == 1, timeout=5)
    # Never handled: NACKed, retried once, NACKed, parked.
    assert server.stats.totals() == dict(handled=0, retried=1, parked=1)
