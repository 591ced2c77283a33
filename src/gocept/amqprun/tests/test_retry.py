"""The retry policy: decisions (pure logic) and growing delays (broker)."""

import time

import pytest

import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.retry as retry
import gocept.amqprun.server
import gocept.amqprun.testing
import gocept.amqprun.topology


class FakeDelivery:
    """What the policy reads of a delivery."""

    def __init__(self, headers=None, redelivered=False, queue='q',
                 source=None, **properties):
        self.header = gocept.amqprun.message.Header(
            headers=dict(headers or {}), **properties)
        self.redelivered = redelivered
        self.queue = queue
        self.source = source or queue
        self.routing_key = 'r.k'
        self.delivery_tag = 7
        self.body = b'body'


def test_delays_grow_up_to_the_maximum():
    policy = retry.RetryPolicy(retries=5, delay=2, backoff=3, max_delay=30)
    assert [policy.delay_of(n) for n in range(1, 6)] == [2, 6, 18, 30, 30]
    assert policy.delays == [2, 6, 18, 30]


def test_constant_delay_uses_one_retry_queue():
    policy = retry.RetryPolicy(retries=3, delay=5)
    queue = gocept.amqprun.topology.Queue('q', ['q'])
    names = [q.name for q in policy.auxiliary_queues(queue)]
    assert names == ['q.quarantine', 'q.retry', 'q.parked']


def test_growing_delays_use_a_retry_queue_per_delay():
    policy = retry.RetryPolicy(retries=3, delay=1.5, backoff=2)
    queue = gocept.amqprun.topology.Queue('q', ['q'])
    aux = policy.auxiliary_queues(queue)
    assert [q.name for q in aux] == [
        'q.quarantine', 'q.retry.1.5s', 'q.retry.3s', 'q.retry.6s',
        'q.parked']
    for q in aux[1:4]:
        assert not q.consume
        assert q.arguments == {'x-dead-letter-exchange': '',
                               'x-dead-letter-routing-key': 'q'}
    quarantine = aux[0]
    assert quarantine.consume and quarantine.single
    assert quarantine.prefetch == 1
    assert quarantine.handler_queue == 'q'


def test_auxiliary_queues_have_the_type_of_the_handler_queue():
    policy = retry.RetryPolicy()
    queue = gocept.amqprun.topology.Queue(
        'q', ['q'], {'x-queue-type': 'quorum', 'x-max-length': 10})
    for aux in policy.auxiliary_queues(queue):
        assert aux.arguments['x-queue-type'] == 'quorum'
        assert 'x-max-length' not in aux.arguments
    [retry_queue] = [q for q in policy.auxiliary_queues(queue)
                     if q.name == 'q.retry']
    assert retry_queue.arguments == {
        'x-queue-type': 'quorum', 'x-dead-letter-exchange': '',
        'x-dead-letter-routing-key': 'q',
        'x-dead-letter-strategy': 'at-least-once',
        'x-overflow': 'reject-publish'}


@pytest.mark.parametrize('value', [0.5, -1])
def test_backoff_below_one_is_refused(value):
    with pytest.raises(ValueError, match='backoff'):
        retry.RetryPolicy(backoff=value)


def test_max_delay_below_delay_is_refused():
    with pytest.raises(ValueError, match='max_delay'):
        retry.RetryPolicy(delay=10, max_delay=5)


def test_retry_decision_counts_and_routes_by_delay():
    policy = retry.RetryPolicy(retries=3, delay=1, backoff=2)
    decision = policy.decide(
        FakeDelivery({retry.ATTEMPTS: 1}, expiration='60000'),
        RuntimeError('x'))
    assert decision.outcome == 'retried'
    [(exchange, key, header, body)] = decision.publishes
    assert (exchange, key) == ('', 'q.retry.2s')
    assert header.headers[retry.ATTEMPTS] == 2
    assert header.expiration == '2000'
    # The message's own expiration travels in a header meanwhile.
    assert header.headers[retry.EXPIRATION] == '60000'
    assert header.headers[retry.ROUTING_KEY] == 'r.k'


def test_retry_restores_the_original_expiration_when_parking():
    policy = retry.RetryPolicy(retries=1, delay=1)
    decision = policy.decide(
        FakeDelivery({retry.ATTEMPTS: 1, retry.EXPIRATION: '60000'}),
        RuntimeError('boom'))
    assert decision.outcome == 'parked'
    [(exchange, key, header, body)] = decision.publishes
    assert key == 'q.parked'
    assert header.expiration == '60000'
    assert retry.EXPIRATION not in header.headers
    assert header.headers[retry.ERROR] == 'RuntimeError: boom'
    assert header.headers[retry.QUEUE] == 'q'


