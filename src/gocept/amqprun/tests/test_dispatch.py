"""No delivery waits while a worker is idle (`dispatch`).

1. `dispatch.Dispatcher` alone, with real threads and no broker: own
   backlog first, stealing, who is woken, no lost wake-up, `close()`.
2. The scenario of the issue against the real broker: 4 workers, one
   message whose handler takes long, then 30 instant ones (on the same
   queue or on another queue of the daemon): each instant message is
   handled and answered within 1 s although one channel's worker is busy
   -- in-process (`test_send_faults.in_process`, through this module's
   `proxy`) and in the real daemon.
3. Stealing keeps the guarantees: a worker that takes another slot's
   delivery commits on that slot's channel, so two workers commit on one
   channel; an `AMQPProxy` checks that the client never sends anything on
   a channel while its ``Tx.Commit`` is unanswered (RabbitMQ closes the
   connection, 504, for that) and that every commit went on the channel
   its input came on.

Every wait is bounded. The unit tests know that a thread is blocked in
`get` only from the dispatcher's private `_waiting` (nothing public tells);
they poll it with `wait_for`.
"""

import collections
import queue
import random
import threading
import time

import pytest
import transaction

import gocept.amqprun.channel
import gocept.amqprun.dispatch
import gocept.amqprun.handler
import gocept.amqprun.message
import gocept.amqprun.retry
import gocept.amqprun.session
import gocept.amqprun.tests.test_send_faults
import gocept.amqprun.topology
from gocept.amqprun.testing import AMQPProxy
from gocept.amqprun.testing import TO_BROKER
from gocept.amqprun.testing import TO_CLIENT
from gocept.amqprun.testing import TX_COMMIT
from gocept.amqprun.testing import TX_COMMIT_OK
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.test_faults import LOST
from gocept.amqprun.tests.test_faults import ZCML
from gocept.amqprun.tests.test_faults import drain
from gocept.amqprun.tests.test_faults import tally
from gocept.amqprun.tests.test_server import register


Dispatcher = gocept.amqprun.dispatch.Dispatcher
Message = gocept.amqprun.message.Message

TIMEOUT = 10        # the bound of a wait that is expected to succeed
NOT_YET = 0.2       # how long a test watches for what must not happen
MAX_WAIT = 1.0      # the most an instant message may wait (the issue)
SLOW = 6            # seconds the slow handler takes at most
INSTANT = 30        # instant messages published behind the slow one


# 1. The Dispatcher alone


class Getter(threading.Thread):
    """`dispatcher.get(index)` in a thread of its own."""

    def __init__(self, dispatcher, index):
        super().__init__(name=f'getter-{index}', daemon=True)
        self.dispatcher = dispatcher
        self.index = index
        self.result = None
        self.done = threading.Event()
        self.start()

    def run(self):
        self.result = self.dispatcher.get(self.index)
        self.done.set()

    def wait(self):
        """What `get` returned (AssertionError if it still waits)."""
        assert self.done.wait(TIMEOUT), f'get({self.index}) still waits'
        return self.result


def take(dispatcher, index):
    """`dispatcher.get(index)`, bounded: it must not wait."""
    return Getter(dispatcher, index).wait()


def waiting(dispatcher):
    """The indexes whose worker waits in `get` (private state)."""
    return {i for i, flag in enumerate(dispatcher._waiting) if flag}


def getters(dispatcher, *indexes):
    """Getters of `indexes`, returned once all of them wait."""
    started = [Getter(dispatcher, i) for i in indexes]
    wait_for(lambda: waiting(dispatcher) == set(indexes), timeout=TIMEOUT,
             message=f'not waiting: {set(indexes) - waiting(dispatcher)}')
    return started


def started(target, count):
    """`count` started threads running target(0) ... target(count - 1)."""
    threads = [threading.Thread(target=target, args=(i,), daemon=True)
               for i in range(count)]
    for thread in threads:
        thread.start()
    return threads


def joined(threads):
    """Wait (bounded) until `threads` ended."""
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), f'{thread.name} still runs'


