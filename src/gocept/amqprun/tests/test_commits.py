"""Group commits (`commits`): the commits of many workers on one channel
go out together, and each message keeps its promise.

Against the real broker, with in-process servers connected through a
`CommitWatch` proxy that sees every frame. To make a group of a known
size at a known moment, a test holds back the broker's ``Tx.CommitOk``
(`AMQPProxy.hold`): the commits handed over meanwhile queue up behind the
one in flight; released, they go out as one transaction -- which the
proxy may then cut at an exact step:

- *Tx.Commit dropped*: the broker rolls the group back and redelivers
  every member; each is answered once after the reconnect.
- *Tx.CommitOk dropped*: the broker committed the group; none is handled
  or answered twice.
  Either way every member is in doubt (counted, logged).
- *refused*: one member publishes to an exchange that does not exist, the
  broker closes the channel and rolls the group back; the others come
  back, are committed alone and answered once, without counting as
  unsettled returns; the culprit fails alone and is parked.
"""

import collections
import os
import random
import threading
import time

import pytest

import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.retry
import gocept.amqprun.tests.test_send_faults
from gocept.amqprun.testing import AMQPProxy
from gocept.amqprun.testing import BASIC_ACK
from gocept.amqprun.testing import BASIC_PUBLISH
from gocept.amqprun.testing import TO_BROKER
from gocept.amqprun.testing import TO_CLIENT
from gocept.amqprun.testing import TX_COMMIT
from gocept.amqprun.testing import TX_COMMIT_OK
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.test_faults import LOST
from gocept.amqprun.tests.test_faults import drain
from gocept.amqprun.tests.test_faults import tally
from gocept.amqprun.tests.test_server import register


Message = gocept.amqprun.message.Message

TIMEOUT = 10
CHANNEL_CLOSE = (20, 40)
CHANNEL_CLOSE_OK = (20, 41)
POISON = b'poison'
UNSETTLED = 'returned unsettled'


class CommitWatch(AMQPProxy):
    """An `AMQPProxy` that also counts ``Tx.Commit`` per channel and
    records each method frame the client sends on a channel whose
    ``Tx.Commit`` is not answered yet (`intrusions`). The daemon's
    connection must be the only one through it at a time (channel numbers
    are per connection)."""

    def __init__(self, *args, **kw):
        self.commits = collections.Counter()
        self.intrusions = []
        self._committing = set()
        self._closing = set()
        super().__init__(*args, **kw)

    def _opened(self, client, upstream):
        super()._opened(client, upstream)
        # A new connection (after a cut): its channels commit nothing yet.
        self._committing.clear()
        self._closing.clear()

    def _fire(self, direction, channel, method):
        fired, passed = super()._fire(direction, channel, method)
        if not passed:
            return fired, passed
        # The proxy's thread sees a frame before its receiver does.
        if direction == TO_CLIENT:
            if method == TX_COMMIT_OK:
                self._committing.discard(channel)
            elif method == CHANNEL_CLOSE:
                # The broker closed it: no commit pending; what the client
                # sent meanwhile, until Close-Ok, the broker ignores.
                self._committing.discard(channel)
                self._closing.add(channel)
        elif channel in self._closing:
            if method == CHANNEL_CLOSE_OK:
                self._closing.discard(channel)
        else:
            if channel in self._committing:
                self.intrusions.append((channel, method))
            if method == TX_COMMIT:
                self.commits[channel] += 1
                self._committing.add(channel)
        return fired, passed

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


@pytest.fixture
def proxy(amqp_parameters):
    """The servers' way to the broker: a CommitWatch."""
    with CommitWatch.to(amqp_parameters) as watch:
        yield watch


# In-process servers connected through `proxy`.
in_process = gocept.amqprun.tests.test_send_faults.in_process


