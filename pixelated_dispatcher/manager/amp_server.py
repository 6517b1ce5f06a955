"""The manager's end of the AMP socket: translate commands into Manager calls.

Responders only translate. Every error a command did not declare would make
AMP close the connection (failing every other call in flight), so anything
that is not one of the contract's errors becomes ``InternalError`` here, after
being logged with its traceback; a write that failed for want of space
becomes ``StorageFull`` (logged as such, without a traceback), so that the
proxy and ``pixelated-ctl`` can say what is wrong.

Each connection learns its peer's credentials once (``peer_policy``), and
every command passes the one :class:`PeerPolicy` check before any domain
code runs; for the commands that name a user's agent, the policy also says
whether the peer must show a session of that user (a proxy must; an admin
need not). A connection that sends ``Subscribe`` receives the manager's
invalidations (``SessionEnded``, ``SessionsRevoked``, ``AgentStopped``).
"""
from functools import wraps
from typing import Any, Callable, Dict, List, Optional, Type

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import protocol as p
from .database import is_storage_full
from .invalidations import IInvalidationListener
from .peer_policy import PeerCredentials, PeerPolicy, peer_credentials
from .service import NO_SUCH_SESSION, Manager

log = Logger()


def _translated(command: Type[amp.Command]) -> Callable[[Callable[..., Any]], Any]:
    """Wrap a responder: check the policy, translate unexpected errors."""
    def decorate(method: Callable[..., Any]) -> Any:
        @wraps(method)
        def responder(self: "ManagerLocator", **kwargs: Any) -> Deferred:
            if not self.policy.allows(self.peer, command):
                log.warn("refused {command} to {peer}", command=command.__name__, peer=self.peer)
                raise p.PermissionDenied("permission denied")
            d = maybeDeferred(method, self, **kwargs)
            d.addErrback(_translate_unexpected, command)
            return d
        return command.responder(responder)
    return decorate


def _translate_unexpected(failure: Failure, command: Type[amp.Command]) -> Failure:
    if failure.check(*command.allErrors):  # type: ignore[attr-defined]  # set by amp's metaclass
        return failure
    if failure.value is not None and is_storage_full(failure.value):
        log.error("{command} failed: no space left in the state directory ({error})",
                  command=command.__name__, error=failure.value)
        raise p.StorageFull("the manager cannot write its state: no space left on its"
                            " disk; nothing was changed")
    log.failure("unexpected error in {command}", failure, command=command.__name__)
    raise p.InternalError("internal error in the manager (see its log)")


def _address(address: p.AgentAddress) -> Dict[str, Any]:
    return {"host": address.host, "port": address.port}


def _node(node: str) -> dict:
    """The optional ``node`` field: present only where agents run on nodes."""
    return {"node": node} if node else {}


def _empty(_: object) -> Dict[str, Any]:
    return {}


