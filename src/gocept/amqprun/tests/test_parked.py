"""Parked messages: the operator's story and its guarantees.

The story runs with the real daemon (a subprocess) and the real broker,
on a classic and a quorum queue: a handler with a bug parks messages,
listing them (four times) changes nothing, the fix lands (a flag file the
handler reads), replay brings them back one by one or all at once, each
is handled exactly once, drop deletes one only. The faults cut the
tool's connection at exact AMQP steps (`AMQPProxy`). The command line
runs through its real entry point (``python -m gocept.amqprun parked``).
"""

import datetime
import json
import os
import subprocess
import sys
import threading

import pika
import pytest

from gocept.amqprun.parked import Busy
from gocept.amqprun.parked import Interrupted
from gocept.amqprun.parked import NotParked
from gocept.amqprun.parked import Parked
from gocept.amqprun.parked import ParkedMessage
from gocept.amqprun.parked import TargetMissing
from gocept.amqprun.parked import UnknownQueue
from gocept.amqprun.testing import AMQPProxy
from gocept.amqprun.testing import TO_BROKER
from gocept.amqprun.testing import TO_CLIENT
from gocept.amqprun.testing import TX_COMMIT
from gocept.amqprun.testing import TX_COMMIT_OK
from gocept.amqprun.testing import wait_for
import gocept.amqprun.message
import gocept.amqprun.parked
import gocept.amqprun.parkedcli
import gocept.amqprun.properties
import gocept.amqprun.retry as retry


QUORUM = {'x-queue-type': 'quorum'}
QUEUE_TYPES = [
    pytest.param(None, id='classic'),
    pytest.param(QUORUM, id='quorum'),
]

# Fails until the flag file exists (the fix); then replies with what it
# saw of the failure counters and the routing key.
HANDLERS = '''\
import os
import gocept.amqprun.handler
import gocept.amqprun.message


@gocept.amqprun.handler.declare({queue!r}, {key!r}, arguments={arguments!r})
def handle(message):
    body = message.body.decode()
    if not os.path.exists({flag!r}):
        raise ValueError('not fixed yet: ' + body)
    headers = message.header.headers
    return [gocept.amqprun.message.Message(dict(
        replays=headers.get('amqprun-replays', 0),
        attempts=headers.get('amqprun-attempts', 0),
        seen_routing_key=message.routing_key,
        redelivered=message.redelivered),
        message.body, routing_key={out!r})]
'''

ZCML = '''\
<utility component="handlers.handle" name="handle"
         provides="gocept.amqprun.interfaces.IHandler" />
'''


class Story:
    """A daemon whose handler of `queue` fails until `fix()`, parking at
    once (retries 0); replies go to `out`."""

    def __init__(self, tmp_path, client, prefix, server_process,
                 arguments=None, worker_extra=''):
        self.client = client
        self.queue = f'{prefix}.in'
        self.key = f'{prefix}.key'
        self.parked = f'{self.queue}.parked'
        self.out = client.declare(f'{prefix}.out', [f'{prefix}.out'])
        client.forget(self.queue)
        self.flag = tmp_path / 'fixed'
        self.process = server_process(
            zcml=ZCML, amount=1,
            worker_extra='  retries 0\n' + worker_extra,
            handlers=HANDLERS.format(
                queue=self.queue, key=self.key, arguments=arguments,
                flag=str(self.flag), out=self.out))

    def park(self, *bodies):
        """Send messages with `bodies`, wait until all are parked;
        return their message ids."""
        before = self.client.count(self.parked)
        ids = [self.client.send(self.key, body) for body in bodies]
        wait_for(lambda: self.client.count(self.parked)
                 == before + len(bodies), timeout=30,
                 message=f'{len(bodies)} messages not parked')
        return ids

    def fix(self):
        self.flag.write_text('fixed')

    def replies(self, count):
        """`count` replies ({body: header}); AssertionError if fewer
        come."""
        return {r.body.decode(): r.header for r in
                self.client.wait_many(self.out, count, timeout=30)}


def ids_of(messages):
    return [m.message_id for m in messages]


def as_read(message):
    """What a listing must leave as it was: properties (without the
    broker's delivery count) and body."""
    data = message.header.as_dict()
    data['headers'] = {k: v for k, v in message.header.headers.items()
                       if k != retry.DELIVERY_COUNT}
    return data, message.body


