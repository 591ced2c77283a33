"""The public API: every documented name, where it is documented, with the
call shape it is documented with.

Two sources promise an API: the documentation of this release (docs/,
README.txt) and the README of gocept.amqprun 0.12.1 (applications written
against it must keep working, see docs/installation.rst, "Compatibility").
`DOCUMENTED` lists the names in our own words; a name that disappears,
moves or changes a documented parameter fails here, so that no split or
rename breaks users silently. New optional parameters may be added after
the documented ones.

The 0.12.1 README's own examples run verbatim where it is available
(``../shared/gocept.amqprun-0.12.1-README.txt`` beside the checkout, or
the file named by ``AMQPRUN_012_README``): its code is read at test time,
never copied.
"""

import importlib
import inspect
import os
import pathlib
import sys
import textwrap
import threading
import types

import pytest
import transaction
import zope.component
import zope.configuration.xmlconfig

import gocept.amqprun.handler
import gocept.amqprun.message
import gocept.amqprun.server
import gocept.amqprun.testing


EMPTY = inspect.Parameter.empty

# (dotted name, documented parameters) -- parameters as
# ('name', default) pairs, or 'name' without a default, in their
# documented order; None for a name that is not called (a class used as
# an interface, a constant, a module).
DOCUMENTED = [
    # Writing handlers (0.12.1 and docs/howto/handlers.rst).
    ('gocept.amqprun.handler.declare',
     ['queue_name', 'routing_key', ('arguments', None),
      ('principal', None)]),
    ('gocept.amqprun.handler.Handler',
     ['queue_name', 'routing_key', 'handler_function', ('arguments', None),
      ('principal', None)]),
    ('gocept.amqprun.message.Message',
     ['header', 'body', ('delivery_tag', None), ('routing_key', None)]),
    ('gocept.amqprun.message.Header', None),
    # Sending messages (0.12.1: connection.Parameters + Server.start in a
    # thread + send; docs/howto/sending.rst: parameters.Parameters).
    ('gocept.amqprun.connection.Parameters', None),
    ('gocept.amqprun.parameters.Parameters', None),
    ('gocept.amqprun.server.Server',
     ['parameters', ('setup_handlers', True), ('workers', 1),
      ('prefetch', None), ('shutdown_timeout', 30.0), ('on_ready', None),
      ('retry_policy', None), ('confirm', False)]),
    ('gocept.amqprun.server.Server.start', ['self']),
    ('gocept.amqprun.server.Server.stop', ['self']),
    ('gocept.amqprun.server.Server.send', ['self', 'message']),
    ('gocept.amqprun.server.Server.fail', ['self', 'error']),
    ('gocept.amqprun.server.Server.wait_until_running',
     ['self', ('timeout', None)]),
    ('gocept.amqprun.retry.RetryPolicy',
     [('retries', 3), ('delay', 5.0), ('park', 'queue'),
      ('error_routing_key', None), ('backoff', 1.0), ('max_delay', 300.0)]),
    # Settings and events.
    ('gocept.amqprun.interfaces.ISettings', None),
    ('gocept.amqprun.interfaces.ISender', None),
    ('gocept.amqprun.interfaces.IHandler', None),
    ('gocept.amqprun.interfaces.IMessage', None),
    ('gocept.amqprun.interfaces.ISession', None),
    ('gocept.amqprun.interfaces.ILoop', None),
    ('gocept.amqprun.interfaces.IOutbox', None),
    ('gocept.amqprun.interfaces.IProcessStarted', None),
    ('gocept.amqprun.interfaces.IProcessStopping', None),
    ('gocept.amqprun.interfaces.ProcessStarted', []),
    ('gocept.amqprun.interfaces.ProcessStopping', []),
    ('gocept.amqprun.interfaces.IMessageStored', None),
    ('gocept.amqprun.interfaces.MessageStored', ['message', 'path']),
    ('gocept.amqprun.interfaces.EXIT_OK', None),
    ('gocept.amqprun.interfaces.EXIT_FAILURE', None),
    ('gocept.amqprun.interfaces.EXIT_CONFIG', None),
    ('gocept.amqprun.settings.Settings', None),
    # Errors an application may catch.
    ('gocept.amqprun.errors.ConnectionUnavailable', None),
    ('gocept.amqprun.errors.ConnectionFailed', None),
    ('gocept.amqprun.errors.ChannelLost', None),
    ('gocept.amqprun.errors.CommitInDoubt', None),
    # The entry point (zc.recipe.egg's `arguments` passes the
    # configuration file as the first argument).
    ('gocept.amqprun.main.main', [('config_file', None), ('argv', None)]),
    ('gocept.amqprun.log.JSONFormatter', None),
    ('gocept.amqprun.outbox', None),
    # Testing your handlers.
    ('gocept.amqprun.testing.call_handler',
     ['handler', ('body', b''), ('header', None), ('routing_key', None)]),
    ('gocept.amqprun.testing.Client', ['parameters']),
    ('gocept.amqprun.testing.environment_parameters', []),
    ('gocept.amqprun.testing.ServerProcess', ['directory', 'parameters']),
    ('gocept.amqprun.testing.ServerThread', ['server']),
    ('gocept.amqprun.testing.wait_for', ['condition']),
    ('gocept.amqprun.testing.FakeSession', [('commit', None)]),
    ('gocept.amqprun.testing.Proxy', None),
    ('gocept.amqprun.testing.AMQPProxy', None),
    ('gocept.amqprun.testing.PrivateBroker', None),
    ('gocept.amqprun.testing.PrivateCluster', None),
    ('gocept.amqprun.testing.PrivateDatabase', None),
]

