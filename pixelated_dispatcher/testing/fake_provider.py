"""An in-memory agent provider for fast, deterministic manager tests.

It runs no process and serves no HTTP: it only keeps the books the way a
real provider does, on an injected clock (``twisted.internet.task.Clock``),
so a test decides when a start finishes, makes a start fail, or makes an agent
crash. It passes the same contract suite as the process provider
(``pixelated_dispatcher.testing.provider_contract``), which keeps it honest: a manager test that
passes against the fake should pass against the real thing.
"""
import hashlib
import json
from typing import Dict, Iterable, List, Optional

import attr
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..fanout import fire_all
from ..manager.agent_firewall import IAgentFirewall
from ..manager.providers.interface import (Accounts, AgentStartError, ExitCallback,
                                           IAgentProvider, RunningAgent, notify_exit)
from ..protocol import AgentAddress

log = Logger()

#: the reason :meth:`FakeProvider.crash` reports unless told otherwise, worded
#: like the process provider's report of a SIGKILL
CRASH_REASON = "killed by signal 9 (SIGKILL)"

#: what an adopted agent's end is reported as (it is not the manager's child,
#: so nobody learns its exit status), as the process provider does
ADOPTED_EXIT_REASON = "exited"


@attr.s(auto_attribs=True, eq=False)
class FakeMachine:
    """What outlives a provider: the agents a provider closed with
    ``keep_on_close`` left running, waiting for the next provider's
    ``recover()`` (the process table and state dir, or the Docker daemon, of
    the real providers). Share one between two FakeProviders to model a
    manager restart."""
    #: user name → the agent left running
    left: Dict[str, RunningAgent] = attr.Factory(dict)
    #: user name → the credentials that agent got at its start (it still knows them)
    credentials: Dict[str, bytes] = attr.Factory(dict)


@attr.s(auto_attribs=True, eq=False)
class _FakeAgent:
    username: str
    data_dir: str
    running: Optional[RunningAgent] = None
    stopping: bool = False
    pending: Optional[IDelayedCall] = None
    start_waiters: List[Deferred] = attr.Factory(list)
    stop_waiters: List[Deferred] = attr.Factory(list)
    #: recovered from a previous manager rather than started by us
    adopted: bool = False


def _wait(waiters: List[Deferred]) -> Deferred:
    d: Deferred = Deferred()
    waiters.append(d)
    return d