@pytest.mark.parametrize('arguments', QUEUE_TYPES)
def test_the_story_of_parked_messages(
        arguments, tmp_path, amqp_client, amqp_parameters, name_prefix,
        server_process):
    story = Story(tmp_path, amqp_client, name_prefix, server_process,
                  arguments)
    started = datetime.datetime.now(datetime.timezone.utc)
    bodies = ['m0', 'm1', 'm2', 'm3']
    ids = story.park(*bodies)
    with Parked(amqp_parameters, [story.queue]) as parked:
        # Listing is read-only in effect, however often it runs.
        first = parked.list()
        for _ in range(3):
            listed = parked.list()
            assert ids_of(listed) == ids
            assert [as_read(m) for m in listed] == \
                [as_read(m) for m in first]
            assert amqp_client.count(story.parked) == 4
        for message, body in zip(listed, bodies):
            assert message.queue == story.queue
            assert message.redelivered is False
            # A quorum queue counts returns; nothing returned.
            assert message.delivery_count == (0 if arguments else None)
            assert message.attempts == 1
            assert message.routing_key == story.key
            assert message.size == len(body)
            assert message.body == body.encode()
            assert message.error_line == f'ValueError: not fixed yet: {body}'
            assert 'Traceback (most recent call last)' in message.error
            assert message.error.rstrip().endswith(message.error_line)
            assert started <= message.parked_at \
                <= datetime.datetime.now(datetime.timezone.utc)
        assert parked.show(ids[2]).body == b'm2'

        story.fix()
        assert ids_of(parked.replay([ids[1]])) == [ids[1]]
        replies = story.replies(1)
        assert list(replies) == ['m1']
        # The failure counters were reset, the original key kept, the
        # replay counted.
        headers = replies['m1'].headers
        assert headers['attempts'] == 0
        assert headers['replays'] == 1
        assert headers['seen_routing_key'] == story.key
        assert headers['redelivered'] is False
        # The others stay, in their order.
        assert ids_of(parked.list()) == [ids[0], ids[2], ids[3]]

        assert ids_of(parked.replay(dry_run=True)) == \
            [ids[0], ids[2], ids[3]]
        assert ids_of(parked.replay([ids[2]], dry_run=True)) == [ids[2]]
        assert ids_of(parked.list()) == [ids[0], ids[2], ids[3]]

        assert ids_of(parked.drop([ids[3]])) == [ids[3]]
        assert ids_of(parked.list()) == [ids[0], ids[2]]

        with pytest.raises(NotParked) as info:
            parked.replay([ids[0], 'not-parked'])
        assert info.value.ids == ['not-parked']
        assert ids_of(parked.list()) == [ids[0], ids[2]]

        assert ids_of(parked.replay()) == [ids[0], ids[2]]
        assert sorted(story.replies(2)) == ['m0', 'm2']
        assert parked.list() == []
    assert story.process.stop() == 0
    # Each was handled exactly once: no reply more, nothing left.
    assert amqp_client.count(story.out) == 0
    assert amqp_client.count(story.queue) == 0
    assert amqp_client.count(story.parked) == 0


def park_directly(client, prefix, count, arguments=None):
    """A handler queue and its parked queue holding `count` messages as
    the daemon parks them; (queue, their ids)."""
    queue = client.declare(f'{prefix}.in', arguments=arguments)
    client.declare(retry.parked_queue(queue), arguments=arguments)
    ids = []
    for number in range(count):
        header = gocept.amqprun.message.Message({}, b'').header
        header.headers = {
            retry.ATTEMPTS: 4, retry.ROUTING_KEY: 'first.key',
            retry.ERROR: f'ValueError: {number}', retry.QUEUE: queue,
            retry.PARKED_AT: retry.parked_at(), 'custom': 'kept'}
        client.channel.basic_publish(
            '', retry.parked_queue(queue), b'%d' % number,
            gocept.amqprun.properties.properties_from(header))
        ids.append(header.message_id)
    wait_for(lambda: client.count(retry.parked_queue(queue)) == count)
    return queue, ids


