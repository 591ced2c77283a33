"""The daemon in a 3-node RabbitMQ cluster while nodes fail (issue 12).

Real daemon processes (`ServerProcess`) know all three addresses; their
echo handlers consume quorum queues and reply to a quorum queue. Each test
checks the exact end state: every numbered input got exactly one reply,
nothing is left in the input, retry, quarantine or parked queues, and the
daemon ran until SIGTERM and exited 0.

Two things of RabbitMQ 3.10.8 show here that no client can change:

- ``tx.commit`` is atomic only within one queue
  (https://www.rabbitmq.com/semantics.html, "Semantics of tx": "When
  multiple queues are involved it is possible that in the event of a
  broker failure during tx.commit the effects of the transaction are only
  visible in some of the queues"). An echo commit publishes to the reply
  queue and ACKs in the input queue; a node dying during it can leave the
  reply published and the input unacknowledged: the input comes back and
  is answered twice. The daemon logs such a commit as "Commit in doubt"
  with the message-id (`in_doubt`); a duplicate is accepted for exactly
  those inputs and no other, a loss never.
- A channel whose first publish to a quorum queue comes while that queue
  has no leader (its leader's node died, the election is not over) gets
  Commit-Ok for every transaction and the broker drops what it published
  to that queue, for as long as the channel lives. A daemon that
  reconnects to another node within the election (~0.5 s here) loses its
  replies that way (and so would its quarantine, retry and parked
  copies): the two xfail tests at the end show it deterministically, for
  the daemon and for the broker alone. The tests that take the daemon's
  node down (SIGKILL, rolling restart) therefore let it reconnect after
  2 s (`AFTER_ELECTION`); with 0.2 s both lost replies now and then.

The test clients never use a node a test is about to kill, and publish
only to queues with a leader. One cluster serves the module; a test that
kills a node starts it again.
"""

import collections
import json
import logging
import re
import threading

import pytest

import gocept.amqprun.connection
import gocept.amqprun.testing
import gocept.amqprun.tests.test_cluster
from gocept.amqprun.testing import unique_name
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.test_cluster import QUORUM
from gocept.amqprun.tests.test_cluster import queue_info
from gocept.amqprun.tests.test_faults import CONNECTED
from gocept.amqprun.tests.test_faults import Echo
from gocept.amqprun.tests.test_faults import LOST
from gocept.amqprun.tests.test_faults import client_of
from gocept.amqprun.tests.test_faults import drain
from gocept.amqprun.tests.test_faults import tally
from gocept.amqprun.tests.test_monitor import get


pytestmark = pytest.mark.slow

# The module's cluster; a node a test left down is started again.
cluster = gocept.amqprun.tests.test_cluster.cluster

STREAM = 1000
RECONNECT = '  retry_delay 0.2\n  max_retry_delay 1\n'
# Reconnect only when the quorum queues of a dead node have new leaders
# (see the module docstring).
AFTER_ELECTION = '  retry_delay 2\n  max_retry_delay 4\n'
# A quorum queue on two nodes has no leader while one of them is down.
TWO_MEMBERS = dict(QUORUM, **{'x-quorum-initial-group-size': 2})
REFUSED = 'consuming the other queues, trying again'

HANDLERS = '''\
import logging
import time

import gocept.amqprun.handler
import gocept.amqprun.message
import gocept.amqprun.retry

log = logging.getLogger('handlers')


def echo(queue, arguments, out, sleep, fail_first):
    def handle(message):
        log.info('Handling %s %s', message.body.decode(),
                 message.header.message_id)
        if fail_first and not gocept.amqprun.retry.attempts(message.header):
            raise RuntimeError('the first try fails')
        if sleep:
            time.sleep(sleep)
        return [gocept.amqprun.message.Message(
            {}, message.body, routing_key=out)]
    return gocept.amqprun.handler.declare(
        queue, queue, arguments=arguments)(handle)
'''

