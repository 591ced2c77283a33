import concurrent.futures
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import transaction
import zope.configuration.config
import zope.configuration.xmlconfig
import zope.component

import gocept.amqprun.errors
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.testing
import gocept.amqprun.writefiles as writefiles
import gocept.amqprun.zcml
from gocept.amqprun.testing import wait_for


def files(directory, temporary=True):
    """The relative paths of all files below `directory`, sorted; without
    the hidden temporary files of commits in progress unless
    `temporary`."""
    directory = pathlib.Path(directory)
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory))
                  for p in directory.rglob('*') if p.is_file() and (
                      temporary or not p.name.endswith('.tmp')))


def stored(directory):
    """The files in place below `directory` (no temporary files)."""
    return files(directory, temporary=False)


def message(body=b'body', routing_key='a.b', **header):
    return gocept.amqprun.message.Message(
        header, body, delivery_tag=1, routing_key=routing_key)


# Patterns and paths (pure)

def test_pattern_accepts_both_variable_syntaxes():
    pattern = writefiles.Pattern('{routing_key}/${date}/x-{unique}.xml')
    assert pattern.path(dict(routing_key='r', date='d', unique='u')) == (
        'r/d/x-u.xml')
    assert pattern.extension == '.xml'


@pytest.mark.parametrize('text', [
    '/absolute/${unique}', 'a//b', '../${unique}', 'a/./b', 'a/', '$',
    '${unique}/..', 'a\0b'])
def test_pattern_refuses_paths_leaving_or_empty(text):
    with pytest.raises(writefiles.PatternError):
        writefiles.Pattern(text)


@pytest.mark.parametrize('value, expected', [
    ('..', '__'), ('.', '_'), ('', '_'), ('../../etc/passwd',
                                          '.._.._etc_passwd'),
    ('/etc/passwd', '_etc_passwd'), ('a\0b', 'a_b'), ('a\ud800', 'a?'),
    (b'bytes', 'bytes'), (42, '42')])
def test_values_are_neutralised(value, expected):
    assert writefiles.Pattern('${x}').path({'x': value}) == expected


def test_combined_values_cannot_form_dot_dot():
    assert writefiles.Pattern('${a}${b}/f').path({'a': '.', 'b': '.'}) == (
        '__/f')


def test_overlong_names_are_shortened_keeping_the_extension():
    path = writefiles.Pattern('${x}.xml').path({'x': 'ä' * 300})
    assert path.endswith('.xml')
    assert len(path.encode('utf-8')) <= writefiles.MAX_NAME_BYTES
    # Distinct long values stay distinct.
    other = writefiles.Pattern('${x}.xml').path({'x': 'ä' * 299 + 'b'})
    assert other != path


@pytest.mark.parametrize('pattern, body, header', [
    ('${unique}.xml', 'u.xml', 'u.header.xml'),
    ('${routing_key}-${unique}', 'a.b-u', 'a.b-u.header'),
    ('${xfilename}', 'f.txt', 'f.txt.header'),
])
def test_header_file_name(pattern, body, header):
    pattern = writefiles.Pattern(pattern)
    path = pattern.path(dict(unique='u', routing_key='a.b', xfilename='f.txt'))
    assert path == body
    assert pattern.header_path(path) == header


def make_uniques(count):
    return [writefiles.make_unique() for _ in range(count)]


def test_unique_is_unique_across_threads():
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        names = list(pool.map(lambda i: writefiles.make_unique(),
                              range(20000)))
    assert len(set(names)) == len(names)
    assert '/' not in names[0] and '.' not in names[0]


UNIQUES = """
import json
import gocept.amqprun.writefiles as w
print(json.dumps([w.make_unique() for _ in range(2000)]))
"""


def test_unique_is_unique_across_processes():
    processes = [subprocess.Popen([sys.executable, '-c', UNIQUES],
                                  stdout=subprocess.PIPE, text=True)
                 for _ in range(4)]
    names = make_uniques(2000)
    for process in processes:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        names += json.loads(out)
    assert len(set(names)) == len(names) == 10000
    # The process id is part of it: batches of different processes differ
    # in it even when the clock and the counter agree.
    assert len({name.split('-')[1] for name in names}) == 5


FORKING = """
import json, os
import gocept.amqprun.writefiles as w
parent = [w.make_unique() for _ in range(100)]
read, write = os.pipe()
if os.fork() == 0:
    os.write(write, json.dumps([w.make_unique() for _ in range(100)]).encode())
    os._exit(0)
os.close(write)
child = json.loads(os.read(read, 1 << 20))
os.wait()
print(json.dumps(parent + child + [w.make_unique() for _ in range(100)]))
"""


