import gocept.amqprun.message
import pytest
import time


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
