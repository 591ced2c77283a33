"""SQL benchmark: the gocept.amqprun daemon writing to PostgreSQL beside
raw psycopg + pika.

Not a test: it prints numbers, it asserts nothing. See README.txt.

Every variant gets echo.py's workload, with message-ids: N persistent
messages of SIZE bytes pre-published to a fresh durable queue; a consumer
INSERTs one row per message (its message-id and body) into a fresh table,
commits that, then publishes one reply (to a fresh output queue), ACKs the
request and commits the channel's transaction. The clock runs from
"consuming" until the output queue holds N replies. Afterwards the table
must hold N rows (and the inbox and outbox N records of the queue, for
the outbox variants); a run that lost or doubled rows says so.

Variants (interleaved, ROUNDS times; medians are printed):

  daemon-sql     `python -m gocept.amqprun server.conf`, K workers, a
                 handler inserting through a zope.sqlalchemy-registered
                 scoped_session (Core insert + mark_changed)
  daemon-outbox  the same with `<amqp:outbox session=... />`: inbox and
                 outbox records in the handler's transaction
  raw-sql        K threads, each with a pika connection and a psycopg 3
                 connection: INSERT, COMMIT, publish + ack + tx_commit
  raw-sql-outbox the same, also checking and writing the inbox and
                 writing the outbox row in the same database transaction
  raw-orm        what a user would write without the daemon: K threads,
                 each with a pika connection, a SQLAlchemy ORM session per
                 message (a mapped class, session.add, session.commit()),
                 then publish + ack + tx_commit

This file owns the variants, the database side of a run (tables, counts,
clean-up) and the report's ratios; the daemon is daemon.py's, the raw
consumers are rawsql.py's (on raw.py's), measuring and the table are
measure.py's, the queues workload.py's.
"""

import argparse
import contextlib
import sys
import uuid

import psycopg
import sqlalchemy as sa

import gocept.amqprun.outbox
from daemon import Daemon, variant_settings
from measure import (
    add_common_options, chosen, environment, header, measure, meter, ratios,
    rounds, table)
from procstat import cpu_seconds, find_broker_pid, find_listener_pid, load
from procstat import tree_cpu_seconds
from raw import Raw
from rawsql import raw_sql
from workload import TAGS, Workload


VARIANTS = ('daemon-sql', 'daemon-outbox', 'raw-sql', 'raw-sql-outbox',
            'raw-orm')

# The daemon's handler module (see daemon.HANDLER): its engine, table and
# session; then what the handler does before returning its reply.
SETUP = """\
import sqlalchemy as sa
import sqlalchemy.orm
import zope.sqlalchemy

engine = sa.create_engine({url!r}, pool_size={workers})
rows = sa.Table({table!r}, sa.MetaData(), sa.Column('message_id', sa.Text),
                sa.Column('body', sa.LargeBinary))
Session = sqlalchemy.orm.scoped_session(
    sqlalchemy.orm.sessionmaker(bind=engine))
zope.sqlalchemy.register(Session)
"""

WORK = """\
    session = Session()
    session.execute(rows.insert().values(
        message_id=message.header.message_id, body=message.body))
    zope.sqlalchemy.mark_changed(session)
"""

# The target: the daemon beside the hand-written ORM consumer.
TARGETS = {('daemon-sql', 'raw-orm'): 0.9}

OUTBOX_ZCML = '  <amqp:outbox session="{module}.Session" />\n'


class Database:
    """The benchmark's side of PostgreSQL at `url`: a fresh table per
    run, the counts that verify it, and the clean-up. Each step uses a
    short connection of its own (none is open while a run is measured)."""

    def __init__(self, url):
        parsed = sa.engine.make_url(url)
        # SQLAlchemy's spelling (psycopg 3) for the daemon, libpq's for
        # psycopg itself.
        self.sa_url, self.url = (
            parsed.set(drivername=driver).render_as_string(
                hide_password=False)
            for driver in ('postgresql+psycopg', 'postgresql'))
        self.host, self.port = parsed.host, parsed.port or 5432
        self.tables = []

    def connect(self):
        # DROP TABLE must not wait forever for a stuck consumer's lock.
        return psycopg.connect(self.url, autocommit=True,
                               options='-c lock_timeout=10000')

    def postmaster(self):
        """The pid of the PostgreSQL server if it runs on this machine
        and /proc lets us read it, else None."""
        if self.host not in (None, '', 'localhost', '127.0.0.1', '::1'):
            return None
        pid = find_listener_pid(self.port, 'postgres')
        return pid if pid and tree_cpu_seconds(pid) is not None else None

    def create(self, outbox=False):
        """A fresh table for one run (and the outbox's tables if
        missing); returns its name."""
        name = f'bench_{uuid.uuid4().hex[:10]}'
        self.tables.append(name)
        with self.connect() as connection:
            connection.execute(
                f'CREATE TABLE {name} (id bigserial PRIMARY KEY, '
                'message_id text NOT NULL, body bytea NOT NULL)')
        if outbox:
            engine = sa.create_engine(self.sa_url)
            with engine.begin() as connection:
                gocept.amqprun.outbox.metadata.create_all(connection)
            engine.dispose()
        return name

    def counts(self, name, queue):
        """(rows, distinct message-ids) of table `name`, and the inbox and
        outbox records of `queue` (None where there is no such table)."""
        with self.connect() as connection:
            rows, ids = connection.execute(
                f'SELECT count(*), count(DISTINCT message_id) FROM {name}'
            ).fetchone()
            boxes = existing_boxes(connection)
            inbox, outbox = (connection.execute(
                f'SELECT count(*) FROM {box} WHERE queue = %s',
                (queue,)).fetchone()[0] if box in boxes else None
                for box in BOXES)
        return rows, ids, inbox, outbox

    def drop(self):
        """Drop the tables created so far and delete the inbox and
        outbox records of this run's queues."""
        with self.connect() as connection:
            for name in list(self.tables):
                connection.execute(f'DROP TABLE IF EXISTS {name}')
                self.tables.remove(name)
            for box in existing_boxes(connection):
                connection.execute(
                    f'DELETE FROM {box} WHERE queue LIKE ANY(%s)',
                    ([f'bench.{tag}.%' for tag in TAGS],))


