"""The PostgreSQL database of a test run: the environment's, or a private one.

The database comes from the environment variable AMQPRUN_TEST_DATABASE, an
SQLAlchemy URL (default: ``postgresql://postgres@127.0.0.1:5432/test``;
SQLAlchemy 2 reaches ``postgresql://`` through psycopg 3). When nothing
answers there and Debian's PostgreSQL server binaries are installed,
`ensure_database` starts a private cluster on a free port. SQLAlchemy and
psycopg are imported when needed: the rest of gocept.amqprun.testing works
without them.
"""

import contextlib
import os
import pathlib
import pwd
import re
import shutil
import signal
import subprocess
import tempfile

from gocept.amqprun.testing.broker import free_port
from gocept.amqprun.testing.broker import port_open
from gocept.amqprun.testing.broker import unavailable
from gocept.amqprun.testing.wait import wait_for


VARIABLE = 'AMQPRUN_TEST_DATABASE'
DEFAULT_URL = 'postgresql://postgres@127.0.0.1:5432/test'


def environment_database_url():
    """The SQLAlchemy URL (a str) of the database named by the environment
    (AMQPRUN_TEST_DATABASE, else `DEFAULT_URL`)."""
    return os.environ.get(VARIABLE) or DEFAULT_URL


def answers(url, timeout=3):
    """Whether the PostgreSQL database at the SQLAlchemy `url` accepts a
    connection and runs ``SELECT 1``, trying for about `timeout` seconds
    at most. Never raises for an unreachable or refusing server."""
    import psycopg
    import sqlalchemy
    url = sqlalchemy.engine.make_url(url)
    tcp = url.host and not url.host.startswith('/')
    if tcp and not port_open(url.host, url.port or 5432, timeout):
        return False
    conninfo = url.set(drivername='postgresql').render_as_string(
        hide_password=False)
    try:
        with psycopg.connect(conninfo, connect_timeout=timeout) as conn:
            return conn.execute('SELECT 1').fetchone() == (1,)
    except psycopg.Error:
        return False


