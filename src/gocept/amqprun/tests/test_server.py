import concurrent.futures
import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.retry
import gocept.amqprun.server
import gocept.amqprun.testing
import pytest
import threading
import time
import transaction
import zope.component
import zope.interface.verify


Message = gocept.amqprun.message.Message


def register(zca, handler, name=None):
    zca.registerUtility(handler, gocept.amqprun.interfaces.IHandler,
                        name=name or handler.queue_name)


@pytest.fixture
def run_server(amqp_parameters, amqp_client, zca):
    servers = []

    def factory(**kw):
        server = gocept.amqprun.server.Server(amqp_parameters, **kw)
        for queue in server.connection.queues:
            amqp_client.forget(queue.name)
        runner = gocept.amqprun.testing.ServerThread(server).start()
        servers.append(runner)
        return server
    yield factory
    for runner in servers:
        runner.stop()


def test_server_provides_interfaces(amqp_parameters, zca):
    server = gocept.amqprun.server.Server(amqp_parameters)
    zope.interface.verify.verifyObject(
        gocept.amqprun.interfaces.ILoop, server)
    zope.interface.verify.verifyObject(
        gocept.amqprun.interfaces.ISender, server)


def test_embedded_server_has_the_daemons_default_prefetch(
        amqp_parameters, zca):
    def prefetch(**kw):
        return gocept.amqprun.server.Server(
            amqp_parameters, **kw).connection.prefetch
    assert prefetch() == 10
    assert prefetch(confirm=True) == 100
    assert prefetch(confirm=True, prefetch=7) == 7


def test_a_channel_takes_the_workers_share_of_each_queue(
        amqp_parameters, zca, name_prefix):
    register(zca, gocept.amqprun.handler.declare(
        f'{name_prefix}.q', f'{name_prefix}.q')(lambda message: None))

    def connection(**kw):
        return gocept.amqprun.server.Server(
            amqp_parameters, **kw).connection
    default = connection(workers=8)
    assert (len(default.consumer_slots), default.prefetch) == (1, 80)
    two = connection(workers=8, channels=2, prefetch=3)
    assert (len(two.consumer_slots), two.prefetch) == (2, 12)
    assert len(connection(workers=2, channels=5).consumer_slots) == 2


def test_handler_reply_and_ack_in_one_transaction(
        run_server, zca, amqp_client, name_prefix):
    received = []

    @gocept.amqprun.handler.declare(f'{name_prefix}.in', f'{name_prefix}.in')
    def handle(message):
        received.append(message)
        return [Message({}, b're: ' + message.body,
                        routing_key=f'{name_prefix}.out')]
    register(zca, handle)
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    server = run_server(workers=2)
    assert server.running
    msgid = amqp_client.send(f'{name_prefix}.in', b'hello')
    reply = amqp_client.wait(out)
    assert reply.body == b're: hello'
    assert reply.header.correlation_id == msgid
    assert reply.header.headers['references'] == msgid
    assert reply.header.message_id != msgid
    assert reply.header.delivery_mode == 2
    [message] = received
    assert message.body == b'hello'
    assert message.routing_key == f'{name_prefix}.in'
    assert message.header.message_id == msgid
    # The incoming message was ACKed: nothing left in its queue, also
    # not unacked (which would show up after the server stopped).
    assert amqp_client.count(f'{name_prefix}.in') == 0


def test_references_are_extended(run_server, zca, amqp_client, name_prefix):
    @gocept.amqprun.handler.declare(f'{name_prefix}.in', f'{name_prefix}.in')
    def handle(message):
        return [Message({}, b'', routing_key=f'{name_prefix}.out'),
                Message({'correlation_id': 'own',
                         'references': 'mine'}, b'',
                        routing_key=f'{name_prefix}.out')]
    register(zca, handle)
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    run_server()
    msgid = amqp_client.send(f'{name_prefix}.in', b'',
                             header={'references': '<a>\n<b>'})
    first, second = amqp_client.wait_many(out, 2)
    assert first.header.headers['references'] == f'<a>\n<b>\n{msgid}'
    assert first.header.correlation_id == msgid
    assert second.header.correlation_id == 'own'
    assert second.header.headers['references'] == 'mine'


def test_typed_queue_arguments_reach_the_broker(
        run_server, zca, amqp_client, name_prefix):
    @gocept.amqprun.handler.declare(
        f'{name_prefix}.in', f'{name_prefix}.in',
        arguments={'x-max-length': 3, 'x-message-ttl': 60000})
    def handle(message):
        pass
    register(zca, handle)
    server = run_server()
    server.stop()
    for i in range(5):
        amqp_client.send(f'{name_prefix}.in', b'%d' % i)
    # x-max-length 3 (an int, else the declare would have failed with 406)
    # drops the oldest.
    gocept.amqprun.testing.wait_for(
        lambda: amqp_client.count(f'{name_prefix}.in') == 3)


def test_send_outside_handler_commits_or_aborts(
        run_server, zca, amqp_client, name_prefix):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    server = run_server(setup_handlers=False)
    server.send(Message({}, b'aborted', routing_key=f'{name_prefix}.out'))
    transaction.abort()
    server.send(Message({}, b'committed', routing_key=f'{name_prefix}.out'))
    transaction.commit()
    assert amqp_client.wait(out).body == b'committed'
    assert amqp_client.get(out) is None


def test_send_from_many_threads(run_server, zca, amqp_client, name_prefix):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    server = run_server(setup_handlers=False)

    def work(i):
        for j in range(10):
            server.send(Message({}, f'{i}-{j}',
                                routing_key=f'{name_prefix}.out'))
            if j % 2:
                transaction.commit()
            else:
                transaction.abort()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    bodies = sorted(m.body.decode() for m in amqp_client.wait_many(out, 40))
    assert bodies == sorted(f'{i}-{j}' for i in range(8)
                            for j in range(1, 10, 2))
    assert amqp_client.get(out) is None


