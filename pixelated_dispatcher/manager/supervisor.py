"""When agents start and stop: one state machine per user.

::

    stopped ──ensure──▶ starting ──ready──▶ running ──stop/exit──▶ stopping ─▶ stopped
                           │                                          ▲
                           └──error──▶ failed (with the reason) ──ensure┘

The supervisor decides *when* (a login, a request, an operator's command, a
logout, idleness); the provider decides *how*. Per user it keeps at most one
start and one stop in flight: concurrent requests share one start, a stop
asked for during a start waits for it and then stops, a start asked for
during a stop waits for it and then starts again.

Credentials: an agent starts with the credentials line that ``ensure`` is
given a way to fetch (the manager opens them with the session token of the
request); fetched only when a start actually happens, and dropped once the
provider has it. Without one (an operator holds no session), a running
agent's address is answered but nothing is started.

Capacity: at most ``max_agents`` agents run or start at once (0: no limit;
beyond it a start fails with ``CapacityReached``), and at most
``max_concurrent_starts`` starts are in progress at once; the others wait
in a first-come, first-served queue.
"""
import os
import time
from typing import Any, Callable, Dict, Generator, List, NoReturn, Optional

import attr
from twisted.internet.defer import (Deferred, DeferredSemaphore, inlineCallbacks,
                                    maybeDeferred, succeed)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ..fanout import SharedResult, tell_all
from ..protocol import AgentAddress, AgentStartFailed, CapacityReached
from .metrics import ManagerMetrics
from .providers.interface import AgentStartError, IAgentProvider, RunningAgent

#: fetches an agent's credentials line (a Deferred of bytes) when it must start
CredentialsSource = Callable[[], Deferred]

STOPPED = "stopped"
STARTING = "starting"
RUNNING = "running"
STOPPING = "stopping"
FAILED = "failed"


@attr.s(frozen=True, auto_attribs=True)
class AgentStatus:
    username: str
    state: str
    agent: Optional[RunningAgent]
    #: why the last start failed (state FAILED), else ""
    reason: str = ""
    #: the last failure (failed start or unexpected end) with its time,
    #: kept after the agent was started again, for ``pixelated-ctl info``
    last_failure: str = ""