@pytest.fixture
def proxy(amqp_parameters):
    proxy = AMQPProxy.to(amqp_parameters)
    yield proxy
    proxy.stop()


COMMIT_DROPPED = 'commit-dropped'          # the broker rolls back
COMMIT_OK_DROPPED = 'commit-ok-dropped'    # the broker committed
CUTS = {COMMIT_DROPPED: (TX_COMMIT, TO_BROKER),
        COMMIT_OK_DROPPED: (TX_COMMIT_OK, TO_CLIENT)}


@pytest.mark.parametrize('arguments', QUEUE_TYPES)
@pytest.mark.parametrize('cut', sorted(CUTS))
def test_a_replay_cut_in_its_commit_loses_nothing_and_names_the_message(
        cut, arguments, proxy, amqp_client, amqp_parameters, name_prefix):
    queue, ids = park_directly(amqp_client, name_prefix, 3, arguments)
    parked_queue = retry.parked_queue(queue)
    method, direction = CUTS[cut]
    # Replaying all is one commit per message: cut at the second.
    rule = proxy.arm(method, direction=direction, nth=2)
    with Parked(proxy.parameters(), [queue]) as parked:
        with pytest.raises(Interrupted) as info:
            parked.replay()
    assert rule.fired.wait(10)
    error = info.value
    assert ids_of(error.done) == ids[:1]
    assert error.in_doubt.message_id == ids[1]
    assert f'replay of message {ids[1]} is in doubt' in str(error)
    moved = 2 if cut == COMMIT_OK_DROPPED else 1
    wait_for(lambda: amqp_client.count(queue) == moved
             and amqp_client.count(parked_queue) == 3 - moved,
             message='messages lost or doubled')
    # The rest is replayed; each message is in its queue exactly once.
    with Parked(amqp_parameters, [queue]) as parked:
        assert len(parked.replay()) == 3 - moved
    got = amqp_client.wait_many(queue, 3)
    assert sorted(m.header.message_id for m in got) == sorted(ids)
    assert amqp_client.count(queue) == 0
    assert amqp_client.count(parked_queue) == 0
    for message in got:
        assert not message.redelivered
        assert message.header.headers[retry.ROUTING_KEY] == 'first.key'
        assert message.header.headers['custom'] == 'kept'
        assert retry.ATTEMPTS not in message.header.headers
        assert retry.ERROR not in message.header.headers


@pytest.mark.parametrize('arguments', QUEUE_TYPES)
def test_a_listing_cut_loses_nothing(
        arguments, proxy, amqp_client, amqp_parameters, name_prefix):
    queue, ids = park_directly(amqp_client, name_prefix, 3, arguments)
    rule = proxy.arm(TX_COMMIT, direction=TO_BROKER, nth=2)
    with Parked(proxy.parameters(), [queue], batch=1) as parked:
        with pytest.raises(Interrupted) as info:
            parked.list()
    assert rule.fired.wait(10)
    assert info.value.in_doubt is None
    assert 'nothing is lost' in str(info.value)
    wait_for(lambda: amqp_client.count(retry.parked_queue(queue)) == 3)
    with Parked(amqp_parameters, [queue]) as parked:
        # The message in hand came back, flagged (and counted) once; the
        # order is rotated by the one message the listing had done.
        listed = parked.list()
        assert sorted(ids_of(listed)) == sorted(ids)
        flagged = [m.message_id for m in listed if m.redelivered]
        assert flagged == [ids[1]]
        if arguments:
            assert [m.delivery_count for m in listed
                    if m.message_id == ids[1]] == [1]
        listed = parked.list()
        assert not any(m.redelivered or m.delivery_count for m in listed)
        assert len(listed) == 3


def test_a_delivery_limit_never_drops_a_listed_message(
        amqp_client, amqp_parameters, name_prefix):
    # A requeue per listing would count a return: the second listing
    # would lose them all.
    queue, ids = park_directly(amqp_client, name_prefix, 3, dict(
        QUORUM, **{'x-delivery-limit': 1}))
    with Parked(amqp_parameters, [queue]) as parked:
        for _ in range(4):
            listed = parked.list()
            assert ids_of(listed) == ids
            assert [m.delivery_count for m in listed] == [0, 0, 0]