def test_legacy_header_names_are_read_and_renamed():
    delivery = FakeDelivery({'x-amqprun-attempts': 2,
                             'x-amqprun-routing-key': 'first.key',
                             'x-custom': 'kept'})
    assert retry.attempts(delivery.header) == 2
    assert retry.original_routing_key(delivery) == 'first.key'
    decision = retry.RetryPolicy(retries=5, delay=0).decide(
        delivery, RuntimeError())
    [(_, _, header, _)] = decision.publishes
    assert header.headers[retry.ATTEMPTS] == 3
    assert header.headers[retry.ROUTING_KEY] == 'first.key'
    assert 'x-amqprun-attempts' not in header.headers
    assert header.headers['x-custom'] == 'kept'


def test_returns_counts_the_redelivered_flag_or_the_delivery_count():
    assert retry.returns(FakeDelivery()) == 0
    assert retry.returns(FakeDelivery(redelivered=True)) == 1
    assert retry.returns(FakeDelivery(
        {'x-delivery-count': 3}, redelivered=True)) == 3


def test_quarantine_counts_unsettled_returns_then_parks():
    policy = retry.RetryPolicy(retries=3)
    first = policy.quarantine(FakeDelivery(redelivered=True))
    assert first.outcome == 'quarantined'
    [(exchange, key, header, body)] = first.publishes
    assert key == 'q.quarantine'
    assert header.headers[retry.UNSETTLED] == 1
    # Failures and unsettled returns share the budget of `retries`.
    assert policy.quarantine(FakeDelivery(
        {retry.UNSETTLED: 1, retry.ATTEMPTS: 1},
        redelivered=True)).outcome == 'quarantined'
    parked = policy.quarantine(FakeDelivery(
        {retry.UNSETTLED: 2, retry.ATTEMPTS: 1}, redelivered=True))
    assert parked.outcome == 'parked'
    [(_, key, header, _)] = parked.publishes
    assert key == 'q.parked'
    assert header.headers[retry.UNSETTLED] == 3
    assert 'without being settled' in header.headers[retry.ERROR]
    # The quorum queue's count is dropped from the copy.
    quorum = policy.quarantine(FakeDelivery(
        {'x-delivery-count': 2}, redelivered=True))
    [(_, _, header, _)] = quorum.publishes
    assert header.headers[retry.UNSETTLED] == 2
    assert 'x-delivery-count' not in header.headers


def test_a_failure_after_quarantine_counts_its_unsettled_returns():
    policy = retry.RetryPolicy(retries=2, delay=0)
    decision = policy.decide(
        FakeDelivery({retry.UNSETTLED: 2}), RuntimeError())
    assert decision.outcome == 'parked'


def test_republished_keeps_the_message_as_it_is():
    delivery = FakeDelivery({retry.ATTEMPTS: 1, 'x-delivery-count': 1,
                             'x-custom': 'kept'},
                            source='q.quarantine', expiration='5000')
    exchange, key, header, body = retry.republished(delivery)
    assert (exchange, key, body) == ('', 'q.quarantine', b'body')
    assert header.expiration == '5000'
    assert header.headers == {retry.ATTEMPTS: 1, 'x-custom': 'kept'}


def test_growing_delays_through_the_broker(
        amqp_parameters, amqp_client, zca, name_prefix):
    """Three failures, retried after 0.3, 0.6 and 1.2 s through three
    retry queues, then handled."""
    tries = []

    @gocept.amqprun.handler.declare(f'{name_prefix}.in', f'{name_prefix}.in')
    def handle(message):
        tries.append(time.monotonic())
        if len(tries) < 4:
            raise RuntimeError(f'try {len(tries)}')
        return [gocept.amqprun.message.Message(
            {}, b'done', routing_key=f'{name_prefix}.out')]
    zca.registerUtility(handle, gocept.amqprun.interfaces.IHandler, 'h')
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    server = gocept.amqprun.server.Server(
        amqp_parameters, retry_policy=retry.RetryPolicy(
            retries=3, delay=0.3, backoff=2))
    for queue in server.connection.queues:
        amqp_client.forget(queue.name)
    assert [q.name for q in server.connection.queues
            if '.retry' in q.name] == [
        f'{name_prefix}.in.retry.0.3s', f'{name_prefix}.in.retry.0.6s',
        f'{name_prefix}.in.retry.1.2s']
    runner = gocept.amqprun.testing.ServerThread(server).start()
    try:
        amqp_client.send(f'{name_prefix}.in', b'x')
        reply = amqp_client.wait(out, timeout=15)
        assert reply.body == b'done'
        waited = [b - a for a, b in zip(tries, tries[1:])]
        for actual, planned in zip(waited, (0.3, 0.6, 1.2)):
            assert planned <= actual < planned + 1, waited
    finally:
        runner.stop()