BOXES = ('amqprun_inbox', 'amqprun_outbox')


def existing_boxes(connection):
    """Those of the outbox's tables (BOXES) that exist."""
    return [box for box in BOXES if connection.execute(
        'SELECT to_regclass(%s)', (box,)).fetchone()[0]]


def verify(database, name, workload, outbox):
    """The run's row counts, and a note if they are not N each."""
    rows, ids, inbox, outbox_rows = database.counts(name, workload.input)
    n = workload.count
    wrong = []
    if rows != n or ids != n:
        wrong.append(f'{rows} rows ({ids} message-ids)')
    if outbox and (inbox, outbox_rows) != (n, n):
        wrong.append(f'{inbox} inbox, {outbox_rows} outbox records')
    if not outbox and inbox:
        wrong.append(f'{inbox} inbox records without an outbox')
    note = f'WRONG: {", ".join(wrong)} for {n} messages' if wrong else ''
    return dict(rows=rows, note=note)


def run_variant(name, broker, database, args, workdir, meters):
    """One run of variant `name`: workload, table, consumer, counts."""
    base = name.split('/')[0]
    outbox = base.endswith('outbox') or base.endswith('outbox-baseline')
    workload = Workload(broker, args.messages, args.size, message_ids=True,
                        queue_type=args.queue_type)
    consumer = None
    try:
        table_name = database.create(outbox)
        if name.startswith('daemon'):
            consumer = Daemon(
                workload, args, workdir,
                setup=SETUP.format(url=database.sa_url, table=table_name,
                                   workers=args.workers),
                work=WORK, zcml=OUTBOX_ZCML if outbox else '',
                baseline=base.endswith('-baseline'),
                settings=variant_settings(name))
            wait_ready = Daemon.wait_started
        elif name == 'raw-orm':
            consumer = raw_sql(workload, args, database.sa_url, table_name,
                               'orm')
            wait_ready = Raw.wait_ready
        else:
            consumer = raw_sql(workload, args, database.url, table_name,
                               'outbox' if outbox else 'sql')
            wait_ready = Raw.wait_ready
        result = measure(consumer, workload, meters, wait_ready)
        result.update(verify(database, table_name, workload, outbox))
        return result
    finally:
        process = getattr(consumer, 'process', None)
        if process is not None and process.poll() is None:
            with contextlib.suppress(Exception):
                consumer.stop(timeout=30)
            if process.poll() is None:
                process.kill()
                process.wait()
        workload.delete()
        database.drop()


def report(results, args):
    def rows(runs):
        return 'ok' if not any(r['note'] for r in runs) else 'WRONG'

    med = table(results, args, extra=[('rows', 7, rows)])
    for name, runs in results.items():
        for round_, r in enumerate(runs):
            if r['note']:
                print(f'{name} round {round_ + 1}: {r["note"]}')
    print()
    ratios(med, [('daemon-sql', 'raw-orm'),
                 ('daemon-sql', 'raw-sql'),
                 ('daemon-outbox', 'raw-sql-outbox'),
                 ('daemon-outbox', 'raw-sql'),
                 ('daemon-outbox', 'daemon-sql'),
                 ('raw-sql-outbox', 'raw-sql'),
                 ('raw-orm', 'raw-sql')], TARGETS)
    daemons = [name for name in med if name.startswith('daemon')]
    if daemons:
        print()
    for name in daemons:
        print(f'{name} start to consuming: {med[name]["start"]:.2f} s; '
              f'to first reply: {med[name]["first_reply"]:.2f} s')


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_options(parser, messages=5000, variants=','.join(VARIANTS))
    parser.add_argument(
        '--database-url', default='postgresql://postgres@127.0.0.1:5432/test',
        help='PostgreSQL (a SQLAlchemy or libpq URL; psycopg 3 is used)')
    args = parser.parse_args(argv)
    variants = chosen(parser, args, VARIANTS)
    database = Database(args.database_url)
    broker_pid = find_broker_pid(args.port)
    pg_pid = database.postmaster()
    header(broker_pid, f'  postgres pid {pg_pid or "unreadable"}')
    meters = {'broker': meter(cpu_seconds, broker_pid),
              'pg': meter(tree_cpu_seconds, pg_pid)}
    with environment(args) as (broker, workdir):
        try:
            results = rounds(variants, args.rounds, lambda name, _: (
                run_variant(name, broker, database, args, workdir, meters)))
            report(results, args)
            print('load average after: %.2f %.2f %.2f' % load())
        finally:
            database.drop()


if __name__ == '__main__':
    main()
