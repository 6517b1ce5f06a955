"""The login limiter's promises, checked over random sequences of failures,
successes and time (hypothesis state machine), and the guesses per day of
``bench/login_guesses.py``.

* An attacker failing for alice from some networks never makes alice wait
  on another network, until the name's failures from everywhere reach the
  global ceiling; never on a network she logged in from (known).
* From one network the wait doubles after the free failures, up to the
  maximum; a quiet maximum later nobody waits.
* The table never holds more than ``max_keys`` keys.
"""
import ipaddress
from collections import Counter

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from bench.login_guesses import attack
from pixelated_dispatcher.manager.login_limits import LoginLimiter, client_network

FREE, GLOBAL_FREE, MAXIMUM = 3, 12, 60.0
NAMES = ("alice", "bob")
#: Clients in four networks: two IPv4 /24s, one IPv6 /64, and the IPv4-mapped
#: form of an address of the first /24.
CLIENTS = ("192.0.2.1", "192.0.2.77", "198.51.100.1", "198.51.100.9",
           "2001:db8:0:1::5", "2001:db8:0:1:ffff::9", "::ffff:192.0.2.200")


class LimiterMachine(RuleBasedStateMachine):
    """The limiter against what a user of it must be able to count on."""

    max_keys = 10_000

    @initialize()
    def start(self):
        self.clock = Clock()
        self.limiter = LoginLimiter(self.clock, free_failures=FREE, maximum=MAXIMUM,
                                    global_free_failures=GLOBAL_FREE, max_keys=self.max_keys)
        #: failures per (name, network) since that pair's last success
        self.net_failures = Counter()
        #: failures per name, from unknown networks (an upper bound of the
        #: drained global count)
        self.global_failures = Counter()
        self.known = set()
        self.last_failure = None
        #: (name, network) -> consecutive failures at the current instant
        self.burst = Counter()

    @rule(name=st.sampled_from(NAMES), client=st.sampled_from(CLIENTS))
    def fail(self, name, client):
        network = client_network(client)
        self.limiter.failed(name, client)
        self.net_failures[name, network] += 1
        if (name, network) not in self.known:
            self.global_failures[name] += 1
        self.last_failure = self.clock.seconds()
        self.burst[name, network] += 1

    @rule(name=st.sampled_from(NAMES), client=st.sampled_from(CLIENTS))
    def succeed(self, name, client):
        network = client_network(client)
        self.limiter.succeeded(name, client)
        self.net_failures[name, network] = 0
        self.known.add((name, network))
        self.burst[name, network] = 0

    @rule(seconds=st.floats(min_value=0, max_value=3 * MAXIMUM))
    def advance(self, seconds):
        self.clock.advance(seconds)
        if seconds > 0:
            self.burst.clear()

    def fresh_client(self, network):
        """An address of ``network`` that never failed (no per-address count)."""
        net = ipaddress.ip_network(network)
        return str(net[200])

    @invariant()
    def other_networks_do_not_lock_a_user_out(self):
        if not hasattr(self, "limiter") or self.max_keys < 10_000:
            return
        for name in NAMES:
            for network in {client_network(c) for c in CLIENTS}:
                if self.net_failures[name, network] >= FREE:
                    continue
                wait = self.limiter.wait_for(name, self.fresh_client(network))
                if (name, network) in self.known or self.global_failures[name] < GLOBAL_FREE:
                    assert wait == 0, (name, network, wait)

    @invariant()
    def backoff_doubles_up_to_the_maximum(self):
        if not hasattr(self, "limiter") or self.max_keys < 10_000:
            return
        for (name, network), count in self.burst.items():
            if count >= FREE:
                expected = min(MAXIMUM, 2.0 ** (count - FREE))
                assert self.limiter.wait_for(name, self.fresh_client(network)) >= expected

    @invariant()
    def waits_are_bounded(self):
        if not hasattr(self, "limiter"):
            return
        quiet = (float("inf") if self.last_failure is None
                 else self.clock.seconds() - self.last_failure)
        for name in NAMES:
            for client in CLIENTS:
                wait = self.limiter.wait_for(name, client)
                assert 0 <= wait <= MAXIMUM
                assert wait <= max(0.0, MAXIMUM - quiet)

    @invariant()
    def memory_is_bounded(self):
        if hasattr(self, "limiter"):
            assert len(self.limiter._records) <= self.max_keys


class SmallTableMachine(LimiterMachine):
    max_keys = 5


LimiterMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                            deadline=None)
SmallTableMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=40,
                                               deadline=None)
TestLimiterMachine = LimiterMachine.TestCase
TestSmallTableMachine = SmallTableMachine.TestCase


class NetworkTests(SynchronousTestCase):
    def test_client_networks(self):
        self.assertEqual(client_network("192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(client_network("::ffff:192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(client_network("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(client_network("unix"), "unix")


class GuessesPerDay(SynchronousTestCase):
    """The figures docs/security.rst quotes (defaults: 5 free failures per
    network, 100 per name, 900 s maximum), from ``bench/login_guesses.py``."""

    def test_one_network(self):
        result = attack(7, 1)
        self.assertLessEqual(result["per_day"], 100)
        self.assertEqual(result["elsewhere"], 0)

    def test_many_networks_meet_the_ceiling_but_not_at_home(self):
        result = attack(7, 0)
        self.assertLessEqual(result["per_day"], 210)
        self.assertEqual(result["home"], 0)
        self.assertGreater(result["elsewhere"], 0)