def test_unique_is_unique_in_a_forked_child():
    # A fresh interpreter forks (forking the test process is unsafe).
    result = subprocess.run([sys.executable, '-c', FORKING],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    names = json.loads(result.stdout)
    assert len(set(names)) == len(names) == 300


def test_variables_of_a_message():
    msg = message(routing_key='r.k', timestamp=0, message_id='<id@h>',
                  **{'X-Filename': 'f.txt'})
    values = writefiles.variables(msg)
    assert values['routing_key'] == 'r.k'
    assert values['msgid'] == '<id@h>'
    assert values['xfilename'] == 'f.txt'
    assert re.fullmatch(r'19(69|70)-(12-31|01-01)', values['date'])


def test_header_json_has_properties_headers_and_routing_key():
    msg = message(routing_key='r.k', content_type='text/plain',
                  message_id='<id>', timestamp=5,
                  **{'X-Bytes': b'b\xff', 'X-Int': 3})
    data = json.loads(writefiles.header_json(msg))
    assert data['content_type'] == 'text/plain'
    assert data['message_id'] == '<id>'
    assert data['timestamp'] == 5
    assert data['reply_to'] is None
    assert data['headers'] == {'X-Bytes': 'b\ufffd', 'X-Int': 3}
    assert data['routing_key'] == 'r.k'


def test_parse_arguments():
    parse = gocept.amqprun.zcml.parse_arguments
    assert parse('x-max-length = 5 x-queue-mode: lazy\n x-b=true '
                 'x-dead-letter-exchange=a:b') == {
        'x-max-length': 5, 'x-queue-mode': 'lazy', 'x-b': True,
        'x-dead-letter-exchange': 'a:b'}
    assert parse(None) is None
    with pytest.raises(ValueError):
        parse('x-max-length = 5 junk')


# The data manager (no broker)

def failing_commit():
    """The AMQP session's stand-in, failing its commit for certain."""
    def commit():
        raise gocept.amqprun.errors.ChannelLost('AMQP commit failed')
    return gocept.amqprun.testing.FakeSession(commit)


def in_doubt_commit():
    """The AMQP session's stand-in, losing the connection after Tx.Commit
    was sent."""
    def commit():
        raise gocept.amqprun.errors.CommitInDoubt('connection lost')
    return gocept.amqprun.testing.FakeSession(commit)


def test_data_manager_writes_on_commit(tmp_path):
    with transaction.manager as txn:
        txn.join(writefiles.FileDataManager(
            str(tmp_path), {str(tmp_path / 'd' / 'f'): b'data'}))
        assert files(tmp_path) == []
    assert files(tmp_path) == ['d/f']
    assert (tmp_path / 'd' / 'f').read_bytes() == b'data'


def test_files_are_in_place_when_the_amqp_commit_happens(tmp_path):
    seen = []
    txn = transaction.manager.begin()
    txn.join(gocept.amqprun.testing.FakeSession(
        lambda: seen.append(files(tmp_path))))
    txn.join(writefiles.FileDataManager(
        str(tmp_path), {str(tmp_path / 'd' / 'f'): b'data',
                        str(tmp_path / 'd' / 'f.header'): b'{}'}))
    transaction.manager.commit()
    assert seen == [['d/f', 'd/f.header']]


def test_a_failed_amqp_commit_leaves_no_file(tmp_path):
    txn = transaction.manager.begin()
    txn.join(failing_commit())
    txn.join(writefiles.FileDataManager(
        str(tmp_path), {str(tmp_path / 'f'): b'data',
                        str(tmp_path / 'f.header'): b'{}'}))
    with pytest.raises(gocept.amqprun.errors.ChannelLost):
        transaction.manager.commit()
    transaction.manager.abort()
    assert files(tmp_path) == []


def test_a_failed_amqp_commit_keeps_a_file_it_replaced(tmp_path):
    (tmp_path / 'f').write_bytes(b'stored before')
    txn = transaction.manager.begin()
    txn.join(failing_commit())
    txn.join(writefiles.FileDataManager(
        str(tmp_path), {str(tmp_path / 'f'): b'stored again'}))
    with pytest.raises(gocept.amqprun.errors.ChannelLost):
        transaction.manager.commit()
    transaction.manager.abort()
    assert files(tmp_path) == ['f']
    assert (tmp_path / 'f').read_bytes() == b'stored again'


def test_an_amqp_commit_in_doubt_keeps_the_files(tmp_path):
    session = in_doubt_commit()
    txn = transaction.manager.begin()
    txn.join(session)
    txn.join(writefiles.FileDataManager(
        str(tmp_path), {str(tmp_path / 'f'): b'data'}))
    transaction.manager.commit()
    assert session.in_doubt
    assert files(tmp_path) == ['f']


def test_files_and_directories_are_fsynced_before_the_commit(
        tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f'/proc/self/fd/{fd}'))
        return fsync(fd)
    monkeypatch.setattr(os, 'fsync', recording_fsync)
    txn = transaction.manager.begin()
    txn.join(gocept.amqprun.testing.FakeSession(
        lambda: synced.append('AMQP commit')))
    txn.join(writefiles.FileDataManager(
        str(tmp_path), {str(tmp_path / 'new' / 'f'): b'data'}))
    transaction.manager.commit()
    commit = synced.index('AMQP commit')
    before = synced[:commit]
    # The data (under its temporary name), the directory of the renamed
    # file, and the parent of the directory created for it.
    assert any(p.startswith(str(tmp_path / 'new' / '.')) for p in before)
    assert str(tmp_path / 'new') in before
    assert str(tmp_path) in before
    assert before.index(str(tmp_path / 'new')) > [
        i for i, p in enumerate(before) if p.endswith('.tmp')][0]