class Echo:
    """A handler answering each input of `queue` on `out` with its body
    (the body ``poison`` publishes to an exchange that does not exist);
    `handled` counts its calls per body."""

    def __init__(self, zca, client, prefix):
        self.client = client
        self.queue = client.declare(f'{prefix}.in', [f'{prefix}.in'])
        self.out = client.declare(f'{prefix}.out', [f'{prefix}.out'])
        self.handled = collections.Counter()
        self.changed = threading.Condition()
        self.server = None
        register(zca, gocept.amqprun.handler.declare(
            self.queue, self.queue)(self.handle))

    def handle(self, message):
        reply = Message({}, message.body, routing_key=self.out)
        if message.body == POISON:
            reply.exchange = f'{self.queue}.no-such-exchange'
        with self.changed:
            self.handled[message.body] += 1
            self.changed.notify_all()
        return [reply]

    def wait_handled(self, count):
        """Wait until the handler ran `count` times in all."""
        with self.changed:
            assert self.changed.wait_for(
                lambda: sum(self.handled.values()) >= count, TIMEOUT), \
                f'{sum(self.handled.values())} of {count} handled'

    def send(self, *bodies):
        for body in bodies:
            self.client.send(self.queue, body)

    def group(self, proxy, bodies, cut=None):
        """Make the commits of `bodies` one group: hold the Commit-Ok of
        a first input, let the workers hand over the others' commits,
        then arm `cut` (a function of the proxy returning a rule, or
        None) and release. Returns the rule."""
        hold = proxy.hold(TX_COMMIT_OK, TO_CLIENT)
        before = sum(self.handled.values())
        self.send(b'first')
        assert hold.holding.wait(TIMEOUT)
        commits = proxy.seen(TX_COMMIT, TO_BROKER)
        self.send(*bodies)
        self.wait_handled(before + 1 + len(bodies))
        # ... and their commits handed over (queued behind the first).
        wait_for(lambda: self.server.stats.snapshot()['in_flight'] == 0,
                 timeout=TIMEOUT)
        rule = cut(proxy) if cut is not None else None
        hold.release()
        return rule, commits


def test_commits_of_many_workers_go_out_together(
        in_process, proxy, zca, amqp_client, name_prefix, caplog):
    count = 400
    e = Echo(zca, amqp_client, name_prefix)
    e.send(*(b'%06d' % n for n in range(count)))
    e.server = in_process(workers=8)
    wait_for(lambda: amqp_client.count(e.out) == count, timeout=60)
    e.server.stop()
    tally(drain(amqp_client, e.out), count)
    assert amqp_client.count(e.queue) == 0
    commits = sum(proxy.commits.values())
    print(f'{count} inputs in {commits} transactions '
          f'({count / commits:.1f} per Tx.Commit)')
    # Groups: fewer transactions than inputs.
    assert commits < count
    assert proxy.seen(TX_COMMIT_OK, TO_CLIENT) == commits
    # At least one ACK per transaction; mostly one for many (multiple).
    assert commits <= proxy.seen(BASIC_ACK, TO_BROKER) < count
    # Nothing was sent on a channel during its commit (RabbitMQ answers
    # that with 504), one connection all along.
    assert proxy.intrusions == []
    assert proxy.accepted == 1
    stats = e.server.stats.snapshot()
    assert stats['messages'] == {(e.queue, 'handled'): count}
    assert stats['commit_seconds'].count == count
    for text in ('504', LOST, 'closed by the broker', UNSETTLED):
        assert text not in caplog.text


def test_a_lone_commit_goes_at_once(
        in_process, proxy, zca, amqp_client, name_prefix):
    e = Echo(zca, amqp_client, name_prefix)
    e.server = in_process(workers=8)
    for n in range(5):
        e.send(b'%d' % n)
        assert amqp_client.wait(e.out, timeout=TIMEOUT).body == b'%d' % n
        # Its own transaction, sent without waiting for company.
        assert sum(proxy.commits.values()) == n + 1


