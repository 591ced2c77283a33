import os
import pathlib
import signal

import pytest
import transaction
import zope.component
import zope.configuration.config
import zope.event
import zope.interface

import gocept.amqprun.errors
import gocept.amqprun.connection
import gocept.amqprun.interfaces
import gocept.amqprun.readfiles as readfiles
import gocept.amqprun.testing
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.test_writefiles import load
from gocept.amqprun.tests.test_writefiles import stored


def names(directory):
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


@zope.interface.implementer(gocept.amqprun.interfaces.ISender)
class FakeSender:
    """Collects what is sent; its commit (where the AMQP session
    commits) fails with `error` when set."""

    def __init__(self):
        self.sent = []
        self.error = None

    def send(self, message):
        def commit():
            if self.error is not None:
                raise self.error
            self.sent.append(message)
        transaction.get().join(gocept.amqprun.testing.FakeSession(commit))


@pytest.fixture
def sender(zca):
    sender = FakeSender()
    zca.registerUtility(sender, gocept.amqprun.interfaces.ISender)
    return sender


@pytest.fixture
def reader(tmp_path):
    fatal = []
    reader = readfiles.FileReader(
        str(tmp_path / 'in'), 'r.k', on_fatal=fatal.append)
    reader.fatal = fatal
    reader.store.prepare()
    return reader


def put(directory, name, data):
    """Deliver a file into the Maildir the way writers should: write it
    into tmp/, then move it into new/."""
    tmp = pathlib.Path(directory) / 'tmp' / name
    tmp.write_bytes(data)
    os.rename(tmp, pathlib.Path(directory) / 'new' / name)


def test_poll_sends_and_moves_files(sender, reader):
    put(reader.directory, 'b.txt', b'second')
    put(reader.directory, 'a.txt', b'first')
    reader.poll()
    assert [m.body for m in sender.sent] == [b'first', b'second']
    message = sender.sent[0]
    assert message.routing_key == 'r.k'
    assert message.header.headers == {'X-Filename': 'a.txt'}
    assert message.header.content_type == 'application/octet-stream'
    assert names(f'{reader.directory}/new') == []
    assert names(f'{reader.directory}/cur') == ['a.txt', 'b.txt']


def test_failed_commit_keeps_the_file_in_new(sender, reader):
    sender.error = gocept.amqprun.errors.ConnectionUnavailable('down')
    put(reader.directory, 'a', b'a')
    put(reader.directory, 'b', b'b')
    reader.poll()
    assert sender.sent == []
    assert names(f'{reader.directory}/new') == ['a', 'b']
    assert names(f'{reader.directory}/cur') == []
    sender.error = None
    reader.poll()
    assert [m.body for m in sender.sent] == [b'a', b'b']
    assert names(f'{reader.directory}/cur') == ['a', 'b']


def test_a_file_vanishing_before_the_commit_is_not_sent(sender, reader):
    put(reader.directory, 'a', b'a')

    class Remover(FakeSender):
        def send(self, message):
            os.unlink(f'{reader.directory}/new/a')
            sender.send(message)
    zope.component.provideUtility(
        Remover(), gocept.amqprun.interfaces.ISender)
    assert reader.send(f'{reader.directory}/new/a')
    assert sender.sent == []


def test_unexpected_file_system_error_is_fatal(sender, reader):
    reader.interval = 0.01
    reader.start()
    try:
        # Polling has begun once a file was sent.
        put(reader.directory, 'f', b'')
        wait_for(lambda: sender.sent)
        os.rmdir(f'{reader.directory}/new')
        wait_for(lambda: reader.fatal)
        wait_for(lambda: not reader.thread.is_alive())
    finally:
        reader.stop()


def test_start_creates_the_maildir_and_stop_ends_the_thread(
        sender, tmp_path):
    reader = readfiles.FileReader(str(tmp_path / 'a' / 'b'), 'r',
                                  interval=0.01)
    reader.start()
    thread = reader.thread
    wait_for(lambda: names(tmp_path / 'a' / 'b') == ['cur', 'new', 'tmp'])
    put(reader.directory, 'f', b'')
    wait_for(lambda: len(sender.sent) == 1)
    reader.stop()
    assert not thread.is_alive()
    reader.stop()   # again: no-op


def test_directive_subscribes_to_process_events(zca, sender, tmp_path):
    load(f'<amqp:readfiles directory="{tmp_path}" routing_key="r"'
         ' content_type="text/plain" poll_interval="0.01" />')
    zope.event.notify(gocept.amqprun.interfaces.ProcessStarted())
    try:
        wait_for(lambda: names(tmp_path) == ['cur', 'new', 'tmp'])
        put(tmp_path, 'f', b'x')
        wait_for(lambda: sender.sent)
        assert sender.sent[0].header.content_type == 'text/plain'
    finally:
        zope.event.notify(gocept.amqprun.interfaces.ProcessStopping())
    assert names(tmp_path / 'cur') == ['f']


