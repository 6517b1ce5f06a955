"""When agents start and stop: at most one agent per user, never two starts at once.

The supervisor decides *when* (a login, a request, an operator's command, a
logout); the provider decides *how*. It keeps per-user bookkeeping of starts
and stops in flight so that concurrent requests share one start, and so that
a start asked for during a stop waits for the stop and then starts again.
"""
import os
from typing import Callable, Dict, List, Optional

import attr
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..protocol import AgentAddress, AgentStartFailed
from .providers.interface import AgentStartError, IAgentProvider, RunningAgent

STOPPED = "stopped"
STARTING = "starting"
RUNNING = "running"
STOPPING = "stopping"


@attr.s(frozen=True, auto_attribs=True)
class AgentStatus:
    username: str
    state: str
    agent: Optional[RunningAgent]


class _Fanout:
    """One result delivered to any number of later waiters."""

    def __init__(self, source: Deferred) -> None:
        self._waiters: List[Deferred] = []
        self._done = False
        self._result = None
        source.addBoth(self._fire)

    def _fire(self, result):
        self._done, self._result = True, result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(result) if not _is_failure(result) else waiter.errback(result)
        return None

    def wait(self) -> Deferred:
        if self._done:
            d = Deferred()
            d.callback(self._result) if not _is_failure(self._result) else d.errback(self._result)
            return d
        d = Deferred()
        self._waiters.append(d)
        return d


def _is_failure(result) -> bool:
    return isinstance(result, Failure)


class AgentSupervisor:
    """Starts and stops the agents of one provider."""

    log = Logger()

    def __init__(self, reactor, provider: IAgentProvider, data_root: str,
                 credentials: Callable[[str], bytes], file_pool) -> None:
        self._reactor = reactor
        self._provider = provider
        self._data_root = data_root
        self._credentials = credentials
        self._file_pool = file_pool
        self._starting: Dict[str, _Fanout] = {}
        self._stopping: Dict[str, _Fanout] = {}
        provider.on_exit(self._agent_exited)

    def data_dir(self, username: str) -> str:
        return os.path.join(self._data_root, username, "data")

    def recover(self) -> Deferred:
        """Adopt agents that outlived a previous manager."""
        def adopted(agents):
            for agent in agents:
                self.log.info("adopted agent of {username} at {host}:{port}",
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
        return STOPPED

    def status(self, username: str) -> AgentStatus:
        return AgentStatus(username, self.state(username),
                           self._provider.running().get(username))

    def running(self) -> Dict[str, RunningAgent]:
        return dict(self._provider.running())

    def ensure(self, username: str) -> "Deferred[AgentAddress]":
        """The address of the user's agent, started first if needed.

        The caller has checked that the user exists.
        """
        if username in self._stopping:
            d = self._stopping[username].wait()
            d.addBoth(lambda _: self.ensure(username))
            return d
        agent = self._provider.running().get(username)
        if agent is not None and username not in self._starting:
            return succeed(agent.address)
        if username not in self._starting:
            return self._track(self._starting, username, lambda: self._start(username))
        return self._starting[username].wait()

    def stop(self, username: str) -> Deferred:
        """Stop the user's agent (after a start in flight has finished)."""
        if username in self._stopping:
            return self._stopping[username].wait()
        if username in self._starting:
            d = self._starting[username].wait()
            d.addBoth(lambda _: self.stop(username))
            return d
        if username not in self._provider.running():
            return succeed(None)
        self.log.info("stopping agent of {username}", username=username)
        return self._track(self._stopping, username, lambda: self._provider.stop(username))

    def close(self) -> Deferred:
        """The manager is shutting down: leave the agents as the provider wants."""
        return self._provider.close()

    @inlineCallbacks
    def _start(self, username: str):
        self.log.info("starting agent of {username}", username=username)
        data_dir = self.data_dir(username)
        yield deferToThreadPool(self._reactor, self._file_pool, _make_private_dir, data_dir)
        try:
            agent = yield self._provider.start(username, data_dir, self._credentials(username))
        except AgentStartError as error:
            self.log.warn("agent of {username} failed to start: {reason}",
                          username=username, reason=str(error))
            raise AgentStartFailed(str(error))
        self.log.info("agent of {username} running at {host}:{port}", username=username,
                      host=agent.address.host, port=agent.address.port)
        return agent.address

    def _track(self, table: Dict[str, _Fanout], username: str,
               operation: Callable[[], Deferred]) -> Deferred:
        """Run ``operation`` as the one start (or stop) in flight for
        ``username``; it leaves ``table`` before anybody hears the outcome, so
        that waiters see the state it left behind."""
        source: Deferred = Deferred()
        fanout = table[username] = _Fanout(source)

        def forget(result):
            if table.get(username) is fanout:
                del table[username]
            return result
        maybeDeferred(operation).addBoth(forget).chainDeferred(source)
        return fanout.wait()

    def _agent_exited(self, username: str, reason: str) -> None:
        self.log.info("agent of {username} ended: {reason}", username=username, reason=reason)


def _make_private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