@implementer(IAgentProvider)
@attr.s(auto_attribs=True, eq=False)
class FakeProvider:
    """:param clock: an ``IReactorTime``; starts and stops complete on it.
    :param start_delay: seconds a start takes (0: at the next ``advance``).
    :param stop_delay: seconds a stop takes.
    :param recoverable: agents that ``recover()`` adopts, as if a previous
        manager had left them running.
    :param keep_on_close: ``close()`` leaves running agents on ``machine``
        for the next provider's ``recover()`` (the process provider with a
        state dir does that by default); starts in flight are stopped.
    :param machine: shared with the provider that "restarts" this one.
    """
    clock: IReactorTime
    start_delay: float = 0.0
    stop_delay: float = 0.0
    recoverable: Iterable[RunningAgent] = ()
    keep_on_close: bool = False
    machine: FakeMachine = attr.Factory(FakeMachine)
    #: kept as the interface asks; the fake runs no process to give a uid
    accounts: Optional[Accounts] = None
    #: protects each agent's endpoint before it runs and releases it when it
    #: ends, as the process and docker providers do (None: no firewall)
    firewall: Optional[IAgentFirewall] = None

    name = "fake"

    #: the credentials bytes each user's latest start received
    credentials: Dict[str, bytes] = attr.ib(init=False, factory=dict)
    #: user names in the order their agents were launched (one entry per
    #: launch, so a test can check that concurrent starts launched once)
    launches: List[str] = attr.ib(init=False, factory=list)

    _agents: Dict[str, _FakeAgent] = attr.ib(init=False, factory=dict)
    _callbacks: List[ExitCallback] = attr.ib(init=False, factory=list)
    _failures: Dict[str, str] = attr.ib(init=False, factory=dict)
    _closing: bool = attr.ib(init=False, default=False)
    _next_port: int = attr.ib(init=False, default=20000)

    # -- test controls ------------------------------------------------------

    def fail_next_start(self, username: str,
                        message: str = "the agent exited with status 1 before it answered HTTP"
                        ) -> None:
        """Make the next launch for ``username`` fail with AgentStartError(message)."""
        self._failures[username] = message

    def crash(self, username: str, reason: Optional[str] = None) -> None:
        """The agent ends by itself (as if killed from outside).

        A running agent goes away and ``on_exit`` callbacks get ``reason``
        (default: :data:`CRASH_REASON`, or :data:`ADOPTED_EXIT_REASON` for an
        adopted agent); a starting one fails its start instead, as a real
        agent that dies before answering HTTP does.
        """
        agent = self._agents.get(username)
        if agent is None:
            raise KeyError("no agent of %s to crash" % (username,))
        if reason is None:
            reason = ADOPTED_EXIT_REASON if agent.adopted else CRASH_REASON
        if agent.running is None:
            self._cancel_pending(agent)
            self._forget(agent)
            fire_all(agent.start_waiters, Failure(AgentStartError(
                "the agent of %s %s before it answered HTTP" % (username, reason))))
            fire_all(agent.stop_waiters, None)
            return
        self._ended(agent, "stopped" if agent.stopping else reason)

    def die(self) -> None:
        """The manager is killed (SIGKILL, power to the process cut): no
        callback fires, nothing more happens through this provider. With
        ``keep_on_close`` its running agents stay on ``machine`` for the next
        provider's ``recover()`` (the process provider's agents outlive a
        killed manager then); without, they die with it (pdeathsig). Starts
        in flight die either way, unanswered."""
        for username, agent in list(self._agents.items()):
            self._cancel_pending(agent)
            if self.keep_on_close and agent.running is not None and not agent.stopping:
                self.machine.left[username] = agent.running
                if username in self.credentials:
                    self.machine.credentials[username] = self.credentials[username]
        self._agents.clear()
        self._callbacks.clear()
        self._closing = True

    def alive(self, username: str) -> bool:
        """Whether an agent of ``username`` exists in any state (starting,
        running, stopping): the fake's equivalent of a live process."""
        return username in self._agents

    def received(self, username: str) -> dict:
        """What ``username``'s latest agent learnt from its credentials, in the
        shape of the demo agent's ``/whoami`` (so the contract can compare)."""
        data = json.loads(self.credentials[username].decode("utf-8"))
        return {
            "username": username,
            "authenticated": data.get("user") == username,
            "credentials_user": data.get("user"),
            "leap_provider_hostname": data.get("leap_provider_hostname"),
            "password_received": bool(data.get("password")),
            "credentials_sha256": hashlib.sha256(self.credentials[username]).hexdigest(),
        }

    # -- IAgentProvider -----------------------------------------------------

    def recover(self) -> Deferred:
        left, self.machine.left = self.machine.left, {}
        for username in left:
            if username in self.machine.credentials:
                self.credentials[username] = self.machine.credentials.pop(username)
        adopted = list(self.recoverable) + list(left.values())
        for running in adopted:
            self._agents[running.username] = _FakeAgent(running.username, "", running,
                                                        adopted=True)
        if self.firewall is None:
            return defer.succeed(adopted)
        firewall = self.firewall
        d = firewall.start()
        d.addCallback(lambda _: firewall.retain_only(
            [(a.address.host, a.address.port) for a in adopted]))
        return d.addCallback(lambda _: adopted)

    def running(self) -> Dict[str, RunningAgent]:
        return {name: agent.running for name, agent in self._agents.items()
                if agent.running is not None and not agent.stopping}

    def on_exit(self, callback: ExitCallback) -> None:
        self._callbacks.append(callback)

    def start(self, username: str, data_dir: str, credentials: bytes) -> Deferred:
        if self._closing:
            return defer.fail(AgentStartError(
                "not starting the agent of %s: the manager is shutting down" % (username,)))
        agent = self._agents.get(username)
        if agent is not None and agent.stopping:
            d = _wait(agent.stop_waiters)
            d.addCallback(lambda _: self.start(username, data_dir, credentials))
            return d
        if agent is not None and agent.running is not None:
            return defer.succeed(agent.running)
        if agent is not None:
            return _wait(agent.start_waiters)
        agent = _FakeAgent(username, data_dir)
        self._agents[username] = agent
        self.credentials[username] = credentials
        self.launches.append(username)
        d = _wait(agent.start_waiters)
        agent.pending = self.clock.callLater(self.start_delay, self._finish_start, agent)
        return d

    def stop(self, username: str) -> Deferred:
        agent = self._agents.get(username)
        if agent is None:
            return defer.succeed(None)
        d = _wait(agent.stop_waiters)
        if agent.stopping:
            return d
        agent.stopping = True
        if agent.running is None:
            # stopped while starting: the start fails, as the real one does
            self._cancel_pending(agent)
            agent.pending = self.clock.callLater(self.stop_delay, self._abort_start, agent)
        else:
            agent.pending = self.clock.callLater(self.stop_delay, self._ended, agent, "stopped")
        return d

    def close(self) -> Deferred:
        self._closing = True
        stops = []
        for username, agent in list(self._agents.items()):
            if self.keep_on_close and agent.running is not None and not agent.stopping:
                self._forget(agent)
                self.machine.left[username] = agent.running
                if username in self.credentials:
                    self.machine.credentials[username] = self.credentials[username]
            else:
                stops.append(self.stop(username))
        return defer.gatherResults(stops, consumeErrors=True).addCallback(lambda _: None)

    # -- internals ------------------------------------------------------------

    def _finish_start(self, agent: _FakeAgent) -> None:
        agent.pending = None
        message = self._failures.pop(agent.username, None)
        if message is not None:
            self._forget(agent)
            fire_all(agent.start_waiters, Failure(AgentStartError(message)))
            return
        port, self._next_port = self._next_port, self._next_port + 1
        if self.firewall is not None:
            self.firewall.protect("127.0.0.1", port)
        agent.running = RunningAgent(agent.username, AgentAddress("127.0.0.1", port),
                                     0, self.clock.seconds())
        fire_all(agent.start_waiters, agent.running)

    def _abort_start(self, agent: _FakeAgent) -> None:
        agent.pending = None
        self._forget(agent)
        fire_all(agent.start_waiters, Failure(AgentStartError(
            "the agent of %s was stopped while it was starting" % (agent.username,))))
        fire_all(agent.stop_waiters, None)

    def _ended(self, agent: _FakeAgent, reason: str) -> None:
        self._cancel_pending(agent)
        self._forget(agent)
        if self.firewall is not None and agent.running is not None:
            self.firewall.release(agent.running.address.host, agent.running.address.port)
        notify_exit(self._callbacks, agent.username, reason)
        fire_all(agent.stop_waiters, None)

    def _cancel_pending(self, agent: _FakeAgent) -> None:
        if agent.pending is not None and agent.pending.active():
            agent.pending.cancel()
        agent.pending = None

    def _forget(self, agent: _FakeAgent) -> None:
        if self._agents.get(agent.username) is agent:
            del self._agents[agent.username]
