"""The provider contract against the in-memory FakeProvider, plus the test
controls the manager's unit tests rely on."""
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from pixelated_dispatcher.testing.fake_provider import (
    ADOPTED_EXIT_REASON, CRASH_REASON, FakeMachine, FakeProvider)
from pixelated_dispatcher.manager.providers.interface import AgentStartError, RunningAgent
from pixelated_dispatcher.protocol import AgentAddress

from pixelated_dispatcher.testing.provider_contract import credentials_for, make_provider_tests


class FakeFixture:
    adopted_exit_reason = ADOPTED_EXIT_REASON

    def __init__(self, test_case, start_delay=0.5, stop_delay=0.2):
        self.clock = Clock()
        self.machine = FakeMachine()
        self._delays = dict(start_delay=start_delay, stop_delay=stop_delay)
        self.providers = []
        self.provider = self.new_provider(keep_on_close=False)

    def new_provider(self, keep_on_close):
        provider = FakeProvider(self.clock, keep_on_close=keep_on_close, machine=self.machine,
                                **self._delays)
        self.providers.append(provider)
        return provider

    def data_dir(self, username):
        return "/nonexistent/users/%s/data" % (username,)

    def settle(self, d):
        fired = []

        def note(result):
            fired.append(True)
            return result
        d.addBoth(note)
        for _ in range(1000):
            if fired:
                break
            self.clock.advance(0.1)
        return d

    def received(self, username, provider=None):
        return succeed((provider or self.provider).received(username))

    def kill_from_outside(self, username, provider=None):
        (provider or self.provider).crash(username)

    def break_next_start(self, username):
        self.provider.fail_next_start(username)

    def live_agents(self, username):
        return (sum(1 for provider in self.providers if provider.alive(username))
                + (1 if username in self.machine.left else 0))


class FakeProviderContractTests(make_provider_tests(FakeFixture)):
    pass


class FakeProviderControlTests(TestCase):
    """The knobs a manager test turns, and that they behave like time does."""

    def setUp(self):
        self.clock = Clock()
        self.provider = FakeProvider(self.clock, start_delay=5)
        self.exits = []
        self.provider.on_exit(lambda username, reason: self.exits.append((username, reason)))

    def test_start_takes_the_configured_delay(self):
        d = self.provider.start("alice", "/d", credentials_for("alice"))
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.assertEqual(self.provider.running(), {})
        self.clock.advance(0.1)
        agent = self.successResultOf(d)
        self.assertEqual(agent.started, 5.0)
        self.assertEqual(self.provider.running(), {"alice": agent})

    def test_records_credentials_and_launches(self):
        self.provider.start("alice", "/d", credentials_for("alice", "pw1"))
        self.provider.start("alice", "/d", credentials_for("alice", "pw2"))
        self.clock.advance(5)
        self.assertEqual(self.provider.credentials, {"alice": credentials_for("alice", "pw1")})
        self.assertEqual(self.provider.launches, ["alice"])

    def test_fail_next_start_fails_only_the_next_one(self):
        self.provider.fail_next_start("alice", "disk on fire")
        d = self.provider.start("alice", "/d", credentials_for("alice"))
        self.clock.advance(5)
        self.assertEqual(str(self.failureResultOf(d, AgentStartError).value), "disk on fire")
        d = self.provider.start("alice", "/d", credentials_for("alice"))
        self.clock.advance(5)
        self.assertIsInstance(self.successResultOf(d), RunningAgent)
        self.assertEqual(self.provider.launches, ["alice", "alice"])

    def test_crash_reports_the_reason(self):
        self.provider.start("alice", "/d", credentials_for("alice"))
        self.clock.advance(5)
        self.provider.crash("alice", "exited with status 3")
        self.assertEqual(self.exits, [("alice", "exited with status 3")])
        self.assertEqual(self.provider.running(), {})

    def test_crash_while_starting_fails_the_start(self):
        d = self.provider.start("alice", "/d", credentials_for("alice"))
        self.provider.crash("alice")
        self.assertIn(CRASH_REASON, str(self.failureResultOf(d, AgentStartError).value))
        self.assertEqual(self.exits, [])
        self.clock.advance(10)
        self.assertEqual(self.provider.running(), {})

    def test_crash_of_unknown_agent_is_a_test_bug(self):
        self.assertRaises(KeyError, self.provider.crash, "nobody")

    def test_recover_adopts_the_recoverable_agents(self):
        left = RunningAgent("alice", AgentAddress("127.0.0.1", 4567), 0, 1.0)
        provider = FakeProvider(self.clock, recoverable=[left])
        self.assertEqual(self.successResultOf(provider.recover()), [left])
        self.assertEqual(provider.running(), {"alice": left})

    def test_crash_of_an_adopted_agent_says_exited(self):
        left = RunningAgent("alice", AgentAddress("127.0.0.1", 4567), 0, 1.0)
        provider = FakeProvider(self.clock, recoverable=[left])
        exits = []
        provider.on_exit(lambda username, reason: exits.append((username, reason)))
        provider.recover()
        provider.crash("alice")
        self.assertEqual(exits, [("alice", ADOPTED_EXIT_REASON)])

    def test_keep_on_close_hands_running_agents_to_the_machine(self):
        machine = FakeMachine()
        first = FakeProvider(self.clock, keep_on_close=True, machine=machine)
        d = first.start("alice", "/d", credentials_for("alice", "pw"))
        self.clock.advance(0)
        alice = self.successResultOf(d)
        self.successResultOf(first.close())
        self.assertEqual(machine.left, {"alice": alice})
        second = FakeProvider(self.clock, machine=machine)
        self.assertEqual(self.successResultOf(second.recover()), [alice])
        self.assertEqual(machine.left, {})
        self.assertTrue(second.received("alice")["password_received"])
        self.assertEqual(second.launches, [])

    def test_a_killed_manager_leaves_running_agents_when_it_keeps_them(self):
        machine = FakeMachine()
        first = FakeProvider(self.clock, keep_on_close=True, machine=machine)
        exits = []
        first.on_exit(lambda username, reason: exits.append(username))
        first.start("alice", "/d", credentials_for("alice"))
        self.clock.advance(0)
        alice = first.running()["alice"]
        starting = first.start("bob", "/d", credentials_for("bob"))
        first.die()
        self.clock.advance(10)
        self.assertNoResult(starting)
        self.assertEqual((first.running(), exits), ({}, []))
        self.assertEqual(machine.left, {"alice": alice})
        second = FakeProvider(self.clock, machine=machine)
        self.assertEqual(self.successResultOf(second.recover()), [alice])

    def test_a_killed_manager_takes_its_agents_along_when_it_does_not_keep_them(self):
        machine = FakeMachine()
        first = FakeProvider(self.clock, machine=machine)
        first.start("alice", "/d", credentials_for("alice"))
        self.clock.advance(0)
        first.die()
        self.assertEqual(machine.left, {})
        self.assertFalse(first.alive("alice"))