@pytest.fixture
def dispatcher():
    """A factory of Dispatchers, closed afterwards (which ends every
    getter still waiting). Workers take a busy worker's deliveries at
    once (steal_after=0) unless `steal_after` says otherwise."""
    made = []

    def factory(size, steal_after=0):
        made.append(Dispatcher(size, steal_after=steal_after))
        return made[-1]
    yield factory
    for d in made:
        d.close()


def test_a_worker_takes_its_own_backlog_first(dispatcher):
    d = dispatcher(3, steal_after=60)
    for index in range(3):
        d.put(index, 'first')
        assert take(d, index) == 'first'     # all three busy now
    d.put(1, 'b1')
    d.put(0, 'a1')
    d.put(2, 'c1')
    d.put(0, 'a2')
    assert take(d, 0) == 'a1'
    # Each one's own, although stealing would find others first.
    assert take(d, 2) == 'c1'
    assert take(d, 1) == 'b1'
    assert take(d, 0) == 'a2'
    assert len(d) == 0


def test_the_oldest_delivery_of_a_busy_workers_slot_goes_first(dispatcher):
    d = dispatcher(2)
    d.put(0, 'first')
    assert take(d, 0) == 'first'       # worker 0 is busy with it now
    d.put(0, 'behind the busy one')
    d.put(1, 'later, own')
    # Worker 1 takes the older delivery of busy worker 0's slot first.
    assert take(d, 1) == 'behind the busy one'
    assert take(d, 1) == 'later, own'


def test_a_worker_keeps_its_deliveries_until_it_was_busy_for_a_while(
        dispatcher):
    d = dispatcher(2, steal_after=0.3)
    d.put(0, 'running')
    assert take(d, 0) == 'running'      # worker 0 is busy from now on
    started = time.monotonic()
    d.put(0, 'behind it')
    other = Getter(d, 1)
    # Worker 1 takes it once worker 0 has been busy for 0.3 s -- by
    # looking again, without another put waking it.
    assert other.wait() == 'behind it'
    waited = time.monotonic() - started
    assert 0.25 <= waited < 1.5, waited


def test_a_busy_worker_taking_its_next_delivery_in_time_keeps_it(
        dispatcher):
    d = dispatcher(2, steal_after=5)
    d.put(0, 'first')
    assert take(d, 0) == 'first'
    d.put(0, 'second')
    [other] = getters(d, 1)              # worker 1 idles ...
    assert take(d, 0) == 'second'        # ... worker 0 takes its own
    assert not other.done.is_set()


def test_an_isolated_item_waits_for_the_running_ones_and_runs_alone(
        dispatcher):
    d = dispatcher(3)
    d.put(1, 'running')
    assert take(d, 1) == 'running'
    d.put(0, 'isolated', isolated=True)
    d.put(2, 'regular')
    # Nothing starts while the isolated item waits for 'running' ...
    first, third = getters(d, 0, 2)
    assert not first.done.is_set() and not third.done.is_set()
    # ... worker 1, done with it, runs the isolated item ...
    assert take(d, 1) == 'isolated'
    assert waiting(d) == {0, 2}
    assert len(d) == 1
    # ... and when that is done, the others go on.
    second = Getter(d, 1)
    d.put(0, 'next')
    getters_ = (first, second, third)
    wait_for(lambda: sum(g.done.is_set() for g in getters_) == 2,
             timeout=TIMEOUT)
    assert sorted(g.result for g in getters_ if g.done.is_set()) == [
        'next', 'regular']


def test_a_worker_steals_when_its_own_backlog_is_empty(dispatcher):
    d = dispatcher(3)
    d.put(1, 'b1')
    d.put(1, 'b2')
    d.put(2, 'c1')
    taken = [take(d, 0) for _ in range(3)]
    assert sorted(taken) == ['b1', 'b2', 'c1']
    # The oldest of a backlog first.
    assert taken.index('b1') < taken.index('b2')
    assert len(d) == 0
    # Nothing left anywhere: it waits.
    [getter] = getters(d, 0)
    assert not getter.done.wait(NOT_YET)