def test_messages_parked_during_a_listing_are_kept(
        proxy, amqp_client, amqp_parameters, name_prefix):
    queue, ids = park_directly(amqp_client, name_prefix, 300)
    listed = []
    with Parked(proxy.parameters(), [queue], batch=1) as parked:
        listing = threading.Thread(
            target=lambda: listed.extend(parked.list()))
        listing.start()
        try:
            # Parked (and confirmed) while the rotation is under way.
            wait_for(lambda: proxy.seen(TX_COMMIT) >= 10, interval=0.001)
            other = gocept.amqprun.testing.Client(amqp_parameters)
            other.channel.confirm_delivery()
            meanwhile = [other.send(retry.parked_queue(queue), b'new',
                                    exchange='') for _ in range(5)]
            rotated = proxy.seen(TX_COMMIT)
            other.connection.close()
        finally:
            listing.join(60)
    assert rotated < 300, 'the listing ended before the messages came'
    # The listing saw what was there when it began.
    assert ids_of(listed) == ids
    with Parked(amqp_parameters, [queue]) as parked:
        after = ids_of(parked.list())
    # Nothing lost or doubled, the listed ones in their order; the new
    # ones among them (where the rotation stood), in theirs.
    assert sorted(after) == sorted(ids + meanwhile)
    assert [i for i in after if i in ids] == ids
    assert [i for i in after if i in meanwhile] == meanwhile


def test_a_replay_of_ids_cut_while_checking_moves_nothing(
        proxy, amqp_client, name_prefix):
    queue, ids = park_directly(amqp_client, name_prefix, 3)
    # The pass that checks the ids commits once (batch 50).
    rule = proxy.arm(TX_COMMIT, direction=TO_BROKER, nth=1)
    with Parked(proxy.parameters(), [queue]) as parked:
        with pytest.raises(Interrupted) as info:
            parked.replay([ids[2]])
    assert rule.fired.wait(10)
    assert info.value.done == [] and info.value.in_doubt is None
    wait_for(lambda: amqp_client.count(retry.parked_queue(queue)) == 3)
    assert amqp_client.count(queue) == 0


def test_tools_exclude_each_other(amqp_client, amqp_parameters, name_prefix):
    queue, ids = park_directly(amqp_client, name_prefix, 2)
    holder = pika.BlockingConnection(amqp_parameters.pika_parameters())
    try:
        holder.channel().queue_declare(
            gocept.amqprun.parked.lock_queue(queue), exclusive=True)
        with Parked(amqp_parameters, [queue], lock_timeout=0.5) as parked:
            with pytest.raises(Busy, match='Another tool works on'):
                parked.replay()
            holder.close()
            assert ids_of(parked.list()) == ids
            # Its own lock was released after the listing.
            with Parked(amqp_parameters, [queue]) as other:
                assert ids_of(other.list()) == ids
    finally:
        if holder.is_open:
            holder.close()


def test_locks_are_released_after_each_operation(
        amqp_client, amqp_parameters, name_prefix):
    first, first_ids = park_directly(amqp_client, f'{name_prefix}.1', 2)
    second, _ = park_directly(amqp_client, f'{name_prefix}.2', 1)
    with Parked(amqp_parameters, [first, second]) as parked:
        # Locks both queues, moves from the first only.
        assert ids_of(parked.drop([first_ids[0]])) == first_ids[:1]
        with Parked(amqp_parameters, [first, second],
                    lock_timeout=0) as other:
            assert len(other.list()) == 2


def test_a_connection_lost_while_idle_is_made_again(
        proxy, amqp_client, name_prefix):
    queue, ids = park_directly(amqp_client, name_prefix, 2)
    with Parked(proxy.parameters(), [queue]) as parked:
        assert ids_of(parked.list()) == ids
        assert proxy.cut() == 1
        assert ids_of(parked.list()) == ids
    assert proxy.accepted == 2


def test_replay_to_a_missing_queue_changes_nothing(
        amqp_client, amqp_parameters, name_prefix):
    queue, ids = park_directly(amqp_client, name_prefix, 2)
    amqp_client.channel.queue_delete(queue)
    with Parked(amqp_parameters, [queue]) as parked:
        with pytest.raises(TargetMissing, match='does not exist'):
            parked.replay()
        assert ids_of(parked.list()) == ids


