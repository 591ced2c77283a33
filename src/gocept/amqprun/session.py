"""The AMQP side of a transaction (a `transaction` data manager).

The commit protocol
-------------------
A Session collects the messages to publish in one transaction and, inside
a handler, the delivery to ACK. The broker's commit is the *decision* of
the whole transaction, taken after every other data manager voted:

1. ``tpc_vote``: every data manager votes. Other managers prepare (a
   two-phase database PREPAREs, ``<amqp:writefiles>`` makes its files
   durable) or, where they have only one phase, commit (zope.sqlalchemy's
   default commits in its vote). The Session only checks that the
   delivery's channel is still there (or, outside a handler, that a
   connection is up): nothing can be sent yet.
2. The AMQP commit: the replies and the ACK, in one AMQP transaction on
   the delivery's channel. The Session sorts before every other data
   manager (its sort key is the empty string, the smallest there is), so
   its ``tpc_finish`` is the first one -- after all votes, before any
   other manager finishes. That is the order by the protocol of
   ``transaction``, not by a sort key that happens to sort late.
3. ``tpc_finish`` of the others (a two-phase database COMMITs PREPARED).

When the AMQP commit fails for certain (the channel went before
``Tx.Commit`` was sent, the broker refused what was sent), ``tpc_finish``
raises: the transaction aborts and every manager that can still undo does
(a prepared database rolls back, written files are removed); the input
goes the retry/park way or is redelivered. When the outcome is unknown
(the connection died after ``Tx.Commit`` was sent: *in doubt*), the
Session logs it and returns normally: the other managers complete, and
the broker either has the commit or redelivers the input -- a duplicate
is possible, a loss is not. Messages sent outside a handler have no
input to be redelivered: in doubt, they are sent once more before the
commit returns.

In confirm mode the replies are published with publisher confirms and
the ACK follows them. When other data managers are in the transaction,
the Session waits for the confirms in ``tpc_finish`` (a NACK aborts the
transaction) and ACKs after every manager finished (an after-commit
hook); alone, it does not wait: the IO thread ACKs when the confirms
arrive and hands a NACKed input back to the retry path.
"""

import logging
import time

import transaction.interfaces
import zope.interface

from gocept.amqprun.errors import ChannelLost
from gocept.amqprun.errors import CommitInDoubt
from gocept.amqprun.errors import ConnectionUnavailable
import gocept.amqprun.interfaces
import gocept.amqprun.message


log = logging.getLogger(__name__)


def has_other_resources(txn, resource):
    """Whether `txn` has data managers besides `resource`.

    `transaction` has no public way to ask; this reads its private list
    of joined resources (tests/test_session.py fails if that changes) and
    answers True when it cannot tell. Confirm mode uses it to wait for
    confirms only where another manager must finish after them: waiting
    always costs 60 % of its throughput (7,500 -> 2,770 msg/s measured
    with benchmarks/echo.py, 8 workers).
    """
    resources = getattr(txn, '_resources', None)
    if not isinstance(resources, list):
        return True
    return any(r is not resource for r in resources)


@zope.interface.implementer(
    gocept.amqprun.interfaces.ISession,
    transaction.interfaces.IDataManager)
