"""The contract of :class:`IManager`, as one suite for every implementation.

Flocker's "verified fakes": the proxy's unit tests trust
:class:`~pixelated_dispatcher.testing.fake_manager.FakeManager`, so the fake
must behave like the real manager seen through
:class:`~pixelated_dispatcher.proxy.manager_client.AMPManagerClient`. Both run
this suite; a behaviour the proxy relies on belongs here.

Use::

    class FakeManagerContract(manager_contract_tests(make_fixture)):
        pass

where ``make_fixture(test_case)`` returns (or returns a Deferred of) an
object with

* ``manager``: the :class:`IManager` under test;
* ``add_user(username, password)``: create a user, returning None or a
  Deferred;
* optionally ``revoke_sessions(username)``: end every session of the user
  as ``pixelated-ctl logout`` does (None or a Deferred); without it the
  test of the ``SessionsRevoked`` push is skipped;

and registers its own cleanups with ``test_case.addCleanup``. A fresh user's
``ensure_agent`` (with a token of that user's session) is expected to
succeed with some address, so the real manager's fixture needs an agent
command that starts. The real fixture talks to the manager as a proxy-group
peer (not an admin), as the proxy does.

The tests are trial ``TestCase`` methods returning Deferreds, so a fixture
may use the real reactor (sockets, processes).
"""
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface.verify import verifyObject

from pixelated_dispatcher.protocol import (AgentAddress, InvalidCredentials,
                                           InvalidSession, token_digest)
from pixelated_dispatcher.proxy.manager_interface import IManager

Fixture = Any


class RecordingListener:
    """An ``IInvalidationListener`` that writes down what it hears."""

    def __init__(self) -> None:
        self.events: list = []

    def subscribed(self) -> None:
        self.events.append(("subscribed",))

    def reset(self) -> None:
        self.events.append(("reset",))

    def session_ended(self, digest: str) -> None:
        self.events.append(("session_ended", digest))

    def sessions_revoked(self, username: str) -> None:
        self.events.append(("sessions_revoked", username))

    def agent_stopped(self, username: str) -> None:
        self.events.append(("agent_stopped", username))


@inlineCallbacks
def heard(listener: RecordingListener, event: tuple, timeout: float = 10.0) -> Any:
    """Wait (on the real reactor) until ``listener`` heard ``event``."""
    waited = 0.0
    while event not in listener.events and waited < timeout:
        yield deferLater(reactor, 0.02, lambda: None)
        waited += 0.02
    return event in listener.events