class AgentSupervisor:
    """Starts and stops the agents of one provider."""

    log = Logger()

    def __init__(self, reactor: Any, provider: IAgentProvider, data_root: str,
                 file_pool: ThreadPool,
                 max_agents: int = 0, max_concurrent_starts: int = 0,
                 metrics: Optional[ManagerMetrics] = None) -> None:
        self._reactor = reactor
        self._provider = provider
        self._data_root = data_root
        self._file_pool = file_pool
        self.max_agents = max_agents
        self._start_slots = DeferredSemaphore(max_concurrent_starts) \
            if max_concurrent_starts > 0 else None
        self._starting: Dict[str, SharedResult] = {}
        self._stopping: Dict[str, SharedResult] = {}
        self._failures: Dict[str, str] = {}
        self._last_failures: Dict[str, str] = {}
        self._exit_listeners: List[Callable[[str, str], None]] = []
        self._metrics = metrics
        if metrics is not None:
            metrics.watch_states(self.counts)
        provider.on_exit(self._agent_exited)

    def data_dir(self, username: str) -> str:
        return os.path.join(self._data_root, username, "data")

    def on_exit(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(username, reason)`` whenever an agent ends."""
        self._exit_listeners.append(listener)

    def recover(self) -> Deferred:
        """Adopt agents that outlived a previous manager."""
        def adopted(agents: List[RunningAgent]) -> List[RunningAgent]:
            for agent in agents:
                self.log.info("agent of {username}: adopted at {host}:{port}",
                              username=agent.username, host=agent.address.host,
                              port=agent.address.port)
            return agents
        return self._provider.recover().addCallback(adopted)

    def state(self, username: str) -> str:
        if username in self._stopping:
            return STOPPING
        if username in self._starting:
            return STARTING
        if username in self._provider.running():
            return RUNNING
        if username in self._failures:
            return FAILED
        return STOPPED

    def status(self, username: str) -> AgentStatus:
        return AgentStatus(username, self.state(username),
                           self._provider.running().get(username),
                           self._failures.get(username, ""),
                           self._last_failures.get(username, ""))

    def running(self) -> Dict[str, RunningAgent]:
        return dict(self._provider.running())

    def counts(self) -> Dict[str, int]:
        """How many agents are in each state (stopped ones are not counted)."""
        return {RUNNING: len(set(self._provider.running()) - set(self._stopping)),
                STARTING: len(self._starting), STOPPING: len(self._stopping),
                FAILED: len(self._failures)}

    def ensure(self, username: str, reason: str = "request",
               credentials: Optional[CredentialsSource] = None) -> "Deferred[AgentAddress]":
        """The address of the user's agent, started first if needed with
        the line ``credentials()`` gives; without ``credentials`` a stopped
        agent is not started (``AgentStartFailed`` says why).

        The caller has checked that the user exists.
        """
        if username in self._stopping:
            d = self._stopping[username].wait()
            d.addBoth(lambda _: self.ensure(username, reason, credentials))
            return d
        if username in self._starting:
            return self._starting[username].wait()
        agent = self._provider.running().get(username)
        if agent is not None:
            return succeed(agent.address)
        if credentials is None:
            return maybeDeferred(_raise, AgentStartFailed(
                "the agent of %s is not running, and it starts only with the credentials"
                " sealed under %s's session: it starts at their next login or request"
                % (username, username)))
        # Agents being stopped still hold their memory: they count.
        busy = len(set(self._provider.running()) | set(self._stopping)) + len(self._starting)
        if self.max_agents and busy >= self.max_agents:
            self.log.warn("agent of {username}: not started, capacity of {max} agents reached",
                          username=username, max=self.max_agents)
            if self._metrics is not None:
                self._metrics.start_failed("capacity")
            return maybeDeferred(_raise, CapacityReached(
                "capacity reached: %d agents run already; retry after 60 seconds"
                % self.max_agents))
        return self._track(self._starting, username,
                           lambda: self._start(username, reason, credentials))

    def stop(self, username: str, reason: str = "operator") -> Deferred:
        """Stop the user's agent (after a start in flight has finished)."""
        self._failures.pop(username, None)
        if username in self._stopping:
            return self._stopping[username].wait()
        if username in self._starting:
            d = self._starting[username].wait()
            d.addBoth(lambda _: self.stop(username, reason))
            return d
        if username not in self._provider.running():
            return succeed(None)
        self.log.info("agent of {username}: stopping ({reason})", username=username,
                      reason=reason)
        return self._track(self._stopping, username, lambda: self._provider.stop(username))

    def close(self) -> Deferred:
        """The manager is shutting down: leave the agents as the provider wants."""
        return self._provider.close()

    def _start(self, username: str, reason: str, credentials: CredentialsSource) -> Deferred:
        if self._start_slots is None:
            return self._start_now(username, reason, credentials)
        return self._start_slots.run(self._start_now, username, reason, credentials)

    @inlineCallbacks
    def _start_now(self, username: str, reason: str,
                   credentials: CredentialsSource) -> Generator[Deferred, Any, AgentAddress]:
        self._failures.pop(username, None)
        line = yield credentials()
        self.log.info("agent of {username}: starting ({reason})", username=username,
                      reason=reason)
        began = time.monotonic()
        data_dir = self.data_dir(username)
        yield deferToThreadPool(self._reactor, self._file_pool, _make_private_dir, data_dir)
        try:
            agent = yield self._provider.start(username, data_dir, line)
        except AgentStartError as error:
            self._failures[username] = str(error)
            self._remember_failure(username, str(error))
            self.log.warn("agent of {username}: failed to start: {reason}",
                          username=username, reason=str(error))
            if self._metrics is not None:
                self._metrics.start_failed(str(error))
            raise AgentStartFailed(str(error))
        if self._metrics is not None:
            self._metrics.started(time.monotonic() - began)
        self.log.info("agent of {username}: running at {host}:{port}", username=username,
                      host=agent.address.host, port=agent.address.port)
        return agent.address

    def _track(self, table: Dict[str, SharedResult], username: str,
               operation: Callable[[], Deferred]) -> Deferred:
        """Run ``operation`` as the one start (or stop) in flight for
        ``username``; it leaves ``table`` before anybody hears the outcome, so
        that waiters see the state it left behind."""
        source: Deferred = Deferred()
        fanout = table[username] = SharedResult(source)

        def forget(result: Any) -> Any:
            if table.get(username) is fanout:
                del table[username]
            return result
        maybeDeferred(operation).addBoth(forget).chainDeferred(source)
        return fanout.wait()

    def _remember_failure(self, username: str, reason: str) -> None:
        now = self._reactor.seconds() if self._reactor is not None else time.time()
        self._last_failures[username] = "%s at %s" % (
            reason, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)))

    def _agent_exited(self, username: str, reason: str) -> None:
        self.log.info("agent of {username}: stopped ({reason})", username=username,
                      reason=reason)
        if reason != "stopped" and username not in self._stopping:
            # Nobody asked it to stop (it crashed, the kernel killed it for
            # memory): "failed", with the reason, until the next start.
            self._failures[username] = reason
            self._remember_failure(username, reason)
        tell_all(self._exit_listeners, lambda listener: listener(username, reason),
                 "agent exit", self.log)


def _raise(error: Exception) -> NoReturn:
    raise error


def _make_private_dir(path: str) -> None:
    """Make the data directory (0700) if it is missing; its parents only let
    others pass (0711), so that an agent under its own uid reaches its own
    data and nothing else. An existing data directory is left as it is: it
    may belong to the agent's uid, which the manager need not be able to chmod."""
    parent = os.path.dirname(path)
    for directory in (os.path.dirname(parent), parent):
        os.makedirs(directory, mode=0o711, exist_ok=True)
        os.chmod(directory, 0o711)
    if not os.path.isdir(path):
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)
