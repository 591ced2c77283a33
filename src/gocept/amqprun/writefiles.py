"""``<amqp:writefiles>``: store each message of a queue as files.

A message becomes a body file and a header file (JSON) in a directory.
The files are durable (written, renamed into place, fsynced with their
directory) when the transaction votes, before the AMQP commit ACKs the
message; a failed AMQP commit removes them again (see `FileDataManager`).
"""

import datetime
import decimal
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import string
import time

import transaction
import transaction.interfaces
import zope.event
import zope.interface

import gocept.amqprun.interfaces
import gocept.amqprun.message


log = logging.getLogger(__name__)

DEFAULT_PATTERN = '${routing_key}-${unique}'
# Leaves room below NAME_MAX (255 bytes) for ".header" in the header name.
MAX_NAME_BYTES = 240

_counter = itertools.count()


def make_unique():
    """A name part unique across threads, processes and restarts: time,
    process id, a per-process counter and random bits."""
    return '{}-{}-{}-{}'.format(
        time.time_ns(), os.getpid(), next(_counter), secrets.token_hex(4))


class PatternError(ValueError):
    """A pattern that cannot produce a safe relative path."""


class Pattern:
    """A string.Template for relative paths below a directory.

    ``{name}`` is accepted for ``${name}``. The pattern itself must yield
    a relative path without empty, ``.`` or ``..`` components (checked
    here); variable values are neutralised by `path`, so no value can
    leave the directory. `extension` is the literal extension the pattern
    ends with (``.xml`` of ``${unique}.xml``), or ``''``.
    """

    _braces = re.compile(r'(?<!\$)\{([_a-zA-Z][_a-zA-Z0-9]*)\}')

    def __init__(self, text):
        self.text = text
        self.template = string.Template(self._braces.sub(r'${\1}', text))
        try:
            names = self.template.get_identifiers()
            probe = self.template.substitute({n: 'x' for n in names})
        except (ValueError, KeyError) as e:
            raise PatternError(f'Invalid pattern {text!r}: {e}') from None
        self.names = names
        if probe.startswith('/'):
            raise PatternError(f'Pattern {text!r} is an absolute path.')
        for part in probe.split('/'):
            if part in ('', '.', '..') or '\0' in part:
                raise PatternError(
                    f'Pattern {text!r} has an empty, "." or ".." path '
                    'component or a NUL character.')
        # The literal text after the last variable in the last component.
        marked = self.template.substitute({n: '\0' for n in names})
        tail = marked.rsplit('/', 1)[-1].rsplit('\0', 1)[-1]
        self.extension = os.path.splitext('x' + tail)[1]

    def path(self, variables):
        """The relative path for `variables` (missing ones are empty).

        Slashes and NUL characters in values become ``_``; a resulting
        component that is empty, ``.`` or ``..`` is replaced by
        underscores, an over-long one is shortened.
        """
        values = {name: _clean_value(variables.get(name, ''))
                  for name in self.names}
        path = self.template.substitute(values)
        return '/'.join(_clean_component(part) for part in path.split('/'))

    def header_path(self, body_path):
        """``name.header.ext`` for ``name.ext`` (where ``.ext`` is the
        pattern's `extension`), else ``name.header``."""
        ext = self.extension
        if ext and body_path.endswith(ext):
            return f'{body_path[:-len(ext)]}.header{ext}'
        return f'{body_path}.header'


def _clean_value(value):
    if isinstance(value, bytes):
        value = value.decode('utf-8', 'replace')
    elif not isinstance(value, str):
        value = str(value)
    # Lone surrogates cannot be file names.
    value = value.encode('utf-8', 'replace').decode('utf-8')
    return value.replace('/', '_').replace('\0', '_')


def _clean_component(part):
    if part in ('', '.', '..'):
        return '_' * max(1, len(part))
    encoded = part.encode('utf-8')
    if len(encoded) <= MAX_NAME_BYTES:
        return part
    stem, ext = os.path.splitext(part)
    if len(ext.encode('utf-8')) > 32:
        stem, ext = part, ''
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    room = MAX_NAME_BYTES - len(ext.encode('utf-8')) - len(digest) - 1
    stem = stem.encode('utf-8')[:room].decode('utf-8', 'ignore')
    return f'{stem}~{digest}{ext}'


def variable_name(header):
    """The pattern variable of an application header: lower case, only
    letters, digits and underscores (``X-Filename`` -> ``xfilename``)."""
    return re.sub(r'[^a-z0-9_]', '', header.lower())


def variables(message):
    """The pattern variables of `message` (without ``unique``)."""
    result = {variable_name(k): v for k, v in message.header.headers.items()}
    timestamp = message.header.timestamp
    if isinstance(timestamp, (int, float)):
        timestamp = datetime.datetime.fromtimestamp(timestamp)
    elif not isinstance(timestamp, datetime.datetime):
        timestamp = datetime.datetime.now()
    result.update(
        date=timestamp.strftime('%Y-%m-%d'),
        msgid=message.header.message_id or '',
        routing_key=message.routing_key or '')
    return result


