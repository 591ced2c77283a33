import gocept.amqprun.security
import pytest
import zope.security.management


def test_interaction_has_principal_and_ends():
    with gocept.amqprun.security.interaction('zope.user'):
        interaction = zope.security.management.getInteraction()
        [participation] = interaction.participations
        assert participation.principal.id == 'zope.user'
    assert zope.security.management.queryInteraction() is None


def test_interaction_ends_on_error():
    with pytest.raises(RuntimeError):
        with gocept.amqprun.security.interaction('zope.user'):
            raise RuntimeError()
    assert zope.security.management.queryInteraction() is None


def test_no_principal_no_interaction():
    with gocept.amqprun.security.interaction(None):
        assert zope.security.management.queryInteraction() is None


def test_leftover_interaction_is_replaced():
    zope.security.management.newInteraction()
    with gocept.amqprun.security.interaction('zope.user'):
        [p] = zope.security.management.getInteraction().participations
        assert p.principal.id == 'zope.user'
    assert zope.security.management.queryInteraction() is None
