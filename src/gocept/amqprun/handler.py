"""Handlers: functions bound to a queue and its routing keys."""

import zope.interface
import gocept.amqprun.interfaces


@zope.interface.implementer(gocept.amqprun.interfaces.IHandler)
class Handler:
    """An IHandler calling `handler_function` with each message."""

    def __init__(self, queue_name, routing_key, handler_function,
                 arguments=None, principal=None):
        if not callable(handler_function):
            raise TypeError(
                f'handler_function is not callable: {handler_function!r}')
        self.queue_name = queue_name
        self.routing_key = routing_key
        self.handler_function = handler_function
        self.arguments = arguments
        self.principal = principal

    @property
    def routing_keys(self):
        """The routing keys as a list."""
        return routing_keys(self)

    def __call__(self, message):
        return self.handler_function(message)

    def __repr__(self):
        return (f'<Handler {self.queue_name!r} '
                f'routing_key={self.routing_key!r}>')


def routing_keys(handler):
    """The routing keys of any IHandler as a list (its `routing_key` is a
    string or a list)."""
    keys = handler.routing_key
    return [keys] if isinstance(keys, str) else list(keys)


def declare(queue_name, routing_key, arguments=None, principal=None):
    """Decorator: turn a function into a Handler for `queue_name`, bound
    to `routing_key` (a string or a list) on ``amq.topic``."""
    def decorate(handler_function):
        return Handler(queue_name, routing_key, handler_function,
                       arguments=arguments, principal=principal)
    return decorate