def test_abort_twice_and_tpc_abort_without_tpc_begin(tmp_path):
    dm = writefiles.FileDataManager(str(tmp_path), {str(tmp_path / 'f'): b''})
    dm.tpc_abort(None)
    dm.commit(None)
    assert len(files(tmp_path)) == 1
    dm.abort(None)
    dm.abort(None)
    dm.tpc_abort(None)
    assert files(tmp_path) == []


def test_failed_rename_fails_the_vote_before_the_amqp_commit(tmp_path):
    target = tmp_path / 'f'
    target.mkdir()   # a directory in the way: the rename fails
    committed = []
    txn = transaction.manager.begin()
    txn.join(gocept.amqprun.testing.FakeSession(
        lambda: committed.append(True)))
    txn.join(writefiles.FileDataManager(str(tmp_path), {str(target): b'x'}))
    with pytest.raises(OSError):
        transaction.manager.commit()
    transaction.manager.abort()
    assert committed == []     # nothing ACKed: the message is retried
    assert files(tmp_path) == []


def test_handler_notifies_message_stored_inside_the_transaction(
        zca, tmp_path):
    events = []
    zca.registerHandler(
        lambda event: events.append((event, files(tmp_path))),
        (gocept.amqprun.interfaces.IMessageStored,))
    writer = writefiles.FileWriter('q', ['r'], str(tmp_path), '${unique}')
    msg = message()
    with transaction.manager:
        writer(msg)
    [(event, present)] = events
    assert present == []   # not yet written
    assert event.message is msg
    assert os.path.isabs(event.path)
    assert pathlib.Path(event.path).read_bytes() == b'body'


# The directive

def load(zcml):
    return zope.configuration.xmlconfig.string(
        '<configure xmlns="http://namespaces.zope.org/zope"'
        ' xmlns:amqp="http://namespaces.gocept.com/amqp">'
        '<include package="gocept.amqprun" />' + zcml + '</configure>')


def test_directive_registers_a_handler(zca, tmp_path):
    load(f'<amqp:writefiles queue_name="q" routing_key="a.b  c.d"'
         f' directory="{tmp_path}" arguments="x-max-length = 3" />')
    [(name, handler)] = zope.component.getUtilitiesFor(
        gocept.amqprun.interfaces.IHandler)
    assert handler.queue_name == 'q'
    assert handler.routing_key == ['a.b', 'c.d']
    assert handler.arguments == {'x-max-length': 3}
    assert handler.pattern.text == writefiles.DEFAULT_PATTERN


@pytest.mark.parametrize('attribute', [
    'pattern="../${unique}"', 'arguments="x-max-length"'])
def test_directive_refuses_bad_values(zca, tmp_path, attribute):
    with pytest.raises(zope.configuration.config.ConfigurationError):
        load(f'<amqp:writefiles queue_name="q" routing_key="a"'
             f' directory="{tmp_path}" {attribute} />')


# Through the real server

