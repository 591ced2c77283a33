"""Declaring queues and their bindings, one queue at a time.

The broker answers a declaration it refuses (other arguments than an
existing queue's, a classic queue whose home node is down) by closing the
channel. A `Declaration` then notes the queue as refused, opens a new
channel and goes on with the next queue, so that one refused queue does
not keep the others from being declared (and consumed). IO thread only.
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
