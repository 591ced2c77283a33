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
import threading

import pytest

import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.retry
import gocept.amqprun.tests.test_send_faults
from gocept.amqprun.testing import AMQPProxy
from gocept.amqprun.testing import BASIC_ACK
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
POISON = b'poison'
UNSETTLED = 'returned unsettled'


class CommitWatch(AMQPProxy):
    """An `AMQPProxy` that also counts ``Tx.Commit`` per channel and
    records each method frame the client sends on a channel whose
    ``Tx.Commit`` is not answered yet (`intrusions`). The daemon's
    connection must be the only one through it (channel numbers are per
    connection)."""

    def __init__(self, *args, **kw):
        self.commits = collections.Counter()
        self.intrusions = []
        self._committing = set()
        super().__init__(*args, **kw)

    def _fire(self, direction, channel, method):
        fired, passed = super()._fire(direction, channel, method)
        if passed:
            # The proxy's thread sees a Commit-Ok before the client can.
            if direction == TO_BROKER:
                if channel in self._committing:
                    self.intrusions.append((channel, method))
                if method == TX_COMMIT:
                    self.commits[channel] += 1
                    self._committing.add(channel)
            elif method == TX_COMMIT_OK:
                self._committing.discard(channel)
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
