"""Testing handlers and data managers without a broker."""

import transaction
import zope.component

import gocept.amqprun.errors
import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.security
import gocept.amqprun.session


def call_handler(handler, body=b'', header=None, routing_key=None,
                 commit=False):
    """Call `handler` with a fake incoming message, without a broker;
    return its replies as the daemon would send them.

    handler: an IHandler, or the name of a registered one.
    body, header, routing_key: the incoming message (`header` a dict or
        a message.Header; `routing_key` by default the handler's first
        one); it gets a message-id unless `header` has one.

    The handler runs as the daemon runs it: inside a transaction, as its
    principal. Its replies pass through `session.Session.send`, so they
    carry correlation_id and the ``references`` header. The transaction
    is aborted afterwards (data managers the handler joined do nothing)
    unless `commit` is true. Exceptions of the handler propagate (the
    transaction is aborted).
    """
    if isinstance(handler, str):
        handler = zope.component.getUtility(
            gocept.amqprun.interfaces.IHandler, name=handler)
    header = gocept.amqprun.message.make_header(dict(
        header.as_dict() if isinstance(header, gocept.amqprun.message.Header)
        else header or {}))
    if header.message_id is None:
        header.message_id = gocept.amqprun.message.make_message_id()
    if routing_key is None:
        routing_key = gocept.amqprun.handler.routing_keys(handler)[0]
    message = gocept.amqprun.message.Message(
        header, body, delivery_tag=1, routing_key=routing_key)
    session = gocept.amqprun.session.Session(None, None, received=message)
    replies = []
    manager = transaction.manager
    manager.begin()
    try:
        with gocept.amqprun.security.interaction(handler.principal):
            for reply in handler(message) or ():
                session.send(reply)
                replies.append(reply)
    except BaseException:
        manager.abort()
        raise
    if commit:
        manager.commit()
    else:
        manager.abort()
    return replies


class FakeSession:
    """A stand-in for the AMQP session in unit tests of data managers.

    It sorts like `session.Session` (before every other data manager) and
    calls `commit()` where the real session commits to the broker: in the
    first ``tpc_finish``, after every manager voted. `commit` may raise
    `errors.ChannelLost` (or anything else) to simulate a commit that
    certainly failed -- the transaction then aborts -- or
    `errors.CommitInDoubt`, which the stand-in swallows like the real
    session: the other managers finish. `in_doubt` tells whether it did.
    """

    transaction_manager = transaction.manager

    def __init__(self, commit=None):
        self._commit = commit or (lambda: None)
        self.in_doubt = False

    def sortKey(self):
        return ''

    def abort(self, txn):
        pass

    tpc_begin = commit = tpc_vote = tpc_abort = abort

    def tpc_finish(self, txn):
        try:
            self._commit()
        except gocept.amqprun.errors.CommitInDoubt:
            self.in_doubt = True
