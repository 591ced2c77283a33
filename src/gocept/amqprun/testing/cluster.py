"""A private RabbitMQ cluster for tests: N nodes on this machine.

Each node is a `broker.PrivateBroker` (its own AMQP and distribution
ports, node name, mnesia and log directories) below one temporary
directory, which is also the nodes' HOME: they share the Erlang cookie
written there. The cluster runs its own ``epmd`` on a free port
(ERL_EPMD_PORT), so it neither uses nor touches the epmd of a broker
already running on the machine (port 4369), and ends it by PID.

Needs Debian's rabbitmq-server package (Linux: processes are found via
/proc).
"""

import concurrent.futures
import json
import os
import pathlib
import secrets
import shutil
import subprocess
import tempfile
import time

import gocept.amqprun.parameters
from gocept.amqprun.testing.broker import PrivateBroker
from gocept.amqprun.testing.broker import free_port
from gocept.amqprun.testing.broker import kill_processes_with
from gocept.amqprun.testing.broker import port_open
from gocept.amqprun.testing.wait import wait_for


EPMD = '/usr/bin/epmd'
QUEUES = '/usr/lib/rabbitmq/bin/rabbitmq-queues'


class ClusterNode(PrivateBroker):
    """A node of a `PrivateCluster`.

    As a PrivateBroker (`port`, `name`, `parameters()`, `stop()`,
    `kill()`, `restart()`, `ctl()`), but `start()` returns only when the
    node runs in the cluster again.
    """

    def __init__(self, cluster, **kw):
        super().__init__(**kw)
        self.cluster = cluster

    def start(self, timeout=60):
        """(Re)start a stopped or killed node; return when it is running
        and the cluster lists it among its running nodes.

        The node keeps its mnesia directory, so it rejoins by itself; it
        needs a running node of the cluster to do so (a node restarted
        while all others are down waits for them, as RabbitMQ does).
        """
        deadline = time.monotonic() + timeout
        super().start(timeout)
        self.cluster.wait_complete(max(deadline - time.monotonic(), 1))

    def __repr__(self):
        return f'<ClusterNode {self.name} port {self.port}>'


