# The fixtures of gocept.amqprun.testing serve the project's own tests.
pytest_plugins = ['gocept.amqprun.testing']