def manager_contract_tests(make_fixture: Callable[[TestCase], Any]) -> type:
    """A ``TestCase`` class checking the ``IManager`` contract against the
    implementation that ``make_fixture`` sets up."""

    class IManagerContract(TestCase):
        timeout = 60

        @inlineCallbacks
        def setUp(self) -> Any:  # type: ignore[override]  # trial waits for a Deferred
            self.fixture = yield maybeDeferred(make_fixture, self)
            self.manager = self.fixture.manager

        def add_user(self, username: str, password: str) -> Any:
            return maybeDeferred(self.fixture.add_user, username, password)

        def assert_fails_with(self, d: Any, error: type) -> Any:
            """``assertFailure`` that also accepts a synchronous exception."""
            return self.assertFailure(maybeDeferred(lambda: d()), error)

        def test_provides_interface(self) -> None:
            self.assertTrue(verifyObject(IManager, self.manager))

        @inlineCallbacks
        def test_right_password_gives_a_token(self) -> Any:
            yield self.add_user("alice", "correct horse")
            token = yield self.manager.authenticate("alice", "correct horse", "192.0.2.1")
            self.assertIsInstance(token, str)
            self.assertTrue(token)

        @inlineCallbacks
        def test_wrong_password_and_unknown_user_are_refused_alike(self) -> Any:
            yield self.add_user("alice", "correct horse")
            wrong = yield self.assert_fails_with(
                lambda: self.manager.authenticate("alice", "wrong", "192.0.2.1"),
                InvalidCredentials)
            unknown = yield self.assert_fails_with(
                lambda: self.manager.authenticate("nobody", "correct horse", "192.0.2.1"),
                InvalidCredentials)
            self.assertEqual(type(wrong), type(unknown))

        @inlineCallbacks
        def test_token_resolves_to_its_user(self) -> Any:
            yield self.add_user("alice", "a-secret")
            yield self.add_user("bob", "b-secret")
            alice = yield self.manager.authenticate("alice", "a-secret", "192.0.2.1")
            bob = yield self.manager.authenticate("bob", "b-secret", "192.0.2.2")
            self.assertEqual((yield self.manager.resolve_session(alice)), "alice")
            self.assertEqual((yield self.manager.resolve_session(bob)), "bob")

        @inlineCallbacks
        def test_unknown_token_is_an_invalid_session(self) -> Any:
            yield self.assert_fails_with(
                lambda: self.manager.resolve_session("no-such-session-token-at-all"),
                InvalidSession)

        @inlineCallbacks
        def test_two_logins_give_two_tokens(self) -> Any:
            yield self.add_user("alice", "a-secret")
            first = yield self.manager.authenticate("alice", "a-secret", "192.0.2.1")
            second = yield self.manager.authenticate("alice", "a-secret", "192.0.2.1")
            self.assertNotEqual(first, second)
            self.assertEqual((yield self.manager.resolve_session(first)), "alice")
            self.assertEqual((yield self.manager.resolve_session(second)), "alice")

        @inlineCallbacks
        def test_ended_session_no_longer_resolves(self) -> Any:
            yield self.add_user("alice", "a-secret")
            token = yield self.manager.authenticate("alice", "a-secret", "192.0.2.1")
            self.assertEqual((yield self.manager.end_session(token)), "alice")
            yield self.assert_fails_with(
                lambda: self.manager.resolve_session(token), InvalidSession)

        @inlineCallbacks
        def test_ending_one_session_keeps_the_others(self) -> Any:
            yield self.add_user("alice", "a-secret")
            first = yield self.manager.authenticate("alice", "a-secret", "192.0.2.1")
            second = yield self.manager.authenticate("alice", "a-secret", "192.0.2.1")
            yield self.manager.end_session(first)
            self.assertEqual((yield self.manager.resolve_session(second)), "alice")

        @inlineCallbacks
        def test_ending_an_unknown_session_is_an_invalid_session(self) -> Any:
            yield self.assert_fails_with(
                lambda: self.manager.end_session("no-such-session-token-at-all"),
                InvalidSession)

        @inlineCallbacks
        def log_in(self, username: str, password: str) -> Any:
            yield self.add_user(username, password)
            token = yield self.manager.authenticate(username, password, "192.0.2.1")
            return token

        @inlineCallbacks
        def test_ensure_agent_gives_an_address(self) -> Any:
            token = yield self.log_in("alice", "a-secret")
            address = yield self.manager.ensure_agent("alice", token)
            self.assertIsInstance(address, AgentAddress)
            self.assertIsInstance(address.host, str)
            self.assertTrue(0 < address.port < 65536)

        @inlineCallbacks
        def test_ensure_agent_twice_gives_the_same_agent(self) -> Any:
            token = yield self.log_in("alice", "a-secret")
            first = yield self.manager.ensure_agent("alice", token)
            second = yield self.manager.ensure_agent("alice", token)
            self.assertEqual(first, second)

        @inlineCallbacks
        def test_another_session_of_the_user_finds_the_same_agent(self) -> Any:
            first = yield self.log_in("alice", "a-secret")
            second = yield self.manager.authenticate("alice", "a-secret", "192.0.2.9")
            address = yield self.manager.ensure_agent("alice", first)
            self.assertEqual((yield self.manager.ensure_agent("alice", second)), address)

        @inlineCallbacks
        def test_users_get_different_agents(self) -> Any:
            alice_token = yield self.log_in("alice", "a-secret")
            bob_token = yield self.log_in("bob", "b-secret")
            alice = yield self.manager.ensure_agent("alice", alice_token)
            bob = yield self.manager.ensure_agent("bob", bob_token)
            self.assertNotEqual(alice, bob)

        @inlineCallbacks
        def test_no_agent_without_a_session_of_that_user(self) -> Any:
            # A compromised proxy holding alice's session asks for bob's
            # agent, for a user nobody has, for a name breaking the rule, or
            # with no session at all: one answer, which tells nothing.
            alice = yield self.log_in("alice", "a-secret")
            yield self.add_user("bob", "b-secret")
            answers = []
            for username, token in (("bob", alice), ("nobody", alice), ("../etc", alice),
                                    ("bob", "no-such-session-token-at-all"), ("bob", "")):
                failure = yield self.assert_fails_with(
                    lambda: self.manager.ensure_agent(username, token), InvalidSession)
                answers.append(str(failure))
            self.assertEqual(len(set(answers)), 1, answers)
            # and alice's own session still works
            self.assertIsInstance((yield self.manager.ensure_agent("alice", alice)),
                                  AgentAddress)

        @inlineCallbacks
        def test_an_ended_session_starts_no_agent(self) -> Any:
            token = yield self.log_in("alice", "a-secret")
            yield self.manager.end_session(token)
            yield self.assert_fails_with(
                lambda: self.manager.ensure_agent("alice", token), InvalidSession)

        @inlineCallbacks
        def test_activity_reports_are_accepted(self) -> Any:
            token = yield self.log_in("alice", "a-secret")
            yield self.manager.ensure_agent("alice", token)
            yield self.manager.report_activity(["alice"])
            yield self.manager.report_activity([])

        @inlineCallbacks
        def test_activity_report_beyond_one_amp_value(self) -> Any:
            # Names of users that do not exist are ignored, and the client
            # splits a report that would not fit in one AMP value (64 KiB).
            yield self.add_user("alice", "a-secret")
            names = ["user-%06d" % i for i in range(7000)] + ["alice"]
            yield self.manager.report_activity(names)

        @inlineCallbacks
        def test_subscriber_is_told_it_is_subscribed(self) -> Any:
            listener = RecordingListener()
            yield self.manager.subscribe(listener)
            self.assertIn(("subscribed",), listener.events)

        @inlineCallbacks
        def test_subscriber_hears_a_session_end(self) -> Any:
            yield self.add_user("alice", "a-secret")
            listener = RecordingListener()
            yield self.manager.subscribe(listener)
            token = yield self.manager.authenticate("alice", "a-secret", "192.0.2.1")
            other = yield self.manager.authenticate("alice", "a-secret", "192.0.2.1")
            yield self.manager.end_session(token)
            self.assertTrue((yield heard(listener, ("session_ended", token_digest(token)))),
                            listener.events)
            self.assertNotIn(("session_ended", token_digest(other)), listener.events)

        @inlineCallbacks
        def test_subscriber_hears_that_all_sessions_of_a_user_ended(self) -> Any:
            if not hasattr(self.fixture, "revoke_sessions"):
                raise SkipTest("the fixture has no revoke_sessions hook")
            yield self.add_user("alice", "a-secret")
            listener = RecordingListener()
            yield self.manager.subscribe(listener)
            token = yield self.manager.authenticate("alice", "a-secret", "192.0.2.1")
            yield maybeDeferred(self.fixture.revoke_sessions, "alice")
            self.assertTrue((yield heard(listener, ("sessions_revoked", "alice"))),
                            listener.events)
            yield self.assert_fails_with(
                lambda: self.manager.resolve_session(token), InvalidSession)

        @inlineCallbacks
        def test_subscriber_hears_the_agent_stop_after_the_last_logout(self) -> Any:
            yield self.add_user("alice", "a-secret")
            listener = RecordingListener()
            yield self.manager.subscribe(listener)
            token = yield self.manager.authenticate("alice", "a-secret", "192.0.2.1")
            yield self.manager.ensure_agent("alice", token)
            yield self.manager.end_session(token)
            self.assertTrue((yield heard(listener, ("agent_stopped", "alice"))),
                            listener.events)

    return IManagerContract