def test_a_put_wakes_the_worker_of_its_index_if_it_waits(dispatcher):
    d = dispatcher(3)
    g0, g1, g2 = getters(d, 0, 1, 2)
    d.put(1, 'x')
    assert g1.wait() == 'x'
    assert not g0.done.wait(NOT_YET)
    assert not g2.done.is_set()
    assert waiting(d) == {0, 2}
    d.put(2, 'y')
    assert g2.wait() == 'y'
    assert not g0.done.is_set()
    assert len(d) == 0


def test_a_put_wakes_another_waiting_worker_if_its_own_is_busy(dispatcher):
    # Workers 1 (and 3) are busy, i.e. not in get().
    d = dispatcher(4)
    [g0] = getters(d, 0)
    d.put(1, 'x')
    assert g0.wait() == 'x'
    g0, g2 = getters(d, 0, 2)
    d.put(1, 'y')
    wait_for(lambda: g0.done.is_set() or g2.done.is_set(), timeout=TIMEOUT)
    woken, other = (g0, g2) if g0.done.is_set() else (g2, g0)
    assert woken.result == 'y'
    # One put, one worker woken; the other goes on waiting ...
    assert not other.done.wait(NOT_YET)
    assert waiting(d) == {other.index}
    # ... until the next put.
    d.put(3, 'z')
    assert other.wait() == 'z'
    assert len(d) == 0


def test_each_put_wakes_a_waiting_worker_no_lost_wake_up(dispatcher):
    # Ping-pong: worker 0 takes what is put for the busy worker 1, one
    # item at a time, so that puts hit every moment of its get().
    d = dispatcher(2)
    handed = queue.SimpleQueue()

    def worker(index):
        while (item := d.get(index)) is not None:
            handed.put(item)
    workers = started(worker, 1)
    for n in range(5000):
        d.put(1, n)
        try:
            assert handed.get(timeout=TIMEOUT) == n
        except queue.Empty:
            raise AssertionError(
                f'item {n} not taken: {len(d)} waiting, worker waits: '
                f'{waiting(d)}') from None
    assert d.close() == []
    joined(workers)


class Counting:
    """A dispatcher's bell (private: a queue a waiting worker gets from)
    that counts how often a worker waited on it."""

    def __init__(self, bell):
        self.bell = bell
        self.acquired = 0

    def get(self, *args, **kw):
        self.acquired += 1
        return self.bell.get(*args, **kw)

    def put(self, item):
        self.bell.put(item)


def test_many_producers_and_consumers_take_every_item_once(dispatcher):
    size, count = 4, 20000
    d = dispatcher(size)
    d._bells = bells = [Counting(bell) for bell in d._bells]
    start = threading.Barrier(size + 2)
    taken = [[] for _ in range(size)]
    lock = threading.Lock()
    total = [0]
    all_taken = threading.Event()

    def consume(index):
        start.wait(TIMEOUT)
        while (item := d.get(index)) is not None:
            taken[index].append(item)
            with lock:
                total[0] += 1
                if total[0] == count:
                    all_taken.set()

    def produce(first):
        rnd = random.Random(first)
        start.wait(TIMEOUT)
        for n in range(first, count, 2):
            d.put(rnd.randrange(size), n)
            # Let the consumers run (yield the GIL): they catch up and
            # wait, so that puts meet them at every step of get().
            time.sleep(0)

    began = time.monotonic()
    consumers = started(consume, size)
    producers = started(produce, 2)
    # A lost wake-up leaves items behind while consumers wait.
    assert all_taken.wait(60), (
        f'{total[0]} of {count} taken; {len(d)} left while waiting: '
        f'{waiting(d)}')
    waits = sum(bell.acquired for bell in bells)
    print(f'{count} items through {size} consumers in '
          f'{time.monotonic() - began:.2f} s, {waits} waits in get()')
    assert waits > count // 10, 'hardly any contention'
    joined(producers)
    assert d.close() == []
    joined(consumers)
    items = [item for part in taken for item in part]
    assert len(items) == count
    assert sorted(items) == list(range(count))


