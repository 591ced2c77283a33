"""``<amqp:readfiles>``: publish the files put into a Maildir.

A thread polls ``new/``. Each file is published in a transaction of its
own together with a data manager that moves it to ``cur/`` in
`tpc_finish`, i.e. only after the AMQP commit succeeded (in doubt, the
session has sent it once more: perhaps twice, never lost). While the
broker is unavailable the commit fails, the file stays in ``new/`` and is
tried again at the next poll.
"""

import logging
import os
import threading

import gocept.filestore.filestore
import transaction
import transaction.interfaces
import zope.component
import zope.interface

import gocept.amqprun.errors
import gocept.amqprun.interfaces
import gocept.amqprun.message


log = logging.getLogger(__name__)

DEFAULT_CONTENT_TYPE = 'application/octet-stream'


class Vanished(Exception):
    """The file left ``new/`` before its transaction committed."""


def stop_sender(error):
    """Stop the Server this process sends with -- the ISender utility, if
    it is an ILoop -- because of `error`. The daemon then exits with 1; an
    application embedding a Server sees its `start()` raise `error`."""
    sender = zope.component.queryUtility(gocept.amqprun.interfaces.ISender)
    if gocept.amqprun.interfaces.ILoop.providedBy(sender):
        sender.fail(error)
    else:
        log.critical('No server to stop (the ISender utility %r is not an '
                     'ILoop).', sender)


class FileReader:
    """Publishes the files of the Maildir `directory` to `routing_key`.

    `start` and `stop` take an (ignored) event, so they can be subscribers
    of ProcessStarted and ProcessStopping. An unexpected error (a file
    system error, say) is logged and passed to `on_fatal` (default:
    `stop_sender`) instead of ending the thread silently.
    """

    stop_timeout = 30

    def __init__(self, directory, routing_key,
                 content_type=DEFAULT_CONTENT_TYPE, interval=1.0,
                 on_fatal=stop_sender):
        self.directory = os.path.abspath(directory)
        self.routing_key = routing_key
        self.content_type = content_type
        self.interval = interval
        self.on_fatal = on_fatal
        self.store = gocept.filestore.filestore.FileStore(self.directory)
        self.thread = None
        self._stopping = threading.Event()

    def start(self, event=None):
        if self.thread is not None:
            return
        self._stopping.clear()
        self.thread = threading.Thread(
            target=self.run, daemon=True,
            name=f'amqprun-readfiles-{os.path.basename(self.directory)}')
        self.thread.start()

    def stop(self, event=None):
        """Stop polling; wait for the file being sent (bounded)."""
        thread, self.thread = self.thread, None
        if thread is None:
            return
        self._stopping.set()
        thread.join(self.stop_timeout)
        if thread.is_alive():
            log.warning('Reading %s did not stop within %s s.',
                        self.directory, self.stop_timeout)

    def run(self):
        try:
            os.makedirs(self.directory, exist_ok=True)
            self.store.prepare()
            log.info('Reading files from %s/new (routing key %r).',
                     self.directory, self.routing_key)
            while not self._stopping.is_set():
                self.poll()
                self._stopping.wait(self.interval)
        except Exception as e:
            log.critical('Reading files from %s failed, stopping the '
                         'server: %s', self.directory, e, exc_info=True)
            self.on_fatal(e)

    def poll(self):
        """Send the files in ``new/`` (by name), until the broker fails or
        `stop` is called."""
        for path in sorted(self.store.list('new')):
            if self._stopping.is_set() or not self.send(path):
                break

    def send(self, path):
        """Publish the file at `path` and move it to ``cur/`` in one
        transaction. Return False when the broker could not be reached
        (the file stays); raise on other errors."""
        name = os.path.basename(path)
        try:
            if not os.path.isfile(path):
                return True
            with open(path, 'rb') as f:
                body = f.read()
        except FileNotFoundError:
            # Taken away by someone else meanwhile.
            return True
        manager = transaction.manager
        txn = manager.begin()
        try:
            sender = zope.component.getUtility(
                gocept.amqprun.interfaces.ISender)
            sender.send(gocept.amqprun.message.Message(
                {'content_type': self.content_type, 'X-Filename': name},
                body, routing_key=self.routing_key))
            txn.join(MoveDataManager(self.store, name, 'new', 'cur'))
            manager.commit()
        except Vanished:
            manager.abort()
            return True
        except gocept.amqprun.errors.AMQPError as e:
            manager.abort()
            log.warning('Could not send %s, trying again later: %s',
                        path, e)
            return False
        except BaseException:
            manager.abort()
            raise
        log.info('Sent %s to %r.', path, self.routing_key)
        return True


@zope.interface.implementer(transaction.interfaces.IDataManager)
class MoveDataManager:
    """Moves a file between the folders of a FileStore on tpc_finish,
    after the AMQP commit (see `session`).

    `tpc_vote` checks that the file is still there, so a vanished file
    aborts the transaction before the AMQP commit.
    """

    def __init__(self, store, name, source, destination):
        self.store = store
        self.name = name
        self.source = source
        self.destination = destination
        self.transaction_manager = transaction.manager

    def abort(self, txn):
        pass

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        path = os.path.join(self.store.path, self.source, self.name)
        if not os.path.isfile(path):
            raise Vanished(f'{path} vanished before the commit')

    def tpc_finish(self, txn):
        self.store.move(self.name, self.source, self.destination)

    def tpc_abort(self, txn):
        pass

    def sortKey(self):
        return f'gocept.amqprun.readfiles:{id(self)}'
