"""``python -m gocept.amqprun CONFIG`` runs the daemon like ``server``;
``python -m gocept.amqprun check CONFIG`` checks a configuration,
``python -m gocept.amqprun parked ACTION ... CONFIG`` works on parked
messages."""

import gocept.amqprun.main


gocept.amqprun.main.main(prog='python -m gocept.amqprun')
