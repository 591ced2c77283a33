import gocept.amqprun.handler
import gocept.amqprun.interfaces
import pytest
import zope.interface.verify


def test_declare_returns_handler_with_attributes():
    @gocept.amqprun.handler.declare(
        'queue', ['a.b', 'c.d'], arguments={'x-max-length': 5},
        principal='zope.user')
    def handle(message):
        return ['reply to ' + message]
    assert zope.interface.verify.verifyObject(
        gocept.amqprun.interfaces.IHandler, handle)
    assert handle.queue_name == 'queue'
    assert handle.routing_key == ['a.b', 'c.d']
    assert handle.routing_keys == ['a.b', 'c.d']
    assert handle.arguments == {'x-max-length': 5}
    assert handle.principal == 'zope.user'
    assert handle('m') == ['reply to m']


def test_single_routing_key_is_a_list_of_one():
    handler = gocept.amqprun.handler.declare('q', 'a.b')(lambda m: None)
    assert handler.routing_key == 'a.b'
    assert handler.routing_keys == ['a.b']
    assert handler.arguments is None
    assert handler.principal is None


def test_non_callable_is_a_type_error():
    with pytest.raises(TypeError, match='not callable'):
        gocept.amqprun.handler.declare('q', 'a.b')('no function')