def test_a_quorum_queue_retries_through_quorum_queues(
        amqp_parameters, amqp_client, zca, name_prefix):
    """The auxiliary queues of a quorum queue are quorum queues, the retry
    queue with at-least-once dead-lettering: the broker accepts them and
    a retry comes back."""
    tries = []

    @gocept.amqprun.handler.declare(
        f'{name_prefix}.in', f'{name_prefix}.in',
        arguments={'x-queue-type': 'quorum'})
    def handle(message):
        tries.append(message.body)
        if len(tries) == 1:
            raise RuntimeError('first try')
        return [gocept.amqprun.message.Message(
            {}, b'done', routing_key=f'{name_prefix}.out')]
    zca.registerUtility(handle, gocept.amqprun.interfaces.IHandler, 'h')
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    server = gocept.amqprun.server.Server(
        amqp_parameters, retry_policy=retry.RetryPolicy(delay=0.2))
    for queue in server.connection.queues:
        amqp_client.forget(queue.name)
    runner = gocept.amqprun.testing.ServerThread(server).start()
    try:
        amqp_client.send(f'{name_prefix}.in', b'x')
        assert amqp_client.wait(out, timeout=15).body == b'done'
        assert tries == [b'x', b'x']
    finally:
        runner.stop()


def raised(error):
    """`error` with the traceback of having been raised here."""
    try:
        raise error
    except Exception as e:
        return e


def test_parking_records_when_and_the_whole_error():
    policy = retry.RetryPolicy(retries=0)
    before = retry.parked_at()
    try:
        try:
            {}['key']
        except KeyError as e:
            raise RuntimeError('boom') from e
    except RuntimeError as e:
        error = e
    decision = policy.decide(FakeDelivery(), error)
    [(_, key, header, _)] = decision.publishes
    headers = header.headers
    assert key == 'q.parked'
    assert headers[retry.ERROR] == 'RuntimeError: boom'
    assert before <= headers[retry.PARKED_AT] <= retry.parked_at()
    assert headers[retry.PARKED_AT].endswith('+00:00')
    trace = headers[retry.TRACEBACK]
    assert trace.startswith('Traceback (most recent call last):')
    assert "KeyError: 'key'" in trace
    assert 'direct cause' in trace
    assert trace.rstrip().endswith('RuntimeError: boom')


def test_a_park_without_a_raised_error_has_no_traceback():
    policy = retry.RetryPolicy(retries=0)
    # Never raised (the worker builds such errors itself).
    decision = policy.decide(FakeDelivery(), RuntimeError('refused'))
    [(_, _, header, _)] = decision.publishes
    assert retry.TRACEBACK not in header.headers
    # An unsettled message parked after an earlier parking: the old
    # traceback does not pass for this parking's.
    decision = policy.quarantine(FakeDelivery(
        {retry.TRACEBACK: 'old', retry.PARKED_AT: 'old'}, redelivered=True))
    [(_, _, header, _)] = decision.publishes
    assert retry.TRACEBACK not in header.headers
    assert header.headers[retry.PARKED_AT] != 'old'


def test_a_long_traceback_keeps_its_start_and_its_end():
    # Two functions in turn: Python compacts only repeated frames.
    def ping(n):
        if not n:
            raise ValueError('the innermost ' + 'ü' * 100)
        pong(n - 1)

    def pong(n):
        ping(n)
    try:
        ping(400)
    except ValueError as e:
        error = e
    full = ''.join(retry.traceback.format_exception(error))
    assert len(full.encode()) > retry.TRACEBACK_LIMIT
    trace = retry.traceback_text(error)
    assert len(trace.encode()) <= retry.TRACEBACK_LIMIT
    assert trace.startswith('Traceback (most recent call last):\n')
    assert 'bytes of the traceback left out' in trace
    assert trace.endswith('ValueError: the innermost ' + 'ü' * 100 + '\n')
    assert retry.traceback_text(raised(ValueError('x')), limit=10 ** 6) \
        .endswith('ValueError: x\n')
