"""An example handler: answers every message on ``example.request`` with
a message on ``example.reply`` that carries the upper-cased body."""

import gocept.amqprun.handler
import gocept.amqprun.message


@gocept.amqprun.handler.declare('example.requests', 'example.request')
def shout(message):
    return [gocept.amqprun.message.Message(
        {'content_type': 'text/plain'}, message.body.upper(),
        routing_key='example.reply')]
