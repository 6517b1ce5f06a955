"""The AMP contract between pixelated-manager, pixelated-proxy and pixelated-ctl.

Every command lists every error it can raise. AMP answers an undeclared
exception by closing the whole connection, which would fail every other call
in flight, so the manager translates anything unexpected into
:class:`InternalError` (see ``manager/amp_server.py``).

Error codes are stable names: ctl and the proxy map them to messages, and
later versions only add new ones.
"""
import attr
from twisted.protocols import amp


@attr.s(frozen=True, auto_attribs=True)
class AgentAddress:
    """Where an agent serves HTTP; always chosen by the manager or the engine."""
    host: str
    port: int


class DispatcherError(Exception):
    """Base of every error that travels over the manager socket."""


class InternalError(DispatcherError):
    """Something unexpected went wrong in the manager; its log has the details."""


class PermissionDenied(DispatcherError):
    """The caller's Unix credentials do not allow this command."""


class InvalidUsername(DispatcherError):
    """The user name breaks the user name rule."""


class UserExists(DispatcherError):
    """A user of that name exists already."""


class UnknownUser(DispatcherError):
    """No user of that name."""


class InvalidCredentials(DispatcherError):
    """Wrong user name or password (deliberately not saying which)."""


class InvalidSession(DispatcherError):
    """The session token is unknown, expired or revoked."""


class AgentNotRunning(DispatcherError):
    """The user's agent is not running."""


class AgentStartFailed(DispatcherError):
    """The user's agent could not be started; the message says why."""


COMMON_ERRORS = {
    InternalError: b"INTERNAL_ERROR",
    PermissionDenied: b"PERMISSION_DENIED",
}


def _errors(*extra):
    errors = dict(COMMON_ERRORS)
    codes = {
        InvalidUsername: b"INVALID_USERNAME",
        UserExists: b"USER_EXISTS",
        UnknownUser: b"UNKNOWN_USER",
        InvalidCredentials: b"INVALID_CREDENTIALS",
        InvalidSession: b"INVALID_SESSION",
        AgentNotRunning: b"AGENT_NOT_RUNNING",
        AgentStartFailed: b"AGENT_START_FAILED",
    }
    for error in extra:
        errors[error] = codes[error]
    return errors


# --- proxy commands ----------------------------------------------------------

class Authenticate(amp.Command):
    """Check a password and open a session; returns an opaque session token."""
    arguments = [(b"username", amp.Unicode()),
                 (b"password", amp.Unicode()),
                 (b"client", amp.Unicode())]
    response = [(b"token", amp.Unicode())]
    errors = _errors(InvalidCredentials)


class ResolveSession(amp.Command):
    """Map a session token to its user name."""
    arguments = [(b"token", amp.Unicode())]
    response = [(b"username", amp.Unicode())]
    errors = _errors(InvalidSession)


class EndSession(amp.Command):
    """Log out: revoke the session and stop the user's agent."""
    arguments = [(b"token", amp.Unicode())]
    response = [(b"username", amp.Unicode())]
    errors = _errors(InvalidSession)


class EnsureAgent(amp.Command):
    """Start the user's agent unless it runs; answer once it serves HTTP."""
    arguments = [(b"username", amp.Unicode())]
    response = [(b"host", amp.Unicode()), (b"port", amp.Integer())]
    errors = _errors(InvalidUsername, UnknownUser, AgentStartFailed)


class LocateAgent(amp.Command):
    """The address of the user's running agent, without starting it."""
    arguments = [(b"username", amp.Unicode())]
    response = [(b"host", amp.Unicode()), (b"port", amp.Integer())]
    errors = _errors(InvalidUsername, UnknownUser, AgentNotRunning)


# --- administration (pixelated-ctl) ------------------------------------------

class AddUser(amp.Command):
    arguments = [(b"username", amp.Unicode()), (b"password", amp.Unicode())]
    response = []
    errors = _errors(InvalidUsername, UserExists)


class RemoveUser(amp.Command):
    """Remove a user, stopping their agent and ending their sessions."""
    arguments = [(b"username", amp.Unicode())]
    response = []
    errors = _errors(InvalidUsername, UnknownUser)


class ListUsers(amp.Command):
    """Every user with the state of their agent."""
    arguments = []
    response = [(b"users", amp.AmpList([(b"username", amp.Unicode()),
                                        (b"state", amp.Unicode())]))]
    errors = _errors()


class StartAgent(amp.Command):
    arguments = [(b"username", amp.Unicode())]
    response = [(b"host", amp.Unicode()), (b"port", amp.Integer())]
    errors = _errors(InvalidUsername, UnknownUser, AgentStartFailed)


class StopAgent(amp.Command):
    arguments = [(b"username", amp.Unicode())]
    response = []
    errors = _errors(InvalidUsername, UnknownUser, AgentNotRunning)


class AgentInfo(amp.Command):
    """State of one user's agent: state, address (empty when stopped), pid."""
    arguments = [(b"username", amp.Unicode())]
    response = [(b"username", amp.Unicode()),
                (b"state", amp.Unicode()),
                (b"host", amp.Unicode()),
                (b"port", amp.Integer()),
                (b"pid", amp.Integer()),
                (b"started", amp.Float())]
    errors = _errors(InvalidUsername, UnknownUser)


PROXY_COMMANDS = (Authenticate, ResolveSession, EndSession, EnsureAgent, LocateAgent)
ADMIN_COMMANDS = (AddUser, RemoveUser, ListUsers, StartAgent, StopAgent, AgentInfo)
