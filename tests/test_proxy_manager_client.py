"""AMPManagerClient over a real Unix socket, against a small AMP responder
backed by FakeManager: the IManager contract survives the wire, errors keep
their classes, and a missing, vanishing or silent manager gives
ManagerUnavailable quickly instead of a hanging browser."""
import os
import shutil
import tempfile
import time
from typing import Any, List, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.trial.unittest import TestCase

import copy

from pixelated_dispatcher.protocol import (AgentAddress, AgentStartFailed, AgentStopped,
                                           Authenticate, EndSession, EnsureAgent,
                                           InvalidCredentials, ReportActivity,
                                           ResolveSession, SessionEnded,
                                           SessionsRevoked, Subscribe)
from pixelated_dispatcher.proxy.fake_manager import FakeManager
from pixelated_dispatcher.proxy.manager_client import AMPManagerClient
from pixelated_dispatcher.proxy.manager_interface import ManagerUnavailable

from .manager_contract import manager_contract_tests


class PushToConnection:
    """A FakeManager listener that pushes to one subscribed AMP connection,
    as the real manager does."""

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
    """The proxy commands of the manager's AMP server, answered by a FakeManager
    (one copy per connection: ``connection`` is set by ManagerSocket)."""

    connection: Optional[amp.AMP] = None

    def __init__(self, manager: FakeManager) -> None:
        self.manager = manager

    @Subscribe.responder
    def subscribe(self) -> Deferred:
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
    def ensure_agent(self, username: str) -> Deferred:
        return self.manager.ensure_agent(username).addCallback(
            lambda address: {"host": address.host, "port": address.port})


class _ServerAMP(amp.AMP):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections.append(self)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.factory.connections.remove(self)
        pusher = getattr(self, "pusher", None)
        if pusher is not None and pusher in self.factory.locator.manager.listeners:
            self.factory.locator.manager.listeners.remove(pusher)


class ManagerSocket(Factory):
    """A stand-in manager listening on a Unix socket; can go away and come back."""

    def __init__(self, path: str, locator: amp.CommandLocator) -> None:
        self.path = path
        self.locator = locator
        self.connections: List[_ServerAMP] = []
        self.port: Optional[Any] = None

    def buildProtocol(self, addr: Any) -> _ServerAMP:
        locator = copy.copy(self.locator)
        protocol = _ServerAMP(locator=locator)
        locator.connection = protocol
        protocol.factory = self
        return protocol

    def start(self) -> None:
        self.port = reactor.listenUNIX(self.path, self)

    @inlineCallbacks
    def stop(self) -> Any:
        """Stop listening and hang up on every client, like a manager that exits."""
        if self.port is not None:
            yield self.port.stopListening()
            self.port = None
        for connection in list(self.connections):
            connection.transport.abortConnection()
        while self.connections:
            yield deferLater(reactor, 0.01, lambda: None)


def temporary_directory(test: TestCase) -> str:
    # Short, outside the work tree: Unix socket paths are limited to 107 bytes.
    path = tempfile.mkdtemp(prefix="pxd-")
    test.addCleanup(shutil.rmtree, path, True)
    return path


def start_client(test: TestCase, path: str, **kwargs: Any) -> AMPManagerClient:
    client = AMPManagerClient.for_socket(reactor, path, **kwargs)
    client.service.startService()
    test.addCleanup(client.service.stopService)
    return client


def start_manager(test: TestCase, path: str, manager: FakeManager,
                  locator: Optional[amp.CommandLocator] = None) -> ManagerSocket:
    server = ManagerSocket(path, locator or FakeManagerResponder(manager))
    server.start()
    test.addCleanup(server.stop)
    return server


class AMPFixture:
    """The contract fixture: the client talking AMP to a FakeManager."""

    def __init__(self, test: TestCase) -> None:
        path = os.path.join(temporary_directory(test), "manager.sock")
        self.fake = FakeManager()
        start_manager(test, path, self.fake)
        self.manager = start_client(test, path)

    def add_user(self, username: str, password: str) -> None:
        self.fake.add_user(username, password)

    def revoke_sessions(self, username: str) -> None:
        self.fake.revoke_sessions(username)


