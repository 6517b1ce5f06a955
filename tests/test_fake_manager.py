"""FakeManager keeps the IManager contract, and its test knobs do what they say."""
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.protocol import (AgentAddress, AgentStartFailed,
                                           InvalidSession)
from pixelated_dispatcher.testing.fake_manager import FakeManager
from pixelated_dispatcher.proxy.manager_interface import ManagerUnavailable

from pixelated_dispatcher.testing.manager_contract import manager_contract_tests


class FakeManagerFixture:
    def __init__(self, test_case: object) -> None:
        self.manager = FakeManager()

    def add_user(self, username: str, password: str) -> None:
        self.manager.add_user(username, password)

    def revoke_sessions(self, username: str) -> None:
        self.manager.revoke_sessions(username)


class FakeManagerContract(manager_contract_tests(FakeManagerFixture)):
    pass


class FakeManagerKnobs(SynchronousTestCase):
    def setUp(self) -> None:
        self.manager = FakeManager()
        self.manager.add_user("alice", "secret")

    def test_placed_agent_address_is_answered(self) -> None:
        self.manager.place_agent("alice", AgentAddress("127.0.0.1", 12345))
        token = self.manager.open_session("alice")
        self.assertEqual(self.successResultOf(self.manager.ensure_agent("alice", token)),
                         AgentAddress("127.0.0.1", 12345))

    def test_failed_agent_start(self) -> None:
        self.manager.fail_agent_start("alice", "out of memory")
        token = self.manager.open_session("alice")
        failure = self.failureResultOf(self.manager.ensure_agent("alice", token),
                                       AgentStartFailed)
        self.assertEqual(str(failure.value), "out of memory")

    def test_unreachable_manager_fails_every_call(self) -> None:
        token = self.manager.open_session("alice")
        self.manager.reachable = False
        for d in (self.manager.authenticate("alice", "secret", "192.0.2.1"),
                  self.manager.resolve_session(token),
                  self.manager.end_session(token),
                  self.manager.ensure_agent("alice", token)):
            self.failureResultOf(d, ManagerUnavailable)

    def test_logout_stops_the_agent(self) -> None:
        token = self.successResultOf(self.manager.authenticate("alice", "secret", "192.0.2.1"))
        self.successResultOf(self.manager.ensure_agent("alice", token))
        self.assertIn("alice", self.manager.running)
        self.successResultOf(self.manager.end_session(token))
        self.assertNotIn("alice", self.manager.running)

    def test_another_users_session_gets_no_agent(self) -> None:
        token = self.manager.open_session("alice")
        self.failureResultOf(self.manager.ensure_agent("nobody", token), InvalidSession)
        self.manager.add_user("bob", "b")
        self.failureResultOf(self.manager.ensure_agent("bob", token), InvalidSession)
        self.assertNotIn("bob", self.manager.running)

    def test_client_address_is_recorded(self) -> None:
        self.failureResultOf(self.manager.authenticate("alice", "wrong", "198.51.100.7"))
        self.assertEqual(self.manager.logins, [("alice", "198.51.100.7")])
