"""A :class:`~.fake_manager.FakeManager` behind the manager's real AMP commands.

The proxy talks to the manager over AMP on a Unix socket. Tests of the proxy's
client (``AMPManagerClient``) and the proxy benchmarks need something on the
other end of that socket that answers like the manager, without argon2,
SQLite or agent processes: :class:`ManagerSocket` listens on a path and
answers every connection with a :class:`FakeManagerResponder` around one
shared ``FakeManager``; what the fake pushes (a session ended, sessions
revoked, an agent stopped) reaches the subscribed connections as the real
manager's pushes do.
"""
import copy
from typing import Any, Dict, List, Optional

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IListeningPort, IReactorTime, IReactorUNIX
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.python.failure import Failure

from ..protocol import (AgentAddress, AgentStopped, Authenticate, EndSession,
                        EnsureAgent, ReportActivity, ResolveSession, SessionEnded,
                        SessionsRevoked, Subscribe)
from .fake_manager import FakeManager


class PushToConnection:
    """A ``FakeManager`` listener that pushes to one subscribed AMP
    connection, as the real manager does."""

    def __init__(self, connection: amp.AMP) -> None:
        self.connection = connection

    def _push(self, command: type, **arguments: Any) -> None:
        if self.connection.transport is not None:
            self.connection.callRemote(command, **arguments).addErrback(lambda f: None)

    def subscribed(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def session_ended(self, digest: str) -> None:
        self._push(SessionEnded, token_digest=digest)

    def sessions_revoked(self, username: str) -> None:
        self._push(SessionsRevoked, username=username)

    def agent_stopped(self, username: str) -> None:
        self._push(AgentStopped, username=username)


class FakeManagerResponder(amp.CommandLocator):
    """The proxy's commands of the manager's AMP server, answered by a
    ``FakeManager`` (one copy per connection: :class:`ManagerSocket` sets
    ``connection``)."""

    connection: Optional["ManagerConnection"] = None

    def __init__(self, manager: FakeManager) -> None:
        self.manager = manager

    @Subscribe.responder
    def subscribe(self) -> Deferred:
        assert self.connection is not None
        pusher = PushToConnection(self.connection)
        self.connection.pusher = pusher
        return self.manager.subscribe(pusher).addCallback(lambda _: {})

    @ReportActivity.responder
    def report_activity(self, usernames: List[str]) -> Deferred:
        return self.manager.report_activity(usernames).addCallback(lambda _: {})

    @Authenticate.responder
    def authenticate(self, username: str, password: str, client: str) -> Deferred:
        return self.manager.authenticate(username, password, client).addCallback(
            lambda token: {"token": token})

    @ResolveSession.responder
    def resolve_session(self, token: str) -> Deferred:
        return self.manager.resolve_session(token).addCallback(
            lambda username: {"username": username})

    @EndSession.responder
    def end_session(self, token: str) -> Deferred:
        return self.manager.end_session(token).addCallback(
            lambda username: {"username": username})

    @EnsureAgent.responder
    def ensure_agent(self, username: str, token: Optional[str] = None) -> Deferred:
        def answer(address: AgentAddress) -> Dict[str, Any]:
            return {"host": address.host, "port": address.port}
        return self.manager.ensure_agent(username, token or "").addCallback(answer)


class ManagerConnection(amp.AMP):
    """One proxy's connection; on loss, its pusher stops listening."""

    factory: "ManagerSocket"
    pusher: Optional[PushToConnection] = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections.append(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.factory.connections.remove(self)
        listeners = self.factory.locator.manager.listeners
        if self.pusher is not None and self.pusher in listeners:
            listeners.remove(self.pusher)


class ManagerSocket(Factory):
    """A stand-in manager listening on a Unix socket; it can go away
    (:meth:`stop`, like a manager that exits) and come back (:meth:`start`)."""

    def __init__(self, reactor: Any, path: str, locator: FakeManagerResponder) -> None:
        self.reactor = reactor
        self.path = path
        self.locator = locator
        self.connections: List[ManagerConnection] = []
        self.port: Optional[IListeningPort] = None

    def buildProtocol(self, addr: Any) -> ManagerConnection:  # type: ignore[override]
        locator = copy.copy(self.locator)
        protocol = ManagerConnection(locator=locator)
        locator.connection = protocol
        protocol.factory = self
        return protocol

    def start(self, mode: int = 0o600) -> None:
        unix: IReactorUNIX = self.reactor
        self.port = unix.listenUNIX(self.path, self, mode=mode)

    @inlineCallbacks
    def stop(self) -> Any:
        """Stop listening and hang up on every client, like a manager that exits."""
        if self.port is not None:
            yield self.port.stopListening()
            self.port = None
        for connection in list(self.connections):
            transport: Any = connection.transport
            transport.abortConnection()
        clock: IReactorTime = self.reactor
        while self.connections:
            yield deferLater(clock, 0.01, lambda: None)
