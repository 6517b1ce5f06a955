"""What every IAgentProvider must do, as one test suite for real and fake alike.

flocker's "verified fakes": the same tests run against the real process
provider (real agents, real processes) and the in-memory fake the manager's
unit tests use, so the fake cannot drift from what the manager will meet in
production.

A test module builds its test case with::

    class ProcessProviderContractTests(make_provider_tests(make_fixture)):
        pass

where ``make_fixture(test_case)`` returns an object with these hooks (it
registers its own cleanup on ``test_case``):

``provider``
    the provider under test; its ``close()`` stops its agents.
``new_provider(keep_on_close) -> provider``
    another provider on the same state (state directory, process table,
    Docker daemon): a manager restart. The fixture cleans it up.
``data_dir(username) -> str``
    a data directory for that user (existing, if the provider needs it).
``settle(d) -> Deferred``
    ``d``, once it has had the chance to fire: the real fixture just returns
    it (trial waits); the fake advances its clock.
``received(username, provider=None) -> Deferred[dict]``
    what the user's agent running under ``provider`` (default: ``provider``)
    learnt from its credentials, in the shape of the demo agent's ``/whoami``.
``kill_from_outside(username, provider=None)``
    end the agent running under ``provider`` as an operator's ``kill -9`` would.
``adopted_exit_reason``
    what ``on_exit`` says when an adopted agent ends by itself (an adopted
    process is not the manager's child: its exit status is unknown).
``break_next_start(username)``
    make the next start of that user's agent fail.
``agent_host`` (optional, default ``127.0.0.1``)
    the address agents are reached at (a swarm node's address).
``live_agents(username) -> int``
    how many agents of that user exist right now (live processes, for real).
"""
import json
from typing import Any, Callable, List, Tuple, Type

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from pixelated_dispatcher.manager.providers.interface import (
    AgentStartError, IAgentProvider, IMeasuresMemory, IRunsOnNodes, RunningAgent)


def credentials_for(username: str, password: str = "correct horse battery staple") -> bytes:
    """The line the manager writes to an agent's stdin."""
    return json.dumps({"leap_provider_hostname": "example.org", "user": username,
                       "password": password}).encode("utf-8") + b"\n"


class _Exits:
    """Records ``on_exit`` calls; ``next()`` fires at the next one."""

    def __init__(self, provider: IAgentProvider) -> None:
        self.calls: List[Tuple[str, str]] = []
        self._waiters: List[Deferred] = []
        provider.on_exit(self._exited)

    def _exited(self, username: str, reason: str) -> None:
        self.calls.append((username, reason))
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback((username, reason))

    def next(self) -> Deferred:
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d


