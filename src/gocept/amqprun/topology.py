"""What the daemon declares on the broker: queues and their bindings."""

import gocept.amqprun.handler


class Queue:
    """A queue to declare (durable), bind to amq.topic with each routing
    key and, if `consume`, consume from.

    prefetch: unacked deliveries of its consumers (None: the
        connection's).
    single: consumed by one consumer slot only (the first).
    handler_queue: the queue whose handler handles its messages (default:
        its own name).
    """

    def __init__(self, name, routing_keys=(), arguments=None, consume=True,
                 prefetch=None, single=False, handler_queue=None):
        self.name = name
        self.routing_keys = list(routing_keys)
        self.arguments = dict(arguments) if arguments else None
        self.consume = consume
        self.prefetch = prefetch
        self.single = single
        self.handler_queue = handler_queue or name

    def __repr__(self):
        return f'<Queue {self.name!r} {self.routing_keys!r}>'

    def _key(self):
        return (self.name, self.routing_keys, self.arguments, self.consume,
                self.prefetch, self.single, self.handler_queue)

    def __eq__(self, other):
        if not isinstance(other, Queue):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self.name)


def queues_for(handlers, retry_policy):
    """The queues for `handlers` (IHandler objects): each handler's queue
    and, next to it, the auxiliary queues of `retry_policy`, in order."""
    queues = []
    for handler in handlers:
        queue = Queue(
            handler.queue_name, gocept.amqprun.handler.routing_keys(handler),
            handler.arguments)
        queues.append(queue)
        queues.extend(retry_policy.auxiliary_queues(queue))
    return queues


def same_type(arguments):
    """The arguments that give an auxiliary queue the type of a queue with
    `arguments` (quorum queues survive the loss of a node)."""
    queue_type = (arguments or {}).get('x-queue-type')
    return {'x-queue-type': queue_type} if queue_type else {}


def consumption(queues, first):
    """[(prefetch or None, [queues])] a consumer slot consumes, grouped
    by prefetch; `first` says whether it is the first slot (the only one
    consuming `single` queues)."""
    groups = {}
    for queue in queues:
        if queue.consume and (first or not queue.single):
            groups.setdefault(queue.prefetch, []).append(queue)
    return sorted(groups.items(), key=lambda item: item[0] or 0)