class AMPManagerClientContract(manager_contract_tests(AMPFixture)):
    """The IManager contract holds through AMP and the client's translation."""


def fast_retries(attempt: int) -> float:
    return 0.05


class ManagerClientTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.path = os.path.join(temporary_directory(self), "manager.sock")
        self.fake = FakeManager()
        self.fake.add_user("alice", "secret")

    @inlineCallbacks
    def test_declared_errors_keep_their_class_and_message(self) -> Any:
        start_manager(self, self.path, self.fake)
        self.fake.fail_agent_start("alice", "no memory left for alice")
        client = start_client(self, self.path)
        yield self.assertFailure(client.authenticate("alice", "wrong", "192.0.2.4"),
                                 InvalidCredentials)
        failure = yield self.assertFailure(client.ensure_agent("alice"), AgentStartFailed)
        self.assertEqual(str(failure), "no memory left for alice")
        self.assertEqual(self.fake.logins, [("alice", "192.0.2.4")])

    @inlineCallbacks
    def test_missing_manager_fails_fast(self) -> Any:
        client = start_client(self, self.path)  # the default retry policy
        # Let a few attempts fail, so that the client is waiting to retry.
        yield deferLater(reactor, 0.5, lambda: None)
        started = time.monotonic()
        calls = [client.authenticate("alice", "secret", "192.0.2.4"),
                 client.resolve_session("t" * 43),
                 client.end_session("t" * 43),
                 client.ensure_agent("alice")]
        for call in calls:
            yield self.assertFailure(call, ManagerUnavailable)
        self.assertLess(time.monotonic() - started, 3.0)

    @inlineCallbacks
    def test_connection_lost_during_a_call(self) -> Any:
        called = Deferred()

        class HangsUp(FakeManagerResponder):
            @EnsureAgent.responder
            def ensure_agent(self, username: str) -> Deferred:
                called.callback(None)
                return Deferred()  # never answers: the manager dies first

        server = start_manager(self, self.path, self.fake, HangsUp(self.fake))
        client = start_client(self, self.path)
        answer = client.ensure_agent("alice")
        yield called
        yield server.stop()
        yield self.assertFailure(answer, ManagerUnavailable)

    @inlineCallbacks
    def test_silent_manager_times_out(self) -> Any:
        class Silent(FakeManagerResponder):
            @EnsureAgent.responder
            def ensure_agent(self, username: str) -> Deferred:
                return Deferred()

        start_manager(self, self.path, self.fake, Silent(self.fake))
        client = start_client(self, self.path, call_timeouts={EnsureAgent: 0.3})
        yield self.assertFailure(client.ensure_agent("alice"), ManagerUnavailable)
        # The connection is still good for the next question.
        token = yield client.authenticate("alice", "secret", "192.0.2.4")
        self.assertEqual((yield client.resolve_session(token)), "alice")

    @inlineCallbacks
    def test_reconnects_when_the_manager_comes_back(self) -> Any:
        server = start_manager(self, self.path, self.fake)
        client = start_client(self, self.path, retry_policy=fast_retries)
        token = yield client.authenticate("alice", "secret", "192.0.2.4")
        yield server.stop()
        yield self.assertFailure(client.resolve_session(token), ManagerUnavailable)
        server.start()
        deadline = time.monotonic() + 5
        while True:
            try:
                username = yield client.resolve_session(token)
                break
            except ManagerUnavailable:
                if time.monotonic() > deadline:
                    raise
                yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(username, "alice")

    @inlineCallbacks
    def test_stopped_client_fails_instead_of_hanging(self) -> Any:
        start_manager(self, self.path, self.fake)
        client = AMPManagerClient.for_socket(reactor, self.path)
        client.service.startService()
        yield client.service.stopService()
        yield self.assertFailure(client.ensure_agent("alice"), ManagerUnavailable)

    @inlineCallbacks
    def test_address_comes_back_as_agent_address(self) -> Any:
        start_manager(self, self.path, self.fake)
        self.fake.place_agent("alice", AgentAddress("127.0.0.1", 40404))
        client = start_client(self, self.path)
        self.assertEqual((yield client.ensure_agent("alice")),
                         AgentAddress("127.0.0.1", 40404))