HANDLER = 'handle{index} = echo({queue!r}, {arguments!r}, {out!r}, ' \
    '{sleep!r}, {fail_first!r})\n'

ZCML = '<utility component="handlers.handle{index}" name="h{index}" ' \
    'provides="gocept.amqprun.interfaces.IHandler" />\n'


class ClusterEcho(Echo):
    """An `Echo` whose input and reply queues are quorum queues, with
    handlers for `queues` ({name: arguments}; default: the input queue,
    quorum) that fail the first try of each message if `fail_first`,
    and log each input's body with its message-id (see `in_doubt`).

    Without a `client` nothing is declared yet: the daemon declares its
    queues where it connects, `declare(client)` the reply queue later.
    `extra` is appended to the daemons' configuration.
    """

    def __init__(self, directory, parameters, client, prefix, queues=None,
                 fail_first=False, extra='', **kw):
        self.handled = queues or {f'{prefix}.in': QUORUM}
        self.fail_first = fail_first
        self.extra = extra
        super().__init__(directory, parameters, client, prefix, **kw)

    def declare(self, client):
        if client is None:
            return
        self.client = client
        client.declare(self.queue, [self.queue], QUORUM)
        client.declare(self.out, [self.out], QUORUM)

    def process(self, start=True, timeout=30):
        process = super().process(start=False)
        (process.directory / 'handlers.py').write_text(HANDLERS + ''.join(
            HANDLER.format(index=i, queue=queue, arguments=arguments,
                           out=self.out, sleep=self.sleep,
                           fail_first=self.fail_first)
            for i, (queue, arguments) in enumerate(self.handled.items())))
        (process.directory / 'server.zcml').write_text(
            '<configure xmlns="http://namespaces.zope.org/zope">\n'
            '  <include package="gocept.amqprun" />\n' + ''.join(
                ZCML.format(index=i) for i in range(len(self.handled))) +
            '</configure>\n')
        with process.config.open('a') as config:
            config.write(self.extra)
        if start:
            process.start(timeout=timeout)
        return process


def publish(client, queue, numbers, batch=100):
    """Publish the numbered inputs to `queue` in AMQP transactions of
    `batch` messages: each commit returns when the quorum queue has them,
    so none is lost when a node dies afterwards."""
    plain, client.channel = client.channel, client.connection.channel()
    try:
        client.channel.tx_select()
        for n, i in enumerate(numbers, 1):
            client.send(queue, b'%06d' % i)
            if n % batch == 0:
                client.channel.tx_commit()
        client.channel.tx_commit()
        client.channel.close()
    finally:
        client.channel = plain


@pytest.fixture
def echo(cluster, tmp_path, name_prefix):
    """A factory of `ClusterEcho`s knowing every node of the cluster;
    daemons still running at the end of the test are killed."""
    made = []

    def factory(client=None, **kw):
        made.append(ClusterEcho(tmp_path, cluster.parameters(), client,
                                name_prefix, **kw))
        return made[-1]
    yield factory
    for e in made:
        e.cleanup()


CONNECTED_PORT = re.compile(r'Connected to amqp://\S+@127\.0\.0\.1:(\d+)/')
HANDLING = re.compile(r'handlers Handling (\d+) (\S+)')
IN_DOUBT = re.compile(r'Commit in doubt: message (\S+) from queue')


def connected_node(cluster, process):
    """The node `process` connected to last ("Connected to" in its
    log)."""
    port = int(CONNECTED_PORT.findall(process.log_text())[-1])
    return next(node for node in cluster.nodes if node.port == port)


def others(cluster, node):
    return [n for n in cluster.nodes if n is not node]


def in_doubt(processes):
    """The numbers of the inputs whose commit a daemon of `processes`
    logged as in doubt (its connection went after Tx.Commit)."""
    numbers = {}
    ids = set()
    for process in processes:
        log = process.log_text()
        numbers.update((m[2], int(m[1])) for m in HANDLING.finditer(log))
        ids.update(IN_DOUBT.findall(log))
    return sorted(numbers[i] for i in ids if i in numbers)


