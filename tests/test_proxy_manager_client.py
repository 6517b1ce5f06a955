"""AMPManagerClient over a real Unix socket, against a small AMP responder
backed by FakeManager: the IManager contract survives the wire, errors keep
their classes, and a missing, vanishing or silent manager gives
ManagerUnavailable quickly instead of a hanging browser."""
import os
import time
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from pixelated_dispatcher.protocol import (AgentAddress, AgentStartFailed, EnsureAgent,
                                           InvalidCredentials)
from pixelated_dispatcher.proxy.manager_client import AMPManagerClient
from pixelated_dispatcher.proxy.manager_interface import ManagerUnavailable
from pixelated_dispatcher.testing.fake_manager import FakeManager
from pixelated_dispatcher.testing.fake_manager_server import FakeManagerResponder
from pixelated_dispatcher.testing.manager_contract import manager_contract_tests

from .helpers import fast_retries, start_client, start_manager, temporary_directory


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
        token = self.fake.open_session("alice")
        failure = yield self.assertFailure(client.ensure_agent("alice", token), AgentStartFailed)
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
                 client.ensure_agent("alice", "t" * 43)]
        for call in calls:
            yield self.assertFailure(call, ManagerUnavailable)
        self.assertLess(time.monotonic() - started, 3.0)

    @inlineCallbacks
    def test_connection_lost_during_a_call(self) -> Any:
        called = Deferred()

        class HangsUp(FakeManagerResponder):
            @EnsureAgent.responder
            def ensure_agent(self, username: str, token: Optional[str] = None) -> Deferred:
                called.callback(None)
                return Deferred()  # never answers: the manager dies first

        server = start_manager(self, self.path, self.fake, HangsUp(self.fake))
        client = start_client(self, self.path)
        answer = client.ensure_agent("alice", "t" * 43)
        yield called
        yield server.stop()
        yield self.assertFailure(answer, ManagerUnavailable)

    @inlineCallbacks
    def test_silent_manager_times_out(self) -> Any:
        class Silent(FakeManagerResponder):
            @EnsureAgent.responder
            def ensure_agent(self, username: str, token: Optional[str] = None) -> Deferred:
                return Deferred()

        start_manager(self, self.path, self.fake, Silent(self.fake))
        client = start_client(self, self.path, call_timeouts={EnsureAgent: 0.3})
        yield self.assertFailure(client.ensure_agent("alice", "t" * 43), ManagerUnavailable)
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
        yield self.assertFailure(client.ensure_agent("alice", "t" * 43), ManagerUnavailable)

    @inlineCallbacks
    def test_address_comes_back_as_agent_address(self) -> Any:
        start_manager(self, self.path, self.fake)
        self.fake.place_agent("alice", AgentAddress("127.0.0.1", 40404))
        client = start_client(self, self.path)
        token = self.fake.open_session("alice")
        self.assertEqual((yield client.ensure_agent("alice", token)),
                         AgentAddress("127.0.0.1", 40404))
