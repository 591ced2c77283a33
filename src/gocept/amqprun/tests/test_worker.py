import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.retry
import gocept.amqprun.server
import gocept.amqprun.testing
import pytest
import threading
import zope.security.management


Message = gocept.amqprun.message.Message
RetryPolicy = gocept.amqprun.retry.RetryPolicy
wait_for = gocept.amqprun.testing.wait_for


@pytest.fixture
def start(amqp_parameters, amqp_client, zca, name_prefix):
    runners = []

    def factory(function, workers=1, routing_key=None, arguments=None,
                principal=None, **kw):
        handler = gocept.amqprun.handler.declare(
            f'{name_prefix}.in', routing_key or f'{name_prefix}.in',
            arguments=arguments, principal=principal)(function)
        zca.registerUtility(handler, gocept.amqprun.interfaces.IHandler,
                            name='test')
        server = gocept.amqprun.server.Server(
            amqp_parameters, workers=workers, **kw)
        zca.registerUtility(server, gocept.amqprun.interfaces.ISender)
        for queue in server.connection.queues:
            amqp_client.forget(queue.name)
        runners.append(gocept.amqprun.testing.ServerThread(server).start())
        return server
    yield factory
    for runner in runners:
        runner.stop()


def reply(message, body=None, routing_key=None):
    return Message({}, message.body if body is None else body,
                   routing_key=routing_key)


def test_failure_then_success_is_retried_with_delay(
        start, amqp_client, name_prefix, caplog):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    tries = []

    def handle(message):
        tries.append(message)
        if len(tries) < 3:
            raise RuntimeError(f'failure {len(tries)}')
        return [reply(message, routing_key=f'{name_prefix}.out')]
    start(handle, retry_policy=RetryPolicy(retries=3, delay=0.1))
    msgid = amqp_client.send(f'{name_prefix}.in', b'payload')
    answer = amqp_client.wait(out)
    assert answer.body == b'payload'
    assert answer.header.correlation_id == msgid
    assert len(tries) == 3
    # The handler always sees the original routing key and message-id.
    assert {m.routing_key for m in tries} == {f'{name_prefix}.in'}
    assert {m.header.message_id for m in tries} == {msgid}
    assert [m.header.headers.get('amqprun-attempts') for m in tries] == [
        None, 1, 2]
    assert amqp_client.get(out) is None
    assert f'Handling message {msgid} from queue' in caplog.text
    assert 'RuntimeError: failure 1' in caplog.text
    wait_for(lambda: 'retry 1 of 3 in 0.1 s' in caplog.text)


def test_poison_message_is_parked_while_others_pass(
        start, amqp_client, name_prefix, caplog):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    poison_tries = []

    def handle(message):
        if message.body == b'poison':
            poison_tries.append(1)
            raise ValueError('cannot digest')
        return [reply(message, routing_key=f'{name_prefix}.out')]
    start(handle, workers=2, retry_policy=RetryPolicy(retries=2, delay=0))
    poison_id = amqp_client.send(f'{name_prefix}.in', b'poison',
                                 header={'x-custom': 'kept'})
    for i in range(100):
        amqp_client.send(f'{name_prefix}.in', b'%d' % i)
    answers = amqp_client.wait_many(out, 100)
    assert sorted(int(a.body) for a in answers) == list(range(100))
    parked = amqp_client.wait(f'{name_prefix}.in.parked')
    assert parked.body == b'poison'
    assert parked.header.message_id == poison_id
    assert parked.header.headers['x-custom'] == 'kept'
    assert parked.header.headers['amqprun-attempts'] == 3
    assert parked.header.headers['amqprun-error'] == (
        'ValueError: cannot digest')
    assert parked.header.headers['amqprun-queue'] == f'{name_prefix}.in'
    assert len(poison_tries) == 3
    assert amqp_client.count(f'{name_prefix}.in') == 0
    # The worker logs after its commit returned: the client may be first.
    wait_for(lambda: (
        f"Message {poison_id} from queue '{name_prefix}.in': parked "
        f"after 3 failure(s) in queue '{name_prefix}.in.parked'"
        in caplog.text))


def test_parking_with_error_routing_key(start, amqp_client, name_prefix):
    errors = amqp_client.declare(
        f'{name_prefix}.errors', [f'{name_prefix}.error'])
    start(lambda m: 1 / 0, retry_policy=RetryPolicy(
        retries=0, error_routing_key=f'{name_prefix}.error'))
    amqp_client.send(f'{name_prefix}.in', b'x')
    parked = amqp_client.wait(errors)
    assert parked.body == b'x'
    assert 'ZeroDivisionError' in parked.header.headers['amqprun-error']
    assert not amqp_client.exists(f'{name_prefix}.in.parked')