class ManagerLocator(amp.CommandLocator):
    """Answers the commands of one connection."""

    def __init__(self, manager: Manager, policy: PeerPolicy,
                 peer: Optional[PeerCredentials],
                 connection: Optional["ManagerAMP"] = None) -> None:
        self.manager = manager
        self.policy = policy
        self.peer = peer
        self.connection = connection

    # -- proxy --

    @_translated(p.Authenticate)
    def authenticate(self, username: str, password: str, client: str) -> Deferred:
        d = self.manager.authenticate(username, password, client)
        return d.addCallback(lambda token: {"token": token})

    @_translated(p.ResolveSession)
    def resolve_session(self, token: str) -> Deferred:
        return self.manager.resolve_session(token).addCallback(lambda u: {"username": u})

    @_translated(p.EndSession)
    def end_session(self, token: str) -> Deferred:
        return self.manager.end_session(token).addCallback(lambda u: {"username": u})

    def _session_for(self, command: Type[amp.Command], token: Optional[str]) -> Optional[str]:
        """The token to check (None: an admin asking without one); a peer
        that must show a session and shows none gets ``InvalidSession``."""
        if not token:
            if self.policy.needs_session(self.peer, command):
                raise p.InvalidSession(NO_SUCH_SESSION)
            return None
        return token

    @_translated(p.EnsureAgent)
    def ensure_agent(self, username: str, token: Optional[str] = None) -> Deferred:
        token = self._session_for(p.EnsureAgent, token)
        return self.manager.ensure_agent(username, token).addCallback(_address)

    @_translated(p.LocateAgent)
    def locate_agent(self, username: str, token: Optional[str] = None) -> Deferred:
        token = self._session_for(p.LocateAgent, token)
        return self.manager.locate_agent(username, token).addCallback(_address)

    @_translated(p.ReportActivity)
    def report_activity(self, usernames: List[str]) -> Dict[str, Any]:
        self.manager.report_activity(usernames)
        return {}

    @_translated(p.Subscribe)
    def subscribe(self) -> Dict[str, Any]:
        if self.connection is None:
            raise p.InternalError("this connection cannot receive invalidations")
        self.manager.invalidations.subscribe(self.connection)
        return {}

    # -- administration --

    @_translated(p.AddUser)
    def add_user(self, username: str, password: str) -> Deferred:
        return self.manager.add_user(username, password).addCallback(_empty)

    @_translated(p.SetPassword)
    def set_password(self, username: str, password: str) -> Deferred:
        return self.manager.set_password(username, password).addCallback(_empty)

    @_translated(p.RemoveUser)
    def remove_user(self, username: str, purge: bool = False) -> Deferred:
        return self.manager.remove_user(username, bool(purge)).addCallback(_empty)

    @_translated(p.ResetData)
    def reset_data(self, username: str) -> Deferred:
        return self.manager.reset_data(username).addCallback(_empty)

    @_translated(p.ListUsers)
    def list_users(self, after: Optional[str] = None, limit: Optional[int] = None) -> Deferred:
        limit = p.LIST_PAGE if limit is None else max(1, min(limit, p.LIST_PAGE))

        def answer(users: Any) -> Dict[str, Any]:
            text, taken = p.format_user_page(users, limit)
            return {"users": text, "more": len(users) > taken}
        return self.manager.list_users(after or "", limit + 1).addCallback(answer)

    @_translated(p.StartAgent)
    def start_agent(self, username: str) -> Deferred:
        return self.manager.start_agent(username).addCallback(_address)

    @_translated(p.StopAgent)
    def stop_agent(self, username: str) -> Deferred:
        return self.manager.stop_agent(username).addCallback(_empty)

    @_translated(p.AgentInfo)
    def agent_info(self, username: str) -> Deferred:
        def answer(details: Any) -> Dict[str, Any]:
            status, agent = details.status, details.status.agent
            return {"username": status.username, "state": status.state,
                    "reason": status.reason,
                    "host": agent.address.host if agent else "",
                    "port": agent.address.port if agent else 0,
                    "pid": agent.pid if agent else 0,
                    "started": agent.started if agent else 0.0,
                    "memory": details.memory,
                    "last_activity": details.last_activity,
                    "limits": details.limits,
                    "last_failure": status.last_failure,
                    **({"node": details.node} if details.node else {})}
        return self.manager.agent_info(username).addCallback(answer)

    @_translated(p.ListSessions)
    def list_sessions(self, username: str) -> Deferred:
        return self.manager.list_sessions(username).addCallback(lambda sessions: {
            "sessions": [{"created": c, "last_seen": s, "client": client}
                         for c, s, client in sessions[:p.SESSIONS_LISTED]]})

    @_translated(p.RevokeSessions)
    def revoke_sessions(self, username: str) -> Deferred:
        return self.manager.revoke_sessions(username).addCallback(lambda n: {"count": n})

    @_translated(p.Stats)
    def stats(self) -> Deferred:
        # only a manager whose provider has nodes (swarm) knows them
        node_of = getattr(self.manager, "node_of", lambda name: "")

        def answer(result: Any) -> Dict[str, Any]:
            users, sessions, agents = result
            return {"users": users, "sessions": sessions, "running": len(agents),
                    "memory": sum(memory for memory, _ in agents.values()),
                    "agents": [dict({"username": name, "memory": memory, "started": started},
                                    **_node(node_of(name)))
                               for name, (memory, started)
                               in sorted(agents.items())[:p.AGENTS_LISTED]]}
        return self.manager.stats().addCallback(answer)

    @_translated(p.ImportLegacy)
    def import_legacy(self, root: str, after: Optional[str] = None,
                      limit: Optional[int] = None) -> Deferred:
        limit = p.IMPORT_PAGE if limit is None else max(1, min(limit, p.IMPORT_PAGE_MAX))

        def answer(result: Any) -> Dict[str, Any]:
            entries, more = result
            return {"entries": [{"username": u, "outcome": o, "detail": d[:p.IMPORT_DETAIL]}
                                for u, o, d in entries], "more": more}
        return self.manager.import_legacy(root, after or "", limit).addCallback(answer)


@implementer(IInvalidationListener)
class ManagerAMP(amp.AMP):
    """One connection to the manager socket."""

    def __init__(self, manager: Manager, policy: PeerPolicy) -> None:
        super().__init__()
        self._manager = manager
        self._policy = policy

    def connectionMade(self) -> None:
        super().connectionMade()
        self.locator = ManagerLocator(self._manager, self._policy,
                                      peer_credentials(self.transport), self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._manager.invalidations.unsubscribe(self)
        super().connectionLost(reason)

    # IInvalidationListener: push to the subscribed proxy, never wait for it.

    def session_ended(self, token_digest: str) -> None:
        self._push(p.SessionEnded, token_digest=token_digest)

    def sessions_revoked(self, username: str) -> None:
        self._push(p.SessionsRevoked, username=username)

    def agent_stopped(self, username: str) -> None:
        self._push(p.AgentStopped, username=username)

    def _push(self, command: Type[amp.Command], **kwargs: Any) -> None:
        d = self.callRemote(command, **kwargs)
        d.addErrback(lambda failure: log.warn("could not push {command}: {error}",
                                              command=command.__name__,
                                              error=failure.getErrorMessage()))


class ManagerAMPFactory(Factory):

    def __init__(self, manager: Manager, policy: PeerPolicy) -> None:
        self._manager = manager
        self._policy = policy

    def buildProtocol(self, addr: object) -> "ManagerAMP":
        return ManagerAMP(self._manager, self._policy)
