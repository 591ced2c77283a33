"""No delivery waits while a worker is idle (`dispatch`).

1. `dispatch.Dispatcher` alone, with real threads and no broker: oldest
   first, who is woken, isolation, no lost wake-up, `close()`.
2. The scenario of the issue against the real broker: 4 workers, one
   message whose handler takes long, then 30 instant ones (on the same
   queue or on another queue of the daemon): each instant message is
   handled and answered within 1 s although a worker is busy --
   in-process (`test_send_faults.in_process`, through this module's
   `proxy`) and in the real daemon. A delivery is not overtaken by later
   ones for longer than what is in flight.

How commits of many workers share a channel is tested in test_commits.py.

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
from gocept.amqprun.tests.test_commits import CommitWatch
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.test_faults import LOST
from gocept.amqprun.tests.test_faults import ZCML
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
    return set(dispatcher._waiting)


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
    getter still waiting)."""
    made = []

    def factory(size):
        made.append(Dispatcher(size))
        return made[-1]
    yield factory
    for d in made:
        d.close()


def test_the_oldest_delivery_goes_first_to_any_worker(dispatcher):
    d = dispatcher(3)
    for item in ('a', 'b', 'c', 'd'):
        d.put(item)
    assert [take(d, 2), take(d, 0), take(d, 2), take(d, 1)] == [
        'a', 'b', 'c', 'd']
    assert len(d) == 0
    # Nothing left: it waits.
    [getter] = getters(d, 0)
    assert not getter.done.wait(NOT_YET)


def test_an_isolated_item_waits_for_the_running_ones_and_runs_alone(
        dispatcher):
    d = dispatcher(3)
    d.put('running')
    assert take(d, 1) == 'running'
    d.put('isolated', isolated=True)
    d.put('regular')
    # Nothing starts while the isolated item waits for 'running' ...
    first, third = getters(d, 0, 2)
    assert not first.done.is_set() and not third.done.is_set()
    # ... worker 1, done with it, runs the isolated item ...
    assert take(d, 1) == 'isolated'
    assert waiting(d) == {0, 2}
    assert len(d) == 1
    # ... and when that is done, the others go on.
    second = Getter(d, 1)
    d.put('next')
    getters_ = (first, second, third)
    wait_for(lambda: sum(g.done.is_set() for g in getters_) == 2,
             timeout=TIMEOUT)
    assert sorted(g.result for g in getters_ if g.done.is_set()) == [
        'next', 'regular']


def test_an_isolated_item_at_the_head_runs_at_once_when_all_idle(
        dispatcher):
    d = dispatcher(2)
    d.put('isolated', isolated=True)
    d.put('regular')
    assert take(d, 0) == 'isolated'
    [other] = getters(d, 1)
    assert not other.done.wait(NOT_YET)     # nothing else runs meanwhile
    assert take(d, 0) == 'regular'          # done: the next one goes
    d.put('more')
    assert other.wait() == 'more'


def test_a_put_wakes_one_waiting_worker(dispatcher):
    d = dispatcher(3)
    waiters = getters(d, 0, 1, 2)
    d.put('x')
    wait_for(lambda: any(g.done.is_set() for g in waiters), timeout=TIMEOUT)
    [woken] = [g for g in waiters if g.done.is_set()]
    assert woken.result == 'x'
    others = [g for g in waiters if g is not woken]
    # One put, one worker woken; the others go on waiting ...
    assert not any(g.done.wait(NOT_YET) for g in others)
    assert waiting(d) == {g.index for g in others}
    # ... until the next puts.
    d.put('y')
    d.put('z')
    assert sorted(g.wait() for g in others) == ['y', 'z']
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
        d.put(n)
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
            d.put(n, isolated=rnd.random() < 0.001)
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
    d.put('a')
    d.put('c', isolated=True)
    d.put('b')
    left = d.close()
    assert left == ['a', 'c', 'b']
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
    d.put('late')
    assert take(d, 1) is None
    assert take(d, 0) is None


def test_close_while_workers_take_hands_out_each_item_once(dispatcher):
    size, count = 4, 20000
    d = dispatcher(size)
    for n in range(count):
        d.put(n)
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


def test_len_counts_the_waiting_items(dispatcher):
    d = dispatcher(2)
    assert len(d) == 0
    d.put('a')
    d.put('b')
    d.put('c')
    assert len(d) == 3
    take(d, 0)
    assert len(d) == 2
    take(d, 1)
    assert len(d) == 1
    assert d.close() == ['c']
    assert len(d) == 0


# 2. One slow message, 30 instant ones, 4 workers


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
    workers = collections.Counter(r[1] for r in s.ran.values())
    print(f'waited at most {ran_max:.3f} s to be handled, '
          f'{replied_max:.3f} s to be answered; handled by {dict(workers)}')
    assert ran_max < MAX_WAIT, ran
    assert replied_max < MAX_WAIT, replied
    assert min(ran.values()) > 0
    assert s.slow_worker not in workers
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


def test_a_delivery_is_not_overtaken_by_later_ones(
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
    print(f'input {worst} was overtaken by {overtaken[worst]} later ones')
    # Oldest first, an input is overtaken at most by what is in flight.
    assert overtaken[worst] <= workers * prefetch
