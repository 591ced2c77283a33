"""The parked messages over HTTP: what the monitor's /parked routes do.

Each request opens a `parked.Parked` (a BlockingConnection of its own,
in the HTTP request's thread) and closes it again: nothing here touches
the daemon's connection, and nothing stays open between requests. The
methods answer (HTTP status, JSON-able data); the token is checked by
the monitor before a POST gets here.

Reading parked messages is a pass over their queue (`parked`: AMQP
cannot peek), so the status page's listing is reused while the parked
queues' depths have not changed, for up to `LISTING_MAX_AGE` seconds.
"""

import json
import logging
import threading
import time

import pika.exceptions

import gocept.amqprun.errors
import gocept.amqprun.parked
import gocept.amqprun.parkedcli


log = logging.getLogger(__name__)

# Seconds the status page's listing is reused while the parked queues'
# depths stay the same.
LISTING_MAX_AGE = 30.0
# Seconds a request waits for another tool working on a parked queue.
LOCK_TIMEOUT = 10.0


class BadRequest(Exception):
    """The request body cannot be used; the message says why."""


def selection(body):
    """(queue, ids, dry_run) of a replay/drop request body: ``{"queue":
    Q, "ids": [...]}`` or ``{"queue": Q, "all": true}``; ids None means
    all of the queue. Raises BadRequest."""
    try:
        request = json.loads(body.decode('utf-8') or 'null')
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f'the body is not JSON: {e}') from None
    if not isinstance(request, dict):
        raise BadRequest('expected a JSON object: {"queue": Q, "ids": '
                         '[...]} or {"queue": Q, "all": true}')
    unknown = set(request) - {'queue', 'ids', 'all', 'dry_run'}
    if unknown:
        raise BadRequest(f'unknown key(s): {", ".join(sorted(unknown))}')
    queue = request.get('queue')
    if not isinstance(queue, str) or not queue:
        raise BadRequest('"queue" (the handler queue) is required')
    ids, everything = request.get('ids'), request.get('all', False)
    if everything is not True and everything is not False:
        raise BadRequest('"all" must be true or false')
    if everything == (ids is not None):
        raise BadRequest('give either "ids" (a list) or "all": true')
    if ids is not None and (
            not isinstance(ids, list) or not ids
            or not all(isinstance(i, str) and i for i in ids)):
        raise BadRequest('"ids" must be a non-empty list of message ids')
    dry_run = request.get('dry_run', False)
    if dry_run is not True and dry_run is not False:
        raise BadRequest('"dry_run" must be true or false')
    return queue, ids, dry_run


def _error(status, text, **more):
    return status, dict(error=text, **more)


