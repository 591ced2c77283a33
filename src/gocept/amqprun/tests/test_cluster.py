"""A private 3-node RabbitMQ cluster (testing.PrivateCluster).

What the product relies on, shown against real nodes: a quorum queue is
replicated and stays usable when a node (even its leader) dies; a classic
durable queue is unusable while its home node is down; a rolling restart
keeps a quorum queue's messages. One cluster serves the whole module.
"""

import contextlib
import json

import pika.exceptions
import pytest

from gocept.amqprun.testing import Client
from gocept.amqprun.testing import unique_name
from gocept.amqprun.testing import wait_for
from gocept.amqprun.testing.broker import processes_with


pytestmark = pytest.mark.slow

QUORUM = {'x-queue-type': 'quorum'}


@pytest.fixture
def cluster(rabbitmq_cluster):
    """The module's cluster; a node a test left down is started again."""
    yield rabbitmq_cluster
    for node in rabbitmq_cluster.nodes:
        if not node.running:
            node.start()


def client(parameters):
    """A `Client` for a with-block (closed at its end)."""
    return contextlib.closing(Client(parameters))


def queue_info(node, queue, *items):
    """`items` of `queue` as rabbitmqctl list_queues on `node` gives them
    ({} while the node does not list it, e.g. right after a leader
    died)."""
    rows = json.loads(node.ctl(
        'list_queues', 'name', *items, '--formatter', 'json'))
    return next((row for row in rows if row['name'] == queue), {})


def all_names(cluster):
    return {node.name for node in cluster.nodes}


def test_quorum_queue_declared_on_one_node_is_used_via_the_others(cluster):
    first, second, third = cluster.nodes
    assert cluster.running_nodes(via=third) == all_names(cluster)
    queue = unique_name('cluster')
    with client(first.parameters()) as c1, \
            client(third.parameters()) as c3:
        c1.declare(queue, [queue], QUORUM)
        info = queue_info(second, queue, 'type', 'members')
        assert info['type'] == 'quorum'
        assert set(info['members']) == all_names(cluster)
        assert c3.count(queue) == 0
        c1.send(queue, b'from node 1')
        assert c3.wait(queue).body == b'from node 1'


def test_quorum_queue_outlives_its_killed_leader(cluster):
    queue = unique_name('cluster')
    with client(cluster.nodes[0].parameters()) as c:
        c.channel.queue_declare(queue, durable=True, arguments=QUORUM)
        c.send(queue, b'before', exchange='')
        wait_for(lambda: c.count(queue) == 1)
    leader_name = queue_info(cluster.nodes[0], queue, 'leader')['leader']
    leader = next(n for n in cluster.nodes if n.name == leader_name)
    others = [n for n in cluster.nodes if n is not leader]

    leader.kill()
    assert not leader.running
    assert not processes_with(f'RABBITMQ_NODENAME={leader.name}')
    # Until the others elect a new leader, basic.get closes the connection
    # (541 INTERNAL_ERROR ... nodedown).
    wait_for(lambda: queue_info(others[0], queue, 'leader').get('leader')
             in {n.name for n in others}, timeout=30, interval=0.2)
    # The parameters still list the dead node: the client skips it.
    with client(cluster.parameters()) as c:
        assert c.wait(queue).body == b'before'
        c.send(queue, b'after', exchange='')
        assert c.wait(queue).body == b'after'

    leader.start()
    assert cluster.running_nodes(via=leader) == all_names(cluster)
    wait_for(lambda: set(queue_info(leader, queue, 'online').get('online', []))
             == all_names(cluster), timeout=30, interval=0.2)
    with client(leader.parameters()) as c:
        c.forget(queue)


def test_classic_durable_queue_is_gone_while_its_home_node_is_down(
        cluster):
    home, _, other = cluster.nodes
    queue = unique_name('cluster')
    with client(home.parameters()) as c:
        c.channel.queue_declare(queue, durable=True)
    home.stop()
    with client(other.parameters()) as c:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            c.channel.queue_declare(queue, durable=True)
    assert e.value.reply_code == 404
    assert e.value.reply_text == (
        f"NOT_FOUND - home node '{home.name}' of durable queue '{queue}' "
        "in vhost '/' is down or inaccessible")

    home.start()
    with client(other.parameters()) as c:
        assert c.count(queue) == 0
        c.forget(queue)


def test_rolling_restart_keeps_the_messages_of_a_quorum_queue(cluster):
    queue = unique_name('cluster')
    bodies = {f'message {i}'.encode() for i in range(100)}
    with client(cluster.nodes[0].parameters()) as c:
        c.channel.queue_declare(queue, durable=True, arguments=QUORUM)
        for body in sorted(bodies):
            c.send(queue, body, exchange='')
        wait_for(lambda: c.count(queue) == 100)

    cluster.rolling_restart()

    assert cluster.running_nodes() == all_names(cluster)
    with client(cluster.parameters()) as c:
        received = c.wait_many(queue, 100, timeout=30)
        assert {m.body for m in received} == bodies
        assert all(m.header.delivery_mode == 2 for m in received)
        assert c.count(queue) == 0
        c.forget(queue)
