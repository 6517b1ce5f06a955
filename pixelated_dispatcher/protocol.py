"""The AMP contract between pixelated-manager, pixelated-proxy and pixelated-ctl.

Every command lists every error it can raise. AMP answers an undeclared
exception by closing the whole connection, which would fail every other call
in flight, so the manager translates anything unexpected into
:class:`InternalError` (see ``manager/amp_server.py``).

Error codes are stable names: ctl and the proxy map them to messages, and
later versions only add new ones.
"""
import hashlib

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


class CapacityReached(DispatcherError):
    """No agent can start now: ``--max-agents`` agents run already."""


class RateLimited(DispatcherError):
    """Too many failed logins for this user name or client address.

    The message ends with "retry after N seconds"; :func:`retry_after`
    reads N back.
    """


def rate_limited(seconds: int) -> RateLimited:
    return RateLimited("too many failed logins; retry after %d seconds" % max(1, seconds))


def retry_after(error: Exception, default: int = 60) -> int:
    """The wait, in seconds, that a RateLimited (or any) error asks for."""
    words = str(error).rsplit(" ", 2)
    if len(words) == 3 and words[2] == "seconds" and words[1].isdigit():
        return int(words[1])
    return default


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
        CapacityReached: b"CAPACITY_REACHED",
        RateLimited: b"RATE_LIMITED",
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
    errors = _errors(InvalidCredentials, RateLimited)


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
    errors = _errors(InvalidUsername, UnknownUser, AgentStartFailed, CapacityReached)


class LocateAgent(amp.Command):
    """The address of the user's running agent, without starting it."""
    arguments = [(b"username", amp.Unicode())]
    response = [(b"host", amp.Unicode()), (b"port", amp.Integer())]
    errors = _errors(InvalidUsername, UnknownUser, AgentNotRunning)


class ReportActivity(amp.Command):
    """These users' agents were used since the last report (for idle culling).

    The proxy batches reports (a few per minute); keep a batch under AMP's
    64 KiB value limit by splitting it (about 1,000 names).
    """
    arguments = [(b"usernames", amp.ListOf(amp.Unicode()))]
    response = []
    errors = _errors()


class Subscribe(amp.Command):
    """Ask the manager to push invalidations (the commands below) on this
    connection, so that the proxy may cache sessions and agent addresses."""
    arguments = []
    response = []
    errors = _errors()


# --- pushed by the manager to subscribed proxies -----------------------------

class SessionEnded(amp.Command):
    """One session ended (logout, expiry). ``token_digest`` is the hex
    SHA-256 of the token, so the raw token never needs to be stored."""
    arguments = [(b"token_digest", amp.Unicode())]
    response = []
    errors = _errors()


class SessionsRevoked(amp.Command):
    """Every session of this user ended (``logout NAME``, ``passwd``, removal)."""
    arguments = [(b"username", amp.Unicode())]
    response = []
    errors = _errors()


class AgentStopped(amp.Command):
    """This user's agent is gone (stopped, culled, crashed): forget its address."""
    arguments = [(b"username", amp.Unicode())]
    response = []
    errors = _errors()


def token_digest(token: str) -> str:
    """The hex SHA-256 of a session token, as :class:`SessionEnded` names it."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


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
    errors = _errors(InvalidUsername, UnknownUser, AgentStartFailed, CapacityReached)


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


PROXY_COMMANDS = (Authenticate, ResolveSession, EndSession, EnsureAgent, LocateAgent,
                  ReportActivity, Subscribe)
PUSHED_COMMANDS = (SessionEnded, SessionsRevoked, AgentStopped)
ADMIN_COMMANDS = (AddUser, RemoveUser, ListUsers, StartAgent, StopAgent, AgentInfo)