def test_an_unknown_queue_is_refused(amqp_parameters):
    with Parked(amqp_parameters, ['a', 'b']) as parked:
        with pytest.raises(UnknownQueue, match="'c' is not a handler queue"):
            parked.list('c')
        with pytest.raises(UnknownQueue):
            parked.replay(['x'], queue='c')


def test_the_replay_header_resets_counters_and_removes_the_records():
    header = gocept.amqprun.message.Header(
        message_id='<m>', content_type='text/plain', correlation_id='c',
        headers={retry.ATTEMPTS: 3, 'x-amqprun-unsettled': 1,
                 retry.ERROR: 'E: x', retry.TRACEBACK: 'T', retry.QUEUE: 'q',
                 retry.PARKED_AT: retry.parked_at(),
                 'x-amqprun-routing-key': 'first.key',
                 gocept.amqprun.parked.REPLAYS: 2,
                 retry.DELIVERY_COUNT: 0, 'custom': 'kept'})
    message = ParkedMessage('q', header, b'body')
    assert message.routing_key == 'first.key'
    assert message.replays == 2
    assert message.unsettled == 1
    assert message.error == 'E: x\n\nT'
    assert message.error_line == 'E: x'
    replayed = message.replay_header()
    assert replayed.headers == {retry.ROUTING_KEY: 'first.key',
                                gocept.amqprun.parked.REPLAYS: 3,
                                'custom': 'kept'}
    assert (replayed.message_id, replayed.content_type,
            replayed.correlation_id) == ('<m>', 'text/plain', 'c')
    data = message.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data['parked_at'] == message.parked_at.isoformat()


def test_a_body_preview_is_safe():
    preview = gocept.amqprun.parkedcli.preview
    assert preview(b'hello\nworld') == 'hello\nworld'
    long = preview(b'x' * 5000)
    assert long.startswith('x' * 2000 + '\n... (3000 more characters')
    binary = preview(b'\x00\x01\xffabc' * 100)
    assert binary.startswith('(binary, 600 bytes; the first 64 in hex')
    assert '00 01 ff 61' in binary
    assert '\x1b' not in preview(b'\x1b[2Jcleared')


# The command line, through its real entry point


def cli(process, *args, check=None):
    """Run ``python -m gocept.amqprun parked ARGS CONFIG`` of the daemon
    `process` (its handler module importable)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(process.directory)] + sys.path))
    config = process.config
    if args and str(args[-1]).endswith('.conf'):
        config, args = args[-1], args[:-1]
    result = subprocess.run(
        [sys.executable, '-m', 'gocept.amqprun', 'parked',
         *map(str, args), str(config)],
        cwd=process.directory, capture_output=True, timeout=120, env=env)
    result.out = result.stdout.decode('utf-8', 'replace')
    result.err = result.stderr.decode('utf-8', 'replace')
    if check is not None:
        assert result.returncode == check, result.out + result.err
    return result


def test_the_command_line(tmp_path, amqp_client, amqp_parameters,
                          name_prefix, server_process):
    story = Story(tmp_path, amqp_client, name_prefix, server_process)
    first, second = story.park('first body', 'second body')
    process = story.process

    result = cli(process, 'list', check=0)
    lines = result.out.splitlines()
    assert len(lines) == 2
    for line, id_, body in zip(lines, (first, second),
                               ('first body', 'second body')):
        assert line.startswith(f'{id_}  {story.queue}  20')
        assert line.endswith(f'  1 attempt(s)  {len(body)} bytes  '
                             f'ValueError: not fixed yet: {body}')
    assert '2 parked message(s).' in result.err

    result = cli(process, 'list', '--json', '--queue', story.queue, check=0)
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert [row['message_id'] for row in rows] == [first, second]
    assert {'message_id', 'queue', 'error', 'attempts', 'parked_at',
            'size'} <= set(rows[0])
    assert rows[0]['queue'] == story.queue
    assert rows[0]['size'] == len('first body')
    assert 'Traceback' in rows[0]['error']

    result = cli(process, 'show', '--id', first, check=0)
    assert f'Message-ID:  {first}' in result.out
    assert 'Traceback (most recent call last)' in result.out
    assert '  first body' in result.out
    result = cli(process, 'show', '--id', first, '--body', check=0)
    assert result.stdout == b'first body'

    result = cli(process, 'replay', '--id', 'not-parked', '--id', first,
                 check=1)
    assert 'not-parked' in result.out
    assert 'nothing was changed' in result.out
    result = cli(process, 'replay', '--all', '--dry-run', check=0)
    assert f'would replay {first} to {story.queue}' in result.out
    assert 'nothing was changed' in result.out
    with Parked(amqp_parameters, [story.queue]) as parked:
        assert ids_of(parked.list()) == [first, second]

    story.fix()
    result = cli(process, 'replay', '--id', first, check=0)
    assert f'replayed {first} to {story.queue}' in result.out
    assert list(story.replies(1)) == ['first body']
    result = cli(process, 'drop', '--id', second, check=0)
    assert f'dropped {second} from {story.parked}' in result.out
    assert amqp_client.count(story.parked) == 0
    assert cli(process, 'list', check=0).out == ''

    result = cli(process, 'list', '--queue', 'no.such.queue', check=2)
    assert "'no.such.queue' is not a handler queue" in result.out
    cli(process, 'replay', check=2)     # neither --all nor --id
    assert process.stop() == 0


def variant(process, name, old, new):
    """A copy of `process`'s configuration with `old` replaced."""
    text = process.config.read_text()
    assert old in text
    path = process.directory / name
    path.write_text(text.replace(old, new))
    return path


