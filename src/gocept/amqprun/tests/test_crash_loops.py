"""Messages that kill their process: counted across crashes and parked.

A handler that takes its whole process down (``os._exit`` here; a
segfault in a C extension or the OOM killer in real life) cannot count its
own failure. The broker returns the message unsettled -- classic queues
flag it ``redelivered``, quorum queues count ``x-delivery-count`` -- and
the daemon counts such returns in the message itself (``amqprun-unsettled``,
see `gocept.amqprun.retry`), committed with the ACK, so that the count
survives the next crash and the message is parked after `retries`.

The crash loop runs under the real zdaemon restarting the real daemon;
the other tests kill the daemon from outside (SIGKILL), stop it gracefully
(SIGTERM, which must not count), or return a quorum queue's message
unsettled with a plain client before the daemon ever sees it.
"""

import collections
import os
import pathlib
import re
import sys

import pytest

import gocept.amqprun.testing
from gocept.amqprun.tests.test_buildout import ok
from gocept.amqprun.tests.test_buildout import run
from gocept.amqprun.tests.test_faults import Echo
from gocept.amqprun.tests.test_faults import drain
from gocept.amqprun.tests.test_faults import finish
from gocept.amqprun.tests.test_faults import tally


wait_for = gocept.amqprun.testing.wait_for

ZDAEMON = pathlib.Path(sys.executable).parent / 'zdaemon'
QUORUM = {'x-queue-type': 'quorum'}
QUEUE_TYPES = [
    pytest.param(None, id='classic'),
    pytest.param(QUORUM, id='quorum'),
]
RETRIES = 3

# `echo` (the name test_faults.ZCML registers): after `sleep` seconds, a
# reply with the body, except:
# - b'poison...' records the crash in `crashes` and kills its process;
# - `block` blocks, unless it came back unsettled before;
# - `slow` bodies are long, healthy jobs (2 s); they set RUNNING;
# - `crash_once` bodies wait for RUNNING (a slow job running beside
#   them), then kill their process -- unless they came back unsettled.
HANDLERS = '''\
import logging
import os
import threading
import time
import gocept.amqprun.handler
import gocept.amqprun.message

log = logging.getLogger('handlers')
RUNNING = threading.Event()


def crash(message):
    with open({crashes!r}, 'a') as f:
        f.write(message.header.message_id + '\\n')
    os._exit(1)


@gocept.amqprun.handler.declare({queue!r}, {queue!r}, arguments={arguments!r})
def echo(message):
    body = message.body
    log.info('Handling %s redelivered=%s unsettled=%s', body.decode(),
             message.redelivered,
             message.header.headers.get('amqprun-unsettled'))
    if {sleep!r}:
        time.sleep({sleep!r})
    if body.startswith(b'poison'):
        crash(message)
    if body == {block!r} and not message.redelivered:
        threading.Event().wait()
    if body in {slow!r}:
        RUNNING.set()
        time.sleep(2)
    if body in {crash_once!r} and not message.redelivered:
        RUNNING.wait(10)
        crash(message)
    return [gocept.amqprun.message.Message(
        {{}}, body, routing_key={out!r})]
'''

ZDAEMON_CONF = '''\
<runner>
  program {python} -m gocept.amqprun {directory}/server.conf
  directory {directory}
  socket-name {directory}/zd.sock
  transcript {directory}/transcript.log
  daemon on
  # Restart at once (a start takes longer than the limit) or after 1 s.
  forever on
  backoff-limit 1
  stop-timeout 30
  exit-codes 0,2
</runner>

<environment>
  PYTHONPATH {pythonpath}
</environment>

<eventlog>
  <logfile>
    path {directory}/zdaemon.log
  </logfile>
</eventlog>
'''

UNSETTLED = 'returned unsettled'


