"""The AMP contract between pixelated-manager, pixelated-proxy and pixelated-ctl.

Every command lists every error it can raise. AMP answers an undeclared
exception by closing the whole connection, which would fail every other call
in flight, so the manager translates anything unexpected into
:class:`InternalError` (see ``manager/amp_server.py``).

Error codes are stable names: ctl and the proxy map them to messages, and
later versions only add new ones.
"""
import hashlib
import re
from typing import Dict, List, Optional, Sequence, Tuple, Type

import attr
from twisted.protocols import amp

#: Where the manager listens unless told otherwise (``--socket`` of the
#: manager, ``--manager-socket`` of the proxy, ``--socket`` of the ctl).
DEFAULT_SOCKET = "/run/pixelated/manager.sock"


@attr.s(frozen=True, auto_attribs=True)
class AgentAddress:
    """Where an agent serves HTTP; always chosen by the manager or the engine."""
    host: str
    port: int


class DispatcherError(Exception):
    """Base of every error that travels over the manager socket."""


class InternalError(DispatcherError):
    """Something unexpected went wrong in the manager; its log has the details."""


class StorageFull(DispatcherError):
    """The manager could not write its state: no space left where it keeps it
    (``--state-dir``). Nothing was changed; the same call works once there
    is space again."""


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


class BadRequest(DispatcherError):
    """The request cannot be carried out as asked; the message says why."""


class CapacityReached(DispatcherError):
    """No agent can start now: ``--max-agents`` agents run already."""


class RateLimited(DispatcherError):
    """Too many failed logins for this user name or client address.

    The message ends with "retry after N seconds": AMP errors carry only a
    code and a text, so the wait travels in the text (why it is not a typed
    field: ``docs/architecture.rst``, the contract). :func:`rate_limited`
    writes it and :func:`retry_after` reads it back; nothing else does.
    """


#: the longest wait a RATE_LIMITED error can ask for (nine digits)
MAX_RETRY_AFTER = 999_999_999


def rate_limited(seconds: int) -> RateLimited:
    wait = min(max(1, seconds), MAX_RETRY_AFTER)
    return RateLimited("too many failed logins; retry after %d seconds" % wait)


#: the end of a message that asks for a wait: ASCII digits only (int() also
#: takes other scripts' digits, and refuses more than 4300 of them)
_WAIT = re.compile(r" ([0-9]{1,9}) seconds\Z")


def retry_after(error: Optional[BaseException], default: int = 60) -> int:
    """The wait, in seconds, that a RateLimited (or any) error asks for:
    ``default`` when its message does not end with one."""
    match = _WAIT.search(str(error))
    return int(match.group(1)) if match else default


COMMON_ERRORS: Dict[Type[Exception], bytes] = {
    InternalError: b"INTERNAL_ERROR",
    PermissionDenied: b"PERMISSION_DENIED",
    StorageFull: b"STORAGE_FULL",
}


