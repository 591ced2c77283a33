"""The raw consumers of the SQL benchmark: psycopg + pika (raw-sql and
raw-sql-outbox) and SQLAlchemy ORM + pika (raw-orm).

Owns the database work each of their K threads does per message, on a
psycopg 3 connection of its own: INSERT the message's row (message-id,
body) and COMMIT; for raw-sql-outbox also, in the same transaction, what
gocept.amqprun.outbox does -- look the message-id up in amqprun_inbox,
record it there and its reply (properties encoded as AMQP carries them)
in amqprun_outbox. raw-orm does what a user would write without the
daemon: a mapped class, a SQLAlchemy ORM session per message
(``session.add``, ``session.commit()``), one engine whose pool holds K
connections. raw.py's blocking consumer (mode b: K connections in K
threads) does the rest, after the database COMMIT: publish the reply, ACK
the delivery, commit the channel's transaction -- the daemon's order of
commits. `raw_sql` runs this file in a subprocess as raw.Raw runs
raw.py.
"""

import datetime
import pathlib
import sys
import uuid

import psycopg

from raw import Raw, raw_main


SCRIPT = str(pathlib.Path(__file__).resolve())

INSERT_ROW = 'INSERT INTO {table} (message_id, body) VALUES (%s, %s)'
SELECT_INBOX = ('SELECT message_id FROM amqprun_inbox '
                'WHERE queue = %s AND message_id = %s')
INSERT_INBOX = ('INSERT INTO amqprun_inbox (queue, message_id, handled_at) '
                'VALUES (%s, %s, %s)')
INSERT_OUTBOX = (
    'INSERT INTO amqprun_outbox (queue, message_id, position, handled_at, '
    'exchange, routing_key, properties, body) '
    'VALUES (%s, %s, %s, %s, %s, %s, %s, %s)')


def sql_work(url, table, queue, output_key, outbox):
    """raw_main's `work`: a function that opens the thread's database
    connection and returns what it does per message."""
    insert_row = INSERT_ROW.format(table=table)

    def work():
        connection = psycopg.connect(url)

        def handle(properties, body, reply):
            # The daemon gives every message it sends a message-id.
            reply.message_id = f'<{uuid.uuid4().hex}@bench>'
            message_id = properties.message_id
            with connection.cursor() as cursor:
                if outbox:
                    cursor.execute(SELECT_INBOX, (queue, message_id))
                    if cursor.fetchone() is not None:
                        raise RuntimeError(f'{message_id} seen twice')
                cursor.execute(insert_row, (message_id, body))
                if outbox:
                    now = datetime.datetime.now(datetime.timezone.utc)
                    cursor.execute(INSERT_INBOX, (queue, message_id, now))
                    cursor.execute(INSERT_OUTBOX, (
                        queue, message_id, 0, now, 'amq.topic', output_key,
                        b''.join(reply.encode()), body))
            connection.commit()
        return handle
    return work


def orm_work(url, table, connections):
    """raw_main's `work` for raw-orm: `table` at `url` (a SQLAlchemy URL)
    through a mapped class and an ORM session per message."""
    import sqlalchemy as sa
    import sqlalchemy.orm

    engine = sa.create_engine(url, pool_size=connections)

    class Base(sqlalchemy.orm.DeclarativeBase):
        pass

    class Row(Base):
        __tablename__ = table
        id = sqlalchemy.orm.mapped_column(sa.BigInteger, primary_key=True)
        message_id = sqlalchemy.orm.mapped_column(sa.Text, nullable=False)
        body = sqlalchemy.orm.mapped_column(sa.LargeBinary, nullable=False)

    Session = sqlalchemy.orm.sessionmaker(engine)

    def work():
        def handle(properties, body, reply):
            reply.message_id = f'<{uuid.uuid4().hex}@bench>'
            with Session() as session:
                session.add(Row(message_id=properties.message_id,
                                body=body))
                session.commit()
        return handle
    return work


def raw_sql(workload, args, url, table, mode='sql'):
    """raw-sql (`mode` sql), raw-sql-outbox (outbox) or raw-orm (orm) for
    `workload`: a raw.Raw consumer with K (`args.workers`) connections
    writing to `table` at `url` (a libpq URL; for orm a SQLAlchemy
    one)."""
    return Raw(mode, workload, args, args.workers, script=SCRIPT,
               extra=[url, table])


def main(argv):
    """`rawsql.py sql|outbox|orm HOST PORT INPUT OUTPUT_KEY COUNT
    CONNECTIONS PREFETCH URL TABLE`: raw.py's mode b with the database
    work."""
    mode, url, table = argv[0], argv[8], argv[9]
    if mode == 'orm':
        work = orm_work(url, table, int(argv[6]))
    else:
        work = sql_work(url, table, argv[3], argv[4],
                        outbox=mode == 'outbox')
    raw_main(['b'] + argv[1:8], work=work)


if __name__ == '__main__':
    main(sys.argv[1:])
