"""Running a handler as a principal (zope.security interactions)."""

import contextlib
import logging


log = logging.getLogger(__name__)


class Principal:
    """The minimal principal a participation needs."""

    def __init__(self, id):
        self.id = id
        self.title = id
        self.description = ''


class Participation:

    interaction = None

    def __init__(self, principal):
        self.principal = principal


@contextlib.contextmanager
def interaction(principal_id):
    """Run the body inside a zope.security interaction whose participation
    has a principal with id `principal_id`; the interaction ends on exit,
    also on error. Does nothing when `principal_id` is None."""
    if principal_id is None:
        yield
        return
    try:
        import zope.security.management
    except ImportError:  # pragma: no cover
        raise RuntimeError(
            f'A handler runs as principal {principal_id!r}, which needs '
            'zope.security: install gocept.amqprun[security].') from None
    if zope.security.management.queryInteraction() is not None:
        log.warning('Ending an interaction left over in this thread.')
        zope.security.management.endInteraction()
    zope.security.management.newInteraction(
        Participation(Principal(principal_id)))
    try:
        yield
    finally:
        zope.security.management.endInteraction()
