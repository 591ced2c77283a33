import pytest

import gocept.amqprun.parameters


Parameters = gocept.amqprun.parameters.Parameters


def test_parameters_defaults_and_string_port():
    params = Parameters(hostname='localhost', port='5673')
    assert params.port == 5673
    assert params.virtual_host == '/'
    assert params.heartbeat_interval == 60
    [pika_params] = params.pika_parameters()
    assert pika_params.port == 5673
    assert pika_params.heartbeat == 60
    assert pika_params.blocked_connection_timeout == 300


def test_parameters_unknown_keyword_is_an_error():
    with pytest.raises(TypeError, match='hostnme'):
        Parameters(hostnme='localhost')


def test_parameters_need_hostname_or_url():
    with pytest.raises(ValueError):
        Parameters()


def test_several_hosts_are_tried_in_order():
    params = Parameters(hostname='a b:5673, c', port=5672)
    assert [(p.host, p.port) for p in params.pika_parameters()] == [
        ('a', 5672), ('b', 5673), ('c', 5672)]
    assert params.describe() == (
        'amqp://guest@a:5672/%2F, amqp://guest@b:5673/%2F, '
        'amqp://guest@c:5672/%2F')


def test_url_parameters_keep_url_options():
    params = Parameters(
        url='amqp://user:secret@host:1234/vhost?heartbeat=7')
    [p] = params.pika_parameters()
    assert (p.host, p.port, p.virtual_host) == ('host', 1234, 'vhost')
    assert p.credentials.username == 'user'
    assert p.heartbeat == 7
    assert 'secret' not in params.describe()
    assert 'secret' not in repr(params)


def test_ssl_uses_tls_port_and_verifies():
    params = Parameters(hostname='broker', ssl=True)
    [p] = params.pika_parameters()
    assert p.port == 5671
    assert p.ssl_options.context.check_hostname
    assert p.ssl_options.server_hostname == 'broker'
    assert params.describe() == 'amqps://guest@broker:5671/%2F'
