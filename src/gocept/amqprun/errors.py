"""The errors of the AMQP layer, and how to say in a log line why
something failed.

pika's exceptions print poorly (a bare class name, or a tuple); `reason`
turns any of them into a sentence that never contains a password.
"""

import pika.exceptions
import pika.spec
from pika.adapters.utils.connection_workflow import (
    AMQPConnectionWorkflowFailed)


# AMQP reply codes (pika.spec names them all).
CONNECTION_FORCED = pika.spec.CONNECTION_FORCED       # 320
NOT_FOUND = pika.spec.NOT_FOUND                       # 404
PRECONDITION_FAILED = pika.spec.PRECONDITION_FAILED   # 406


class AMQPError(Exception):
    """Base class of the errors of the AMQP layer."""


class ConnectionFailed(AMQPError):
    """The broker cannot be used (unreachable, refused credentials or
    vhost, or a queue it refuses to declare); the process must stop."""


class Refused(ConnectionFailed):
    """The broker refuses what the configuration asks for at start-up:
    the credentials, the virtual host, a queue's arguments (406) or the
    permission to declare it (403). Starting again does not help until the
    configuration or the broker changes: the daemon exits with
    EXIT_CONFIG, which supervisors do not restart on."""


# The reply codes of a refused declaration that stay until somebody
# changes the configuration or the broker: 403 ACCESS_REFUSED, 406
# PRECONDITION_FAILED (other arguments). 404 (a classic queue whose home
# node is down) and 405 (locked by another connection) may pass.
PERMANENT_REFUSALS = (403, 406)


def refusal(why, text):
    """The error for a declaration the broker refused (`why`, the close
    reason): `Refused` when it will not pass by itself, else
    ConnectionFailed; `text` is its message."""
    permanent = getattr(why, 'reply_code', None) in PERMANENT_REFUSALS
    return (Refused if permanent else ConnectionFailed)(text)


class ChannelLost(AMQPError):
    """The channel of a delivery or of a commit went away before the
    commit was confirmed. The broker has rolled the transaction back (and
    requeued the delivery) -- unless the loss happened after the broker
    committed but before it confirmed, which cannot be told apart.

    `refused` is True when the broker closed the channel because of what
    was sent on it (e.g. a publish to an exchange that does not exist);
    `shared` when the commit failed together with others in one
    transaction (a group commit, see `commits`): then it need not have
    been this one's fault.
    """

    def __init__(self, message, refused=False, shared=False):
        super().__init__(message)
        self.refused = refused
        self.shared = shared


class ConnectionUnavailable(AMQPError):
    """No connection to the broker came up within the send timeout."""


class CommitInDoubt(AMQPError):
    """The connection was lost after ``Tx.Commit`` was sent and before
    ``Tx.CommitOk`` arrived: the broker has either committed the whole
    transaction or rolled it back, and nobody can tell which. Not a
    ChannelLost: treating it as a failure would lose what the broker
    committed."""


def root_cause(error):
    """Unwrap pika's connection workflow exceptions down to the error
    that says why (refused, certificate verify failed, ...)."""
    for _ in range(10):
        inner = None
        if isinstance(error, AMQPConnectionWorkflowFailed) \
                and error.exceptions:
            inner = error.exceptions[-1]
        elif isinstance(getattr(error, 'exception', None), BaseException):
            inner = error.exception
        elif isinstance(error, pika.exceptions.AMQPConnectionError) \
                and len(error.args) == 1 \
                and isinstance(error.args[0], BaseException):
            inner = error.args[0]
        if inner is None:
            break
        error = inner
    return error


def reason(error):
    """Why `error` (a pika exception or a close reason) happened, as a
    log-friendly sentence."""
    if isinstance(error, pika.exceptions.ProbableAuthenticationError):
        return ('the broker refused the credentials '
                '(wrong username or password?)')
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError):
        return 'access refused (unknown virtual host or no permission?)'
    if isinstance(error, (pika.exceptions.ChannelClosed,
                          pika.exceptions.ConnectionClosed)):
        return f'{error.reply_code} {error.reply_text}'
    cause = root_cause(error)
    if cause is not error:
        return reason(cause)
    name = error.__class__.__name__
    text = str(error) or repr(error)
    return text if text.startswith(name) else f'{name}: {text}'


def closed_by_broker(why):
    """Whether the broker closed a channel (because of what was sent on
    it, or a consumer timeout) -- not the connection going away."""
    return isinstance(why, pika.exceptions.ChannelClosedByBroker)


def _closed_with(why, code, *words):
    """Whether `why` (a pika close reason) has reply code `code` and
    every one of `words` in its reply text."""
    text = str(getattr(why, 'reply_text', ''))
    return (getattr(why, 'reply_code', None) == code
            and all(word in text for word in words))


def timed_out(why):
    """Whether the broker closed a channel because a delivery was not
    acknowledged within its consumer timeout."""
    return _closed_with(why, PRECONDITION_FAILED, 'acknowledgement',
                        'timed out')


def queue_deleted(why):
    """Whether the broker closed a channel because a queue it used does
    not exist (any more): 404 "NOT_FOUND - no queue ...". (A durable
    queue whose node is down is another 404: "home node ... is down".)"""
    return _closed_with(why, NOT_FOUND, 'no queue')
