"""The manager's rules that need no database: who may do what, login backoff,
idle culling, capacity and the start queue."""
from hypothesis import given, strategies as st
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher import protocol as p
from pixelated_dispatcher.manager.agent_accounts import UidRange
from pixelated_dispatcher.manager.culler import IdleCuller
from pixelated_dispatcher.manager.login_limits import LoginLimiter
from pixelated_dispatcher.manager.peer_policy import ADMIN, PROXY, PeerCredentials, PeerPolicy
from pixelated_dispatcher.testing.fake_provider import FakeProvider
from pixelated_dispatcher.manager.supervisor import AgentSupervisor

ALL = p.PROXY_COMMANDS + p.ADMIN_COMMANDS


def CREDENTIALS():
    """The credentials line of a start (the manager opens it from a session)."""
    return succeed(b"{}\n")


class PeerPolicyTests(SynchronousTestCase):
    policy = PeerPolicy(admin_gid=900, proxy_gid=901, admin_uids=frozenset({0}))

    def peer(self, uid, gid, *groups):
        return PeerCredentials(pid=1, uid=uid, gid=gid, groups=frozenset((gid,) + groups))

    def test_root_and_admin_group_may_do_everything(self):
        for peer in (self.peer(0, 0), self.peer(1000, 1000, 900), self.peer(1000, 900)):
            self.assertEqual(self.policy.role(peer), ADMIN)
            self.assertTrue(all(self.policy.allows(peer, command) for command in ALL))

    def test_proxy_group_may_use_only_proxy_commands(self):
        peer = self.peer(120, 120, 901)
        self.assertEqual(self.policy.role(peer), PROXY)
        for command in p.PROXY_COMMANDS:
            self.assertTrue(self.policy.allows(peer, command), command)
        for command in p.ADMIN_COMMANDS:
            self.assertFalse(self.policy.allows(peer, command), command)

    @given(st.integers(1, 2 ** 31 - 1), st.sets(st.integers(0, 2 ** 31 - 1), max_size=5))
    def test_anybody_else_may_do_nothing(self, uid, groups):
        groups -= {900, 901}
        peer = PeerCredentials(1, uid, min(groups) if groups else uid + 1, frozenset(groups))
        if peer.gid in (900, 901):
            return
        self.assertIsNone(self.policy.role(peer))
        self.assertFalse(any(self.policy.allows(peer, command) for command in ALL))

    def test_unknown_peer_is_refused(self):
        self.assertFalse(self.policy.allows(None, p.ResolveSession))

    def test_uid_range_refuses_root_and_system_ids(self):
        self.assertEqual(UidRange.parse("200000-299999"), UidRange(200000, 299999))
        for text in ("0-100", "999-5000", "300-200", "abc", "5000-4000", "1000"):
            self.assertRaises(ValueError, UidRange.parse, text)