def test_close_returns_the_untaken_items(dispatcher):
    d = dispatcher(3)
    d.put(0, 'a')
    d.put(2, 'c')
    d.put(0, 'b')
    left = d.close()
    assert sorted(left) == ['a', 'b', 'c']
    assert left.index('a') < left.index('b')
    assert len(d) == 0
    assert take(d, 0) is None
    assert take(d, 2) is None


def test_close_ends_waiting_and_later_gets(dispatcher):
    d = dispatcher(3)
    g0, g1 = getters(d, 0, 1)
    assert d.close() == []
    assert g0.wait() is None
    assert g1.wait() is None
    assert take(d, 2) is None
    # What is put after the close is not handed out any more.
    d.put(1, 'late')
    assert take(d, 1) is None
    assert take(d, 0) is None


def test_close_while_workers_take_hands_out_each_item_once(dispatcher):
    size, count = 4, 20000
    d = dispatcher(size)
    for n in range(count):
        d.put(n % size, n)
    start = threading.Barrier(size + 1)
    taken = [[] for _ in range(size)]
    enough = threading.Event()

    def consume(index):
        start.wait(TIMEOUT)
        while (item := d.get(index)) is not None:
            taken[index].append(item)
            if len(taken[index]) == 500:
                enough.set()
            time.sleep(0)   # yield the GIL: the close comes in between

    consumers = started(consume, size)
    start.wait(TIMEOUT)
    assert enough.wait(TIMEOUT)
    left = d.close()
    joined(consumers)
    items = [item for part in taken for item in part]
    print(f'{len(items)} taken, {len(left)} returned by close()')
    assert left, 'the workers took everything before the close'
    assert sorted(items + left) == list(range(count))


def test_len_counts_the_items_in_all_backlogs(dispatcher):
    d = dispatcher(2)
    assert len(d) == 0
    d.put(0, 'a')
    d.put(1, 'b')
    d.put(1, 'c')
    assert len(d) == 3
    take(d, 0)
    assert len(d) == 2
    take(d, 0)      # stolen
    assert len(d) == 1
    assert d.close() == ['c']
    assert len(d) == 0


# 2. One slow message, 30 instant ones, 4 workers


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
    """The daemon's way to the broker: a CommitWatch."""
    with CommitWatch.to(amqp_parameters) as watch:
        yield watch


# In-process servers connected through `proxy`.
in_process = gocept.amqprun.tests.test_send_faults.in_process


def received(client, queue_name, count, timeout):
    """{body: time.monotonic() when it arrived} of the next `count`
    messages of `queue_name`, or fewer after `timeout` seconds."""
    seen = {}
    deadline = time.monotonic() + timeout
    for method, properties, body in client.channel.consume(
            queue_name, auto_ack=True, inactivity_timeout=0.01):
        if method is not None:
            seen[body] = time.monotonic()
        if len(seen) >= count or time.monotonic() > deadline:
            break
    client.channel.cancel()
    return seen


def publish_instant(client, queue_name):
    """Publish the instant messages; {body: time.monotonic() of its
    publish}."""
    published = {}
    for n in range(INSTANT):
        body = b'%02d' % n
        published[body] = time.monotonic()
        client.send(queue_name, body)
    return published


def late(published, times):
    """{body: seconds from its publish to `times[body]`} and the
    largest of them."""
    waits = {body: times[body] - published[body] for body in published}
    return waits, max(waits.values())


def own_slot(worker):
    """The name of the consumer slot of `worker` (a thread name)."""
    return f'consumer-{worker.rsplit("-", 1)[1]}'