def history(processes, numbers):
    """The lines of the daemons' logs about the inputs `numbers` (found
    by the message-ids their handler logged with them)."""
    ids = {m[2] for process in processes
           for m in HANDLING.finditer(process.log_text())
           if int(m[1]) in numbers}
    return '\n'.join(
        line[:400] for process in processes
        for line in process.log_text().splitlines()
        if any(i in line for i in ids))


def one_reply_each(echo, client, count, state='', node_loss=False):
    """Drain the reply queue: each input 0..count-1 got exactly one reply
    (with `node_loss`, an input whose commit was in doubt may have two).
    A loss or duplicate is reported with the commits in doubt and what
    the daemons logged about those inputs."""
    bodies = drain(client, echo.out)
    seen = collections.Counter(int(b) for b in bodies)
    lost = sorted(set(range(count)) - set(seen))
    doubled = sorted(n for n, c in seen.items() if c > 1)
    doubtful = in_doubt(echo.processes)
    report = (f'{state}lost {lost}, doubled {doubled}; inputs whose '
              f'commit was in doubt: {doubtful}')
    print(report)
    if lost or doubled:
        report += '\n' + history(echo.processes, set(lost + doubled))
    assert not lost, report
    if node_loss:
        # RabbitMQ's tx is not atomic across queues when a node fails
        # during tx.commit (module docstring): the reply of a commit in
        # doubt may be there although its input came back and was
        # answered again. Seen here in 2 of 14 runs of the SIGKILL test:
        # doubled [251] with [251, 252] in doubt, [253] with [253, 254].
        # Any other duplicate is an error.
        assert set(doubled) <= set(doubtful), report
        bodies = sorted(set(bodies))
    else:
        assert not doubled, report
    tally(bodies, count)


def finish(echo, process, count, client, timeout=60, node_loss=False):
    """Wait until `count` replies are there and the input queue is empty,
    stop `process` (alive until now: SIGTERM, exit 0); check one reply
    per input and nothing left in the queues."""
    try:
        wait_for(lambda: echo.replies(client) >= count
                 and client.count(echo.queue) == 0, timeout=timeout,
                 interval=0.2)
        state = ''
    except AssertionError:
        state = f'Not all inputs handled within {timeout} s. '
    assert process.process.poll() is None, 'the daemon stopped'
    assert process.stop() == 0
    left = {queue + suffix: client.count(queue + suffix)
            for queue in echo.handled
            for suffix in ('', '.quarantine', '.retry', '.parked')}
    one_reply_each(echo, client, count, f'{state}Left in queues: {left}; ',
                   node_loss)
    assert not any(left.values()), left


def leaders(node, queues):
    """{queue: its leader's node name} as `node` lists them (missing
    while a queue has no leader)."""
    rows = json.loads(node.ctl(
        'list_queues', 'name', 'leader', '--formatter', 'json'))
    return {row['name']: row['leader'] for row in rows
            if row['name'] in queues and row['leader']}


def wait_for_new_leaders(node, queues, dead=None):
    """Wait until every one of `queues` has a leader (other than `dead`,
    if given): before, a client reading a queue may have its connection
    closed (541 INTERNAL_ERROR), one publishing to it loses the messages
    (module docstring)."""
    excluded = (None, None if dead is None else dead.name)
    wait_for(lambda: all(
        leaders(node, queues).get(q) not in excluded
        for q in queues), timeout=30, interval=0.2,
        message=f'no new leaders for {queues}')


def eventually(condition, timeout):
    """Whether `condition` becomes true within `timeout` seconds."""
    try:
        wait_for(condition, timeout=timeout, interval=0.2)
    except AssertionError:
        return False
    return True


