"""Any order of requests, stops, crashes, failed starts, idleness, time and
manager restarts keeps the supervisor's promises: one agent per user at most,
never above capacity, its state always agrees with the provider, and a
restarted manager adopts exactly the agents that were running."""
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from pixelated_dispatcher import protocol as p
from pixelated_dispatcher.manager import supervisor as supervisor_module
from pixelated_dispatcher.manager.culler import IdleCuller
from pixelated_dispatcher.testing.fake_provider import FakeProvider
from pixelated_dispatcher.manager.supervisor import (FAILED, RUNNING, STARTING, STOPPED,
                                                     STOPPING, AgentSupervisor)

USERS = st.sampled_from(["alice", "bob", "carol", "dave"])
MAX_AGENTS = 2


def CREDENTIALS():
    """The credentials line of a start (the manager opens it from a session)."""
    return succeed(b"{}\n")


class SupervisorMachine(RuleBasedStateMachine):

    def __init__(self):
        super().__init__()
        self._patched = supervisor_module.deferToThreadPool
        supervisor_module.deferToThreadPool = lambda reactor, pool, f, *a: succeed(None)
        self.clock = Clock()
        self.outcomes = []
        self._boot(FakeProvider(self.clock, start_delay=1.0, stop_delay=0.5,
                                keep_on_close=True))

    def _boot(self, provider):
        """A manager (supervisor and culler) over ``provider``, after recovery."""
        self.provider = provider
        self.supervisor = AgentSupervisor(None, provider, "/nonexistent", None,
                                          max_agents=MAX_AGENTS, max_concurrent_starts=1)
        self.culler = IdleCuller(self.clock, self.supervisor, timeout=30)
        self._watch(self.supervisor.recover())

    def teardown(self):
        supervisor_module.deferToThreadPool = self._patched

    def _watch(self, d):
        d.addBoth(self.outcomes.append)

    @rule(user=USERS)
    def request(self, user):
        self._watch(self.supervisor.ensure(user, credentials=CREDENTIALS))

    @rule(user=USERS)
    def stop(self, user):
        self._watch(self.supervisor.stop(user))

    @rule(user=USERS)
    def crash(self, user):
        if user in self.provider.running():
            self.provider.crash(user)

    @rule(user=USERS)
    def fail_next_start(self, user):
        self.provider.fail_next_start(user, "exited with status 1")

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 5.0, 40.0]))
    def time_passes(self, seconds):
        self.clock.advance(seconds)

    @rule(killed=st.booleans())
    def manager_restarts(self, killed):
        """The manager stops (or is killed); the next one adopts what ran."""
        running = set(self.provider.running())
        if killed:
            self.provider.die()
        else:
            self._watch(self.provider.close())
            self.clock.advance(1.0)
        self._boot(FakeProvider(self.clock, start_delay=1.0, stop_delay=0.5,
                                keep_on_close=True, machine=self.provider.machine))
        assert set(self.supervisor.running()) == running, (running, self.supervisor.running())

    @rule(users=st.lists(USERS, max_size=3))
    def activity_and_cull(self, users):
        self.culler.activity(users)
        self.culler.cull()

    @invariant()
    def never_above_capacity(self):
        alive = [user for user in ("alice", "bob", "carol", "dave") if self.provider.alive(user)]
        assert len(alive) <= MAX_AGENTS, alive

    @invariant()
    def state_agrees_with_the_provider(self):
        running = self.provider.running()
        for user in ("alice", "bob", "carol", "dave"):
            state = self.supervisor.state(user)
            if state == RUNNING:
                assert user in running, (user, state)
            elif state in (STOPPED, FAILED):
                assert not self.provider.alive(user), (user, state)
            else:
                assert state in (STARTING, STOPPING), state

    @invariant()
    def every_outcome_is_an_address_none_or_a_named_error(self):
        for outcome in self.outcomes:
            if hasattr(outcome, "check"):
                assert outcome.check(p.AgentStartFailed, p.CapacityReached), outcome
            else:
                assert outcome is None or isinstance(outcome, (p.AgentAddress, list)), outcome


SupervisorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                               deadline=None)
TestSupervisorStateMachine = SupervisorMachine.TestCase