def _json_default(value):
    if isinstance(value, bytes):
        return value.decode('utf-8', 'replace')
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise TypeError(f'Cannot store {type(value).__name__} as JSON')


def header_json(message):
    """The header file's content: every AMQP property (null if unset),
    ``headers`` as a JSON object and the ``routing_key``, UTF-8."""
    data = {name: getattr(message.header, name)
            for name in gocept.amqprun.message.PROPERTY_NAMES}
    data['routing_key'] = message.routing_key
    return json.dumps(data, default=_json_default, indent=2,
                      sort_keys=True).encode('utf-8') + b'\n'


@zope.interface.implementer(gocept.amqprun.interfaces.IHandler)
class FileWriter:
    """The IHandler of ``<amqp:writefiles>``.

    Each message is written below `directory` at the path `pattern`
    gives, when its transaction commits; MessageStored is notified while
    handling (inside the transaction, so subscribers may send messages
    with it or abort it).
    """

    principal = None

    def __init__(self, queue_name, routing_key, directory,
                 pattern=DEFAULT_PATTERN, arguments=None):
        self.queue_name = queue_name
        self.routing_key = list(routing_key)
        self.directory = os.path.abspath(directory)
        self.pattern = Pattern(pattern)
        self.arguments = arguments

    def path(self, message):
        """The absolute path of `message`'s body file (a new one each
        call when the pattern uses ``unique``)."""
        values = variables(message)
        values['unique'] = make_unique()
        return os.path.join(self.directory, self.pattern.path(values))

    def __call__(self, message):
        path = self.path(message)
        transaction.get().join(FileDataManager(
            self.directory, {self.pattern.header_path(path):
                             header_json(message),
                             path: message.body}))
        zope.event.notify(
            gocept.amqprun.interfaces.MessageStored(message, path))
        log.debug('Storing message %s as %s', message.header.message_id,
                  path)

    def __repr__(self):
        return f'<FileWriter {self.queue_name!r} -> {self.directory!r}>'


@zope.interface.implementer(transaction.interfaces.IDataManager)
class FileDataManager:
    """Writes files durably before the AMQP commit ACKs their message.

    files: {absolute path: bytes}, put into place in that order.

    - `commit`: every file is written and fsynced under a hidden
      temporary name beside its target.
    - `tpc_vote`: each is renamed into place and its directory fsynced
      (also the parents of directories created for it): once the vote
      succeeded, the files survive a crash or power loss. This happens
      before the AMQP commit, which comes after all votes (see
      `session`).
    - `tpc_abort` (the AMQP commit failed for certain, or another vote
      did): the temporary files are removed, and so are the files this
      transaction put into place where none was before -- a file that
      was replaced (a redelivered message stored under the same name) is
      left as it is, since the message will be stored again.

    A crash between the vote and the AMQP commit leaves the files and the
    message unACKed: the redelivered message is stored again (at a name
    of its own with ``${unique}``, over the same file with ``${msgid}``).
    """

    def __init__(self, directory, files):
        self.directory = directory
        self.files = files
        self.temporary = {}   # target path -> temporary path
        self.created = []     # targets put into place that did not exist
        self.transaction_manager = transaction.manager

    def abort(self, txn):
        self._remove_temporary()

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        for path, data in self.files.items():
            parent = os.path.dirname(path)
            _makedirs(parent)
            temporary = os.path.join(parent, f'.{make_unique()}.tmp')
            self.temporary[path] = temporary
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)

    def tpc_vote(self, txn):
        directories = set()
        for path, temporary in list(self.temporary.items()):
            existed = os.path.lexists(path)
            os.replace(temporary, path)
            del self.temporary[path]
            if not existed:
                self.created.append(path)
            directories.add(os.path.dirname(path))
        for directory in sorted(directories):
            _fsync_directory(directory)

    def tpc_finish(self, txn):
        self.created = []

    def tpc_abort(self, txn):
        self._remove_temporary()
        directories = set()
        for path in self.created:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.error('Cannot remove %s of a failed commit: %s', path, e)
                continue
            log.info('Removed %s: its message was not ACKed and will be '
                     'stored again.', path)
            directories.add(os.path.dirname(path))
        self.created = []
        for directory in sorted(directories):
            _fsync_directory(directory)

    def _remove_temporary(self):
        for path, temporary in list(self.temporary.items()):
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.error('Cannot remove temporary file %s: %s',
                          temporary, e)
            del self.temporary[path]

    def sortKey(self):
        return f'gocept.amqprun.writefiles:{id(self)}'


def _makedirs(path):
    """Create `path` and missing parents, fsyncing the directory that
    received each new entry (a new directory is durable only then)."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        _makedirs(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    _fsync_directory(parent)


def _fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
