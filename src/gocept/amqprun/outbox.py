"""Exactly-once effects with SQL: an inbox of handled messages and an
outbox of their replies, in the handler's own database transaction.

The daemon's promise is at-least-once handling: a message whose commit
is in doubt, or whose process died after the database committed, is
delivered again (RabbitMQ may even "resurrect" a message whose ACK it had
confirmed, after a broker crash). With an `Outbox`, the handler's
database transaction also records

- the handled message's id (per queue) in ``amqprun_inbox``, and
- the messages its transaction sends in ``amqprun_outbox``,

so they commit (or not) together with whatever the handler wrote. When a
message arrives whose id is recorded, its handler is not called again:
the recorded messages are published again (with their original
message-ids, so receivers can tell) and the input is ACKed. A handler
doing a plain INSERT thus writes exactly one row, and one set of replies
reaches the broker, whatever fault hits the commit.

The database session must be the one the handler uses, joined to the
`transaction` with zope.sqlalchemy (``zope.sqlalchemy.register``); the
outbox reads and writes through it. A message without a message-id
cannot be recognised and is handled at-least-once (logged once per
queue). Records older than `retention` seconds are deleted (at most once
per `prune_interval`, by the worker that finishes a message first after
that), so a duplicate arriving later than that is handled again.
"""

import datetime
import logging
import threading
import time

import sqlalchemy as sa
import sqlalchemy.dialects
import sqlalchemy.orm
import zope.interface
import zope.sqlalchemy

import gocept.amqprun.interfaces
import gocept.amqprun.message
import gocept.amqprun.properties


log = logging.getLogger(__name__)

metadata = sa.MetaData()

inbox = sa.Table(
    'amqprun_inbox', metadata,
    sa.Column('queue', sa.String(255), primary_key=True),
    sa.Column('message_id', sa.String(255), primary_key=True),
    sa.Column('handled_at', sa.DateTime(timezone=True), nullable=False,
              index=True),
)

outbox = sa.Table(
    'amqprun_outbox', metadata,
    sa.Column('queue', sa.String(255), primary_key=True),
    sa.Column('message_id', sa.String(255), primary_key=True),
    sa.Column('position', sa.Integer, primary_key=True),
    sa.Column('handled_at', sa.DateTime(timezone=True), nullable=False,
              index=True),
    sa.Column('exchange', sa.String(255), nullable=False),
    sa.Column('routing_key', sa.String(255), nullable=False),
    # The AMQP properties as a content header frame carries them
    # (properties.encode): every header value keeps its type.
    sa.Column('properties', sa.LargeBinary, nullable=False),
    sa.Column('body', sa.LargeBinary, nullable=False),
)

DAY = 86400

# The statements of every handled message, as text: compiling the Core
# constructs each time costs more CPU than the round trips (the figures:
# docs/explanation/performance.rst).
IS_RECORDED = sa.text(
    'SELECT 1 FROM amqprun_inbox WHERE queue = :queue '
    'AND message_id = :message_id')
RECORD_INPUT = sa.text(
    'INSERT INTO amqprun_inbox (queue, message_id, handled_at) '
    'VALUES (:queue, :message_id, :handled_at)')
RECORD_OUTPUT = sa.text(
    'INSERT INTO amqprun_outbox (queue, message_id, position, handled_at, '
    'exchange, routing_key, properties, body) VALUES (:queue, '
    ':message_id, :position, :handled_at, :exchange, :routing_key, '
    ':properties, :body)').bindparams(
        sa.bindparam('properties', type_=sa.LargeBinary),
        sa.bindparam('body', type_=sa.LargeBinary))


def now():
    return datetime.datetime.now(datetime.timezone.utc)