class Crashing(Echo):
    """An `Echo` whose queue may be a quorum queue (`arguments`) and whose
    handler crashes on b'poison...' (see HANDLERS for `block`, `slow` and
    `crash_once`)."""

    def __init__(self, *args, arguments=None, block=None, slow=(),
                 crash_once=(), **kw):
        self.arguments = arguments
        self.block = block
        self.slow = set(slow)
        self.crash_once = set(crash_once)
        super().__init__(*args, **kw)

    def declare(self, client):
        client.declare(self.queue, [self.queue], arguments=self.arguments)
        client.declare(self.out, [self.out])
        for suffix in ('.retry', '.parked', '.quarantine'):
            client.forget(self.queue + suffix)

    @property
    def parked(self):
        return f'{self.queue}.parked'

    def process(self, start=True, timeout=30):
        process = super().process(start=False)
        process.crashes = process.directory / 'crashes.txt'
        (process.directory / 'handlers.py').write_text(HANDLERS.format(
            queue=self.queue, out=self.out, arguments=self.arguments,
            crashes=str(process.crashes), block=self.block,
            sleep=self.sleep, slow=self.slow, crash_once=self.crash_once))
        if start:
            process.start(timeout=timeout)
        return process

    def publish_bodies(self, bodies):
        """Publish `bodies` in order; wait until they are all queued;
        return their message-ids."""
        ids = [self.client.send(self.queue, body) for body in bodies]
        wait_for(lambda: self.client.count(self.queue) == len(bodies),
                 timeout=30, message=f'inputs not in {self.queue}')
        return ids


@pytest.fixture
def crashing(tmp_path, amqp_parameters, amqp_client, name_prefix):
    """A factory of `Crashing` echos (retries 3 without delay); their
    started processes are killed afterwards."""
    made = []

    def factory(**kw):
        kw.setdefault('worker_extra', '')
        kw['worker_extra'] += f'  retries {RETRIES}\n  retry-delay 0\n'
        e = Crashing(tmp_path, amqp_parameters, amqp_client, name_prefix,
                     **kw)
        made.append(e)
        return e
    yield factory
    for e in made:
        e.cleanup()


def crash_count(process):
    try:
        return len(process.crashes.read_text().splitlines())
    except FileNotFoundError:
        return 0


def numbered(count):
    return [b'%06d' % i for i in range(count)]


def unsettled_lines(log, count=None):
    """The log lines of deliveries counted as returned unsettled (`count`
    times, if given)."""
    text = f'{UNSETTLED} {count} time(s)' if count else UNSETTLED
    return [line for line in log.splitlines() if text in line]


# 1. The crash loop under zdaemon


class Zdaemon:
    """zdaemon (the real one) running the daemon configured in
    `directory` (a ServerProcess's: server.conf, handlers.py)."""

    def __init__(self, directory):
        self.directory = directory
        self.conf = directory / 'zdaemon.conf'
        path = [str(directory)] + [p for p in sys.path if p]
        self.conf.write_text(ZDAEMON_CONF.format(
            python=sys.executable, directory=directory,
            pythonpath=os.pathsep.join(path)))

    def __call__(self, command, timeout=60):
        return run([ZDAEMON, '-C', self.conf, command], self.directory,
                   timeout)

    def status(self):
        return self('status')

    def cleanup(self):
        """Stop the daemon and zdaemon if they still run."""
        if (self.directory / 'zd.sock').exists():
            self('stop')
        status = self.status()
        assert status.returncode == 3, status.stdout + status.stderr


