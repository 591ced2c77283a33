"""The helpers gocept.amqprun.testing offers application developers."""

import subprocess
import sys

import pytest
import transaction
import transaction.interfaces
import zope.interface

import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.testing


call_handler = gocept.amqprun.testing.call_handler
Message = gocept.amqprun.message.Message


@gocept.amqprun.handler.declare('app.orders', ['app.order.new', 'app.x'])
def shout(message):
    return [Message({'content_type': 'text/plain'}, message.body.upper(),
                    routing_key='app.order.ack'),
            Message({'correlation_id': 'own', 'references': 'mine'}, b'',
                    routing_key='app.audit')]


def test_call_handler_returns_replies_as_they_would_be_sent():
    ack, audit = call_handler(shout, b'hello', {'message_id': '<in@x>'})
    assert ack.body == b'HELLO'
    assert ack.routing_key == 'app.order.ack'
    assert ack.header.content_type == 'text/plain'
    assert ack.header.correlation_id == '<in@x>'
    assert ack.header.headers['references'] == '<in@x>'
    assert ack.header.message_id.startswith('<')
    assert ack.header.delivery_mode == 2
    # What the handler set itself is kept.
    assert audit.header.correlation_id == 'own'
    assert audit.header.headers['references'] == 'mine'


def test_call_handler_incoming_message():
    seen = []

    @gocept.amqprun.handler.declare('q', ['first.key', 'second.key'])
    def handler(message):
        seen.append(message)
    header = {'message_id': '<b@x>', 'references': '<a@x>', 'app': 'v'}
    assert call_handler(handler, 'text', header) == []
    [message] = seen
    assert message.body == b'text'
    assert message.routing_key == 'first.key'
    assert message.header.headers == {'references': '<a@x>', 'app': 'v'}
    assert message.delivery_tag is not None
    assert header == {'message_id': '<b@x>', 'references': '<a@x>',
                      'app': 'v'}  # not changed

    call_handler(handler, routing_key='second.key')
    assert seen[1].routing_key == 'second.key'
    assert seen[1].header.message_id  # one was made up


def test_call_handler_extends_references():
    [ack, _] = call_handler(
        shout, b'', {'message_id': '<b@x>', 'references': '<a@x>'})
    assert ack.header.headers['references'] == '<a@x>\n<b@x>'


def test_call_handler_by_utility_name(zca):
    zca.registerUtility(
        shout, gocept.amqprun.interfaces.IHandler, name='app.shout')
    [ack, _] = call_handler('app.shout', b'x')
    assert ack.body == b'X'


@zope.interface.implementer(transaction.interfaces.IDataManager)
class Recorder:
    """A data manager that records what happened to it."""

    def __init__(self):
        self.calls = []
        self.transaction_manager = transaction.manager

    def abort(self, txn):
        self.calls.append('abort')

    def tpc_begin(self, txn):
        self.calls.append('tpc_begin')

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        pass

    def tpc_finish(self, txn):
        self.calls.append('tpc_finish')

    def tpc_abort(self, txn):
        self.calls.append('tpc_abort')

    def sortKey(self):
        return 'recorder'


def joining(recorder, fail=False):
    @gocept.amqprun.handler.declare('q', 'k')
    def handler(message):
        transaction.get().join(recorder)
        if fail:
            raise ValueError('failed')
        return [Message({}, b'', routing_key='out')]
    return handler


def test_call_handler_aborts_the_transaction_by_default():
    recorder = Recorder()
    assert len(call_handler(joining(recorder))) == 1
    assert recorder.calls == ['abort']


def test_call_handler_commits_on_request():
    recorder = Recorder()
    call_handler(joining(recorder), commit=True)
    assert recorder.calls == ['tpc_begin', 'tpc_finish']


def test_call_handler_propagates_errors_and_aborts():
    recorder = Recorder()
    with pytest.raises(ValueError, match='failed'):
        call_handler(joining(recorder, fail=True))
    assert recorder.calls == ['abort']


def test_call_handler_runs_as_the_principal():
    import zope.security.management
    principals = []

    @gocept.amqprun.handler.declare('q', 'k', principal='alice')
    def handler(message):
        interaction = zope.security.management.getInteraction()
        principals.extend(p.principal.id for p in interaction.participations)
    call_handler(handler)
    assert principals == ['alice']
    assert zope.security.management.queryInteraction() is None


def test_server_process_with_client(server_process, amqp_client, name_prefix):
    # The example of a test against the real broker (docs/howto/
    # testing.rst, and the tests `server init` makes).
    process = server_process(
        handlers=f"""
            import gocept.amqprun.handler
            import gocept.amqprun.message

            @gocept.amqprun.handler.declare(
                '{name_prefix}.requests', '{name_prefix}.request')
            def shout(message):
                return [gocept.amqprun.message.Message(
                    {{}}, message.body.upper(),
                    routing_key='{name_prefix}.reply')]
        """,
        zcml='<utility component="handlers.shout" name="shout" />')
    for suffix in ('', '.retry', '.parked', '.quarantine'):
        amqp_client.forget(f'{name_prefix}.requests{suffix}')
    replies = amqp_client.declare(
        f'{name_prefix}.replies', [f'{name_prefix}.reply'])
    message_id = amqp_client.send(f'{name_prefix}.request', b'hello')
    reply = amqp_client.wait(replies, timeout=10)
    assert reply.body == b'HELLO'
    assert reply.header.correlation_id == message_id
    assert process.stop() == 0


WITHOUT_PYTEST = '''
import sys
sys.modules['pytest'] = None          # as if pytest were not installed
from gocept.amqprun.testing import Client, environment_parameters
import gocept.amqprun.testing
assert 'amqp_client' not in gocept.amqprun.testing.__all__
client = Client(environment_parameters())
queue = client.declare(sys.argv[1], [sys.argv[1]])
client.send(sys.argv[1], b'hello')
print(client.wait(queue).body)
client.close()
'''


def test_helpers_work_without_pytest(amqp_parameters, name_prefix):
    # The example's snippet (docs/development.rst), where only
    # `gocept.amqprun` is installed: the helpers import, only the
    # fixtures need pytest.
    result = subprocess.run(
        [sys.executable, '-c', WITHOUT_PYTEST, name_prefix],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "b'hello'\n"


def test_unavailable_service_outside_pytest_is_an_error():
    result = subprocess.run(
        [sys.executable, '-c', 'import sys; sys.modules["pytest"] = None\n'
         'import gocept.amqprun.testing.broker as b\n'
         'try:\n    b.unavailable("no broker here")\n'
         'except b.Unavailable as e:\n    print("raised", e)\n'],
        capture_output=True, text=True, timeout=60)
    assert result.stdout == 'raised no broker here\n', result.stderr
