"""Which agents the proxy may reach: the manager grants an agent's endpoint
to the proxy group while its user has a live session that was shown, and
takes it back when the last session or the agent ends.

The manager runs on real SQLite with the verified fakes (FakeProvider,
FakeFirewall: both pass the contracts the real ones pass); the books of
:class:`AgentGrants` are also driven by a hypothesis state machine.
"""
import shutil
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pixelated_dispatcher import protocol as p
from pixelated_dispatcher.manager.agent_firewall import FirewallError
from pixelated_dispatcher.manager.agent_grants import AgentGrants
from pixelated_dispatcher.manager.passwords import FAST_FOR_TESTS
from pixelated_dispatcher.manager.service import Manager, ManagerSettings
from pixelated_dispatcher.manager.providers.interface import RunningAgent
from pixelated_dispatcher.testing.fake_firewall import FakeFirewall
from pixelated_dispatcher.testing.manager_contract import RecordingListener
from pixelated_dispatcher.testing.fake_provider import FakeMachine, FakeProvider

from . import test_manager_service


class ProxyGrantTests(TestCase):
    """The manager's grants, as the fake kernel's table shows them."""

    finish_starts = test_manager_service.ManagerTests.finish_starts
    log_in = test_manager_service.ManagerTests.log_in

    @inlineCallbacks
    def setUp(self):
        self.state_dir = tempfile.mkdtemp(prefix="pxd-")
        self.addCleanup(shutil.rmtree, self.state_dir, True)
        self.kernel = {}
        self.firewall = FakeFirewall("grants", self.kernel)
        self.machine = FakeMachine()
        self.manager = None
        yield self.restart()
        yield self.manager.add_user("alice", "alice's password")
        yield self.manager.add_user("bob", "bob's password")

    @inlineCallbacks
    def restart(self, **settings):
        """(Re)start the manager; agents run on over a restart, as the
        process provider's do by default. (No idle culling: the fake
        provider's clock is not the manager's.)"""
        settings.setdefault("idle_timeout", 0)
        if self.manager is not None:
            yield self.finish_starts(self.manager.stopService())
        self.clock = Clock()
        self.provider = FakeProvider(self.clock, start_delay=1.0, stop_delay=0.5,
                                     firewall=self.firewall, keep_on_close=True,
                                     machine=self.machine)
        manager = Manager(reactor, self.state_dir, self.provider,
                          ManagerSettings(leap_provider="example.org",
                                          hash_parameters=FAST_FOR_TESTS, **settings),
                          firewall=self.firewall)
        manager.startService()
        self.addCleanup(lambda: manager.running and self.finish_starts(manager.stopService()))
        yield manager.ready()
        self.manager = manager
        return manager

    def granted(self):
        """The endpoints the proxy group may connect to, in the fake kernel."""
        return self.kernel["grants"].granted if "grants" in self.kernel else set()

    def grant_calls(self):
        return [call for call in self.firewall.calls if call[0] == "grant"]

    @inlineCallbacks
    def agent_of(self, name, token=None):
        """A session of ``name`` (``token``, or a new login) and its agent's endpoint."""
        if token is None:
            token = yield self.log_in(name)
        address = yield self.finish_starts(self.manager.ensure_agent(name, token))
        return token, (address.host, address.port)

    # -- granting --------------------------------------------------------------

    @inlineCallbacks
    def test_a_request_with_the_users_session_grants_its_agent_before_the_answer(self):
        token = yield self.log_in("alice")
        calls = []
        d = self.manager.ensure_agent("alice", token)
        d.addCallback(lambda address: calls.append((address, set(self.granted()))))
        yield self.finish_starts(d)
        ((address, granted_then),) = calls
        self.assertEqual(granted_then, {(address.host, address.port)})
        self.assertEqual(self.manager.grants.granted(), {"alice": (address.host, address.port)})

    @inlineCallbacks
    def test_a_granted_agent_is_answered_without_asking_the_firewall(self):
        token, endpoint = yield self.agent_of("alice")
        self.assertEqual(len(self.grant_calls()), 1)
        answers = yield gatherResults(
            [self.manager.ensure_agent("alice", token) for _ in range(5)]
            + [self.manager.locate_agent("alice", token) for _ in range(5)])
        self.assertEqual({(a.host, a.port) for a in answers}, {endpoint})
        self.assertEqual(len(self.grant_calls()), 1)

    @inlineCallbacks
    def test_concurrent_first_requests_all_wait_for_the_one_grant(self):
        token = yield self.log_in("alice")
        seen = []

        def check(address):
            seen.append((address.host, address.port) in self.granted())
        yield self.finish_starts(gatherResults(
            [self.manager.ensure_agent("alice", token).addCallback(check) for _ in range(4)]))
        self.assertEqual(seen, [True] * 4)
        self.assertEqual(len(self.grant_calls()), 1)

    @inlineCallbacks
    def test_locate_with_a_session_grants_too(self):
        token, endpoint = yield self.agent_of("alice")
        yield self.manager.revoke_sessions("alice")
        self.assertEqual(self.granted(), set())
        fresh = yield self.log_in("alice")
        self.assertEqual(self.granted(), set(), "a login alone grants nothing")
        address = yield self.manager.locate_agent("alice", fresh)
        self.assertEqual(self.granted(), {(address.host, address.port)})

    @inlineCallbacks
    def test_operators_asking_without_a_session_grant_nothing(self):
        token, endpoint = yield self.agent_of("alice")
        yield self.manager.revoke_sessions("alice")
        self.assertEqual((yield self.manager.start_agent("alice")).port, endpoint[1])
        self.assertEqual((yield self.manager.locate_agent("alice")).port, endpoint[1])
        self.assertEqual(self.granted(), set())
        self.assertEqual(self.manager.grants.granted(), {})

    @inlineCallbacks
    def test_a_refused_request_grants_nothing(self):
        alices, endpoint = yield self.agent_of("alice")
        yield self.manager.revoke_sessions("alice")
        bobs = yield self.log_in("bob")
        for ask in (self.manager.ensure_agent, self.manager.locate_agent):
            yield self.assertFailure(ask("alice", bobs), p.InvalidSession)
            yield self.assertFailure(ask("alice", alices), p.InvalidSession)
        self.assertEqual(self.granted(), set())

    # -- revoking --------------------------------------------------------------

    @inlineCallbacks
    def test_logout_revokes_with_the_last_session_only(self):
        first, endpoint = yield self.agent_of("alice")
        second = yield self.log_in("alice", client="192.0.2.2")
        yield self.finish_starts(self.manager.end_session(first))
        self.assertEqual(self.granted(), {endpoint}, "another session still uses it")
        revoked_before_the_stop = []
        self.provider.on_exit(lambda name, reason: revoked_before_the_stop.append(
            endpoint not in self.granted()))
        yield self.finish_starts(self.manager.end_session(second))
        self.assertEqual(self.granted(), set())
        self.assertEqual(revoked_before_the_stop, [True])

    @inlineCallbacks
    def test_a_firewall_that_fails_to_revoke_does_not_keep_the_agent_running(self):
        token, endpoint = yield self.agent_of("alice")
        del self.kernel["grants"]  # the table is gone: every nft call fails
        yield self.finish_starts(self.manager.end_session(token))
        self.assertFalse(self.provider.alive("alice"), "logged out and stopped all the same")
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_passwd_logout_name_and_remove_revoke_and_the_agent_runs_on(self):
        _, endpoint = yield self.agent_of("alice")
        yield self.manager.set_password("alice", "a new one")
        self.assertEqual(self.granted(), set())
        self.assertTrue(self.provider.alive("alice"), "only the proxy's reach ends")
        token = yield self.manager.authenticate("alice", "a new one", "192.0.2.1")
        self.assertEqual((yield self.agent_of("alice", token))[1], endpoint)
        self.assertEqual(self.granted(), {endpoint})
        yield self.manager.revoke_sessions("alice")
        self.assertEqual(self.granted(), set())
        self.assertTrue(self.provider.alive("alice"))
        _, bobs = yield self.agent_of("bob")
        self.assertEqual(self.granted(), {bobs})
        yield self.finish_starts(self.manager.remove_user("bob"))
        self.assertEqual(self.granted(), set())

    @inlineCallbacks
    def test_an_agent_that_ends_takes_its_grant_and_its_successor_is_granted_anew(self):
        token, endpoint = yield self.agent_of("alice")
        self.provider.crash("alice")
        self.assertEqual(self.granted(), set())
        self.assertEqual(self.manager.grants.granted(), {})
        _, again = yield self.agent_of("alice", token)
        self.assertNotEqual(again, endpoint)
        self.assertEqual(self.granted(), {again})

    @inlineCallbacks
    def test_the_sweep_revokes_the_grants_of_users_whose_sessions_expired(self):
        yield self.restart(session_idle_timeout=0.3)
        _, alices = yield self.agent_of("alice")
        _, bobs = yield self.agent_of("bob")
        yield deferLater(reactor, 0.4, lambda: None)
        yield self.log_in("bob")  # bob stays
        listener = RecordingListener()
        self.manager.invalidations.subscribe(listener)
        yield self.manager._sweep_sessions()
        self.assertEqual(self.granted(), {bobs})
        # the proxies drop alice's agent address and tunnels with her sessions
        self.assertEqual(listener.events, [("sessions_revoked", "alice")])
        self.assertTrue(self.provider.alive("alice"), "the idle culler stops it, later")

    @inlineCallbacks
    def test_a_restarted_manager_keeps_the_grants_of_live_sessions_only(self):
        alices, alice_endpoint = yield self.agent_of("alice")
        bobs, bob_endpoint = yield self.agent_of("bob")
        manager = yield self.restart()
        # adopted agents of users with a live session keep their grants (the
        # proxy's open tunnels go on) and answer without a new grant
        self.assertEqual(self.granted(), {alice_endpoint, bob_endpoint})
        self.assertEqual(manager.grants.granted(),
                         {"alice": alice_endpoint, "bob": bob_endpoint})
        answer = yield manager.ensure_agent("alice", alices)
        self.assertEqual((answer.host, answer.port), alice_endpoint)
        self.assertEqual(len(self.grant_calls()), 2)
        yield manager.revoke_sessions("bob")
        self.assertEqual(self.granted(), {alice_endpoint})
        # a grant left for a user without a session (one made as bob's session
        # ended, while the manager was killed): revoked at the next start
        self.kernel["grants"].granted.add(bob_endpoint)
        manager = yield self.restart()
        self.assertEqual(self.granted(), {alice_endpoint})
        self.assertEqual(manager.grants.granted(), {"alice": alice_endpoint})

    @inlineCallbacks
    def test_a_grant_made_while_the_last_session_ended_is_taken_back(self):
        token, endpoint = yield self.agent_of("alice")
        yield self.manager.revoke_sessions("alice")
        fresh = yield self.log_in("alice")
        # the session ends between the check and the grant
        real_grant = self.manager.grants.grant

        def grant_late(agent):
            d = self.manager.sessions.end_all("alice")
            return d.addCallback(lambda _: real_grant(agent))
        self.manager.grants.grant = grant_late
        yield self.assertFailure(self.manager.ensure_agent("alice", fresh), p.InvalidSession)
        self.assertEqual(self.granted(), set())


