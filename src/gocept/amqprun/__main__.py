"""``python -m gocept.amqprun CONFIG`` runs the daemon like ``server``;
``python -m gocept.amqprun check CONFIG`` checks a configuration."""

import sys

import gocept.amqprun.main


if sys.argv[1:2] == ['check']:
    import gocept.amqprun.check
    sys.exit(gocept.amqprun.check.main(sys.argv[2:]))
gocept.amqprun.main.main()