def test_two_readers_on_one_directory_conflict(zca, tmp_path):
    with pytest.raises(zope.configuration.config.ConfigurationConflictError):
        load(f'<amqp:readfiles directory="{tmp_path}" routing_key="a" />'
             f'<amqp:readfiles directory="{tmp_path}/" routing_key="b" />')


# Through the real server

def test_files_are_published_with_filename_and_content_type(
        server_process, amqp_client, name_prefix, tmp_path):
    maildir = tmp_path / 'in'
    queue = amqp_client.declare(f'{name_prefix}.q', [f'{name_prefix}.r'])
    server = server_process(
        zcml=f'<amqp:readfiles directory="{maildir}"'
             f' routing_key="{name_prefix}.r" content_type="text/csv" />')
    wait_for(lambda: names(maildir) == ['cur', 'new', 'tmp'])
    put(maildir, 'data.csv', b'a,b\n')
    message = amqp_client.wait(queue)
    assert message.body == b'a,b\n'
    assert message.header.headers['X-Filename'] == 'data.csv'
    assert message.header.content_type == 'text/csv'
    assert message.routing_key == f'{name_prefix}.r'
    wait_for(lambda: names(maildir / 'cur') == ['data.csv'])
    assert names(maildir / 'new') == []
    assert server.stop() == 0


def test_file_system_error_stops_the_process(
        server_process, name_prefix, tmp_path):
    maildir = tmp_path / 'in'
    server = server_process(
        zcml=f'<amqp:readfiles directory="{maildir}"'
             f' routing_key="{name_prefix}.r" poll_interval="0.05" />')
    wait_for(lambda: names(maildir) == ['cur', 'new', 'tmp'])
    os.rmdir(maildir / 'new')
    assert server.wait(30) == 1
    assert (f'Reading files from {maildir} failed, stopping the server'
            in server.log_text())


def test_broker_briefly_unreachable(
        amqp_parameters, amqp_client, name_prefix, tmp_path):
    """Files put while the broker cannot be reached stay in new/ and are
    sent exactly once when it is back."""
    maildir = tmp_path / 'in'
    queue = amqp_client.declare(f'{name_prefix}.q', [f'{name_prefix}.r'])
    proxy = gocept.amqprun.testing.Proxy.to(amqp_parameters)
    parameters = proxy.parameters()
    process = gocept.amqprun.testing.ServerProcess(
        tmp_path / 'server', parameters,
        server_extra='  retry_delay 0.1\n  max_retry_delay 0.5\n'
                     '  send_timeout 0.5\n',
        zcml=f'<amqp:readfiles directory="{maildir}"'
             f' routing_key="{name_prefix}.r" poll_interval="0.05" />')
    try:
        process.start()
        wait_for(lambda: names(maildir) == ['cur', 'new', 'tmp'])
        put(maildir, 'before', b'0')
        assert amqp_client.wait(queue).body == b'0'
        # Published by the AMQP commit; the move to cur/ follows it.
        wait_for(lambda: names(maildir / 'cur') == ['before'])
        proxy.stop()   # the broker is unreachable now
        process.wait_for_log('Connection to the broker lost')
        for i in range(1, 6):
            put(maildir, f'during-{i}', str(i).encode())
        process.wait_for_log('Could not send')
        assert names(maildir / 'new') == [f'during-{i}' for i in range(1, 6)]
        proxy = gocept.amqprun.testing.Proxy.to(
            amqp_parameters, port=proxy.port)
        received = amqp_client.wait_many(queue, 5)
        assert sorted(m.body for m in received) == [b'1', b'2', b'3', b'4',
                                                    b'5']
        wait_for(lambda: len(names(maildir / 'cur')) == 6)
        assert names(maildir / 'new') == []
        assert process.stop() == 0
        assert amqp_client.count(queue) == 0   # nothing sent twice
    finally:
        if process.process is not None and process.process.poll() is None:
            process.kill()
        proxy.stop()


@pytest.mark.slow
def test_round_trip_of_200_files(
        server_process, amqp_client, name_prefix, tmp_path):
    maildir = tmp_path / 'in'
    out = tmp_path / 'out'
    key = f'{name_prefix}.files'
    queue = f'{name_prefix}.q'
    amqp_client.forget(queue)
    server = server_process(
        amount=4,
        zcml=f'<amqp:readfiles directory="{maildir}" routing_key="{key}"'
             ' poll_interval="0.05" />'
             f'<amqp:writefiles queue_name="{queue}" routing_key="{key}"'
             f' directory="{out}" pattern="{{xfilename}}" />')
    wait_for(lambda: names(maildir) == ['cur', 'new', 'tmp'])
    expected = {}
    for i in range(200):
        name = f'file-{i:03d}.bin'
        expected[name] = os.urandom(i * 37 % 5000) + bytes([i % 256])
        put(maildir, name, expected[name])
    wait_for(lambda: len(stored(out)) == 400, timeout=120,
             message=f'{len(stored(out))} of 400 files')
    for name, data in expected.items():
        assert (out / name).read_bytes() == data
        assert (out / f'{name}.header').exists()
    assert names(maildir / 'new') == []
    assert len(names(maildir / 'cur')) == 200
    assert server.stop(signal.SIGTERM) == 0