class FailingFirewallTests(SynchronousTestCase):
    """A firewall that refuses (its table is gone: an operator ran ``nft
    flush ruleset``) opens nothing and keeps no record: the next request
    tries again."""

    def test_a_refused_grant_is_no_record_and_the_next_request_tries_again(self):
        kernel = {}
        firewall = FakeFirewall("t", kernel)
        grants = AgentGrants(firewall)
        agent = RunningAgent("alice", p.AgentAddress("127.0.0.1", 20001), 0, 1.0)
        self.failureResultOf(grants.grant(agent), FirewallError)
        self.assertEqual(grants.granted(), {})
        firewall.start()
        self.assertTrue(self.successResultOf(grants.grant(agent)))
        self.assertEqual(kernel["t"].granted, {("127.0.0.1", 20001)})
        self.assertFalse(self.successResultOf(grants.grant(agent)), "granted already")


class GrantBooks(RuleBasedStateMachine):
    """Sessions open and close, agents start and end (ports are reused across
    users), the proxy asks, the sweep runs, the manager restarts: the fake
    kernel always grants exactly the agents of users with a live session
    that were asked for since they started, and a port never passes on a
    grant to the next agent that gets it."""

    USERS = ("alice", "bob", "carol")

    def __init__(self):
        super().__init__()
        self.kernel = {}
        self.firewall = FakeFirewall("t", self.kernel)
        self.firewall.start()
        self.grants = AgentGrants(self.firewall)
        self.sessions = {user: 0 for user in self.USERS}
        self.agents = {}
        self.asked = set()
        self.started = 0.0
        self.ended = []

    def _free_port(self, port_choice):
        taken = {agent.address.port for agent in self.agents.values()}
        free = [port for port in (20001, 20002, 20003, 20004) if port not in taken]
        return free[port_choice % len(free)]

    @rule(user=st.sampled_from(USERS))
    def log_in(self, user):
        self.sessions[user] += 1

    @rule(user=st.sampled_from(USERS))
    def log_out(self, user):
        if self.sessions[user]:
            self.sessions[user] -= 1
            if not self.sessions[user]:
                self.grants.revoke(user)
                self.asked.discard(user)

    @rule(user=st.sampled_from(USERS))
    def revoke_all(self, user):
        self.sessions[user] = 0
        self.grants.revoke(user)
        self.asked.discard(user)

    @rule(user=st.sampled_from(USERS), port_choice=st.integers(0, 3))
    def agent_starts(self, user, port_choice):
        if user in self.agents:
            return
        self.started += 1
        port = self._free_port(port_choice)
        self.firewall.protect("127.0.0.1", port)
        self.agents[user] = RunningAgent(user, p.AgentAddress("127.0.0.1", port), 0,
                                         self.started)

    @rule(user=st.sampled_from(USERS))
    def agent_ends(self, user):
        agent = self.agents.pop(user, None)
        if agent is not None:
            self.firewall.release("127.0.0.1", agent.address.port)
            self.grants.forget(user)
            self.asked.discard(user)
            self.ended.append(agent.address.port)

    @rule(choice=st.integers(0, 10))
    def a_grant_arrives_after_its_agent_ended(self, choice):
        """The kernel sees a grant after the release of its endpoint, before
        the port goes to another agent (calls reach the firewall in the
        order they are made, so never later): it must not open the port to
        the next agent that gets it."""
        held = {agent.address.port for agent in self.agents.values()}
        free = [port for port in self.ended if port not in held]
        if free:
            self.firewall.grant("127.0.0.1", free[choice % len(free)])

    @rule(user=st.sampled_from(USERS))
    def proxy_asks(self, user):
        if self.sessions[user] and user in self.agents:
            results = []
            self.grants.grant(self.agents[user]).addCallback(results.append)
            assert results, "the fake firewall answers at once"
            self.asked.add(user)

    @rule()
    def sweep(self):
        self.grants.retain({user for user, count in self.sessions.items() if count})

    @rule()
    def manager_restarts(self):
        self.grants = AgentGrants(FakeFirewall("t", self.kernel))
        live = {user for user, count in self.sessions.items() if count}
        self.grants.recover(self.agents, live)

    @invariant()
    def exactly_the_asked_agents_of_live_users_are_granted(self):
        expected = {(self.agents[user].address.host, self.agents[user].address.port)
                    for user in self.asked}
        table = self.kernel["t"]
        # what the proxy group reaches: granted endpoints that are agents'
        reached = table.granted & table.entries
        assert reached == expected, (reached, expected)
        assert self.grants.granted() == {
            user: (self.agents[user].address.host, self.agents[user].address.port)
            for user in self.asked}

    @invariant()
    def only_users_with_a_session_are_asked_for(self):
        assert all(self.sessions[user] and user in self.agents for user in self.asked)


class GrantBooksTests(SynchronousTestCase):
    def test_state_machine(self):
        run = GrantBooks.TestCase("runTest")
        run.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
        run.runTest()