# The attributes a documented object must have.
ATTRIBUTES = {
    'gocept.amqprun.server.Server': ('running', 'connected', 'alive'),
    'gocept.amqprun.message.Message': ('exchange',),
    'gocept.amqprun.testing.Client': (
        'declare', 'send', 'get', 'wait', 'wait_many', 'count', 'exists',
        'forget', 'close'),
}

# The ZCML directives (namespace http://namespaces.gocept.com/amqp) and
# their documented attributes, each (name, required).
DIRECTIVES = {
    'writefiles': [('queue_name', True), ('routing_key', True),
                   ('directory', True), ('pattern', False),
                   ('arguments', False)],
    'readfiles': [('directory', True), ('routing_key', True),
                  ('content_type', False), ('poll_interval', False)],
    'outbox': [('session', True), ('queues', False), ('retention', False),
               ('create_tables', False)],
}

# The ZConfig sections and their documented keys.
SECTIONS = {
    'amqp-server': [
        'hostname', 'port', 'username', 'password', 'virtual_host',
        'heartbeat_interval', 'url', 'ssl', 'ssl_cafile', 'ssl_certfile',
        'ssl_keyfile', 'ssl_verify', 'connection_attempts', 'retry_delay',
        'max_retry_delay', 'blocked_connection_timeout', 'socket_timeout',
        'send_timeout', 'prefetch'],
    'worker': [
        'amount', 'component-configuration', 'prefetch', 'shutdown-timeout',
        'commit-mode', 'retries', 'retry-delay', 'retry-backoff',
        'retry-max-delay', 'park', 'error-routing-key', 'progress-interval'],
    'monitor': ['address'],
    'settings': [],
    'eventlog': [],
    'logger': [],
}


