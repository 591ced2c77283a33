"""``python -m gocept.amqprun CONFIG`` runs the daemon like ``server``."""

import gocept.amqprun.main


gocept.amqprun.main.main()
