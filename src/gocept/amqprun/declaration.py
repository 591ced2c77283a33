"""Declaring queues and their bindings, one queue at a time.

The broker answers a declaration it refuses (other arguments than an
existing queue's, a classic queue whose home node is down) by closing the
channel. A `Declaration` then notes the queue as refused, opens a new
channel and goes on with the next queue, so that one refused queue does
not keep the others from being declared (and consumed). A connection's
`Topology` declares its queues on each new connection and, after
start-up, the refused ones again with backoff. IO thread only.
"""

import functools
import logging

from gocept.amqprun.errors import reason
from gocept.amqprun.errors import refusal


log = logging.getLogger(__name__)


class Declaration:
    """Declare `queues` (`topology.Queue`), each durable and bound to
    amq.topic with its routing keys, on channels from `open_channel`
    (a function taking the on-open callback); then call
    `on_done(declared, refused)` -- the declared queues in order, and
    {queue: error} for the refused ones (`errors.refusal`: its message
    says why). Nothing is called when the connection goes meanwhile
    (`cancel` stops it explicitly)."""

    def __init__(self, open_channel, queues, on_done):
        self.open_channel = open_channel
        self.queues = list(queues)
        self.on_done = on_done
        self.declared = []
        self.refused = {}
        self._steps = []
        self._current = None
        self._channel = None
        self._cancelled = False

    def start(self):
        self._next_channel()

    def cancel(self):
        self._cancelled = True

    def _next_channel(self):
        if self._cancelled:
            return
        if not self.queues and not self._steps:
            self._finish()
            return
        self.open_channel(self._on_channel)

    def _on_channel(self, channel):
        if self._cancelled:
            channel.close()
            return
        self._channel = channel
        channel.add_on_close_callback(self._on_close)
        self._next_step()

    def _steps_of(self, queue, channel):
        steps = [(f'declaring queue {queue.name!r} with arguments '
                  f'{queue.arguments!r}', functools.partial(
                      channel.queue_declare, queue.name, durable=True,
                      arguments=queue.arguments))]
        for key in queue.routing_keys:
            steps.append((f'binding queue {queue.name!r} to {key!r}',
                          functools.partial(channel.queue_bind, queue.name,
                                            'amq.topic', routing_key=key)))
        steps.append((None, functools.partial(self._declared_one, queue)))
        return steps

    def _declared_one(self, queue, callback):
        self.declared.append(queue)
        callback()

    def _next_step(self, frame=None):
        if self._cancelled:
            return
        if not self._steps:
            if not self.queues:
                self._current = None
                self._channel.close()
                self._finish()
                return
            self._queue = self.queues.pop(0)
            self._steps = self._steps_of(self._queue, self._channel)
        self._current, step = self._steps.pop(0)
        step(callback=self._next_step)

    def _on_close(self, channel, why):
        if self._current is None or self._cancelled:
            return      # closed by us, after the last step
        if not getattr(channel.connection, 'is_open', False):
            return      # the connection went: nothing to report
        self.refused[self._queue] = refusal(
            why, f'The broker refused {self._current}: {reason(why)}')
        self._steps = []
        self._current = None
        self._next_channel()

    def _finish(self):
        if not self._cancelled:
            self._cancelled = True
            self.on_done(self.declared, self.refused)


class Topology:
    """The queues of a connection, declared on each new connection.

    A refusal at start-up is a configuration error: `on_fatal(error)`
    (the `errors.refusal` of the first refused queue).
    Later (a cluster node down) the refused queues are declared again
    after `backoff(attempt)` seconds (`call_later(delay, function)`) while
    the others are consumed. `on_declared(added, first)` gets the queues
    declared by each round (`first`: the first round on this connection).
    """

    def __init__(self, queues, open_channel, call_later, backoff,
                 on_declared, on_fatal):
        self.queues = list(queues)
        self.open_channel = open_channel
        self.call_later = call_later
        self.backoff = backoff
        self.on_declared = on_declared
        self.on_fatal = on_fatal
        self.missing = set()     # queues the broker refused to declare
        self._attempts = 0
        self._ever_declared = False
        self._declaration = None
        self._connected = False
        self._first = True

    @property
    def available(self):
        """The queues declared on the current connection."""
        return [q for q in self.queues if q not in self.missing]

    def start(self):
        """A new connection is open: declare every queue."""
        self._connected = True
        self._first = True
        self._declare(self.queues)

    def cancel(self):
        """The connection is gone."""
        self._connected = False
        if self._declaration is not None:
            self._declaration.cancel()
            self._declaration = None

    def _declare(self, queues):
        self._declaration = Declaration(
            self.open_channel, queues, self._declared)
        self._declaration.start()

    def _declared(self, declared, refused):
        self._declaration = None
        if refused and not self._ever_declared:
            self.on_fatal(next(iter(refused.values())))
            return
        self._ever_declared = True
        self.missing = set(refused)
        if refused:
            self._attempts += 1
            delay = self.backoff(self._attempts)
            for why in refused.values():
                log.error('%s; consuming the other queues, trying again in '
                          '%.1f s', why, delay)
            self.call_later(delay, self._declare_missing)
        else:
            self._attempts = 0
        first, self._first = self._first, False
        self.on_declared(declared, first)

    def _declare_missing(self):
        if self._connected and self.missing and self._declaration is None:
            self._declare([q for q in self.queues if q in self.missing])
