"""An in-memory agent provider for fast, deterministic manager tests.

It runs no process and serves no HTTP: it only keeps the books the way a
real provider does, on an injected clock (``twisted.internet.task.Clock``),
so a test decides when a start finishes, makes a start fail, or makes an agent
crash. It passes the same contract suite as the process provider
(``tests/provider_contract.py``), which keeps it honest: a manager test that
passes against the fake should pass against the real thing.
"""
import json
from typing import Dict, Iterable, List, Optional

import attr
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ...protocol import AgentAddress
from .interface import AgentStartError, ExitCallback, IAgentProvider, RunningAgent

log = Logger()

#: the reason :meth:`FakeProvider.crash` reports unless told otherwise, worded
#: like the process provider's report of a SIGKILL
CRASH_REASON = "killed by signal 9 (SIGKILL)"


@attr.s(auto_attribs=True, eq=False)
class _FakeAgent:
    username: str
    data_dir: str
    running: Optional[RunningAgent] = None
    stopping: bool = False
    pending: Optional[IDelayedCall] = None
    start_waiters: List[Deferred] = attr.Factory(list)
    stop_waiters: List[Deferred] = attr.Factory(list)


def _fire_all(waiters: List[Deferred], result) -> None:
    for waiter in waiters:
        if waiter.called:
            continue
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)


def _wait(waiters: List[Deferred]) -> Deferred:
    d = Deferred()
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
    """
    clock: object
    start_delay: float = 0.0
    stop_delay: float = 0.0
    recoverable: Iterable[RunningAgent] = ()

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

    def crash(self, username: str, reason: str = CRASH_REASON) -> None:
        """The agent ends by itself (as if killed from outside).

        A running agent goes away and ``on_exit`` callbacks get ``reason``; a
        starting one fails its start instead, as a real agent that dies
        before answering HTTP does.
        """
        agent = self._agents.get(username)
        if agent is None:
            raise KeyError("no agent of %s to crash" % (username,))
        if agent.running is None:
            self._cancel_pending(agent)
            self._forget(agent)
            _fire_all(agent.start_waiters, Failure(AgentStartError(
                "the agent of %s %s before it answered HTTP" % (username, reason))))
            _fire_all(agent.stop_waiters, None)
            return
        self._ended(agent, "stopped" if agent.stopping else reason)

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
        }

    # -- IAgentProvider -----------------------------------------------------

    def recover(self) -> Deferred:
        adopted = list(self.recoverable)
        for running in adopted:
            self._agents[running.username] = _FakeAgent(running.username, "", running)
        return defer.succeed(adopted)

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
        stops = [self.stop(username) for username in list(self._agents)]
        return defer.gatherResults(stops, consumeErrors=True).addCallback(lambda _: None)

    # -- internals ------------------------------------------------------------

    def _finish_start(self, agent: _FakeAgent) -> None:
        agent.pending = None
        message = self._failures.pop(agent.username, None)
        if message is not None:
            self._forget(agent)
            _fire_all(agent.start_waiters, Failure(AgentStartError(message)))
            return
        port, self._next_port = self._next_port, self._next_port + 1
        agent.running = RunningAgent(agent.username, AgentAddress("127.0.0.1", port),
                                     0, self.clock.seconds())
        _fire_all(agent.start_waiters, agent.running)

    def _abort_start(self, agent: _FakeAgent) -> None:
        agent.pending = None
        self._forget(agent)
        _fire_all(agent.start_waiters, Failure(AgentStartError(
            "the agent of %s was stopped while it was starting" % (agent.username,))))
        _fire_all(agent.stop_waiters, None)

    def _ended(self, agent: _FakeAgent, reason: str) -> None:
        self._cancel_pending(agent)
        self._forget(agent)
        for callback in list(self._callbacks):
            try:
                callback(agent.username, reason)
            except Exception:
                log.failure("exit callback failed for the agent of {username}",
                            username=agent.username)
        _fire_all(agent.stop_waiters, None)

    def _cancel_pending(self, agent: _FakeAgent) -> None:
        if agent.pending is not None and agent.pending.active():
            agent.pending.cancel()
        agent.pending = None

    def _forget(self, agent: _FakeAgent) -> None:
        if self._agents.get(agent.username) is agent:
            del self._agents[agent.username]