@pytest.mark.slow
@pytest.mark.parametrize('good, poisons, prefetch', [
    pytest.param(10, (0,), None, id='poison-first-of-11'),
    pytest.param(29, (10,), 10, id='poison-among-30-prefetch-10'),
    pytest.param(20, (0, 5), 10, id='2-poisons-among-22-prefetch-10'),
])
@pytest.mark.parametrize('arguments', QUEUE_TYPES)
def test_zdaemon_restarts_after_crashes_poison_is_parked_after_retries(
        crashing, arguments, good, poisons, prefetch):
    if not ZDAEMON.exists():
        pytest.skip(f'{ZDAEMON} is not installed')
    e = crashing(arguments=arguments, amount=2, worker_extra=(
        f'  prefetch {prefetch}\n' if prefetch else ''))
    process = e.process(start=False)
    bodies = numbered(good)
    for i, position in enumerate(poisons):
        bodies.insert(position, b'poison-%d' % i)
    ids = e.publish_bodies(bodies)
    poison_ids = {ids[position]: bodies[position] for position in poisons}
    zdaemon = Zdaemon(process.directory)
    try:
        ok(zdaemon('start'))
        try:
            wait_for(lambda: e.client.count(e.parked) == len(poisons)
                     and e.replies() >= good
                     and e.client.count(e.queue) == 0
                     and e.client.count(f'{e.queue}.quarantine') == 0,
                     timeout=45, interval=0.1)
        except AssertionError:
            raise AssertionError(
                f'{crash_count(process)} crash(es), {e.replies()} of '
                f'{good} replies, {e.client.count(e.parked)} parked, '
                f'{e.client.count(e.queue)} inputs left:\n'
                f'{process.log_text()}') from None
        # The daemon that parked it keeps running and handling.
        e.client.send(e.queue, numbered(good + 1)[-1])
        wait_for(lambda: e.replies() == good + 1, timeout=10)
        status = zdaemon.status()
        assert status.returncode == 0, status.stdout + status.stderr
        assert 'program running' in status.stdout
        ok(zdaemon('stop'))
    finally:
        zdaemon.cleanup()
    log = process.log_text()
    print(log)
    # A poison is counted for each crash that returned it unsettled: its
    # own, and another poison's while it was in flight (prefetched) too.
    # Alone, it is handled (and crashes) once from its queue, then
    # `retries` times from the quarantine queue; then it is parked.
    crashed = collections.Counter(process.crashes.read_text().split())
    assert set(crashed) == set(poison_ids)
    assert all(1 <= n <= RETRIES + 1 for n in crashed.values()), crashed
    if len(poisons) == 1:
        assert crashed.total() == RETRIES + 1
    if len(poisons) == 1:
        assert log.count('handlers Handling poison') == crashed.total()
    else:
        # Two poisons handled at the same moment (both still fresh from
        # their queue): one may die logging, before it recorded its crash.
        assert 0 <= log.count('handlers Handling poison') \
            - crashed.total() < len(poisons)
    # Each run of the daemon connected once: the crashes and the last one.
    assert log.count('gocept.amqprun.connection Connected to ') \
        == crashed.total() + 1
    for _ in poisons:
        parked = e.client.get(e.parked)
        assert parked.body == poison_ids.pop(parked.header.message_id)
        headers = parked.header.headers
        assert headers['amqprun-unsettled'] == RETRIES + 1
        error = headers['amqprun-error']
        error = error.decode() if isinstance(error, bytes) else error
        assert f'delivered {RETRIES + 1} time(s) without being settled' \
            in error
        logged = len([line for line in log.splitlines()
                      if parked.header.message_id in line
                      and 'parked after' in line])
        # Logged after the commit: a crash right after it may lose the line.
        assert logged == 1 if len(poisons) == 1 else logged <= 1
    assert e.client.get(e.parked) is None
    tally(drain(e.client, e.out), good + 1)
    assert e.client.count(e.queue) == 0
    # The messages that shared a crash: quarantined, counted, handled.
    bystanders = [line for line in unsettled_lines(log)
                  if not any(i in line for i in crashed)]
    print(len(bystanders), 'bystander(s):', *bystanders, sep='\n')


# 2. SIGKILL while a handler runs


@pytest.mark.slow
@pytest.mark.parametrize('arguments', QUEUE_TYPES)
def test_sigkill_while_handling_quarantines_then_handles_each_once(
        crashing, arguments):
    e = crashing(arguments=arguments, amount=1, block=b'000000',
                 worker_extra='  prefetch 5\n')
    ids = e.publish_bodies(numbered(10))
    first = e.process()
    first.wait_for_log('handlers Handling 000000 redelivered=False')
    # The 4 messages behind it are prefetched (unacked), 5 still ready.
    wait_for(lambda: e.client.count(e.queue) == 5, timeout=10)
    first.kill()
    assert first.process.returncode == -9
    assert e.replies() == 0

    second = e.process()
    finish(e, second, 10)
    log = second.log_text()
    print(log)
    # The 5 it had were returned flagged, counted once, quarantined ...
    lines = unsettled_lines(log)
    assert len(lines) == 5, lines
    assert all(f'{UNSETTLED} 1 time(s)' in line for line in lines)
    assert len([line for line in lines if ids[0] in line]) == 1
    # ... and handled (the blocking one let through, seen as redelivered).
    assert 'handlers Handling 000000 redelivered=True unsettled=1' in log
    assert 'handlers Handling 000000 redelivered=False' not in log
    assert log.count('redelivered=True unsettled=1') == 5
    assert 'parked after' not in log


# 3. A graceful stop does not count