class PrivateCluster:
    """`size` RabbitMQ nodes of a cluster of their own, for tests.

    `config` is extra rabbitmq.conf text for every node. `start()` starts
    and joins the nodes, `cleanup()` ends every process of the cluster
    and removes its directory; as a context manager it does both::

        with PrivateCluster(3) as cluster:
            client = Client(cluster.parameters())
            cluster.nodes[0].kill()
            cluster.nodes[0].start()
    """

    def __init__(self, size=3, config=''):
        if size < 1:
            raise ValueError(f'A cluster needs at least one node: {size}')
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix='amqprun-cluster-'))
        self.epmd_port = free_port()
        # Every process of the cluster (nodes, their children, the CLI
        # calls, epmd) carries this marker, so cleanup() finds them all.
        self.marker = f'AMQPRUN_PRIVATE_CLUSTER={self.dir}'
        self.env = dict(ERL_EPMD_PORT=str(self.epmd_port),
                        AMQPRUN_PRIVATE_CLUSTER=str(self.dir))
        self.nodes = [
            ClusterNode(self, config=config, directory=self.dir / f'node{i}',
                        home=self.dir, env=self.env)
            for i in range(1, size + 1)]
        self.epmd = None
        self.failed = False

    @classmethod
    def available(cls):
        """Whether rabbitmq-server is installed (to start a cluster)."""
        return PrivateBroker.available() and os.path.exists(EPMD)

    def __repr__(self):
        return f'<PrivateCluster {" ".join(n.name for n in self.nodes)}>'

    def __enter__(self):
        """Start the cluster (unless started); clean up if that fails."""
        if self.epmd is None:
            try:
                self.start()
            except BaseException:
                self.cleanup()
                raise
        return self

    def __exit__(self, *exc_info):
        self.cleanup()

    def start(self, timeout=120):
        """Start the new cluster: all nodes (in parallel), then join the
        2nd to Nth to the first (rabbitmqctl stop_app, join_cluster,
        start_app); return when the first lists all of them as running.

        RuntimeError naming the cluster's directory (the nodes' logs are
        in ``nodeI/log``) if that fails or takes more than `timeout`
        seconds; the processes are ended then, the directory is kept.
        """
        deadline = time.monotonic() + timeout

        def left():
            return max(deadline - time.monotonic(), 1)
        try:
            self._start_epmd(left())
            for node in self.nodes:
                node.launch()
            for node in self.nodes:
                node.wait_started(left())
            first = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl('stop_app', timeout=left())
                node.ctl('join_cluster', first.name, timeout=left())
                node.ctl('start_app', timeout=left())
            self.wait_complete(left())
        except (AssertionError, RuntimeError) as e:
            self.failed = True
            self.stop()
            raise RuntimeError(
                f'Private cluster did not start: {e}\n'
                f'Logs are in {self.dir}/node*/log') from e

    def _start_epmd(self, timeout):
        """Start the cluster's own epmd, before any node would start one
        (detached, on ERL_EPMD_PORT) that we could only find by name.
        Not with a node's environment: `kill()` of that node would end
        it."""
        cookie = self.dir / '.erlang.cookie'
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20))
            cookie.chmod(0o400)
        self.epmd = subprocess.Popen(
            [EPMD, '-port', str(self.epmd_port), '-address', '127.0.0.1'],
            env=dict(os.environ, **self.env), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: port_open('127.0.0.1', self.epmd_port, 0.2)
                 or self.epmd.poll() is not None, timeout=timeout,
                 interval=0.05)
        if self.epmd.poll() is not None:
            raise RuntimeError(
                f'epmd on port {self.epmd_port} exited: '
                f'{self.epmd.returncode}')

    def running_nodes(self, via=None):
        """The names of the nodes that `via` (default: the first node
        whose process runs) lists as running in the cluster."""
        if via is None:
            via = next((n for n in self.nodes if n.running), None)
        if via is None:
            raise RuntimeError(f'No node of {self} runs.')
        status = json.loads(via.ctl('cluster_status', '--formatter', 'json'))
        return set(status['running_nodes'])

    def wait_complete(self, timeout=60):
        """Wait until each node whose process runs is listed as running in
        the cluster (AssertionError after `timeout`)."""
        def complete():
            expected = {n.name for n in self.nodes if n.running}
            try:
                return expected and self.running_nodes() == expected
            except RuntimeError:
                return False  # A node still booting, or just gone.
        wait_for(complete, timeout=timeout, interval=0.2,
                 message=f'{self} not complete within {timeout} s; '
                 f'logs are in {self.dir}/node*/log')

    def wait_not_quorum_critical(self, node, timeout=60):
        """Wait until stopping `node` would leave every quorum queue with
        a majority of its members online (rabbitmq-queues
        check_if_node_is_quorum_critical)."""
        def safe():
            try:
                node.ctl('check_if_node_is_quorum_critical', program=QUEUES)
            except RuntimeError:
                return False
            return True
        wait_for(safe, timeout=timeout, interval=0.2,
                 message=f'{node.name} still quorum critical (or its '
                 f'check fails); logs are in {node.log}')

    def rolling_restart(self, timeout=60):
        """Restart the nodes one after the other (graceful stop, start).

        Before a node stops, its quorum queue members must not be critical
        (see `wait_not_quorum_critical`); after it started, it must run in
        the cluster again (`ClusterNode.start`). So every quorum queue
        keeps a majority of its members throughout (a stopping leader
        still means an election: a short pause, and clients connected to
        the node lose their connection). `timeout` bounds each wait.
        """
        for node in self.nodes:
            self.wait_not_quorum_critical(node, timeout)
            node.stop()
            node.start(timeout)

    def parameters(self, **kw):
        """`parameters.Parameters` listing every node (tried in turn)."""
        return gocept.amqprun.parameters.Parameters(
            hostname=' '.join(f'127.0.0.1:{n.port}' for n in self.nodes),
            **kw)

    def stop(self, timeout=30):
        """Stop all nodes (gracefully, in parallel) and the cluster's
        epmd; then SIGKILL whatever process of the cluster is left."""
        try:
            with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as p:
                list(p.map(lambda node: node.stop(timeout), self.nodes))
        finally:
            if self.epmd is not None:
                self.epmd.terminate()
                try:
                    self.epmd.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.epmd.kill()
                    self.epmd.wait()
                self.epmd = None
            kill_processes_with(self.marker)

    def cleanup(self):
        """End every process of the cluster and remove its directory
        (kept if `start` failed, for its logs). May be called again."""
        self.stop()
        if not self.failed:
            shutil.rmtree(self.dir, ignore_errors=True)
