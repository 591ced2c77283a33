"""The contracts of gocept.amqprun.

Application code depends on these interfaces and the names in
``handler``, ``message``, ``settings`` and ``server``; everything else is an
implementation detail.
"""

import zope.interface
import zope.interface.common.mapping


# Exit codes of the `server` command and its subcommands, the contract
# with process supervisors (zdaemon, systemd): restart after 1, not after
# 0 or 2.

#: Stopped by SIGTERM or SIGINT; a subcommand: done, nothing wrong.
EXIT_OK = 0
#: A failure at run time, SIGUSR1, or problems found: restart.
EXIT_FAILURE = 1
#: The configuration or the command line is wrong, or the broker refused
#: it at start-up (`errors.Refused`): do not restart.
EXIT_CONFIG = 2


class IMessage(zope.interface.Interface):
    """An AMQP message, received or to be sent."""

    header = zope.interface.Attribute(
        'The AMQP properties (a `gocept.amqprun.message.Header`): '
        'content_type, content_encoding, delivery_mode, priority, '
        'correlation_id, reply_to, expiration, message_id, timestamp, type, '
        'user_id, app_id and `headers` (a dict of application headers).')
    body = zope.interface.Attribute('The payload (bytes).')
    exchange = zope.interface.Attribute(
        'The exchange to publish to (default ``amq.topic``).')
    routing_key = zope.interface.Attribute(
        'Received: the routing key it arrived with. '
        'To send: the routing key to publish with.')
    delivery_tag = zope.interface.Attribute(
        'Received: the delivery tag (only meaningful to the daemon). '
        'To send: None.')
    redelivered = zope.interface.Attribute(
        'Received: True when the broker delivered it before (to this or '
        'another consumer) without it being acknowledged. To send: False.')


class IHandler(zope.interface.Interface):
    """Handles the messages of one queue.

    Register as a named utility; the name must be unique, and so must the
    queue name among all handlers of a process.
    """

    queue_name = zope.interface.Attribute('The queue to consume from.')
    routing_key = zope.interface.Attribute(
        'A routing key or a list of them, bound on ``amq.topic``.')
    arguments = zope.interface.Attribute(
        'A dict of queue arguments passed to queue.declare (or None); '
        'values keep their types.')
    principal = zope.interface.Attribute(
        'The id of the principal the handler runs as (zope.security), or '
        'None for no interaction.')

    def __call__(message):
        """Handle `message` (an IMessage).

        Return an iterable of IMessage to send, or None. Everything sent is
        published together with the ACK of `message` when the transaction
        commits; an exception aborts it and nothing is sent.

        Called concurrently: from every worker thread (``amount`` in the
        ``<worker>`` section, `workers` of the Server), each call in a
        `transaction` of its own that the worker begins and ends. The
        handler must not commit or abort that transaction itself.

        May see the same message more than once: a retry after a failure
        (``amqprun-attempts`` header), a redelivery after a lost channel,
        connection or process (``message.redelivered``), among them a
        commit that was in doubt and that the broker rolled back while a
        database in the transaction had committed. Effects outside the
        AMQP transaction can therefore repeat; an `IOutbox` makes SQL
        effects exactly-once.
        """


class ISession(zope.interface.Interface):
    """The AMQP side of one transaction.

    Collects the messages to publish and, inside a handler, the ACK of the
    received message; all of it reaches the broker in one AMQP transaction
    when the `transaction` commits, none of it when it aborts.
    """

    received = zope.interface.Attribute(
        'The message being handled, or None outside a handler.')

    def send(message):
        """Publish `message` when the transaction commits.

        Inside a handler a reply gets ``correlation_id`` = the received
        message-id and a ``references`` header (received references +
        newline + received message-id), each unless already set.
        """


class ISender(zope.interface.Interface):
    """Sends messages transactionally (the Server provides it)."""

    def send(message):
        """Publish `message` when the calling thread's transaction commits.

        Thread-safe. Discarded when the transaction aborts. Inside a handler
        it joins the handler's transaction.
        """


class IOutbox(zope.interface.Interface):
    """Records handled messages and their replies in the handler's
    database transaction (see `gocept.amqprun.outbox`).

    Every worker thread calls it, concurrently: its methods must be
    thread-safe. Per message, in the worker thread that handles it:
    `applies`, then (if it applies) `recorded` and either the recorded
    messages are sent again or the handler runs and `record` runs right
    before that transaction commits; after the transaction, `prune_due`
    and, if it says so, `prune`.
    """

    def applies(queue, message_id):
        """Whether the outbox covers messages of `queue` (it may cover
        only some queues) with `message_id` (a message without id cannot
        be recorded). Says nothing about whether it was recorded."""

    def prepare():
        """Get ready before the first message (e.g. create tables);
        called once, by `Server.start` before the workers start."""

    def recorded(queue, message_id):
        """The recorded messages of a handled input, or None.

        Runs in the handler's transaction (the calling worker thread's
        current `transaction`), before the handler is called."""

    def record(queue, message_id, messages):
        """Record the input as handled with the messages it sends.

        Runs in the handler's transaction, as a before-commit hook (so
        `messages` is complete): it commits or aborts with the handler's
        work."""

    def prune_due():
        """Whether old records should be deleted now.

        Called concurrently by every worker thread after each message;
        True for one caller only until the next prune is due."""

    def prune(transaction_manager):
        """Delete old records in a transaction of their own, begun and
        ended with `transaction_manager` (the calling worker thread's,
        after the handler's transaction has ended)."""


class ILoop(zope.interface.Interface):
    """A main loop that runs until stopped (the Server provides it)."""

    running = zope.interface.Attribute('True while consuming/able to send.')

    def start():
        """Run the loop in the calling thread until `stop()` is called."""

    def stop():
        """Stop the loop; thread-safe.

        Returns when it has stopped -- or when it gave up waiting: the
        Server waits up to its `shutdown_timeout` for running handlers
        and a few seconds for each answer of the broker (cancelling the
        consumers, putting unstarted deliveries back, closing the
        connection); what it gave up on is left to the broker, which
        redelivers unacknowledged messages. A call while a stop is under
        way returns at once.

        Must not be called from a handler (it waits for the handlers'
        worker threads): use `fail()` there."""

    def fail(error):
        """Stop the loop because of `error`, which `start()` then raises;
        thread-safe; returns at once."""


class ISettings(zope.interface.common.mapping.IEnumerableMapping):
    """The ``<settings>`` of the configuration file (keys keep their case,
    values are str)."""

    def update(mapping):
        """Add or replace entries."""


class IProcessStarted(zope.interface.Interface):
    """Notified once, when the daemon has started consuming."""


class IProcessStopping(zope.interface.Interface):
    """Notified once, when the daemon begins to shut down."""


@zope.interface.implementer(IProcessStarted)
class ProcessStarted:
    """The daemon consumes now."""


@zope.interface.implementer(IProcessStopping)
class ProcessStopping:
    """The daemon shuts down."""


class IMessageStored(zope.interface.Interface):
    """A message was written to a file by ``<amqp:writefiles>``."""

    message = zope.interface.Attribute('The IMessage.')
    path = zope.interface.Attribute('The absolute path of the body file.')


@zope.interface.implementer(IMessageStored)
class MessageStored:

    def __init__(self, message, path):
        self.message = message
        self.path = path