def test_parking_by_reject_reaches_dead_letter_exchange(
        start, amqp_client, name_prefix):
    dead = amqp_client.declare(
        f'{name_prefix}.dead', [f'{name_prefix}.in'])
    amqp_client.channel.exchange_declare(
        f'{name_prefix}.dlx', 'fanout', auto_delete=True)
    amqp_client.channel.queue_bind(dead, f'{name_prefix}.dlx')
    # Bound to the same routing key, the "dead" queue gets a copy of the
    # input too: only the second copy proves dead-lettering.
    start(lambda m: 1 / 0, retry_policy=RetryPolicy(retries=0, park='reject'),
          arguments={'x-dead-letter-exchange': f'{name_prefix}.dlx'})
    amqp_client.send(f'{name_prefix}.in', b'x')
    first, second = amqp_client.wait_many(dead, 2)
    assert [first.body, second.body] == [b'x', b'x']
    deaths = [m.header.headers.get('x-death') for m in (first, second)]
    assert [d for d in deaths if d][0][0]['reason'] == 'rejected'


def test_handler_error_never_kills_a_worker(start, amqp_client, name_prefix):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])

    def handle(message):
        if message.body == b'bad':
            raise RuntimeError()
        return [reply(message, routing_key=f'{name_prefix}.out')]
    start(handle, workers=1, retry_policy=RetryPolicy(retries=0))
    amqp_client.send(f'{name_prefix}.in', b'bad')
    amqp_client.send(f'{name_prefix}.in', b'good')
    assert amqp_client.wait(out).body == b'good'


def test_returned_generator_failing_sends_nothing(
        start, amqp_client, name_prefix):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])

    def handle(message):
        yield reply(message, b'first', routing_key=f'{name_prefix}.out')
        if message.body == b'fail':
            raise RuntimeError('half way')
    start(handle, retry_policy=RetryPolicy(retries=0))
    amqp_client.send(f'{name_prefix}.in', b'fail')
    amqp_client.wait(f'{name_prefix}.in.parked')
    assert amqp_client.get(out) is None


def test_several_replies_and_routing_keys(start, amqp_client, name_prefix):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])

    def handle(message):
        return [reply(message, b'%d' % i, routing_key=f'{name_prefix}.out')
                for i in range(3)]
    start(handle, routing_key=[f'{name_prefix}.a', f'{name_prefix}.b'])
    amqp_client.send(f'{name_prefix}.a', b'')
    amqp_client.send(f'{name_prefix}.b', b'')
    bodies = sorted(m.body for m in amqp_client.wait_many(out, 6))
    assert bodies == [b'0', b'0', b'1', b'1', b'2', b'2']


def test_handler_runs_as_principal(start, amqp_client, name_prefix):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])

    def handle(message):
        [p] = zope.security.management.getInteraction().participations
        return [reply(message, p.principal.id.encode(),
                      routing_key=f'{name_prefix}.out')]
    start(handle, principal='zope.user')
    amqp_client.send(f'{name_prefix}.in', b'')
    assert amqp_client.wait(out).body == b'zope.user'


def test_prefetch_bounds_unacked_deliveries(start, amqp_client, name_prefix):
    release = threading.Event()
    started = []

    def handle(message):
        started.append(message)
        release.wait(30)
    try:
        amqp_client.declare(f'{name_prefix}.in', [f'{name_prefix}.in'])
        for i in range(50):
            amqp_client.send(f'{name_prefix}.in', b'%d' % i)
        start(handle, workers=2, prefetch=3)
        wait_for(lambda: len(started) == 2)
        # 2 workers x prefetch 3 are out; the rest waits in the queue.
        wait_for(lambda: amqp_client.count(f'{name_prefix}.in') == 44)
    finally:
        release.set()


def test_confirm_mode_replies_acks_and_retries(
        start, amqp_client, name_prefix):
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    tries = []

    def handle(message):
        tries.append(message.body)
        if message.body == b'flaky' and tries.count(b'flaky') == 1:
            raise RuntimeError('first try')
        return [reply(message, routing_key=f'{name_prefix}.out'),
                reply(message, b'second', routing_key=f'{name_prefix}.out')]
    server = start(handle, workers=2, confirm=True,
                   retry_policy=RetryPolicy(retries=1, delay=0))
    assert server.connection.confirm
    for i in range(50):
        amqp_client.send(f'{name_prefix}.in', b'%d' % i)
    amqp_client.send(f'{name_prefix}.in', b'flaky')
    replies = amqp_client.wait_many(out, 102)
    assert sorted(r.body for r in replies if r.body != b'second') == sorted(
        [b'%d' % i for i in range(50)] + [b'flaky'])
    # Everything was ACKed (confirm mode ACKs after the confirms).
    wait_for(lambda: amqp_client.count(f'{name_prefix}.in') == 0)
    assert amqp_client.get(out) is None
    assert tries.count(b'flaky') == 2


def test_confirm_mode_send_outside_handler(
        amqp_parameters, amqp_client, zca, name_prefix):
    import transaction
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    server = gocept.amqprun.server.Server(
        amqp_parameters, setup_handlers=False, confirm=True)
    runner = gocept.amqprun.testing.ServerThread(server).start()
    try:
        for i in range(3):
            server.send(Message({}, b'%d' % i,
                                routing_key=f'{name_prefix}.out'))
        transaction.commit()
        assert [m.body for m in amqp_client.wait_many(out, 3)] == [
            b'0', b'1', b'2']
    finally:
        runner.stop()