@pytest.mark.slow
@pytest.mark.parametrize('arguments', QUEUE_TYPES)
def test_graceful_stop_puts_unstarted_back_uncounted(crashing, arguments):
    e = crashing(arguments=arguments, amount=1, sleep=0.5,
                 worker_extra='  prefetch 10\n')
    e.publish(20)
    first = e.process()
    first.wait_for_log('handlers Handling')
    # 10 prefetched: one running, the others waiting in the daemon.
    wait_for(lambda: e.client.count(e.queue) <= 10, timeout=10)
    assert first.stop() == 0
    log = first.log_text()
    print(log)
    handled = log.count('handlers Handling')
    match = re.search(r'Put (\d+) unstarted message\(s\) back', log)
    assert match, log
    assert int(match.group(1)) >= 10 - handled
    assert e.replies() == handled
    wait_for(lambda: e.client.count(e.queue) == 20 - handled, timeout=10)

    e.sleep = 0     # the second daemon need not be slow
    second = e.process()
    finish(e, second, 20)
    log = second.log_text()
    print(log)
    assert UNSETTLED not in first.log_text() + log
    # Put back as they were: not flagged, not counted, not quarantined.
    assert log.count('handlers Handling') == 20 - handled
    assert log.count('redelivered=False unsettled=None') == 20 - handled


# 4. Counting carries over from the broker's x-delivery-count


def return_unsettled(client, queue, times):
    """Receive the first message of `queue` and close the channel without
    settling it, `times` times; return the x-delivery-count of the last
    delivery."""
    count = None
    for _ in range(times):
        channel = client.connection.channel()
        method, properties, body = next(
            channel.consume(queue, inactivity_timeout=10))
        assert method is not None, f'nothing delivered from {queue}'
        count = (properties.headers or {}).get('x-delivery-count')
        channel.close()
    return count


@pytest.mark.slow
@pytest.mark.parametrize('returns', [2, RETRIES + 1])
def test_quorum_delivery_count_is_counted_in_one_step(crashing, returns):
    e = crashing(arguments=QUORUM, amount=1)
    [message_id] = e.publish_bodies(numbered(1))
    assert return_unsettled(e.client, e.queue, returns) == returns - 1
    wait_for(lambda: e.client.count(e.queue) == 1, timeout=10)
    process = e.process()
    if returns <= RETRIES:
        reply = e.client.wait(e.out, timeout=20)
        assert reply.header.correlation_id == message_id
        process.wait_for_log('Handled message')
        assert e.client.count(e.parked) == 0
    else:
        parked = e.client.wait(e.parked, timeout=20)
        assert parked.header.message_id == message_id
        assert parked.header.headers['amqprun-unsettled'] == returns
    assert process.stop() == 0
    log = process.log_text()
    print(log)
    if returns <= RETRIES:
        [line] = unsettled_lines(log)
        assert message_id in line
        assert f'{UNSETTLED} {returns} time(s)' in line
        assert 'handlers Handling 000000 redelivered=True unsettled=%d' \
            % returns in log
        assert e.client.get(e.out) is None     # one reply only
    else:
        assert f'after {returns} unsettled deliveries' in log
        assert 'handlers Handling' not in log
        assert e.client.count(e.out) == 0
    assert e.client.count(e.queue) == 0


# 5. What a quarantined message is charged with


@pytest.mark.slow
def test_quarantined_message_is_not_charged_for_others_crashes(crashing):
    """A healthy, slow message (000000) is quarantined after a crash it
    shared; later messages (000001 ...) each kill their process once
    while it runs in the quarantine. It must not be parked."""
    slow = b'000000'
    e = crashing(amount=2, slow=[slow],
                 crash_once=numbered(RETRIES + 2)[1:])
    e.publish_bodies([slow])
    crashes = 0
    for _ in range(RETRIES + 2):
        process = e.process()
        # Until the slow one runs in this process (or all are done) ...
        wait_for(lambda: f'Handling {slow.decode()}' in process.log_text()
                 or e.replies() + e.client.count(e.parked) > crashes,
                 timeout=20)
        if f'Handling {slow.decode()}' not in process.log_text():
            break
        # ... then another message kills the process.
        crashes += 1
        e.client.send(e.queue, numbered(crashes + 1)[-1])
        assert process.wait(timeout=20) == 1
    wait_for(lambda: e.replies() + e.client.count(e.parked) > crashes,
             timeout=20)
    assert process.stop() == 0
    print(process.log_text())
    parked = e.client.get(e.parked)
    assert parked is None, (
        f'{parked.body} parked: {parked.header.headers}')
    tally(drain(e.client, e.out), crashes + 1)
