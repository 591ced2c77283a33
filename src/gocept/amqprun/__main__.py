"""``python -m gocept.amqprun CONFIG`` runs the daemon like ``server``;
``python -m gocept.amqprun check CONFIG`` checks a configuration."""

import gocept.amqprun.main


gocept.amqprun.main.main(prog='python -m gocept.amqprun')