class SlowAndInstant:
    """The handlers of the issue's scenario and what they measured: a
    slow handler (message ``slow``) that blocks until `release` is set
    (at most SLOW seconds), instant ones on `queue` (the slow one's queue
    or another one)."""

    def __init__(self, zca, client, prefix, other_queue):
        self.slow_queue = f'{prefix}.in'
        self.queue = f'{prefix}.other' if other_queue else self.slow_queue
        self.out = client.declare(f'{prefix}.out', [f'{prefix}.out'])
        self.server = None
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()
        self.released = None
        self.slow_worker = None
        self.ran = {}       # body -> (time.monotonic(), worker, slot)
        queues = {self.slow_queue, self.queue}
        for name in queues:
            register(zca, gocept.amqprun.handler.declare(name, name)(
                self.handle))

    def handle(self, message):
        delivery = gocept.amqprun.session.Session.of(
            self.server, transaction.get()).delivery
        if message.body == b'slow':
            self.slow_worker = threading.current_thread().name
            self.started.set()
            self.released = self.release.wait(SLOW)
            self.finished.set()
        else:
            self.ran[message.body] = (
                time.monotonic(), threading.current_thread().name,
                delivery.slot.name)
        return [Message({}, message.body, routing_key=self.out)]


@pytest.mark.parametrize('prefetch', [None, 10], ids=['prefetch 2',
                                                      'prefetch 10'])
@pytest.mark.parametrize('other_queue', [False, True],
                         ids=['same queue', 'other queue'])
def test_no_message_waits_behind_a_slow_one_while_workers_idle(
        in_process, proxy, zca, amqp_client, name_prefix, prefetch,
        other_queue):
    s = SlowAndInstant(zca, amqp_client, name_prefix, other_queue)
    s.server = in_process(workers=4, prefetch=prefetch)
    amqp_client.send(s.slow_queue, b'slow')
    assert s.started.wait(TIMEOUT)
    published = publish_instant(amqp_client, s.queue)
    seen = received(amqp_client, s.out, INSTANT, timeout=SLOW - 1)
    still_running = not s.finished.is_set()
    s.release.set()
    assert s.finished.wait(TIMEOUT)
    # Every instant reply came while the slow handler still ran.
    assert still_running
    assert s.released, 'the slow handler was not released by the test'
    assert sorted(seen) == sorted(published), \
        f'{len(seen)} of {INSTANT} replies before the slow one finished'
    ran, ran_max = late(published, {b: r[0] for b, r in s.ran.items()})
    replied, replied_max = late(published, seen)
    busy_channel = own_slot(s.slow_worker)
    stolen = sorted(b for b, r in s.ran.items() if r[2] == busy_channel)
    print(f'waited at most {ran_max:.3f} s to be handled, '
          f'{replied_max:.3f} s to be answered; {len(stolen)} of the busy '
          f'worker\'s channel {busy_channel} handled by other workers')
    assert ran_max < MAX_WAIT, ran
    assert replied_max < MAX_WAIT, replied
    assert min(ran.values()) > 0
    # The busy worker's channel got instant messages too: the others took
    # them.
    assert stolen
    assert amqp_client.wait(s.out).body == b'slow'
    assert amqp_client.get(s.out) is None
    assert proxy.intrusions == []


# The real daemon.

SLOW_HANDLERS = '''\
import logging
import time
import gocept.amqprun.handler
import gocept.amqprun.message

log = logging.getLogger('handlers')


@gocept.amqprun.handler.declare({queue!r}, {queue!r})
def echo(message):
    if message.body == b'slow':
        log.info('Slow handler started')
        time.sleep({sleep!r})
    # When it ran (CLOCK_MONOTONIC is system-wide on Linux).
    return [gocept.amqprun.message.Message(
        {{}}, message.body + b' %.6f' % time.monotonic(),
        routing_key={out!r})]
'''