class LoginLimiterTests(SynchronousTestCase):

    def setUp(self):
        self.clock = Clock()
        self.limiter = LoginLimiter(self.clock, free_failures=5, base=1.0, maximum=60.0)

    def fail(self, times, user="alice", client="192.0.2.1"):
        for _ in range(times):
            self.limiter.failed(user, client)

    def test_five_failures_are_free_then_the_wait_doubles(self):
        self.fail(4)
        self.assertEqual(self.limiter.wait_for("alice", "192.0.2.1"), 0)
        self.fail(1)
        self.assertEqual(self.limiter.wait_for("alice", "192.0.2.1"), 1.0)
        self.fail(1)
        self.assertEqual(self.limiter.wait_for("alice", "192.0.2.1"), 2.0)
        self.fail(3)
        self.assertEqual(self.limiter.wait_for("alice", "192.0.2.1"), 16.0)
        self.fail(10)
        self.assertEqual(self.limiter.wait_for("alice", "192.0.2.1"), 60.0)
        self.clock.advance(60.5)
        self.assertEqual(self.limiter.wait_for("alice", "192.0.2.1"), 0)

    def test_limits_apply_per_name_and_network_and_per_address(self):
        self.fail(6, user="alice", client="192.0.2.1")
        self.assertGreater(self.limiter.wait_for("alice", "192.0.2.200"), 0)  # same /24
        self.assertEqual(self.limiter.wait_for("alice", "198.51.100.7"), 0)  # not locked out
        self.assertGreater(self.limiter.wait_for("bob", "192.0.2.1"), 0)
        self.assertEqual(self.limiter.wait_for("bob", "198.51.100.7"), 0)

    def test_the_global_ceiling_per_name_spares_known_networks(self):
        self.limiter.succeeded("alice", "203.0.113.5")  # her home network
        for network in range(25):  # 5 failures from each of 25 networks
            self.fail(5, client="10.0.%d.1" % network)
        self.assertGreater(self.limiter.wait_for("alice", "198.51.100.7"), 0)
        self.assertEqual(self.limiter.wait_for("alice", "203.0.113.9"), 0)

    def test_one_address_trying_many_names_is_limited(self):
        for n in range(6):
            self.limiter.failed("user%d" % n, "192.0.2.1")
        self.assertGreater(self.limiter.wait_for("fresh-name", "192.0.2.1"), 0)

    def test_success_clears_the_record(self):
        self.fail(7)
        self.limiter.succeeded("alice", "192.0.2.1")
        self.assertEqual(self.limiter.wait_for("alice", "192.0.2.1"), 0)

    def test_memory_is_bounded(self):
        limiter = LoginLimiter(self.clock, max_keys=100)
        for n in range(1000):
            limiter.failed("user%d" % n, "10.0.%d.%d" % (n // 256, n % 256))
        self.assertLessEqual(len(limiter._records), 100)


class _SupervisedCase(SynchronousTestCase):
    """A supervisor over the FakeProvider; directory creation is skipped."""

    def setUp(self):
        from pixelated_dispatcher.manager import supervisor
        self.patch(supervisor, "deferToThreadPool", lambda reactor, pool, f, *a: succeed(None))

    def make(self, **kwargs):
        self.clock = Clock()
        self.provider = FakeProvider(self.clock, start_delay=1.0)
        self.supervisor = AgentSupervisor(None, self.provider, "/nonexistent", None, **kwargs)
        return self.supervisor


class CapacityTests(_SupervisedCase):

    def test_start_beyond_max_agents_is_capacity_reached_and_frees_up(self):
        supervisor = self.make(max_agents=2)
        a = supervisor.ensure("a", credentials=CREDENTIALS)
        b = supervisor.ensure("b", credentials=CREDENTIALS)
        failure = self.failureResultOf(supervisor.ensure("c", credentials=CREDENTIALS),
                                       p.CapacityReached)
        self.assertIn("retry after", str(failure.value))
        self.clock.advance(1)
        self.successResultOf(a), self.successResultOf(b)
        self.failureResultOf(supervisor.ensure("c", credentials=CREDENTIALS),
                             p.CapacityReached)
        # running agents are always served
        self.successResultOf(supervisor.ensure("a", credentials=CREDENTIALS))
        supervisor.stop("a")
        self.clock.advance(1)
        d = supervisor.ensure("c", credentials=CREDENTIALS)
        self.clock.advance(1)
        self.successResultOf(d)

    def test_concurrent_starts_are_limited_and_served_first_come_first_served(self):
        supervisor = self.make(max_concurrent_starts=2)
        waiting = {name: supervisor.ensure(name, credentials=CREDENTIALS) for name in "abcde"}
        self.assertEqual(self.provider.launches, ["a", "b"])
        self.clock.advance(1)
        self.assertEqual(self.provider.launches, ["a", "b", "c", "d"])
        self.clock.advance(1)
        self.assertEqual(self.provider.launches, ["a", "b", "c", "d", "e"])
        self.clock.advance(1)
        for d in waiting.values():
            self.successResultOf(d)


class CredentialsTests(_SupervisedCase):

    def test_without_credentials_a_running_agent_is_answered_and_none_started(self):
        supervisor = self.make()
        failure = self.failureResultOf(supervisor.ensure("a", "operator"), p.AgentStartFailed)
        self.assertIn("starts only with the credentials sealed under a's session",
                      str(failure.value))
        self.assertEqual(self.provider.launches, [])
        self.assertEqual(supervisor.state("a"), "stopped", "not counted as a failed start")
        d = supervisor.ensure("a", credentials=lambda: succeed(b'{"user": "a"}\n'))
        self.clock.advance(1)
        address = self.successResultOf(d)
        self.assertEqual(self.provider.credentials["a"], b'{"user": "a"}\n')
        self.assertEqual(self.successResultOf(supervisor.ensure("a", "operator")), address)

    def test_credentials_are_fetched_only_for_a_start_that_happens(self):
        supervisor = self.make()
        fetched = []

        def credentials():
            fetched.append(True)
            return succeed(b"{}\n")
        first = supervisor.ensure("a", credentials=credentials)
        second = supervisor.ensure("a", credentials=credentials)  # shares the start
        self.clock.advance(1)
        self.successResultOf(supervisor.ensure("a", credentials=credentials))  # runs
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual(fetched, [True])

    def test_credentials_that_cannot_be_had_start_nothing(self):
        supervisor = self.make()
        d = supervisor.ensure("a", credentials=lambda: fail(p.InvalidSession("log in again")))
        self.failureResultOf(d, p.InvalidSession)
        self.assertEqual(self.provider.launches, [])
        self.assertEqual(supervisor.state("a"), "stopped")


class CullerTests(_SupervisedCase):

    def setUp(self):
        super().setUp()
        supervisor_ = self.make()
        self.culler = IdleCuller(self.clock, supervisor_, timeout=100)
        for name in ("busy", "idle"):
            supervisor_.ensure(name, credentials=CREDENTIALS)
        self.clock.advance(1)

    def test_idle_agent_is_stopped_and_one_in_use_is_not(self):
        for _ in range(5):
            self.clock.advance(30)
            self.culler.activity(["busy"])
            self.culler.cull()
        self.clock.advance(1)
        self.assertEqual(set(self.supervisor.running()), {"busy"})
        self.assertTrue(self.culler.last_activity("busy") > 100)
        self.assertIsNone(self.culler.last_activity("idle"))

    def test_timeout_zero_disables_culling(self):
        self.culler.timeout = 0
        self.clock.advance(10_000)
        self.assertEqual(self.culler.cull(), 0)
        self.assertEqual(set(self.supervisor.running()), {"busy", "idle"})

    def test_the_culling_timer_runs_on_the_clock(self):
        service = self.culler.service()
        service.startService()
        self.addCleanup(service.stopService)
        self.clock.advance(125)  # a check every 25 s
        self.clock.advance(1)
        self.assertEqual(self.supervisor.running(), {})
