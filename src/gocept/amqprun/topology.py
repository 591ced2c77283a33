"""What the daemon declares on the broker: queues and their bindings."""

import gocept.amqprun.handler


class Queue:
    """A queue to declare (durable), bind to amq.topic with each routing
    key and, if `consume`, consume from."""

    def __init__(self, name, routing_keys=(), arguments=None, consume=True):
        self.name = name
        self.routing_keys = list(routing_keys)
        self.arguments = dict(arguments) if arguments else None
        self.consume = consume

    def __repr__(self):
        return f'<Queue {self.name!r} {self.routing_keys!r}>'

    def __eq__(self, other):
        if not isinstance(other, Queue):
            return NotImplemented
        return (self.name, self.routing_keys, self.arguments,
                self.consume) == (other.name, other.routing_keys,
                                  other.arguments, other.consume)


def queues_for(handlers, retry_policy):
    """The queues for `handlers` (IHandler objects): each handler's queue
    and, next to it, the auxiliary queues of `retry_policy`, in order."""
    queues = []
    for handler in handlers:
        queues.append(Queue(
            handler.queue_name, gocept.amqprun.handler.routing_keys(handler),
            handler.arguments))
        queues.extend(
            Queue(name, arguments=arguments, consume=False)
            for name, arguments in
            retry_policy.auxiliary_queues(handler.queue_name))
    return queues