class ParkedHTTP:
    """The /parked routes of a monitor for `server` (a `server.Server`);
    `depths` (a `depths.QueueDepths` or None) tells when the status
    page's listing is out of date."""

    def __init__(self, server, depths=None):
        self.server = server
        self.depths = depths
        self._lock = threading.Lock()
        # (time, parked depths, messages) of the status page's listing
        self._listing = None

    def _open(self):
        return gocept.amqprun.parked.Parked(
            self.server.parameters, sorted(self.server.handlers),
            lock_timeout=LOCK_TIMEOUT)

    def _unavailable(self, queue=None):
        """(status, error) when there is nothing to work on, else None."""
        why = gocept.amqprun.parkedcli.no_parked_queues(
            self.server.retry_policy)
        if why:
            return _error(404, f'this daemon parks no messages in queues: '
                          f'{why}')
        if queue is not None and queue not in self.server.handlers:
            return _error(404, f'{queue!r} is not a handler queue of this '
                          'daemon', queues=sorted(self.server.handlers))
        return None

    def _call(self, action):
        """(status, data) of `action(parked)`, with the errors of the
        broker and of unknown ids answered."""
        parked_module = gocept.amqprun.parked
        try:
            with self._open() as parked:
                return action(parked)
        except parked_module.NotParked as e:
            return _error(404, f'{e}; nothing was changed',
                          ids=[str(i) for i in e.ids])
        except (parked_module.Busy, parked_module.TargetMissing) as e:
            return _error(409, str(e))
        except parked_module.Interrupted as e:
            log.warning('Monitor: %s', e)
            return _error(503, str(e), action=e.action,
                          done=[m.as_dict() for m in e.done],
                          in_doubt=e.in_doubt and e.in_doubt.as_dict())
        except (gocept.amqprun.errors.AMQPError,
                pika.exceptions.AMQPError, OSError) as e:
            why = gocept.amqprun.errors.reason(e)
            log.warning('Monitor: the parked messages cannot be read: %s',
                        why)
            return _error(503, f'the broker cannot be asked now: {why}')

    def list(self, query, **kw):
        queue = query.get('queue')
        return self._unavailable(queue) or self._call(
            lambda parked: (200, [m.as_dict() for m in parked.list(queue)]))

    def show(self, id, query, **kw):
        queue = query.get('queue')
        return self._unavailable(queue) or self._call(
            lambda parked: (200, parked.show(id, queue).as_dict()))

    def replay(self, body, client=None, **kw):
        return self._change('replay', body, client)

    def drop(self, body, client=None, **kw):
        return self._change('drop', body, client)

    def _change(self, action, body, client):
        try:
            queue, ids, dry_run = selection(body)
        except BadRequest as e:
            return _error(400, str(e))
        if dry_run and action == 'drop':
            return _error(400, '"dry_run" is for replay only')
        unavailable = self._unavailable(queue)
        if unavailable:
            return unavailable

        def change(parked):
            if action == 'replay':
                done = parked.replay(ids=ids, queue=queue, dry_run=dry_run)
            else:
                done = parked.drop(ids=ids, queue=queue)
            return 200, [m.as_dict() for m in done]
        status, result = self._call(change)
        with self._lock:
            self._listing = None
        if status != 200:
            return status, result
        done = [m['message_id'] for m in result]
        verb = {'replay': 'replayed', 'drop': 'dropped'}[action]
        if dry_run:
            verb = 'would replay'
        else:
            log.info('Monitor: %s %d parked message(s) of queue %r for %s: '
                     '%s', verb, len(done), queue, client or 'a client',
                     ', '.join(map(str, done)) or '-')
        return 200, {verb.replace(' ', '_'): result, 'count': len(done),
                     'message': f'{verb} {len(done)} message(s) of '
                                f'{queue}: {", ".join(map(str, done))}'}

    def listing(self, limit):
        """(the newest `limit` ParkedMessages, how many there are, a
        problem or None) for the status page."""
        if self.server.parameters is None:
            return [], 0, 'Parked messages cannot be listed without a broker.'
        unavailable = self._unavailable()
        if unavailable:
            return [], 0, unavailable[1]['error'][:1].upper() + \
                unavailable[1]['error'][1:] + '.'
        counts = self._parked_counts()
        with self._lock:
            cached = self._listing
            if cached is not None and counts is not None \
                    and cached[1] == counts \
                    and time.monotonic() - cached[0] < LISTING_MAX_AGE:
                messages = cached[2]
            elif counts is not None and not any(counts.values()):
                messages = []   # nothing parked: no pass needed
            else:
                try:
                    with self._open() as parked:
                        messages = parked.list()
                except (gocept.amqprun.errors.AMQPError,
                        pika.exceptions.AMQPError, OSError) as e:
                    return [], 0, ('The parked messages cannot be read '
                                   f'now: {gocept.amqprun.errors.reason(e)}')
                self._listing = (time.monotonic(), counts, messages)
        newest = sorted(
            messages, key=lambda m: m.parked_at.timestamp()
            if m.parked_at else 0.0, reverse=True)
        return newest[:limit], len(messages), None

    def _parked_counts(self):
        """{queue: parked messages} of every handler queue as last polled,
        or None when not known for every one."""
        if self.depths is None:
            return None
        snapshot = self.depths.snapshot()
        counts = {q: getattr(snapshot.get(q), 'parked', None)
                  for q in self.server.handlers}
        return None if None in counts.values() else counts