@pytest.mark.slow
def test_daemon_answers_instant_messages_while_one_handler_sleeps(
        server_process, amqp_client, name_prefix):
    in_queue = amqp_client.declare(f'{name_prefix}.in',
                                   [f'{name_prefix}.in'])
    out = amqp_client.declare(f'{name_prefix}.out', [f'{name_prefix}.out'])
    handler = gocept.amqprun.handler.declare(in_queue, in_queue)(
        lambda message: None)
    for q in gocept.amqprun.topology.queues_for(
            [handler], gocept.amqprun.retry.RetryPolicy()):
        amqp_client.forget(q.name)
    process = server_process(
        zcml=ZCML, amount=4, handlers=SLOW_HANDLERS.format(
            queue=in_queue, out=out, sleep=SLOW))
    amqp_client.send(in_queue, b'slow')
    process.wait_for_log('handlers Slow handler started', timeout=TIMEOUT)
    published = publish_instant(amqp_client, in_queue)
    seen = received(amqp_client, out, INSTANT, timeout=SLOW - 1)
    replies = {reply.split()[0]: (arrived, float(reply.split()[1]))
               for reply, arrived in seen.items()}
    slow = received(amqp_client, out, 1, timeout=SLOW + TIMEOUT)
    assert [reply.split()[0] for reply in slow] == [b'slow']
    assert process.stop() == 0
    assert sorted(replies) == sorted(published), \
        f'{len(replies)} of {INSTANT} replies before the slow one'
    ran, ran_max = late(published, {b: r[1] for b, r in replies.items()})
    replied, replied_max = late(published, {b: r[0]
                                            for b, r in replies.items()})
    print(f'daemon: waited at most {ran_max:.3f} s to be handled, '
          f'{replied_max:.3f} s to be answered')
    assert min(ran.values()) > 0
    assert ran_max < MAX_WAIT, ran
    assert replied_max < MAX_WAIT, replied
    # All handled while the slow one slept.
    [slow_done] = [float(reply.split()[1]) for reply in slow]
    assert max(r[1] for r in replies.values()) < slow_done
    assert amqp_client.count(in_queue) == 0
    log = process.log_text()
    assert 'Traceback' not in log
    assert LOST not in log


# 3. Two workers committing on one channel


@pytest.fixture
def queued_commits(monkeypatch):
    """{slot name: commits that had to wait for another one's Commit-Ok
    on its channel} (counted in `Slot._commit`, the IO thread)."""
    counts = collections.Counter()
    original = gocept.amqprun.channel.Slot._commit

    def _commit(self, outcome, *args):
        if self._pending and outcome not in self._pending:
            counts[self.name] += 1
        return original(self, outcome, *args)
    monkeypatch.setattr(gocept.amqprun.channel.Slot, '_commit', _commit)
    return counts


class Numbered:
    """A handler for the numbered inputs of `queue` that replies to `out`.

    Input 0 is the slow one: it blocks until `release` is set. The others
    sleep a random 0 to `pause` seconds. `order` records (number, worker,
    slot) of each input in the order they were handled.
    """

    def __init__(self, zca, client, prefix, pause):
        self.queue = client.declare(f'{prefix}.in', [f'{prefix}.in'])
        self.out = client.declare(f'{prefix}.out', [f'{prefix}.out'])
        self.pause = pause
        self.server = None
        self.started = threading.Event()
        self.release = threading.Event()
        self.released = None
        self.slow = None        # (worker, slot) of input 0
        self.order = []
        self.changed = threading.Condition()
        register(zca, gocept.amqprun.handler.declare(
            self.queue, self.queue)(self.handle))

    def handle(self, message):
        delivery = gocept.amqprun.session.Session.of(
            self.server, transaction.get()).delivery
        here = (threading.current_thread().name, delivery.slot.name)
        number = int(message.body)
        if number == 0:
            self.slow = here
            self.started.set()
            self.released = self.release.wait(TIMEOUT)
        else:
            time.sleep(random.uniform(0, self.pause))
        with self.changed:
            self.order.append((number, *here))
            self.changed.notify_all()
        return [Message({}, message.body, routing_key=self.out)]

    def send(self, client, first, last):
        for number in range(first, last):
            client.send(self.queue, b'%06d' % number)

    def wait_handled(self, count):
        with self.changed:
            assert self.changed.wait_for(
                lambda: len(self.order) >= count, TIMEOUT), \
                f'{len(self.order)} of {count} inputs handled'

    def stolen(self):
        """{slot name: its deliveries that another slot's worker
        handled}."""
        return collections.Counter(
            slot for number, worker, slot in self.order
            if own_slot(worker) != slot)