def resolve(dotted):
    """The object of a dotted name (module, attribute of a module, or
    attribute of a class)."""
    parts = dotted.split('.')
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module('.'.join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize('dotted, documented', DOCUMENTED,
                         ids=[d for d, _ in DOCUMENTED])
def test_documented_name_keeps_its_call_shape(dotted, documented):
    obj = resolve(dotted)
    if documented is None:
        return
    actual = list(inspect.signature(obj).parameters.values())
    assert len(actual) >= len(documented), (dotted, actual)
    for doc, param in zip(documented, actual):
        name, default = (doc, EMPTY) if isinstance(doc, str) else doc
        assert param.name == name, (dotted, param, doc)
        assert param.kind in (param.POSITIONAL_OR_KEYWORD,
                              param.POSITIONAL_ONLY), (dotted, param)
        assert param.default == default, (dotted, param, doc)
    for extra in actual[len(documented):]:
        # Added later: optional, so that documented calls still work.
        assert extra.default is not EMPTY or extra.kind in (
            extra.VAR_POSITIONAL, extra.VAR_KEYWORD), (dotted, extra)


@pytest.mark.parametrize('dotted', sorted(ATTRIBUTES))
def test_documented_object_has_its_attributes(dotted):
    obj = resolve(dotted)
    for name in ATTRIBUTES[dotted]:
        assert hasattr(obj, name), (dotted, name)


def test_parameters_keep_their_old_home_and_keywords():
    import gocept.amqprun.connection
    import gocept.amqprun.parameters
    assert gocept.amqprun.connection.Parameters is \
        gocept.amqprun.parameters.Parameters
    params = gocept.amqprun.connection.Parameters(
        hostname='broker.example.com', port='5673', username='u',
        password='p', virtual_host='/v', heartbeat_interval='30')
    [pika_params] = params.pika_parameters()
    assert (pika_params.host, pika_params.port, pika_params.virtual_host,
            pika_params.heartbeat) == ('broker.example.com', 5673, '/v', 30)


def test_message_takes_keywords_and_a_str_body():
    message = gocept.amqprun.message.Message(
        header=dict(content_type='text/plain'), body='Danke.',
        routing_key='some.key')
    assert message.body == b'Danke.'
    assert message.routing_key == 'some.key'
    assert message.header.content_type == 'text/plain'
    assert message.header.message_id.startswith('<')


def test_zcml_directives_keep_their_attributes():
    import gocept.amqprun.zcml
    schemas = {
        'writefiles': gocept.amqprun.zcml.IWriteFilesDirective,
        'readfiles': gocept.amqprun.zcml.IReadFilesDirective,
        'outbox': gocept.amqprun.zcml.IOutboxDirective,
    }
    assert set(schemas) == set(DIRECTIVES)
    for directive, attributes in DIRECTIVES.items():
        fields = dict(schemas[directive].namesAndDescriptions())
        for name, required in attributes:
            assert name in fields, (directive, name)
            assert fields[name].required == required, (directive, name)


def test_configuration_keeps_its_sections_and_keys():
    import gocept.amqprun.config
    schema = gocept.amqprun.config.load_schema()
    for section, keys in SECTIONS.items():
        sectiontype = schema.gettype(section)
        known = {key for key, _ in sectiontype}
        for key in keys:
            assert key in known, (section, key)


# The 0.12.1 README's examples, read from the file at test time.

def old_readme():
    """The text of the 0.12.1 README, or skip."""
    candidates = [os.environ.get('AMQPRUN_012_README')]
    here = pathlib.Path(__file__).resolve()
    for parent in here.parents:
        candidates.append(
            parent.parent / 'shared' / 'gocept.amqprun-0.12.1-README.txt')
    for candidate in candidates:
        if candidate and pathlib.Path(candidate).is_file():
            return pathlib.Path(candidate).read_text(encoding='utf-8')
    pytest.skip('the 0.12.1 README is not beside the checkout '
                '(../shared/gocept.amqprun-0.12.1-README.txt)')


def literal_blocks(text, section):
    """The literal blocks (after a paragraph ending in ``::``) of the
    section titled `section`, dedented, in order."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.strip() == section
                 and i + 1 < len(lines) and set(lines[i + 1]) <= set('=-'))
    end = next((i - 1 for i in range(start + 2, len(lines))
                if lines[i] and set(lines[i]) <= set('=')
                and len(lines[i]) > 2), len(lines))
    blocks, block, inside = [], [], False
    for line in lines[start + 2:end]:
        if inside:
            if line.strip() and not line.startswith(' '):
                blocks.append(textwrap.dedent('\n'.join(block)).strip())
                block, inside = [], False
            else:
                block.append(line)
                continue
        if line.rstrip().endswith('::'):
            inside = True
    if block:
        blocks.append(textwrap.dedent('\n'.join(block)).strip())
    return blocks


def test_old_readme_send_example_runs_verbatim(
        amqp_parameters, amqp_client, name_prefix):
    [code] = literal_blocks(old_readme(), 'Sending messages')
    namespace = {'__name__': 'readme_0_12_1'}
    # What the example takes for granted: its imports.
    exec('import threading\n'
         'import gocept.amqprun.connection\n'
         'import gocept.amqprun.server', namespace)
    exec(code, namespace)
    p = amqp_parameters
    server = namespace['start_server'](
        hostname=p.hostname, port=p.port, username=p.username,
        password=p.password, virtual_host=p.virtual_host)
    try:
        replies = amqp_client.declare(f'{name_prefix}.out',
                                      [f'{name_prefix}.greeting'])
        server.send(gocept.amqprun.message.Message(
            header=dict(content_type='text/plain'), body='hello',
            routing_key=f'{name_prefix}.greeting'))
        transaction.commit()
        received = amqp_client.wait(replies, timeout=10)
        assert received.body == b'hello'
        assert received.header.content_type == 'text/plain'
    finally:
        server.stop()


def test_old_readme_handler_example_answers(
        amqp_parameters, amqp_client, name_prefix, zca):
    blocks = literal_blocks(old_readme(), 'Getting started: receiving '
                            'messages')
    code = next(b for b in blocks if '@gocept.amqprun.handler.declare' in b)
    module = types.ModuleType(f'readme_handlers_{name_prefix[5:]}')
    exec(code, module.__dict__)
    [handler] = [v for v in module.__dict__.values()
                 if isinstance(v, gocept.amqprun.handler.Handler)]
    # The example's queue and routing key, renamed to the test's own.
    assert (handler.queue_name, handler.routing_key) == (
        'test.queue', 'test.routing')
    module.handler = gocept.amqprun.handler.Handler(
        f'{name_prefix}.queue', f'{name_prefix}.routing',
        handler.handler_function)
    sys.modules[module.__name__] = module
    try:
        zope.configuration.xmlconfig.string(f"""
            <configure xmlns="http://namespaces.zope.org/zope">
              <include package="gocept.amqprun" />
              <utility component="{module.__name__}.handler"
                       name="basic" />
            </configure>""")
    finally:
        del sys.modules[module.__name__]
    # The reply's routing key is the example's own.
    replies = amqp_client.declare(f'{name_prefix}.thanks',
                                  ['test.thank.messages'])
    for suffix in ('', '.retry', '.parked', '.quarantine'):
        amqp_client.forget(f'{name_prefix}.queue{suffix}')
    server = gocept.amqprun.server.Server(amqp_parameters)
    thread = gocept.amqprun.testing.ServerThread(server)
    thread.start()
    try:
        message_id = amqp_client.send(f'{name_prefix}.routing', b'hi')
        reply = amqp_client.wait(replies, timeout=10)
    finally:
        thread.stop()
    assert reply.body == 'Thank you for your message.'.encode()
    assert reply.header.content_type == 'text/plain'
    assert reply.header.correlation_id == message_id
    assert reply.header.headers['references'] == message_id


def test_old_readme_settings_example(tmp_path, zca):
    [code] = literal_blocks(old_readme(), 'Settings')
    import gocept.amqprun.config
    zcml = tmp_path / 'app.zcml'
    zcml.write_text('<configure xmlns="http://namespaces.zope.org/zope">'
                    '<include package="gocept.amqprun" /></configure>')
    conf = tmp_path / 'server.conf'
    conf.write_text(textwrap.dedent(f"""\
        <eventlog>
          <logfile>
            formatter zope.exceptions.log.Formatter
            path STDOUT
          </logfile>
        </eventlog>
        <amqp-server>
          hostname localhost
          username guest
          password guest
          virtual_host /
        </amqp-server>
        <worker>
          amount 10
          component-configuration {zcml}
        </worker>
        <settings>
          your.settings.key here
        </settings>
        """))
    config = gocept.amqprun.config.load_config(conf)
    gocept.amqprun.config.load_components(config)
    namespace = {}
    exec('import zope.component\nimport gocept.amqprun.interfaces',
         namespace)
    exec(code, namespace)
    assert namespace['settings'].get('your.settings.key') == 'here'


def test_old_readme_file_directives_configure(tmp_path, zca):
    text = old_readme()
    blocks = literal_blocks(text, 'Interfacing with the file system')
    directives = [b for b in blocks if '<amqp:' in b]
    assert len(directives) == 5, directives
    output, inbox = tmp_path / 'out', tmp_path / 'in'
    wrapper = ('<configure xmlns="http://namespaces.zope.org/zope" '
               'xmlns:amqp="http://namespaces.gocept.com/amqp">'
               '<include package="gocept.amqprun" file="meta.zcml" />'
               '{}</configure>')
    import gocept.amqprun.interfaces
    for block in directives:
        block = block.replace('/path/to/output-directory', str(output))
        block = block.replace('/path/to/input-directory', str(inbox))
        if block.startswith('<configure'):
            zope.configuration.xmlconfig.string(block)
        else:
            zope.configuration.xmlconfig.string(wrapper.format(block))
        handlers = dict(zope.component.getUtilitiesFor(
            gocept.amqprun.interfaces.IHandler))
        if 'writefiles' in block:
            writer = handlers['gocept.amqprun.writefiles.test.queue']
            assert writer.queue_name == 'test.queue'
            assert set(gocept.amqprun.handler.routing_keys(writer)) <= {
                'test.data', 'test.foo', 'test.bar'}
        zca.unregisterUtility(
            provided=gocept.amqprun.interfaces.IHandler,
            name='gocept.amqprun.writefiles.test.queue')
    # The pattern of the example names files as documented.
    zope.configuration.xmlconfig.string(wrapper.format(next(
        b for b in directives if 'pattern' in b).replace(
            '/path/to/output-directory', str(output))))
    writer = zope.component.getUtility(
        gocept.amqprun.interfaces.IHandler,
        name='gocept.amqprun.writefiles.test.queue')
    gocept.amqprun.testing.call_handler(
        writer, b'data', {'message_id': 'asdf998'}, routing_key='test.data',
        commit=True)
    [body] = [p for p in output.rglob('*.xml') if '.header' not in p.name]
    relative = body.relative_to(output).parts
    assert relative[0] == 'test.data'
    assert relative[2].startswith('asdf998-')
    assert body.read_bytes() == b'data'


def test_server_runs_in_a_thread_of_the_application(amqp_parameters):
    # The 0.12.1 way: start() in a daemon thread, stop() from another.
    server = gocept.amqprun.server.Server(amqp_parameters)
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    assert server.wait_until_running(10)
    assert server.handlers == {}
    assert server.stats.snapshot()['in_flight'] == 0
    server.stop()
    thread.join(10)
    assert not thread.is_alive()