def _errors(*extra: Type[Exception]) -> Dict[Type[Exception], bytes]:
    errors: Dict[Type[Exception], bytes] = dict(COMMON_ERRORS)
    codes: Dict[Type[Exception], bytes] = {
        InvalidUsername: b"INVALID_USERNAME",
        UserExists: b"USER_EXISTS",
        UnknownUser: b"UNKNOWN_USER",
        InvalidCredentials: b"INVALID_CREDENTIALS",
        InvalidSession: b"INVALID_SESSION",
        AgentNotRunning: b"AGENT_NOT_RUNNING",
        AgentStartFailed: b"AGENT_START_FAILED",
        CapacityReached: b"CAPACITY_REACHED",
        BadRequest: b"BAD_REQUEST",
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
    """Start the user's agent unless it runs; answer once it serves HTTP.

    ``token`` is the session the request came with. A proxy must send it
    and it must be a live session of ``username``: else ``InvalidSession``,
    the same answer whether or not the user exists. An agent that must start
    gets the credentials sealed under that session at login (``manager/
    sealed_credentials.py``), which only this token opens. Admin peers may
    leave it out: they get the address of a running agent, and a refusal
    (``AgentStartFailed``) when it would have to start without credentials.
    """
    arguments = [(b"username", amp.Unicode()),
                 (b"token", amp.Unicode(optional=True))]
    response = [(b"host", amp.Unicode()), (b"port", amp.Integer())]
    errors = _errors(InvalidUsername, UnknownUser, AgentStartFailed, CapacityReached,
                     InvalidSession)


class LocateAgent(amp.Command):
    """The address of the user's running agent, without starting it.

    ``token`` as for :class:`EnsureAgent`: required from a proxy."""
    arguments = [(b"username", amp.Unicode()),
                 (b"token", amp.Unicode(optional=True))]
    response = [(b"host", amp.Unicode()), (b"port", amp.Integer())]
    errors = _errors(InvalidUsername, UnknownUser, AgentNotRunning, InvalidSession)


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


class SetPassword(amp.Command):
    """Change a password; ends every session of the user."""
    arguments = [(b"username", amp.Unicode()), (b"password", amp.Unicode())]
    response = []
    errors = _errors(InvalidUsername, UnknownUser)


class RemoveUser(amp.Command):
    """Remove a user, stopping their agent and ending their sessions; their
    data stays on disk unless ``purge``."""
    arguments = [(b"username", amp.Unicode()), (b"purge", amp.Boolean(optional=True))]
    response = []
    errors = _errors(InvalidUsername, UnknownUser)


class ResetData(amp.Command):
    """Stop the user's agent and empty their data directory."""
    arguments = [(b"username", amp.Unicode())]
    response = []
    errors = _errors(InvalidUsername, UnknownUser)


#: most users per ListUsers page, and most bytes of one page's text: far
#: below AMP's 64 KiB per value, so that 10,000 users take a few round trips
LIST_PAGE = 5000
LIST_PAGE_BYTES = 60_000


class ListUsers(amp.Command):
    """Users with the state of their agents, sorted by name, a page at a time.

    ``users`` is text, one ``name<TAB>state`` line per user (user names
    never contain tabs or newlines); :func:`parse_user_page` reads it. Pass
    the last name of a page as ``after`` to get the next one.
    """
    arguments = [(b"after", amp.Unicode(optional=True)),
                 (b"limit", amp.Integer(optional=True))]
    response = [(b"users", amp.Unicode()),
                (b"more", amp.Boolean())]
    errors = _errors()


def format_user_page(users: Sequence[Tuple[str, str]], limit: int = LIST_PAGE,
                     max_bytes: int = LIST_PAGE_BYTES) -> Tuple[str, int]:
    """``(text, taken)``: as many ``(name, state)`` pairs as fit in one page."""
    lines, size = [], 0
    for name, state in users[:limit]:
        line = "%s\t%s\n" % (name, state)
        if size + len(line) > max_bytes:
            break
        lines.append(line)
        size += len(line)
    return "".join(lines), len(lines)


def parse_user_page(text: str) -> List[Tuple[str, ...]]:
    """The ``[(name, state)]`` of a ListUsers page."""
    return [tuple(line.split("\t", 1)) for line in text.splitlines() if line]


class StartAgent(amp.Command):
    """The address of the user's agent if it runs. The operator holds no
    session, so the manager cannot open the credentials an agent starts with:
    a stopped agent is not started (``AgentStartFailed`` says so); it starts
    at its user's next login or request."""
    arguments = [(b"username", amp.Unicode())]
    response = [(b"host", amp.Unicode()), (b"port", amp.Integer())]
    errors = _errors(InvalidUsername, UnknownUser, AgentStartFailed, CapacityReached)


class StopAgent(amp.Command):
    arguments = [(b"username", amp.Unicode())]
    response = []
    errors = _errors(InvalidUsername, UnknownUser, AgentNotRunning)


class AgentInfo(amp.Command):
    """One user's agent: state (and why it failed), address (empty when
    stopped), pid, start time, resident memory, last activity, and the
    resource limits agents get."""
    arguments = [(b"username", amp.Unicode())]
    response = [(b"username", amp.Unicode()),
                (b"state", amp.Unicode()),
                (b"reason", amp.Unicode()),
                (b"host", amp.Unicode()),
                (b"port", amp.Integer()),
                (b"pid", amp.Integer()),
                (b"started", amp.Float()),
                (b"memory", amp.Integer()),
                (b"last_activity", amp.Float()),
                # the cluster node it runs on (swarm provider); absent elsewhere
                (b"node", amp.Unicode(optional=True)),
                (b"limits", amp.Unicode(optional=True)),
                (b"last_failure", amp.Unicode(optional=True))]
    errors = _errors(InvalidUsername, UnknownUser)


#: At most this many sessions in a ``ListSessions`` answer.
SESSIONS_LISTED = 500


class ListSessions(amp.Command):
    """A user's live sessions (never their tokens)."""
    arguments = [(b"username", amp.Unicode())]
    response = [(b"sessions", amp.AmpList([(b"created", amp.Float()),
                                           (b"last_seen", amp.Float()),
                                           (b"client", amp.Unicode())]))]
    errors = _errors(InvalidUsername, UnknownUser)


class RevokeSessions(amp.Command):
    """End every session of a user (``pixelated-ctl logout NAME``)."""
    arguments = [(b"username", amp.Unicode())]
    response = [(b"count", amp.Integer())]
    errors = _errors(InvalidUsername, UnknownUser)


#: At most this many agents in a ``Stats`` answer.
AGENTS_LISTED = 1000


class Stats(amp.Command):
    """Counts and the memory of running agents."""
    arguments = []
    response = [(b"users", amp.Integer()),
                (b"sessions", amp.Integer()),
                (b"running", amp.Integer()),
                (b"memory", amp.Integer()),
                (b"agents", amp.AmpList([(b"username", amp.Unicode()),
                                         (b"memory", amp.Integer()),
                                         (b"started", amp.Float()),
                                         (b"node", amp.Unicode(optional=True))]))]
    errors = _errors()


#: User directories per ``ImportLegacy`` page: the default, and the most a
#: caller may ask for.
IMPORT_PAGE = 100
IMPORT_PAGE_MAX = 200
#: An entry's ``detail`` is cut to this many characters.
IMPORT_DETAIL = 300


class ImportLegacy(amp.Command):
    """Import users of an original pixelated-dispatcher root, a page of user
    directories at a time (sorted by name, after ``after``). Safe to repeat."""
    arguments = [(b"root", amp.Unicode()),
                 (b"after", amp.Unicode(optional=True)),
                 (b"limit", amp.Integer(optional=True))]
    response = [(b"entries", amp.AmpList([(b"username", amp.Unicode()),
                                          (b"outcome", amp.Unicode()),
                                          (b"detail", amp.Unicode())])),
                (b"more", amp.Boolean())]
    errors = _errors(BadRequest)


#: proxy commands that name a user and need a live session of that user
#: (their ``token``) unless the peer is an admin
SESSION_BOUND_COMMANDS = (EnsureAgent, LocateAgent)

PROXY_COMMANDS = (Authenticate, ResolveSession, EndSession, EnsureAgent, LocateAgent,
                  ReportActivity, Subscribe)
PUSHED_COMMANDS = (SessionEnded, SessionsRevoked, AgentStopped)
ADMIN_COMMANDS = (AddUser, SetPassword, RemoveUser, ResetData, ListUsers, StartAgent,
                  StopAgent, AgentInfo, ListSessions, RevokeSessions, Stats, ImportLegacy)
