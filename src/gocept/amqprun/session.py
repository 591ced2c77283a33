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

When the Session is the only data manager of a handler's transaction
and no after-commit hook waits for the outcome, nothing is left to undo
or to finish after the AMQP commit: ``tpc_finish`` hands the commit to
the IO thread and returns, and the worker goes on with its next message
while the broker commits (its commit joins the others on the channel,
see `commits`). What the commit then does is accounted in the IO thread
(`settlement`): committed, in doubt, or failed for certain -- then
nothing was sent and the broker redelivers the input.

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

from gocept.amqprun import tracing
from gocept.amqprun.errors import ChannelLost
from gocept.amqprun.errors import CommitInDoubt
from gocept.amqprun.errors import ConnectionUnavailable
import gocept.amqprun.interfaces
import gocept.amqprun.message


log = logging.getLogger(__name__)

# Seconds a commit outside a handler still gets when its vote took up
# the whole send timeout.
MINIMUM_TIMEOUT = 0.1


def waits_for_commit(txn, resource):
    """Whether `txn` has data managers besides `resource`, or after-commit
    hooks: then something must happen after the AMQP commit, and only
    once its outcome is known.

    `transaction` has no public way to ask for the joined resources; this
    reads its private list (tests/test_session.py fails if that changes)
    and answers True when it cannot tell.
    """
    resources = getattr(txn, '_resources', None)
    if not isinstance(resources, list):
        return True
    return (any(r is not resource for r in resources)
            or any(True for _ in txn.getAfterCommitHooks()))


@zope.interface.implementer(
    gocept.amqprun.interfaces.ISession,
    transaction.interfaces.IDataManager)
class Session:
    """One transaction's messages (and ACK) for one Server.

    connection: the server's `connection.Connection`; settlement: its
    `settlement.Settlement` (which counts what the commit did).
    delivery: the `channel.Delivery` being handled, or None.
    received: the IMessage made of it, or None.
    `settled` becomes True once the AMQP commit succeeded, is in doubt,
    or was handed to the IO thread without waiting (see above): from then
    on nothing may touch the delivery again.
    """

    def __init__(self, connection, settlement, delivery=None, received=None,
                 transaction_manager=None):
        self.connection = connection
        self.settlement = settlement
        self.delivery = delivery
        self.received = received
        self.messages = []
        self.settled = False
        self._deadline = None
        self._started = None
        self.transaction_manager = (
            transaction_manager or transaction.manager)

    @classmethod
    def join(cls, server, txn, delivery=None, received=None):
        """Create a Session of `server`, join it to `txn` and make it
        findable with `Session.of(server, txn)`."""
        session = cls(server.connection, server.settlement, delivery,
                      received)
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
        if tracing.ACTIVE:
            tracing.sending(message)
        self.messages.append(message)

    # IDataManager

    def abort(self, txn):
        self.messages = []

    def tpc_begin(self, txn):
        self._started = time.perf_counter()

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
            timeout = self.connection.send_timeout
            # The commit waits for a channel at most until then.
            self._deadline = time.monotonic() + timeout
            if not self.connection.wait_until_connected(timeout):
                raise ConnectionUnavailable(
                    f'no connection to the broker within {timeout} s')

    def tpc_finish(self, txn):
        publishes = [(m.exchange, m.routing_key, m.header, m.body)
                     for m in self.messages]
        self.messages = []
        if self.delivery is None:
            if publishes:
                self._commit_sent(publishes)
        else:
            self._commit_delivery(txn, publishes)
        self.settled = True

    def _commit_delivery(self, txn, publishes):
        delivery = self.delivery
        slot = delivery.slot
        # An isolated delivery stays alone until its commit is answered.
        waits = delivery.alone or waits_for_commit(txn, self)
        if not waits:
            # Nothing happens after this commit: the worker goes on, the
            # IO thread settles the accounts when the broker answered.
            if tracing.ACTIVE:
                tracing.handed_over(delivery)
            slot.commit(delivery.epoch, publishes, ack=delivery.delivery_tag,
                        alone=delivery.alone, wait=False,
                        callback=self._committed)
        elif slot.connection.confirm and publishes:
            # The others finish after the confirms, the ACK after them.
            slot.commit(delivery.epoch, publishes)
            txn.addAfterCommitHook(self._ack_last)
        else:
            try:
                slot.commit(delivery.epoch, publishes,
                            ack=delivery.delivery_tag, alone=delivery.alone)
            except CommitInDoubt as e:
                # The other managers finish: the broker has the commit or
                # redelivers the input.
                self._committed(e)
            else:
                self._committed(None)

    def _committed(self, error):
        """The AMQP commit of the delivery ended with `error` (None:
        committed); in the IO thread when nobody waits for it."""
        self.settlement.handled(
            self.delivery, error, time.perf_counter() - self._started)

    def _ack_last(self, status):
        delivery = self.delivery
        if status and delivery.current:
            if tracing.ACTIVE:
                tracing.handed_over(delivery)
            delivery.slot.commit(delivery.epoch, ack=delivery.delivery_tag,
                                 wait=False, callback=self._committed)

    def _commit_sent(self, publishes):
        """Commit messages sent outside a handler. In doubt, they are sent
        once more (a duplicate is possible, a loss is not): the commit
        returns when that succeeded and raises when it did not."""
        connection = self.connection
        slot = connection.acquire_sender()
        try:
            timeout = None
            if self._deadline is not None:
                timeout = max(MINIMUM_TIMEOUT,
                              self._deadline - time.monotonic())
            try:
                slot.commit(None, publishes, timeout=timeout)
            except CommitInDoubt as e:
                self.settlement.stats.commit_in_doubt()
                log.warning(
                    'Commit in doubt: %d message(s) %s (%s). The broker may '
                    'or may not have them; sending them again.',
                    len(publishes),
                    ', '.join(str(p[2].message_id) for p in publishes[:5]),
                    e)
                slot.commit(None, publishes)
                log.warning('Sent %d message(s) again after a commit in '
                            'doubt (a duplicate is possible).',
                            len(publishes))
        finally:
            connection.release_sender(slot)

    def tpc_abort(self, txn):
        self.messages = []

    def sortKey(self):
        # The smallest key there is: the first tpc_finish (see above).
        return ''