class RepliesLost(Exception):
    """Replies the daemon committed are not in the reply queue."""


def test_sigkill_of_the_daemons_node_mid_stream(cluster, echo):
    """1,000 inputs; after a quarter, SIGKILL of the node the daemon is
    connected to, which also leads its queues and the reply queue. The
    daemon reconnects to the next address and finishes."""
    e = echo(sleep=0.001, server_extra=AFTER_ELECTION)
    process = e.process()
    victim = connected_node(cluster, process)
    survivor = others(cluster, victim)[0]
    with client_of(victim.parameters(), keep=True) as client:
        e.declare(client)
        # The daemon declared its queues on its node, the reply queue is
        # declared there too: the kill takes their leaders as well.
        assert leaders(victim, [e.queue, e.out]) == {
            e.queue: victim.name, e.out: victim.name}
        publish(client, e.queue, range(STREAM))
    with client_of(survivor.parameters(), keep=True) as client:
        wait_for(lambda: e.replies(client) >= STREAM // 4, timeout=60,
                 interval=0.01)
        before = e.replies(client)
        victim.kill()
        assert before < STREAM, 'the daemon finished before the kill'
        process.wait_for_log(LOST)
        wait_for_new_leaders(survivor, [e.queue, e.out], victim)
        process.wait_for_log(CONNECTED, count=2)
        # After a loss the daemon goes on with the next address.
        index = cluster.nodes.index(victim)
        assert connected_node(cluster, process) is \
            cluster.nodes[(index + 1) % len(cluster.nodes)]
        wait_for(lambda: e.replies(client) > before, timeout=30,
                 message='the stream did not resume')
        victim.start()
        finish(e, process, STREAM, client, node_loss=True)
        print(f'{before} replies at the kill of {victim.name}')


def test_rolling_restart_mid_stream(cluster, echo):
    """1,000 inputs stream (~40/s) through a restart of every node, one
    after the other."""
    with client_of(cluster.nodes[0].parameters(), keep=True) as client:
        e = echo(client, sleep=0.05, server_extra=AFTER_ELECTION)
        publish(client, e.queue, range(STREAM))
        process = e.process()
        wait_for(lambda: e.replies(client) >= 50, timeout=30)
    cluster.rolling_restart()
    with client_of(cluster.parameters(), keep=True) as client:
        handled = e.replies(client)
        print(f'{handled} replies after the rolling restart')
        assert handled < STREAM, 'the stream ended before the restart did'
        assert LOST in process.log_text()
        finish(e, process, STREAM, client, node_loss=True)


def test_two_daemons_on_one_queue_one_sigkilled(cluster, echo):
    """Two daemons (2 workers each) on one queue, one SIGKILLed after a
    quarter of 1,000 inputs: the other finishes, the killed one's
    unacknowledged deliveries come back and pass the quarantine."""
    with client_of(cluster.nodes[0].parameters(), keep=True) as client:
        e = echo(client, sleep=0.001, server_extra=RECONNECT)
        killed, survivor = e.process(), e.process()
        publish(client, e.queue, range(STREAM))
        wait_for(lambda: e.replies(client) >= STREAM // 4, timeout=60,
                 interval=0.01)
        killed.kill()
        assert e.replies(client) < STREAM, 'finished before the kill'
        for process in (killed, survivor):
            assert 'handlers Handling' in process.log_text()
        finish(e, survivor, STREAM, client)
        print(survivor.log_text().count('returned unsettled'),
              'deliveries of the killed daemon quarantined')