def test_one_ack_for_many_never_covers_a_delivery_still_handled(
        in_process, proxy, zca, amqp_client, name_prefix, caplog):
    release = threading.Event()
    e = Echo(zca, amqp_client, name_prefix)
    handle = e.handle

    def slow_first(message):
        if message.body == b'slow':
            release.wait(TIMEOUT)
        return handle(message)
    e.handle = slow_first
    zca.registerUtility(
        gocept.amqprun.handler.declare(e.queue, e.queue)(slow_first),
        gocept.amqprun.interfaces.IHandler, name=e.queue)
    e.server = in_process(workers=4)
    e.send(b'slow', *(b'%02d' % n for n in range(30)))
    e.wait_handled(30)      # all but the slow one
    wait_for(lambda: (amqp_client.count(e.out) or 0) == 30, timeout=TIMEOUT)
    release.set()
    bodies = settled(e, 31)
    assert sorted(bodies) == sorted([b'slow'] + [b'%02d' % n
                                                 for n in range(30)])
    # Its later ACK found its tag unsettled (else: 406, channel closed).
    for text in ('closed by the broker', 'PRECONDITION_FAILED', UNSETTLED):
        assert text not in caplog.text


def settled(e, count):
    """Wait until `count` replies are there and no input is left; stop
    the server; return the replies' bodies."""
    wait_for(lambda: (e.client.count(e.out) or 0) >= count
             and e.client.count(e.queue) == 0, timeout=30)
    e.server.stop()
    return drain(e.client, e.out)


@pytest.mark.parametrize('cut', ['Tx.Commit dropped', 'Tx.CommitOk dropped'])
def test_a_group_cut_at_its_commit_keeps_every_members_promise(
        in_process, proxy, zca, amqp_client, name_prefix, cut, caplog):
    e = Echo(zca, amqp_client, name_prefix)
    e.server = in_process(workers=8, retry_policy=gocept.amqprun.retry.
                          RetryPolicy(retries=3, delay=0))
    members = [b'm%d' % n for n in range(6)]
    if cut == 'Tx.Commit dropped':
        def arm(proxy):
            return proxy.arm(TX_COMMIT, direction=TO_BROKER)
    else:
        def arm(proxy):
            # The held Commit-Ok passes first: the group's is the 2nd.
            return proxy.arm(TX_COMMIT_OK, direction=TO_CLIENT, nth=2)
    rule, commits = e.group(proxy, members, arm)
    assert rule.fired.wait(TIMEOUT)
    # One transaction held every member (what follows shows it: all of
    # them were in doubt, all handled again or none).
    assert proxy.seen(TX_COMMIT, TO_BROKER) == commits + (
        cut == 'Tx.CommitOk dropped')
    bodies = settled(e, 1 + len(members))
    tally_bodies = collections.Counter(bodies)
    assert tally_bodies == collections.Counter([b'first'] + members), \
        tally_bodies
    # Tx.Commit was sent either way: every member is in doubt, counted.
    assert e.server.stats.snapshot()['commits_in_doubt'] == len(members)
    assert caplog.text.count('Commit in doubt: message') == len(members)
    # Rolled back: every member handled again; committed: none.
    again = 2 if cut == 'Tx.Commit dropped' else 1
    assert all(e.handled[m] == again for m in members), e.handled
    assert amqp_client.count(f'{e.queue}.parked') == 0


def test_a_refused_member_does_not_sink_the_others(
        in_process, proxy, zca, amqp_client, name_prefix, caplog):
    retries = 1
    e = Echo(zca, amqp_client, name_prefix)
    e.server = in_process(workers=8, retry_policy=gocept.amqprun.retry.
                          RetryPolicy(retries=retries, delay=0))
    innocent = [b'i%d' % n for n in range(5)]
    e.group(proxy, [POISON] + innocent)
    parked = f'{e.queue}.parked'
    wait_for(lambda: amqp_client.count(parked) == 1, timeout=30)
    bodies = settled(e, 1 + len(innocent))
    assert collections.Counter(bodies) == collections.Counter(
        [b'first'] + innocent)
    # The group failed once; the innocent members were committed alone
    # once each, and not counted as unsettled returns.
    assert all(e.handled[m] == 2 for m in innocent), e.handled
    assert UNSETTLED not in caplog.text
    assert 'they return and are committed alone' in caplog.text
    # The culprit failed alone `retries` + 1 times before it was parked.
    assert e.handled[POISON] == 1 + retries + 1
    [message] = [amqp_client.get(parked)]
    assert message.body == POISON
    assert 'BrokerRefused' in message.header.headers['amqprun-error']
    stats = e.server.stats.snapshot()['messages']
    assert stats[e.queue, 'handled'] == 1 + len(innocent)
    assert stats[e.queue, 'parked'] == 1


