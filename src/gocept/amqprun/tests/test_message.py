import concurrent.futures
import json
import subprocess
import sys
import time

import pytest

import gocept.amqprun.message


Message = gocept.amqprun.message.Message


def test_new_message_gets_defaults():
    before = int(time.time())
    message = Message({}, b'body', routing_key='a.b')
    assert message.header.delivery_mode == 2
    assert before <= message.header.timestamp <= int(time.time())
    assert message.header.message_id.startswith('<')
    assert message.header.message_id.endswith('>')
    assert '@' in message.header.message_id
    assert message.exchange == 'amq.topic'
    assert message.routing_key == 'a.b'
    assert message.delivery_tag is None


def test_message_ids_are_unique():
    ids = {Message({}, b'').header.message_id for _ in range(1000)}
    assert len(ids) == 1000


def make_ids(count):
    return [gocept.amqprun.message.make_message_id() for _ in range(count)]


def origin(message_id):
    """The process and random part of `message_id`."""
    return tuple(message_id.split('.')[1:3])


def in_processes(code, count=4):
    """What `count` Python processes, run at the same time, print as JSON
    after running `code`."""
    processes = [subprocess.Popen([sys.executable, '-c', code],
                                  stdout=subprocess.PIPE, text=True)
                 for _ in range(count)]
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        results.append(json.loads(out))
    return results


IDS = """
import json
import gocept.amqprun.message as m
print(json.dumps([m.make_message_id() for _ in range(500)]))
"""


def test_message_ids_are_unique_across_threads_and_processes():
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        in_threads = sum(pool.map(make_ids, [500] * 4), [])
    batches = in_processes(IDS)
    ids = in_threads + sum(batches, [])
    assert len(set(ids)) == len(ids) == 4000
    # Four processes: four different origins (pid and random part).
    assert len({origin(i) for batch in batches for i in batch}) == 4


FORKING = """
import json, os, sys
import gocept.amqprun.message as m
parent = [m.make_message_id() for _ in range(100)]
read, write = os.pipe()
if os.fork() == 0:
    os.write(write, json.dumps(
        [m.make_message_id() for _ in range(100)]).encode())
    os._exit(0)
os.close(write)
child = json.loads(os.read(read, 1 << 20))
os.wait()
parent += [m.make_message_id() for _ in range(100)]
print(json.dumps([parent, child]))
"""


def test_message_ids_are_unique_in_a_forked_child():
    # In a fresh interpreter: forking the multi-threaded test process is
    # unsafe. The child inherits the counter and the origin; it must not
    # repeat the parent's ids.
    result = subprocess.run([sys.executable, '-c', FORKING],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    parent, child = json.loads(result.stdout)
    assert len(set(parent + child)) == 300
    assert {origin(i) for i in child}.isdisjoint(
        {origin(i) for i in parent})


def test_known_property_names_become_properties_others_headers():
    message = Message({'content_type': 'text/plain', 'priority': 3,
                       'X-Filename': 'a.txt', 'headers': {'a': 1}}, b'')
    assert message.header.content_type == 'text/plain'
    assert message.header.priority == 3
    assert message.header.headers == {'a': 1, 'X-Filename': 'a.txt'}


def test_explicit_properties_win_over_defaults():
    message = Message({'delivery_mode': 1, 'message_id': 'mine',
                       'timestamp': 5}, b'')
    assert message.header.delivery_mode == 1
    assert message.header.message_id == 'mine'
    assert message.header.timestamp == 5


def test_text_body_is_encoded_utf8_by_default():
    message = Message({}, 'äöü')
    assert message.body == 'äöü'.encode('utf-8')
    assert message.header.content_encoding == 'utf-8'


def test_text_body_uses_given_content_encoding():
    message = Message({'content_encoding': 'latin-1'}, 'äöü')
    assert message.body == 'äöü'.encode('latin-1')
    assert message.header.content_encoding == 'latin-1'


def test_bytes_body_stays_and_sets_no_encoding():
    message = Message({}, b'\xff')
    assert message.body == b'\xff'
    assert message.header.content_encoding is None


def test_header_instance_is_used_as_is():
    header = gocept.amqprun.message.Header(content_type='a/b')
    message = Message(header, b'')
    assert message.header is header


def test_received_message_gets_no_defaults():
    header = gocept.amqprun.message.Header()
    message = Message(header, b'', delivery_tag=7, routing_key='x')
    assert message.header.message_id is None
    assert message.header.delivery_mode is None
    assert message.delivery_tag == 7


def test_header_refuses_unknown_property():
    with pytest.raises(TypeError, match='colour'):
        gocept.amqprun.message.Header(colour='red')


def test_header_equality_and_dict():
    a = gocept.amqprun.message.Header(type='t', headers={'x': '1'})
    b = gocept.amqprun.message.Header(type='t', headers={'x': '1'})
    assert a == b
    assert a.as_dict() == {'type': 't', 'headers': {'x': '1'}}