def test_retries_waiting_in_the_retry_queue_outlive_its_leader(
        cluster, echo):
    """50 inputs fail once and wait 2 s in the quorum retry queue, whose
    leader (the daemon's node) is SIGKILLed meanwhile; at-least-once
    dead-letter brings every one back."""
    count = 50
    e = echo(fail_first=True, server_extra=RECONNECT,
             worker_extra='  retries 3\n  retry-delay 2\n')
    process = e.process()
    retry = f'{e.queue}.retry'
    info = queue_info(cluster.nodes[0], retry, 'leader', 'arguments')
    # rabbitmqctl lists arguments as [name, type, value].
    arguments = {a[0]: a[-1] for a in info['arguments']}
    assert arguments['x-dead-letter-strategy'] == 'at-least-once'
    leader = next(n for n in cluster.nodes if n.name == info['leader'])
    survivor = others(cluster, leader)[0]
    with client_of(survivor.parameters(), keep=True) as client:
        e.declare(client)
        publish(client, e.queue, range(count))
        process.wait_for_log('retry 1 of 3 in 2 s', count=count)
        waiting = client.count(retry)
        leader.kill()
        print(f'{waiting} of {count} waiting in {retry} when its leader '
              f'{leader.name} was killed; the daemon was connected to '
              f'{connected_node(cluster, process).name}')
        assert waiting
        leader.start()
        finish(e, process, count, client, node_loss=True)
        assert process.log_text().count('retry 1 of 3') == count


def test_classic_queue_of_a_lost_node_is_retried_others_consumed(
        cluster, echo, name_prefix):
    """The home node of a classic handler queue (and of its auxiliary
    queues) dies after start-up: the daemon stays, logs the refused
    declarations, answers on its quorum queue meanwhile (not ready), and
    consumes the classic queue again once the node is back."""
    classic = f'{name_prefix}.classic'
    port = gocept.amqprun.testing.free_port()
    url = f'http://127.0.0.1:{port}/'
    e = echo(queues={f'{name_prefix}.in': QUORUM, classic: None},
             server_extra=RECONNECT,
             extra=f'<monitor>\n  address 127.0.0.1:{port}\n</monitor>\n')
    process = e.process()
    home = connected_node(cluster, process)
    survivor = others(cluster, home)[0]
    local = json.loads(home.ctl('list_queues', 'name', '--local',
                                '--formatter', 'json'))
    assert classic in {row['name'] for row in local}
    with client_of(survivor.parameters(), keep=True) as client:
        e.declare(client)
        # Not to the classic queue: a classic queue's home node killed
        # right after an ACK committed may not have it on disk yet, and
        # redelivers the message when it is back (seen here).
        publish(client, e.queue, [0])
        wait_for(lambda: e.replies(client) == 1)
        assert get(url + 'readyz')[0] == 200

        home.kill()
        process.wait_for_log(REFUSED)
        assert f"home node '{home.name}' of durable queue '{classic}'" \
            in process.log_text()
        assert get(url + 'readyz')[0] == 503
        # The quorum queue is consumed meanwhile.
        wait_for_new_leaders(survivor, [e.queue], home)
        publish(client, e.queue, range(1, 11))
        wait_for(lambda: e.replies(client) == 11, timeout=30)
        assert get(url + 'readyz')[0] == 503
        assert process.log_text().count('Consuming from') == 1
        assert process.process.poll() is None

        home.start()
        process.wait_for_log('Consuming from', count=2)
        assert get(url + 'readyz')[0] == 200
        publish(client, classic, [11])
        finish(e, process, 12, client, node_loss=True)


def test_connections_spread_over_the_addresses(cluster, caplog):
    """Each Connection starts at a random address: 30 in a row all
    starting at the same of 3 would happen once in 3**29 runs, one of
    the addresses unused once in ~60,000."""
    caplog.set_level(logging.INFO, logger='gocept.amqprun.connection')
    firsts = []
    for _ in range(30):
        connection = gocept.amqprun.connection.Connection(
            cluster.parameters())
        thread = threading.Thread(target=connection.run, daemon=True)
        thread.start()
        try:
            assert connection.wait_until_ready(10)
        finally:
            connection.close()
            thread.join(10)
        [first] = [r.getMessage() for r in caplog.records
                   if r.getMessage().startswith('Connecting to')]
        firsts.append(first)
        caplog.clear()
    counts = collections.Counter(firsts)
    print(counts)
    assert set(counts) == {
        f'Connecting to amqp://guest@127.0.0.1:{n.port}/%2F'
        for n in cluster.nodes}