class PrivateDatabase:
    """A PostgreSQL cluster of its own in a temporary directory.

    It listens on 127.0.0.1:`port` (default: a free one) only, with its
    unix socket in the directory, trust authentication, the superuser
    ``postgres`` and an empty database ``test``; `url` is its SQLAlchemy
    URL, `data` its data directory, `log` the server's log file. It runs
    without fsync: a crash of the machine may lose its data.
    `config` is extra postgresql.conf text (e.g.
    ``max_prepared_transactions = 10`` for two-phase commit).

    Needs Debian's PostgreSQL server binaries (the newest of
    /usr/lib/postgresql/<version>/bin). initdb and postgres refuse to run
    as root: run as root, they run as `user` (default: ``postgres`` if
    that account exists, else ``nobody``), who then owns the directory.
    """

    ROOT = pathlib.Path('/usr/lib/postgresql')
    PROGRAMS = ('initdb', 'postgres')

    def __init__(self, config='', port=None, *, directory=None, user=None):
        self.port = port or free_port()
        self.config = config
        if directory is None:
            directory = tempfile.mkdtemp(prefix='amqprun-postgres-')
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = self.dir / 'data'
        self.log = self.dir / 'postgres.log'
        self.user = user or (self.default_user() if os.geteuid() == 0
                             else None)
        self.bindir = self.bin()
        self.process = None

    @classmethod
    def bin(cls):
        """The bin directory of the newest PostgreSQL version installed
        (a Path), or None."""
        found = [(tuple(map(int, path.name.split('.'))), path / 'bin')
                 for path in cls.ROOT.glob('*')
                 if re.fullmatch(r'\d+(\.\d+)*', path.name)
                 and all((path / 'bin' / p).exists() for p in cls.PROGRAMS)]
        return max(found)[1] if found else None

    @staticmethod
    def default_user():
        """``postgres`` if that account exists, else ``nobody``, or None."""
        names = {account.pw_name for account in pwd.getpwall()}
        return next((n for n in ('postgres', 'nobody') if n in names), None)

    @classmethod
    def available(cls):
        """Whether a private cluster can be started here."""
        return cls.bin() is not None and (
            os.geteuid() != 0 or cls.default_user() is not None)

    @property
    def url(self):
        """The SQLAlchemy URL (a str) of the database ``test``."""
        return self.url_of('test')

    def url_of(self, database):
        """The SQLAlchemy URL (a str) of another database of the cluster."""
        return f'postgresql://postgres@127.0.0.1:{self.port}/{database}'

    @property
    def running(self):
        """Whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def _run_as(self):
        """The keywords of subprocess.Popen for running as `user`."""
        kw = dict(cwd=self.dir, env={
            k: v for k, v in os.environ.items() if not k.startswith('PG')})
        if self.user is not None:
            account = pwd.getpwnam(self.user)
            kw.update(user=account.pw_uid, group=account.pw_gid,
                      extra_groups=[])
        return kw

    def start(self, timeout=60):
        """Create the cluster (the first time), start the server, create
        the database ``test``; return when it answers ``SELECT 1``.

        RuntimeError (naming the log file) if initdb fails or the server
        exits, AssertionError if it does not answer within `timeout`."""
        if self.running:
            return
        if self.user is not None:
            account = pwd.getpwnam(self.user)
            os.chown(self.dir, account.pw_uid, account.pw_gid)
        created = not self.data.exists()
        if created:
            self.initdb(timeout)
        with open(self.log, 'ab') as log:
            self.process = subprocess.Popen(
                [str(self.bindir / 'postgres'), '-D', str(self.data)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, **self._run_as())
        wait_for(lambda: not self.running or answers(
                     self.url_of('postgres'), timeout=1),
                 timeout=timeout, interval=0.05,
                 message=f'private PostgreSQL did not answer within '
                         f'{timeout} s; see {self.log}')
        if not self.running:
            self.process = None
            raise RuntimeError(f'private PostgreSQL exited; see {self.log}')
        if created:
            import psycopg
            with psycopg.connect(self.url_of('postgres'),
                                 autocommit=True) as conn:
                conn.execute('CREATE DATABASE test')

    def initdb(self, timeout):
        command = [str(self.bindir / 'initdb'), '-D', str(self.data),
                   '-U', 'postgres', '-A', 'trust', '-E', 'UTF8',
                   '--no-locale', '--no-sync']
        with open(self.log, 'ab') as log:
            try:
                result = subprocess.run(
                    command, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, timeout=timeout,
                    **self._run_as())
            except subprocess.TimeoutExpired:
                raise RuntimeError(f'initdb took more than {timeout} s; '
                                   f'see {self.log}') from None
        if result.returncode:
            raise RuntimeError(
                f'initdb failed ({result.returncode}); see {self.log}')
        with open(self.data / 'postgresql.conf', 'a') as conf:
            conf.write(
                "\nlisten_addresses = '127.0.0.1'\n"
                f'port = {self.port}\n'
                f"unix_socket_directories = '{self.dir}'\n"
                'fsync = off\n'
                'synchronous_commit = off\n'
                'full_page_writes = off\n' + self.config + '\n')

    def stop(self, timeout=30):
        """Stop the server: fast shutdown (SIGINT, ending open sessions),
        immediate shutdown (SIGQUIT) after `timeout` seconds, SIGKILL of
        its process group after as many again. Returns when it is gone."""
        if self.process is None:
            return
        for sig in (signal.SIGINT, signal.SIGQUIT):
            if self.process.poll() is None:
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                pass
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def cleanup(self):
        """Stop the server and remove the directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


_database = None
_saved = None


def ensure_database():
    """The SQLAlchemy URL of a reachable database: the environment's (see
    `environment_database_url`) if it answers, else the one of a private cluster,
    started on the first call (it then becomes AMQPRUN_TEST_DATABASE
    until `stop_private_database`). Skips the test if there is neither."""
    global _database, _saved
    if _database is not None:
        return _database.url
    url = environment_database_url()
    if answers(url):
        return url
    if not PrivateDatabase.available():
        unavailable(f'no PostgreSQL answers at {url} and no PostgreSQL '
                    'server binaries (Debian: postgresql) to start one')
    database = PrivateDatabase()
    try:
        database.start()
    except BaseException:
        database.stop()  # keeps the directory and its log
        raise
    _database, _saved = database, os.environ.get(VARIABLE)
    os.environ[VARIABLE] = database.url
    return database.url


def stop_private_database():
    """Stop and remove the cluster `ensure_database` started, if any, and
    restore AMQPRUN_TEST_DATABASE."""
    global _database
    if _database is None:
        return
    _database.cleanup()
    _database = None
    if _saved is None:
        os.environ.pop(VARIABLE, None)
    else:
        os.environ[VARIABLE] = _saved