STREAM = 1000
CUTS = 5
# Where a group is cut: (method, direction, nth, cut) -- nth counted from
# the release of the held Tx.CommitOk, which passes first.
STEPS = {
    'Tx.Commit dropped': (TX_COMMIT, TO_BROKER, 1, 'before'),
    'cut after Tx.Commit': (TX_COMMIT, TO_BROKER, 1, 'after'),
    'Tx.CommitOk dropped': (TX_COMMIT_OK, TO_CLIENT, 2, 'before'),
    'a publish dropped': (BASIC_PUBLISH, TO_BROKER, 3, 'before'),
    'an ACK dropped': (BASIC_ACK, TO_BROKER, 1, 'before'),
}
SEED = 'AMQPRUN_FAULT_SEED'


def held_group(e, proxy, size, more, attempts=100):
    """Hold a Tx.CommitOk of the stream until at least `size` commits
    queue up behind it (a group to come); return the hold and the slot's
    commits. While messages that returned unsettled or from a refused
    group run one at a time, no group forms: let go and try again, with
    `more()` inputs when the stream ran dry meanwhile."""
    quarantine = f'{e.queue}.quarantine'
    dispatcher = e.server.dispatcher
    for _ in range(attempts):
        wait_for(lambda: not e.client.count(quarantine)
                 and not dispatcher._draining
                 and dispatcher._isolated is None, timeout=30)
        if not e.client.count(e.queue):
            more()
        hold = proxy.hold(TX_COMMIT_OK, TO_CLIENT)
        assert hold.holding.wait(TIMEOUT)
        # The IO thread's state, read while it waits for the broker.
        commits = e.server.connection.consumer_slots[0].commits
        try:
            wait_for(lambda: commits is not None
                     and len(commits.queued) >= size
                     and e.server.stats.snapshot()['in_flight'] == 0,
                     timeout=0.5)
        except AssertionError:
            hold.release()
            continue
        return hold, commits
    raise AssertionError(f'no group of {size} in {attempts} attempts')