@pytest.fixture
def writer(server_process, amqp_client, name_prefix, tmp_path):
    """Start a server with one writefiles directive; returns
    (server, output directory, queue name)."""
    def start(pattern=None, routing_key=None, arguments=None, zcml='',
              **kw):
        out = tmp_path / 'out'
        queue = f'{name_prefix}.q'
        amqp_client.forget(queue)
        attributes = ''
        if pattern:
            attributes += f' pattern="{pattern}"'
        if arguments:
            attributes += f' arguments="{arguments}"'
        server = server_process(zcml=(
            f'<amqp:writefiles queue_name="{queue}"'
            f' routing_key="{routing_key or name_prefix + ".a"}"'
            f' directory="{out}"{attributes} />' + zcml), **kw)
        return server, out, queue
    return start


def test_default_pattern_body_and_header(writer, amqp_client, name_prefix):
    server, out, queue = writer()
    key = f'{name_prefix}.a'
    msgid = amqp_client.send(key, b'\x00body\xff', {
        'content_type': 'application/x-test', 'X-Foo': 'bar'})
    wait_for(lambda: len(stored(out)) == 2)
    body_name, header_name = sorted(files(out), key=len)
    assert re.fullmatch(re.escape(key) + r'-\d+-\d+-\d+-[0-9a-f]{8}',
                        body_name)
    assert header_name == body_name + '.header'
    assert (out / body_name).read_bytes() == b'\x00body\xff'
    header = json.loads((out / header_name).read_text())
    assert header['message_id'] == msgid
    assert header['content_type'] == 'application/x-test'
    assert header['headers'] == {'X-Foo': 'bar'}
    assert header['routing_key'] == key
    assert header['delivery_mode'] == 2
    assert amqp_client.count(queue) == 0
    assert server.stop() == 0


def test_pattern_with_subdirectories_and_both_syntaxes(
        writer, amqp_client, name_prefix):
    server, out, queue = writer(
        pattern='{routing_key}/${date}/{xkind}-${unique}.xml')
    key = f'{name_prefix}.a'
    amqp_client.send(key, b'<x/>', {'timestamp': 1700000000,
                                    'X-Kind': 'report'})
    wait_for(lambda: len(stored(out)) == 2)
    date = __import__('datetime').datetime.fromtimestamp(
        1700000000).strftime('%Y-%m-%d')
    body, header = sorted(files(out), key=len)
    assert re.fullmatch(
        f'{re.escape(key)}/{date}/report-[0-9a-f-]+\\.xml', body)
    assert header == body[:-len('.xml')] + '.header.xml'
    assert (out / body).read_bytes() == b'<x/>'
    assert server.stop() == 0


def test_typed_arguments_and_several_routing_keys(
        writer, amqp_client, name_prefix):
    keys = [f'{name_prefix}.a', f'{name_prefix}.b']
    server, out, queue = writer(routing_key=' '.join(keys),
                                arguments='x-max-length = 100')
    # Redeclaring with an int argument succeeds only if the daemon
    # declared an int (a string would be a 406 PRECONDITION_FAILED).
    amqp_client.channel.queue_declare(
        queue, durable=True, arguments={'x-max-length': 100})
    for key in keys:
        amqp_client.send(key, key.encode())
    wait_for(lambda: len(stored(out)) == 4)
    bodies = sorted((out / name).read_bytes() for name in files(out)
                    if not name.endswith('.header'))
    assert bodies == sorted(key.encode() for key in keys)
    assert server.stop() == 0


def test_message_stored_subscribers_join_the_transaction(
        writer, amqp_client, name_prefix):
    notice = amqp_client.declare(f'{name_prefix}.stored',
                                 [f'{name_prefix}.stored'])
    server, out, queue = writer(
        handlers=f'''
            import gocept.amqprun.interfaces, gocept.amqprun.message
            import zope.component

            def stored(event):
                zope.component.getUtility(
                    gocept.amqprun.interfaces.ISender).send(
                    gocept.amqprun.message.Message(
                        {{}}, event.path,
                        routing_key='{name_prefix}.stored'))
            ''',
        zcml='<subscriber handler="handlers.stored"'
             ' for="gocept.amqprun.interfaces.IMessageStored" />')
    amqp_client.send(f'{name_prefix}.a', b'data')
    path = amqp_client.wait(notice).body.decode()
    assert os.path.isabs(path)
    # The notice was published by the AMQP commit; the rename follows.
    wait_for(lambda: len(stored(out)) == 2)
    assert pathlib.Path(path).read_bytes() == b'data'
    assert files(out) == sorted(
        [os.path.relpath(path, out), os.path.relpath(path, out) + '.header'])
    assert server.stop() == 0