def test_stolen_deliveries_commit_atomically_on_their_channel(
        in_process, proxy, queued_commits, zca, amqp_client, name_prefix,
        caplog, monkeypatch):
    # Inputs come in rounds of a few, so that backlogs run empty and
    # workers steal -- at once, to make their commits meet on a channel:
    # before the release one worker is busy with input 0 and the other
    # takes its channel's deliveries; after it both take each other's.
    monkeypatch.setattr(gocept.amqprun.dispatch, 'STEAL_AFTER', 0)
    count, size = 300, 3
    h = Numbered(zca, amqp_client, name_prefix, pause=0.005)
    h.server = in_process(workers=2)
    h.send(amqp_client, 0, 1)
    assert h.started.wait(TIMEOUT)
    sent = 1
    while sent < count:
        if sent > count // 4 and not h.release.is_set():
            stolen_before_release = h.stolen()[own_slot(h.slow[0])]
            h.release.set()
        h.send(amqp_client, sent, min(count, sent + size))
        sent = min(count, sent + size)
        h.wait_handled(sent if h.release.is_set() else sent - 1)
    wait_for(lambda: amqp_client.count(h.out) == count, timeout=TIMEOUT)
    channels = {slot.name: slot.channel.channel_number
                for slot in h.server.connection.consumer_slots}
    h.server.stop()
    assert h.released
    tally(drain(amqp_client, h.out), count)
    assert amqp_client.count(h.queue) == 0
    assert amqp_client.count(f'{h.queue}.parked') == 0
    per_slot = collections.Counter(slot for n, w, slot in h.order)
    stolen = h.stolen()
    print(f'commits per channel {dict(proxy.commits)} (channels '
          f'{channels}), inputs per slot {dict(per_slot)}, handled by '
          f'the other worker {dict(stolen)} ({stolen_before_release} '
          f'while {h.slow} was busy), commits that waited for another '
          f'one on their channel {dict(queued_commits)}')
    # The busy worker's channel's deliveries were handled by the other.
    assert stolen_before_release >= 5
    # One commit per input, each on the channel its input came on.
    assert proxy.commits == collections.Counter(
        {channels[slot]: n for slot, n in per_slot.items()})
    assert proxy.seen(TX_COMMIT_OK, TO_CLIENT) == count
    # Nothing was sent on a channel during its commit ...
    assert proxy.intrusions == []
    # ... although the two workers' commits met on one channel.
    assert sum(queued_commits.values()) > 0
    # One connection all along, never closed by the broker.
    assert proxy.accepted == 1
    for text in ('504', 'unexpected command', LOST, 'closed by the broker'):
        assert text not in caplog.text


def test_a_delivery_on_a_busy_channel_is_not_overtaken_by_later_ones(
        in_process, zca, amqp_client, name_prefix):
    count, workers, prefetch = 150, 2, 10
    h = Numbered(zca, amqp_client, name_prefix, pause=0.005)
    h.server = in_process(workers=workers, prefetch=prefetch)
    h.send(amqp_client, 0, 1)
    assert h.started.wait(TIMEOUT)
    h.send(amqp_client, 1, count)
    h.wait_handled(count - 1)
    h.release.set()
    h.wait_handled(count)
    handled = [number for number, worker, slot in h.order if number]
    overtaken = {n: sum(1 for m in handled[:i] if m > n)
                 for i, n in enumerate(handled)}
    worst = max(overtaken, key=overtaken.get)
    print(f'input {worst} was overtaken by {overtaken[worst]} later '
          f'ones; handled by the other worker: {dict(h.stolen())}')
    # Oldest first, an input is overtaken at most by what is in flight.
    assert overtaken[worst] <= workers * prefetch