@pytest.mark.slow
def test_a_stream_of_groups_cut_five_times_with_a_poison_member(
        in_process, proxy, zca, amqp_client, name_prefix, caplog):
    """1,000 inputs, 8 workers, 5 cuts at exact steps of a group of at
    least 4 members, one poison input (its reply goes to an exchange that
    does not exist): each other input answered exactly once, the poison
    parked, nothing lost (replay the steps with the printed seed)."""
    seed = int(os.environ.get(SEED) or random.SystemRandom().getrandbits(32))
    rng = random.Random(seed)
    print(f'{SEED}={seed}')
    e = Echo(zca, amqp_client, name_prefix)
    bodies = [b'%06d' % n for n in range(STREAM)]
    bodies.insert(STREAM // 2, POISON)
    # In batches, one before each cut: the stream must not end first.
    size = len(bodies) // (CUTS + 1) + 1
    batches = [bodies[i:i + size] for i in range(0, len(bodies), size)]
    sent = []

    def send(batch):
        e.send(*batch)
        sent.extend(b for b in batch if b != POISON)

    def more():
        send([b'extra-%d' % n for n in range(len(sent), len(sent) + 50)])
    # Retries: a healthy input may return unsettled from every cut.
    e.server = in_process(workers=8, retry_policy=gocept.amqprun.retry.
                          RetryPolicy(retries=CUTS, delay=0))
    for number, batch in enumerate(batches[:CUTS], 1):
        send(batch)
        hold, commits = held_group(e, proxy, 4, more)
        step = rng.choice(sorted(STEPS))
        method, direction, nth, cut = STEPS[step]
        print(f'cut {number}: {step}, a group of {len(commits.queued)}')
        rule = proxy.arm(method, nth=nth, cut=cut, direction=direction)
        hold.release()
        assert rule.fired.wait(TIMEOUT), rule
        wait_for(lambda: e.server.running, timeout=TIMEOUT)
    for batch in batches[CUTS:]:
        send(batch)
    parked = f'{e.queue}.parked'
    wait_for(lambda: (amqp_client.count(e.out) or 0) >= len(sent)
             and amqp_client.count(parked) == 1
             and amqp_client.count(e.queue) == 0, timeout=60)
    in_doubt = e.server.stats.snapshot()['commits_in_doubt']
    e.server.stop()
    replies = drain(amqp_client, e.out)
    print(f'{proxy.accepted} connections, {in_doubt} commits in doubt, '
          f'{sum(proxy.commits.values())} transactions, '
          f'{caplog.text.count(UNSETTLED)} unsettled returns')
    # Exactly once: in transaction mode even a commit in doubt is either
    # all there (replies and ACK) or not at all.
    assert sorted(replies) == sorted(sent), (
        f'{len(sent)} inputs, {len(replies)} replies, '
        f'{len(set(sent) - set(replies))} lost, '
        f'{len(replies) - len(set(replies))} doubled')
    assert amqp_client.get(parked).body == POISON
    assert proxy.accepted == CUTS + 1
    assert proxy.intrusions == []


def test_stopping_while_a_group_is_in_flight_sends_nothing_in_between(
        in_process, proxy, zca, amqp_client, name_prefix, caplog):
    # RabbitMQ answers anything but Tx.CommitOk's wait on a channel with
    # 504 (connection closed): the consumers are cancelled after it.
    e = Echo(zca, amqp_client, name_prefix)
    e.server = in_process(workers=8)
    e.send(*(b'%02d' % n for n in range(40)))
    hold = proxy.hold(TX_COMMIT_OK, TO_CLIENT)
    assert hold.holding.wait(TIMEOUT)
    stopped = threading.Thread(target=e.server.stop)
    stopped.start()
    # The stop waits for the commit; meanwhile it sent nothing.
    assert not stopped.join(0.5) and stopped.is_alive()
    hold.release()
    stopped.join(TIMEOUT)
    assert not stopped.is_alive()
    assert proxy.intrusions == []
    assert proxy.accepted == 1
    replies = drain(amqp_client, e.out)
    left = amqp_client.count(e.queue)
    assert len(set(replies)) == len(replies)
    assert len(replies) + left == 40, (len(replies), left)
    for text in ('504', LOST, 'did not answer every commit'):
        assert text not in caplog.text


def test_a_stop_while_deliveries_race_the_cancel_puts_them_back_unflagged(
        in_process, proxy, zca, amqp_client, name_prefix, caplog):
    # Workers busy, commits in flight, deliveries on their way when the
    # consumers are cancelled: pika would reject those (requeued, flagged
    # redelivered), and a reject during a Tx.Commit closes the connection.
    count = 160
    e = Echo(zca, amqp_client, name_prefix)
    handle = e.handle

    def slowly(message):
        time.sleep(0.05)
        return handle(message)
    zca.registerUtility(
        gocept.amqprun.handler.declare(e.queue, e.queue)(slowly),
        gocept.amqprun.interfaces.IHandler, name=e.queue)
    e.send(*(b'%03d' % n for n in range(count)))
    e.server = in_process(workers=8)
    e.wait_handled(24)
    e.server.stop()
    replies = drain(amqp_client, e.out)
    assert len(set(replies)) == len(replies)
    back = []
    while (message := amqp_client.get(e.queue)) is not None:
        back.append(message)
    assert len(replies) + len(back) == count, (len(replies), len(back))
    assert sorted(replies + [m.body for m in back]) == [
        b'%03d' % n for n in range(count)]
    # Put back as they were: not flagged, not counted.
    assert not any(m.redelivered for m in back)
    assert not any('amqprun-unsettled' in m.header.headers for m in back)
    assert proxy.intrusions == []
    assert proxy.accepted == 1
    for text in ('504', LOST, 'did not answer every commit'):
        assert text not in caplog.text
