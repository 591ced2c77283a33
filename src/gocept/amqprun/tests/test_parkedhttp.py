"""Parked messages over HTTP: the real daemon, a real HTTP client."""

import json
import urllib.parse

import pytest

import gocept.amqprun.parkedhttp
import gocept.amqprun.testing
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.test_monitor import daemon  # noqa: F401 fixture
from gocept.amqprun.tests.test_monitor import get
from gocept.amqprun.tests.test_monitor import request


TOKEN = 'parked-token-0123456789'


@pytest.fixture
def parked(daemon, amqp_client, name_prefix):  # noqa: F811 fixture
    """A daemon (with the token) whose handler of `failing` fails until
    the file `fixed` exists, and 3 messages parked there; yields (the
    ServerProcess, the handler queue, the parked message ids)."""
    process = daemon(worker_extra='  retries 0\n', token=TOKEN)
    queue = f'{name_prefix}.failing'
    ids = [amqp_client.send(queue, b'%d' % i,
                            header={'message_id': f'id {i}/<&>?'})
           for i in range(3)]
    wait_for(lambda: amqp_client.count(f'{queue}.parked') == 3, timeout=20)
    yield process, queue, ids


def body(text):
    return json.loads(text)


def test_list_and_show(parked, amqp_client):
    process, queue, ids = parked
    status, text = get(process.url + 'parked')
    assert status == 200
    messages = body(text)
    # In the order they were parked (two workers: not always sent order).
    assert sorted(m['message_id'] for m in messages) == ids
    first = messages[0]
    assert first['queue'] == queue
    assert first['attempts'] == 1
    assert first['error_line'] == 'RuntimeError: not fixed yet'
    assert 'Traceback' in first['error']
    assert first['size'] == 1
    assert first['parked_at'].startswith('20')
    # One queue; every message again (reading changed nothing).
    status, text = get(process.url + 'parked?queue=' +
                       urllib.parse.quote(queue))
    assert [m['message_id'] for m in body(text)] == [
        m['message_id'] for m in messages]
    # One message, its id URL-quoted (it has a slash, spaces, <&>?).
    status, text = get(process.url + 'parked/' +
                       urllib.parse.quote(ids[1], safe=''))
    assert status == 200
    assert body(text)['message_id'] == ids[1]
    assert body(text)['error_line'] == 'RuntimeError: not fixed yet'
    # Unknown: 404 with a JSON error.
    status, text = get(process.url + 'parked/nonesuch')
    assert status == 404
    assert body(text)['ids'] == ['nonesuch']
    assert 'nothing was changed' in body(text)['error']
    status, text = get(process.url + 'parked?queue=nonesuch')
    assert status == 404
    assert amqp_client.count(f'{queue}.parked') == 3


def test_replay_and_drop_with_the_token(parked, amqp_client, name_prefix):
    process, queue, ids = parked
    replay, drop = process.url + 'parked/replay', process.url + 'parked/drop'
    # Without the token: nothing changes.
    status, _, _ = request(replay, 'POST', {'queue': queue, 'all': True})
    assert status == 401
    status, _, _ = request(drop, 'POST', {'queue': queue, 'all': True},
                           token='wrong')
    assert status == 401
    assert amqp_client.count(f'{queue}.parked') == 3
    # An unknown id among known ones: 404, nothing changed.
    status, text, _ = request(replay, 'POST', {
        'queue': queue, 'ids': [ids[0], 'nonesuch']}, token=TOKEN)
    assert status == 404
    assert body(text)['ids'] == ['nonesuch']
    assert amqp_client.count(f'{queue}.parked') == 3
    # The handler is fixed; one message replayed is handled.
    (process.directory / 'fixed').touch()
    status, text, _ = request(replay, 'POST', {
        'queue': queue, 'ids': [ids[0]]}, token=TOKEN)
    assert status == 200, text
    result = body(text)
    assert result['count'] == 1
    assert [m['message_id'] for m in result['replayed']] == [ids[0]]
    assert amqp_client.wait(f'{name_prefix}.out').body == b'fixed: 0'
    # Drop one.
    status, text, _ = request(drop, 'POST', {
        'queue': queue, 'ids': [ids[1]]}, token=TOKEN)
    assert status == 200
    assert [m['message_id'] for m in body(text)['dropped']] == [ids[1]]
    assert amqp_client.count(f'{queue}.parked') == 1
    # A dry run changes nothing; then all of the queue.
    status, text, _ = request(replay, 'POST', {
        'queue': queue, 'all': True, 'dry_run': True}, token=TOKEN)
    assert status == 200
    assert [m['message_id'] for m in body(text)['would_replay']] == [ids[2]]
    assert amqp_client.count(f'{queue}.parked') == 1
    status, text, _ = request(replay, 'POST', {
        'queue': queue, 'all': True}, token=TOKEN)
    assert body(text)['count'] == 1
    assert amqp_client.wait(f'{name_prefix}.out').body == b'fixed: 2'
    assert amqp_client.count(f'{queue}.parked') == 0
    assert get(process.url + 'parked')[1].strip() == '[]'
    log = process.log_text()
    assert (f"Monitor: replayed 1 parked message(s) of queue {queue!r} for "
            f"127.0.0.1: {ids[0]}") in log
    assert f"Monitor: dropped 1 parked message(s) of queue {queue!r}" in log
    assert TOKEN not in log
    assert process.stop() == 0


def test_broker_gone_is_503_and_page_still_answers(
        daemon, amqp_parameters):  # noqa: F811 fixture
    proxy = gocept.amqprun.testing.Proxy.to(amqp_parameters)
    process = daemon(parameters=proxy.parameters(socket_timeout=2),
                     token=TOKEN,
                     server_extra='  retry_delay 0.1\n  max_retry_delay 0.5\n')
    try:
        proxy.stop()
        status, text = get(process.url + 'parked')
        assert status == 503
        assert body(text)['error'].startswith(
            'the broker cannot be asked now: ')
        status, text = get(process.url)
        assert status == 200
        assert 'not connected' in text
        assert get(process.url + 'metrics')[0] == 200
    finally:
        proxy.stop()
    assert process.stop() == 0


def test_no_parked_queues_when_parking_elsewhere(
        daemon):  # noqa: F811 fixture
    process = daemon(worker_extra='  park reject\n', token=TOKEN)
    status, text = get(process.url + 'parked')
    assert status == 404
    assert body(text)['error'].startswith(
        'this daemon parks no messages in queues: failed messages are '
        'rejected')
    assert 'This daemon parks no messages in queues' in get(process.url)[1]
    assert process.stop() == 0


def test_selection_of_a_request_body():
    selection = gocept.amqprun.parkedhttp.selection
    assert selection(b'{"queue": "q", "ids": ["a", "b"]}') == (
        'q', ['a', 'b'], False)
    assert selection(b'{"queue": "q", "all": true, "dry_run": true}') == (
        'q', None, True)
    with pytest.raises(gocept.amqprun.parkedhttp.BadRequest):
        selection(b'\xff')
    with pytest.raises(gocept.amqprun.parkedhttp.BadRequest):
        selection(b'')