def test_the_command_line_reports_unusable_configurations(
        tmp_path, amqp_client, name_prefix, server_process):
    story = Story(tmp_path, amqp_client, name_prefix, server_process)
    process = story.process
    broken = variant(process, 'broken.conf', '  amount 1\n',
                     '  amount 1\n  retries many\n')
    result = cli(process, 'list', broken, check=2)
    assert f'{broken}, line ' in result.out
    assert 'section <worker>, key retries' in result.out
    port = gocept.amqprun.testing.free_port()
    unreachable = variant(process, 'unreachable.conf',
                          f'  port {amqp_client.parameters.port or 5672}\n',
                          f'  port {port}\n')
    result = cli(process, 'list', unreachable, check=1)
    assert result.out.startswith('ERROR: Cannot connect to amqp://')
    assert len(result.out.splitlines()) == 1
    assert 'Traceback' not in result.out + result.err
    rejecting = variant(process, 'reject.conf', '  retries 0\n',
                        '  retries 0\n  park reject\n')
    result = cli(process, 'list', rejecting, check=2)
    assert 'there is no parked queue to work on' in result.out
    routing = variant(process, 'routing.conf', '  retries 0\n',
                      '  retries 0\n  error-routing-key errors\n')
    result = cli(process, 'replay', '--all', routing, check=2)
    assert "routing key 'errors'" in result.out
    assert process.stop() == 0


def test_the_command_line_names_a_replay_in_doubt(
        tmp_path, amqp_client, amqp_parameters, name_prefix, server_process,
        proxy):
    story = Story(tmp_path, amqp_client, name_prefix, server_process)
    ids = story.park('a', 'b', 'c')
    story.fix()
    process = story.process
    through_proxy = variant(
        process, 'proxy.conf',
        f'  port {amqp_parameters.port or 5672}\n', f'  port {proxy.port}\n')
    # The broker commits the second move; the tool never hears of it.
    rule = proxy.arm(TX_COMMIT_OK, direction=TO_CLIENT, nth=2)
    result = cli(process, 'replay', '--all', through_proxy, check=1)
    assert rule.fired.wait(10)
    assert f'replayed {ids[0]} to {story.queue}' in result.out
    assert f'replay of message {ids[1]} is in doubt' in result.out
    assert 'Traceback' not in result.out + result.err
    # It was moved (the broker committed): handled once, like the first.
    assert sorted(story.replies(2)) == ['a', 'b']
    with Parked(amqp_parameters, [story.queue]) as parked:
        assert ids_of(parked.list()) == [ids[2]]
        parked.replay()
    assert list(story.replies(1)) == ['c']
    assert process.stop() == 0
    assert amqp_client.count(story.out) == 0