# RabbitMQ 3.10.8 drops tx publishes to a quorum queue without leader.

BROKER_BUG = (
    'RabbitMQ 3.10.8: a channel whose first publish to a quorum queue comes '
    'while the queue has no leader gets Commit-Ok for its transactions, '
    'and the broker drops the messages it published to that queue (cf. '
    'rabbitmq-server issue 9208)')


@pytest.mark.xfail(strict=True, raises=RepliesLost, reason=BROKER_BUG)
def test_tx_commit_to_a_quorum_queue_without_leader(cluster):
    """The broker alone: three transactions on a new channel commit
    (Commit-Ok) while the queue's only other member is down; none of
    their messages is in the queue, also not once the member is back.
    (A broker that kept its promise would block or refuse the commits;
    the connection is closed after 15 s, which fails the test otherwise:
    strict, not as the xfail expects.)"""
    leader, survivor = cluster.nodes[:2]
    queue = unique_name('cluster')
    with client_of(leader.parameters(), keep=True) as client:
        client.declare(queue, [queue], TWO_MEMBERS)
    assert leader.name in queue_info(survivor, queue, 'members')['members']
    leader.kill()
    with client_of(survivor.parameters(), keep=True) as client:
        client.channel.tx_select()
        # Bounded: a commit still waiting after 15 s fails.
        client.connection.call_later(15, client.connection.close)
        for i in range(3):
            client.send(queue, b'%06d' % i)
            client.channel.tx_commit()
    leader.start()
    # Two members: no election without the old leader, which may win it.
    wait_for_new_leaders(survivor, [queue])
    with client_of(survivor.parameters()) as client:
        client.forget(queue)
        bodies = drain(client, queue)
    if len(bodies) < 3:
        raise RepliesLost(f'3 messages committed, {bodies} in the queue')


@pytest.mark.xfail(strict=True, raises=RepliesLost, reason=BROKER_BUG)
def test_replies_after_a_reconnect_into_an_election(cluster, echo):
    """The daemon's node dies; the daemon reconnects to another node at
    once and answers, while its reply queue still has no leader.

    Deterministic: the reply queue has two members, the dead node and
    one other, so it has no leader until the dead node is back. (With
    three members that window is the election, ~0.5 s here: reconnecting
    after 0.2 s, the daemon of test_sigkill_of_the_daemons_node_mid_stream
    lost replies in 3 of 9 runs -- 743, 2 and 2 of 1,000.) A broker that
    kept its promise would hold the commits until the node is back: then
    every reply arrives and the test XPASSes (strict: reported as a
    failure; remove the xfail then)."""
    e = echo(server_extra=RECONNECT)
    process = e.process()
    victim = connected_node(cluster, process)
    survivor = others(cluster, victim)[0]
    with client_of(victim.parameters(), keep=True) as client:
        client.declare(e.out, [e.out], TWO_MEMBERS)
    victim.kill()
    process.wait_for_log(CONNECTED, count=2)
    with client_of(survivor.parameters(), keep=True) as client:
        wait_for_new_leaders(survivor, [e.queue], victim)
        publish(client, e.queue, range(10))
        handled = eventually(
            lambda: process.log_text().count('Handled message') >= 10, 20)
        victim.start()
        eventually(lambda: e.replies(client) >= 10, 10)
        assert process.stop() == 0
        bodies = drain(client, e.out)
    if len(bodies) < 10:
        raise RepliesLost(
            f'the daemon committed {"all" if handled else "some"} of 10 '
            f'inputs without an error; replies: {sorted(bodies)}')
    tally(bodies, 10)