def make_provider_tests(fixture_factory: Callable[[TestCase], Any], *,
                        runs_on_nodes: bool = False,
                        measures_memory: bool = False) -> Type[TestCase]:
    """A TestCase base class running the provider contract on
    ``fixture_factory(test_case)``.

    ``runs_on_nodes`` and ``measures_memory`` declare the optional
    interfaces (``IRunsOnNodes``, ``IMeasuresMemory``) the provider has:
    the contract checks the declaration, and holds the provider to the
    interfaces it declares (a test that does not apply is not there, rather
    than skipped).
    """

    class ProviderContractTests(TestCase):
        timeout = 30

        def setUp(self) -> None:
            self.fixture = fixture_factory(self)
            self.provider = self.fixture.provider
            self.exits = _Exits(self.provider)

        def start(self, username: str,
                  password: str = "correct horse battery staple") -> Deferred:
            return self.provider.start(username, self.fixture.data_dir(username),
                                       credentials_for(username, password))

        def test_provides_interface(self) -> Any:
            self.assertTrue(verifyObject(IAgentProvider, self.provider))
            self.assertEqual(IMeasuresMemory.providedBy(self.provider), measures_memory)
            self.assertEqual(IRunsOnNodes.providedBy(self.provider), runs_on_nodes)
            if measures_memory:
                self.assertTrue(verifyObject(IMeasuresMemory, self.provider))
            if runs_on_nodes:
                self.assertTrue(verifyObject(IRunsOnNodes, self.provider))

        if runs_on_nodes:
            @inlineCallbacks
            def test_node_of_running_agents(self) -> Any:
                nodes = IRunsOnNodes(self.provider)
                self.assertIsNone(nodes.node_of("alice"))
                yield self.fixture.settle(self.start("alice"))
                node = nodes.node_of("alice")
                self.assertTrue(node)
                self.assertEqual(nodes.agents_per_node(), {node: 1})

        def test_accounts_can_be_given(self) -> Any:
            """The manager sets ``accounts`` on every provider it runs as root."""
            self.assertTrue(self.provider.accounts is None or callable(self.provider.accounts))

        if measures_memory:
            @inlineCallbacks
            def test_memory_of_running_agents_measured_by_the_provider(self) -> Any:
                measures = IMeasuresMemory(self.provider)
                yield self.fixture.settle(self.start("alice"))
                usage = yield self.fixture.settle(measures.memory_usage())
                self.assertEqual(list(usage), ["alice"])
                self.assertGreater(usage["alice"], 0)
                yield self.fixture.settle(self.provider.stop("alice"))
                usage = yield self.fixture.settle(measures.memory_usage())
                self.assertEqual(usage, {})

        @inlineCallbacks
        def test_start_gives_a_running_agent(self) -> Any:
            agent = yield self.fixture.settle(self.start("alice"))
            self.assertIsInstance(agent, RunningAgent)
            self.assertEqual(agent.username, "alice")
            self.assertEqual(agent.address.host,
                             getattr(self.fixture, "agent_host", "127.0.0.1"))
            self.assertTrue(0 < agent.address.port < 65536)
            self.assertEqual(self.provider.running(), {"alice": agent})
            self.assertEqual(self.fixture.live_agents("alice"), 1)

        @inlineCallbacks
        def test_credentials_reach_the_agent(self) -> Any:
            yield self.fixture.settle(self.start("alice", password="s3cret"))
            received = yield self.fixture.received("alice")
            self.assertEqual(received["credentials_user"], "alice")
            self.assertEqual(received["leap_provider_hostname"], "example.org")
            self.assertTrue(received["password_received"])
            self.assertTrue(received["authenticated"])

        @inlineCallbacks
        def test_concurrent_starts_give_one_agent(self) -> Any:
            first, second = self.start("alice"), self.start("alice")
            agents = yield self.fixture.settle(gatherResults([first, second]))
            self.assertEqual(agents[0], agents[1])
            again = yield self.fixture.settle(self.start("alice"))
            self.assertEqual(again, agents[0])
            self.assertEqual(list(self.provider.running()), ["alice"])
            self.assertEqual(self.fixture.live_agents("alice"), 1)

        @inlineCallbacks
        def test_stop_removes_the_agent_and_reports_it(self) -> Any:
            yield self.fixture.settle(self.start("alice"))
            yield self.fixture.settle(self.provider.stop("alice"))
            self.assertEqual(self.provider.running(), {})
            self.assertEqual(self.exits.calls, [("alice", "stopped")])
            self.assertEqual(self.fixture.live_agents("alice"), 0)

        @inlineCallbacks
        def test_stop_of_an_agent_that_does_not_run_does_nothing(self) -> Any:
            result = yield self.fixture.settle(self.provider.stop("nobody"))
            self.assertIsNone(result)
            self.assertEqual(self.exits.calls, [])

        @inlineCallbacks
        def test_a_stopped_agent_can_be_started_again(self) -> Any:
            yield self.fixture.settle(self.start("alice"))
            stopping = self.provider.stop("alice")
            restarted = self.start("alice")  # asked while the stop is in flight
            yield self.fixture.settle(stopping)
            agent = yield self.fixture.settle(restarted)
            self.assertEqual(self.provider.running(), {"alice": agent})
            self.assertEqual(self.exits.calls, [("alice", "stopped")])
            self.assertEqual(self.fixture.live_agents("alice"), 1)

        @inlineCallbacks
        def test_agent_killed_from_outside_is_reported_and_forgotten(self) -> Any:
            yield self.fixture.settle(self.start("alice"))
            yield self.fixture.settle(self.start("bob"))
            exited = self.exits.next()
            self.fixture.kill_from_outside("alice")
            username, reason = yield self.fixture.settle(exited)
            self.assertEqual(username, "alice")
            self.assertIn("signal 9", reason)
            self.assertEqual(list(self.provider.running()), ["bob"])
            self.assertEqual(self.fixture.live_agents("alice"), 0)

        @inlineCallbacks
        def test_failing_start_raises_and_leaves_nothing_running(self) -> Any:
            self.fixture.break_next_start("alice")
            starting = self.start("alice")
            yield self.assertFailure(self.fixture.settle(starting), AgentStartError)
            self.assertEqual(self.provider.running(), {})
            self.assertEqual(self.fixture.live_agents("alice"), 0)
            # it never ran, so it never "ended"
            self.assertEqual(self.exits.calls, [])

        @inlineCallbacks
        def test_stop_during_start_fails_the_start(self) -> Any:
            starting = self.start("alice")
            stopping = self.provider.stop("alice")
            yield self.assertFailure(self.fixture.settle(starting), AgentStartError)
            yield self.fixture.settle(stopping)
            self.assertEqual(self.provider.running(), {})
            self.assertEqual(self.fixture.live_agents("alice"), 0)

        @inlineCallbacks
        def test_agents_kept_at_close_are_recovered_by_the_next_provider(self) -> Any:
            first = self.fixture.new_provider(keep_on_close=True)
            first_exits = _Exits(first)
            alice, bob = yield self.fixture.settle(gatherResults([
                first.start(name, self.fixture.data_dir(name), credentials_for(name))
                for name in ("alice", "bob")]))
            yield self.fixture.settle(first.close())
            self.assertEqual(first.running(), {})
            self.assertEqual(first_exits.calls, [])
            self.assertEqual(self.fixture.live_agents("alice"), 1)
            self.assertEqual(self.fixture.live_agents("bob"), 1)

            second = self.fixture.new_provider(keep_on_close=False)
            second_exits = _Exits(second)
            adopted = yield self.fixture.settle(second.recover())
            self.assertEqual(sorted(adopted, key=lambda a: a.username), [alice, bob])
            self.assertEqual(second.running(), {"alice": alice, "bob": bob})
            # the agent still knows what the login told it: no password needed again
            received = yield self.fixture.received("alice", second)
            self.assertTrue(received["authenticated"])
            # a start for an adopted agent is that agent, never a second one
            again = yield self.fixture.settle(second.start(
                "alice", self.fixture.data_dir("alice"), credentials_for("alice")))
            self.assertEqual(again, alice)
            self.assertEqual(self.fixture.live_agents("alice"), 1)

            # an adopted agent's end is noticed, and a stop reaches it
            exited = second_exits.next()
            self.fixture.kill_from_outside("bob", second)
            ended = yield self.fixture.settle(exited)
            self.assertEqual(ended, ("bob", self.fixture.adopted_exit_reason))
            yield self.fixture.settle(second.stop("alice"))
            self.assertEqual(second_exits.calls,
                             [("bob", self.fixture.adopted_exit_reason), ("alice", "stopped")])
            self.assertEqual(second.running(), {})
            self.assertEqual(self.fixture.live_agents("alice"), 0)
            self.assertEqual(self.fixture.live_agents("bob"), 0)

            # nothing is left for a third provider
            third = self.fixture.new_provider(keep_on_close=False)
            adopted = yield self.fixture.settle(third.recover())
            self.assertEqual(adopted, [])

        @inlineCallbacks
        def test_close_that_keeps_agents_still_ends_starts_in_flight(self) -> Any:
            first = self.fixture.new_provider(keep_on_close=True)
            starting = first.start("alice", self.fixture.data_dir("alice"),
                                   credentials_for("alice"))
            closing = first.close()
            yield self.assertFailure(self.fixture.settle(starting), AgentStartError)
            yield self.fixture.settle(closing)
            self.assertEqual(self.fixture.live_agents("alice"), 0)
            second = self.fixture.new_provider(keep_on_close=False)
            adopted = yield self.fixture.settle(second.recover())
            self.assertEqual(adopted, [])

        @inlineCallbacks
        def test_agents_of_a_provider_that_stops_them_are_not_recovered(self) -> Any:
            yield self.fixture.settle(self.start("alice"))
            yield self.fixture.settle(self.provider.close())
            second = self.fixture.new_provider(keep_on_close=False)
            adopted = yield self.fixture.settle(second.recover())
            self.assertEqual(adopted, [])
            self.assertEqual(second.running(), {})

        @inlineCallbacks
        def test_close_stops_every_agent(self) -> Any:
            yield self.fixture.settle(gatherResults([self.start("alice"), self.start("bob")]))
            yield self.fixture.settle(self.provider.close())
            self.assertEqual(self.provider.running(), {})
            self.assertEqual(sorted(self.exits.calls),
                             [("alice", "stopped"), ("bob", "stopped")])
            self.assertEqual(self.fixture.live_agents("alice"), 0)
            self.assertEqual(self.fixture.live_agents("bob"), 0)
            yield self.assertFailure(self.fixture.settle(self.start("carol")), AgentStartError)
            self.assertEqual(self.fixture.live_agents("carol"), 0)

    return ProviderContractTests