ESCAPES = ['../../escaped', '/tmp/absolute-escape', '..', '.', '',
           'nul\0byte', 'x' * 1000 + '.txt', '../' * 20 + 'etc/passwd']


def test_no_value_makes_a_write_leave_the_directory(
        writer, amqp_client, name_prefix, tmp_path):
    server, out, queue = writer(pattern='${xname}')
    before = set(files(tmp_path.parent))
    for value in ESCAPES:
        amqp_client.send(f'{name_prefix}.a', value.encode()[:50],
                         {'X-Name': value})
    server.wait_for_log('Handled message', count=len(ESCAPES))
    names = [f for f in files(out) if not f.endswith('.header')]
    # '..', '.' and '' are all neutralised to underscores; '.' and ''
    # both give '_' (the later one replaces the earlier).
    assert '__' in names and '_' in names
    assert '.._.._escaped' in names
    assert '_tmp_absolute-escape' in names
    assert 'nul_byte' in names
    assert all('/' not in name for name in names)
    assert len(names) == len(ESCAPES) - 1
    assert not os.path.exists('/tmp/absolute-escape')
    assert not (tmp_path.parent / 'escaped').exists()
    outside = set(files(tmp_path.parent)) - before
    assert all(f.startswith(f'{tmp_path.name}/') for f in outside)
    assert all(f.startswith(f'{tmp_path.name}/out/') or
               f.startswith(f'{tmp_path.name}/server')
               for f in outside)
    assert server.process.poll() is None
    assert server.stop() == 0


def test_failed_amqp_commit_leaves_no_file(
        server_process, amqp_parameters, amqp_client, name_prefix,
        tmp_path):
    """The broker connection drops while the message is handled: the
    commit fails, nothing is written; the redelivery is stored once."""
    control = tmp_path / 'control'
    control.mkdir()
    out = tmp_path / 'out'
    queue = f'{name_prefix}.q'
    amqp_client.forget(queue)
    proxy = gocept.amqprun.testing.Proxy.to(amqp_parameters)
    parameters = proxy.parameters()
    process = gocept.amqprun.testing.ServerProcess(
        tmp_path / 'server', parameters, amount=1,
        server_extra='  retry_delay 0.1\n  max_retry_delay 0.5\n',
        handlers=f'''
            import pathlib, time
            CONTROL = pathlib.Path({str(control)!r})

            def stored(event):
                calls = len(list(CONTROL.glob('called-*')))
                (CONTROL / 'tmp').write_text(event.path)
                (CONTROL / 'tmp').rename(CONTROL / f'called-{{calls}}')
                if calls == 0:
                    # Hold the first attempt until the test cut the
                    # connection under it.
                    deadline = time.monotonic() + 30
                    while (not (CONTROL / 'go').exists()
                           and time.monotonic() < deadline):
                        time.sleep(0.01)
            ''',
        zcml=f'<amqp:writefiles queue_name="{queue}"'
             f' routing_key="{name_prefix}.a" directory="{out}" />'
             '<subscriber handler="handlers.stored"'
             ' for="gocept.amqprun.interfaces.IMessageStored" />')
    try:
        process.start()
        amqp_client.send(f'{name_prefix}.a', b'once')
        wait_for(lambda: (control / 'called-0').exists())
        proxy.stop()   # the broker is unreachable now
        process.wait_for_log('Connection to the broker lost')
        proxy = gocept.amqprun.testing.Proxy.to(
            amqp_parameters, port=proxy.port)
        (control / 'go').touch()
        process.wait_for_log(
            f"from queue '{queue}' failed")
        wait_for(lambda: (control / 'called-1').exists())
        first = (control / 'called-0').read_text()
        second = (control / 'called-1').read_text()
        wait_for(lambda: len(stored(out)) == 2)
        assert not os.path.exists(first)
        assert pathlib.Path(second).read_bytes() == b'once'
        assert 'ChannelLost' in process.log_text()
        # No temporary files either.
        assert files(out) == sorted([os.path.relpath(second, out),
                                     os.path.relpath(second, out) +
                                     '.header'])
        assert process.stop() == 0
    finally:
        if process.process is not None and process.process.poll() is None:
            process.kill()
        proxy.stop()