@zope.interface.implementer(gocept.amqprun.interfaces.IOutbox)
class Outbox:
    """The inbox and outbox of the handlers of `queues` (None: all).

    session: the SQLAlchemy session the handlers use, or a callable
        returning it (a ``scoped_session``), registered with
        zope.sqlalchemy.
    retention: seconds a record is kept (default 7 days).
    create: create the tables (if missing) when the server starts.
    prune_interval: seconds between two deletions of old records.

    Thread-safe: every worker thread calls it.
    """

    def __init__(self, session, queues=None, retention=7 * DAY,
                 create=True, prune_interval=3600):
        if retention <= 0 or prune_interval <= 0:
            raise ValueError('retention and prune_interval must be positive')
        self._session = session
        self.queues = None if queues is None else frozenset(queues)
        self.retention = retention
        self.create = create
        self.prune_interval = prune_interval
        self._lock = threading.Lock()   # for the next two
        self._next_prune = time.monotonic() + prune_interval
        self._without_id = set()

    def __repr__(self):
        queues = 'all queues' if self.queues is None else sorted(self.queues)
        return f'<Outbox {queues}>'

    @property
    def session(self):
        """The SQLAlchemy session of the calling thread."""
        session = self._session
        return session if isinstance(session, sqlalchemy.orm.Session) else session()

    def applies(self, queue, message_id):
        """Whether this outbox covers a message of `queue` with
        `message_id`: its queue is one of `queues` and it has an id
        (whether it was recorded is `recorded`'s question)."""
        if self.queues is not None and queue not in self.queues:
            return False
        if not message_id:
            with self._lock:    # workers call it concurrently
                first = queue not in self._without_id
                self._without_id.add(queue)
            if first:
                log.warning('Messages without message-id in queue %r are '
                            'not recorded in the outbox (handled '
                            'at-least-once).', queue)
            return False
        return True

    def prepare(self):
        """Create the tables if `create` and they are missing (in a
        connection of its own, not in a transaction of the caller)."""
        if not self.create:
            return
        bind = self.session.get_bind()
        engine = getattr(bind, 'engine', bind)
        with engine.begin() as connection:
            metadata.create_all(connection, checkfirst=True)
        log.info('Outbox tables ready (%s).', engine.url.render_as_string(
            hide_password=True))

    def recorded(self, queue, message_id):
        """The messages recorded for the input `message_id` of `queue`,
        in the order they were sent, or None when it was not handled.
        Reads in the calling thread's transaction."""
        session = self.session
        found = session.connection().execute(
            IS_RECORDED, dict(queue=queue, message_id=message_id)).first()
        if found is None:
            return None
        rows = session.execute(
            sa.select(outbox).where(
                outbox.c.queue == queue, outbox.c.message_id == message_id)
            .order_by(outbox.c.position)).all()
        result = []
        for row in rows:
            message = gocept.amqprun.message.Message(
                gocept.amqprun.properties.decode(row.properties), row.body,
                routing_key=row.routing_key)
            message.exchange = row.exchange
            result.append(message)
        return result

    def record(self, queue, message_id, messages):
        """Record the input `message_id` of `queue` as handled, with the
        `messages` its transaction sends, in the calling thread's
        transaction (call it right before the commit: the messages must
        have their message-ids)."""
        session = self.session
        connection = session.connection()
        handled_at = now()
        connection.execute(RECORD_INPUT, dict(
            queue=queue, message_id=message_id, handled_at=handled_at))
        if messages:
            connection.execute(RECORD_OUTPUT, [dict(
                queue=queue, message_id=message_id, position=position,
                handled_at=handled_at, exchange=m.exchange,
                routing_key=m.routing_key or '',
                properties=gocept.amqprun.properties.encode(m.header),
                body=m.body) for position, m in enumerate(messages)])
        zope.sqlalchemy.mark_changed(session)

    def prune_due(self):
        """Whether it is time to prune; True for one caller only."""
        with self._lock:
            if time.monotonic() < self._next_prune:
                return False
            self._next_prune = time.monotonic() + self.prune_interval
            return True

    def prune(self, transaction_manager):
        """Delete the records older than `retention` in a transaction of
        their own; return how many inputs were forgotten."""
        cutoff = now() - datetime.timedelta(seconds=self.retention)
        with transaction_manager:
            session = self.session
            session.execute(outbox.delete().where(
                outbox.c.handled_at < cutoff))
            deleted = session.execute(inbox.delete().where(
                inbox.c.handled_at < cutoff)).rowcount
            zope.sqlalchemy.mark_changed(session)
        if deleted:
            log.info('Outbox: forgot %d message(s) handled before %s.',
                     deleted, cutoff.isoformat(timespec='seconds'))
        return deleted


def parse_duration(text):
    """Seconds from ``90``, ``90s``, ``15m``, ``12h`` or ``7d``."""
    text = str(text).strip().lower()
    units = {'s': 1, 'm': 60, 'h': 3600, 'd': DAY}
    factor = units.get(text[-1:], None)
    number = text[:-1] if factor else text
    try:
        value = float(number) * (factor or 1)
    except ValueError:
        raise ValueError(
            f'{text!r} is not a duration (like 90, 90s, 15m, 12h or 7d)'
        ) from None
    if value <= 0:
        raise ValueError(f'{text!r}: a duration must be positive')
    return value


def ddl(dialect_name='postgresql'):
    """The statements that create the tables (and their indexes) in a
    database of `dialect_name`, for a schema the daemon must not create
    itself: ``python -m gocept.amqprun.outbox postgresql``."""
    dialect = sqlalchemy.dialects.registry.load(dialect_name)()
    statements = []
    for table in metadata.sorted_tables:
        statements.append(sa.schema.CreateTable(table))
        statements.extend(sa.schema.CreateIndex(i) for i in table.indexes)
    return [f'{str(s.compile(dialect=dialect)).strip()};' for s in statements]


if __name__ == '__main__':   # pragma: no cover
    import sys
    print('\n\n'.join(ddl(*sys.argv[1:2])))
