"""The AMQP side of a transaction (a `transaction` data manager).

A Session collects the messages to publish in one transaction and, inside a
handler, the delivery to ACK. It does all its AMQP work in `tpc_vote` and
sorts after every other data manager, so it is the last resource to vote:
when its AMQP commit fails, the whole transaction aborts and the other data
managers have not finished yet; when it succeeds, they only have
`tpc_finish` left.
"""

import logging
import transaction.interfaces
import zope.interface
import gocept.amqprun.interfaces
import gocept.amqprun.message


log = logging.getLogger(__name__)


@zope.interface.implementer(
    gocept.amqprun.interfaces.ISession,
    transaction.interfaces.IDataManager)
class Session:
    """One transaction's messages (and ACK) for one Server.

    delivery: the `connection.Delivery` being handled, or None.
    received: the IMessage made of it, or None.
    """

    def __init__(self, server, delivery=None, received=None,
                 transaction_manager=None):
        self.server = server
        self.delivery = delivery
        self.received = received
        self.messages = []
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
        publishes = [(m.exchange, m.routing_key, m.header, m.body)
                     for m in self.messages]
        delivery = self.delivery
        if delivery is not None:
            slot = delivery.slot
            # Confirm mode does not wait for the confirms (at-least-once:
            # an input whose replies are not confirmed is not ACKed).
            slot.commit(
                delivery.epoch, publishes, ack=delivery.delivery_tag,
                wait=not slot.connection.confirm)
        elif publishes:
            connection = self.server.connection
            slot = connection.acquire_sender()
            try:
                slot.commit(None, publishes)
            finally:
                connection.release_sender(slot)
        self.messages = []

    def tpc_finish(self, txn):
        pass

    def tpc_abort(self, txn):
        self.messages = []

    def sortKey(self):
        # '~' sorts after letters and digits: vote last.
        return f'~gocept.amqprun.session:{id(self)}'
