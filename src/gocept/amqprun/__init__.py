"""gocept.amqprun: run AMQP consumers configured with ZCML and ZConfig."""