class Session:
    """One transaction's messages (and ACK) for one Server.

    delivery: the `channel.Delivery` being handled, or None.
    received: the IMessage made of it, or None.
    `settled` becomes True once the AMQP commit succeeded or is in doubt:
    from then on nothing may touch the delivery again. `confirming` is
    True when the commit returned before the broker confirmed it (confirm
    mode, alone in the transaction): the server counts the message when
    the confirms arrive.
    """

    def __init__(self, server, delivery=None, received=None,
                 transaction_manager=None):
        self.server = server
        self.delivery = delivery
        self.received = received
        self.messages = []
        self.settled = False
        self.in_doubt = False
        self.confirming = False
        self._deadline = None
        self.transaction_manager = (
            transaction_manager or transaction.manager)

    @classmethod
    def join(cls, server, txn, delivery=None, received=None):
        """Create a Session, join it to `txn` and make it findable with
        `Session.of(server, txn)`."""
        session = cls(server, delivery, received)
        txn.join(session)
        txn.set_data(server, session)
        return session

    @staticmethod
    def of(server, txn):
        """The Session of `server` in `txn`, or None."""
        try:
            return txn.data(server)
        except KeyError:
            return None

    def send(self, message):
        header = message.header
        if header.message_id is None:
            header.message_id = gocept.amqprun.message.make_message_id()
        if self.received is not None:
            parent = self.received.header
            if header.correlation_id is None:
                header.correlation_id = parent.message_id
            if 'references' not in header.headers and parent.message_id:
                references = parent.headers.get('references')
                if isinstance(references, bytes):
                    references = references.decode('utf-8', 'replace')
                header.headers['references'] = (
                    f'{references}\n{parent.message_id}' if references
                    else parent.message_id)
        self.messages.append(message)

    # IDataManager

    def abort(self, txn):
        self.messages = []

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        # Fail here, while every manager can still abort cleanly, what
        # would fail for certain at the commit.
        delivery = self.delivery
        if delivery is not None:
            if not delivery.current:
                raise ChannelLost(
                    f'{delivery.slot}: the channel of the delivery is gone')
        elif self.messages:
            connection = self.server.connection
            timeout = connection.parameters.send_timeout
            # The commit waits for a channel at most until then.
            self._deadline = time.monotonic() + timeout
            if not connection.wait_until_open(timeout):
                raise ConnectionUnavailable(
                    f'no connection to the broker within {timeout} s')

    def tpc_finish(self, txn):
        publishes = [(m.exchange, m.routing_key, m.header, m.body)
                     for m in self.messages]
        self.messages = []
        if self.delivery is None:
            if publishes:
                self._commit_sent(publishes)
            self.settled = True
            return
        try:
            self._commit_delivery(txn, publishes)
        except CommitInDoubt as e:
            self.settled = self.in_doubt = True
            self._log_in_doubt(e, publishes)
            self.server.stats.commit_in_doubt()
        else:
            self.settled = True

    def _commit_delivery(self, txn, publishes):
        delivery = self.delivery
        slot = delivery.slot
        if not slot.connection.confirm:
            slot.commit(delivery.epoch, publishes, ack=delivery.delivery_tag)
        elif not publishes or not has_other_resources(txn, self):
            # Nothing must finish after the confirms: the IO thread ACKs
            # when they arrive, or hands a NACKed input back.
            self.confirming = True
            slot.commit(delivery.epoch, publishes, ack=delivery.delivery_tag,
                        wait=False, on_failure=self._unconfirmed,
                        on_success=self._confirmed)
        else:
            slot.commit(delivery.epoch, publishes)
            txn.addAfterCommitHook(self._ack_last)

    def _ack_last(self, status):
        delivery = self.delivery
        if status and delivery.current:
            delivery.slot.commit(delivery.epoch, ack=delivery.delivery_tag,
                                 wait=False)

    def _confirmed(self):
        """IO thread: the replies of a non-waiting confirm commit are
        confirmed and the input ACKed."""
        self.server.stats.message(self.delivery.queue, 'handled')

    def _unconfirmed(self, error):
        """IO thread: the broker NACKed a reply of an input (confirm mode,
        nobody waiting): hand the input back to the retry path."""
        self.server.retry_later(self.delivery, error)

    def _commit_sent(self, publishes):
        """Commit messages sent outside a handler. In doubt, they are sent
        once more (a duplicate is possible, a loss is not): the commit
        returns when that succeeded and raises when it did not."""
        connection = self.server.connection
        slot = connection.acquire_sender()
        try:
            timeout = None
            if self._deadline is not None:
                timeout = max(0.1, self._deadline - time.monotonic())
            try:
                slot.commit(None, publishes, timeout=timeout)
            except CommitInDoubt as e:
                self._log_in_doubt(e, publishes)
                self.server.stats.commit_in_doubt()
                slot.commit(None, publishes)
                log.warning('Sent %d message(s) again after a commit in '
                            'doubt (a duplicate is possible).',
                            len(publishes))
        finally:
            connection.release_sender(slot)

    def _log_in_doubt(self, error, publishes):
        if self.received is not None:
            log.warning(
                'Commit in doubt: message %s from queue %r (%s). The broker '
                'either committed its ACK and %d message(s) or redelivers '
                'it; the other resources of its transaction commit.',
                self.received.header.message_id, self.delivery.queue,
                error, len(publishes))
        else:
            log.warning(
                'Commit in doubt: %d message(s) %s (%s). The broker may or '
                'may not have them; sending them again.', len(publishes),
                ', '.join(str(p[2].message_id) for p in publishes[:5]),
                error)

    def tpc_abort(self, txn):
        self.messages = []

    def sortKey(self):
        # The smallest key there is: the first tpc_finish (see above).
        return ''