def test_send_right_after_start_waits_for_connection(
        amqp_parameters, zca, amqp_client, name_prefix):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    server = gocept.amqprun.server.Server(
        amqp_parameters, setup_handlers=False)
    thread = threading.Thread(target=server.start)
    thread.start()
    try:
        server.send(Message({}, b'early', routing_key=f'{name_prefix}.out'))
        transaction.commit()
        assert amqp_client.wait(out).body == b'early'
    finally:
        server.stop()
        thread.join()


def test_send_inside_handler_joins_its_transaction(
        run_server, zca, amqp_client, name_prefix):
    calls = []

    @gocept.amqprun.handler.declare(f'{name_prefix}.in', f'{name_prefix}.in')
    def handle(message):
        sender = zope.component.getUtility(gocept.amqprun.interfaces.ISender)
        sender.send(Message({}, b'via sender: ' + message.body,
                            routing_key=f'{name_prefix}.out'))
        calls.append(message.body)
        if message.body == b'fail':
            raise RuntimeError('handler failed')
    register(zca, handle)
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    amqp_client.forget(f'{name_prefix}.in.parked')
    server = run_server(retry_policy=gocept.amqprun.retry.RetryPolicy(
        retries=0))
    zca.registerUtility(server, gocept.amqprun.interfaces.ISender)
    failing = amqp_client.send(f'{name_prefix}.in', b'fail')
    parked = amqp_client.wait(f'{name_prefix}.in.parked')
    assert parked.header.message_id == failing
    msgid = amqp_client.send(f'{name_prefix}.in', b'ok')
    reply = amqp_client.wait(out)
    assert reply.body == b'via sender: ok'
    assert reply.header.correlation_id == msgid
    # What the failing handler sent was aborted with its transaction.
    assert amqp_client.get(out) is None
    assert calls == [b'fail', b'ok']


def test_two_servers_in_one_process(
        amqp_parameters, zca, amqp_client, name_prefix):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    runners = [gocept.amqprun.testing.ServerThread(
        gocept.amqprun.server.Server(
            amqp_parameters, setup_handlers=False)).start()
        for _ in range(2)]
    try:
        for i, runner in enumerate(runners):
            runner.server.send(Message({}, b'%d' % i,
                                       routing_key=f'{name_prefix}.out'))
        transaction.commit()
        bodies = sorted(m.body for m in amqp_client.wait_many(out, 2))
        assert bodies == [b'0', b'1']
    finally:
        for runner in runners:
            runner.stop()


def test_duplicate_queue_is_an_error_naming_it(amqp_parameters, zca):
    for name in ('one', 'two'):
        register(zca, gocept.amqprun.handler.declare('same.q', 'a')(
            lambda m: None), name=name)
    with pytest.raises(gocept.amqprun.server.DuplicateQueueError,
                       match="'same.q'.*'one' and 'two'"):
        gocept.amqprun.server.Server(amqp_parameters)


def test_activity_names_what_each_worker_handles(
        run_server, zca, amqp_client, name_prefix):
    release = threading.Event()

    @gocept.amqprun.handler.declare(f'{name_prefix}.slow', f'{name_prefix}.s')
    def slow(message):
        release.wait(10)
    register(zca, slow)
    server = run_server(workers=2)
    idle = server.activity()
    assert [(a.worker, a.message_id, a.queue, a.seconds) for a in idle] == [
        ('amqprun-worker-0', None, None, None),
        ('amqprun-worker-1', None, None, None)]
    message_id = amqp_client.send(f'{name_prefix}.s', b'')
    try:
        gocept.amqprun.testing.wait_for(
            lambda: any(a.message_id for a in server.activity()))
        [busy] = [a for a in server.activity() if a.message_id]
        assert (busy.message_id, busy.queue) == (
            message_id, f'{name_prefix}.slow')
        assert 0 <= busy.seconds < 10
        assert busy.thread_id in {w.ident for w in server.workers}
    finally:
        release.set()
    gocept.amqprun.testing.wait_for(
        lambda: not any(a.message_id for a in server.activity()))


def test_connection_names_its_broker_and_since_when(run_server, zca):
    before = time.time()
    server = run_server(setup_handlers=False)
    connection = server.connection
    assert connection.address.startswith('amqp://guest@')
    assert ':guest@' not in connection.address
    assert before <= connection.connected_since <= time.time()


def test_duplicate_queues_names_every_handler_of_a_queue():
    def declared(queue):
        return gocept.amqprun.handler.declare(queue, 'key')(lambda m: None)
    named = [('a', declared('q1')), ('b', declared('q2')),
             ('c', declared('q1')), ('d', declared('q1'))]
    assert gocept.amqprun.server.duplicate_queues(named) == {
        'q1': ['a', 'c', 'd']}
    assert gocept.amqprun.server.duplicate_queues(named[:2]) == {}


def test_stop_from_many_threads_at_once_stops_once(
        run_server, zca, name_prefix, caplog):
    register(zca, gocept.amqprun.handler.declare(
        f'{name_prefix}.q', f'{name_prefix}.q')(lambda message: None))
    server = run_server(workers=2)
    start = threading.Barrier(8)

    def stop():
        start.wait(10)
        server.stop()
    with caplog.at_level('INFO', 'gocept.amqprun.server'):
        threads = [threading.Thread(target=stop) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert caplog.text.count('Stopping: cancelling consumers.') == 1
    assert caplog.text.count('Stopped.') == 1
    assert not server.connection.alive
