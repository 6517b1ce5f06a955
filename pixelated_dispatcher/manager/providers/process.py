"""Run each user's agent as a local child process of the manager.

This is the embedded default provider: it needs nothing installed beyond
util-linux (Essential on Debian). What it guarantees, and why:

* **The manager picks the port** (bind ``127.0.0.1:0``, read it back, release
  it) and passes it on the command line; an agent that loses the race for it
  ("address already in use") is retried on another port a few times.
* **Credentials travel only on stdin**: one JSON line, then stdin is closed.
  Never argv (``/proc/<pid>/cmdline`` is world readable), never the
  environment, never a file.
* **No orphans**: every agent runs under ``setpriv --pdeathsig SIGKILL`` so the
  kernel kills it if the manager dies, even by SIGKILL; and under ``setsid``
  so it leads its own process group and a stop signals everything it forked.
* **Running means answering HTTP**: an agent counts as started only once it
  answers any HTTP response on its port; if it exits first, or the start
  timeout passes, it is killed and the start fails with the last lines it
  logged, so the operator sees why.
* **Stop is polite, then firm**: SIGTERM to the group, SIGKILL after a grace
  period, and the Deferred fires only once the process has been reaped.

Adopting agents that outlived a manager comes in a later issue; until then
the pdeathsig guarantee means there is nothing to adopt and ``recover()``
returns ``[]``.
"""
import collections
import os
import re
import shlex
import shutil
import signal
import socket
import sys
from typing import Callable, Deque, Dict, List, Mapping, Optional

import attr
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ...protocol import AgentAddress
from .interface import AgentStartError, ExitCallback, IAgentProvider, RunningAgent

log = Logger()

#: the bundled demo agent, run by the Python that runs the manager
DEMO_AGENT_COMMAND = (
    shlex.quote(sys.executable)
    + " -m pixelated_dispatcher.demo_agent --port {port} --data-dir {data_dir}"
      " --username {username}")

#: agents listen here and nowhere else
LOOPBACK = "127.0.0.1"

#: how often a start tries another port after "address already in use"
PORT_ATTEMPTS = 3

#: readiness probe: one try at most this long, a new try this often
PROBE_TIMEOUT = 1.0
PROBE_INTERVAL = 0.1

#: output lines kept per agent for error messages
LAST_LINES = 20

#: a line longer than this is logged in pieces (an agent that never writes
#: a newline must not make the manager buffer without end)
MAX_LINE = 8192

#: after the process is reaped, how long to wait for the rest of its output
#: (a leftover child may hold the pipes open)
OUTPUT_DRAIN_TIME = 1.0

_PLACEHOLDER = re.compile(r"\{(port|data_dir|username)\}")

_ADDRESS_IN_USE = ("address already in use", "address in use", "eaddrinuse")


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks it (no guessing, no fixed ranges); the agent binds it
    next. Another program may take it in between, which the provider detects
    and answers by retrying on a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def describe_exit(reason: Failure) -> str:
    """``exited with status 3`` or ``killed by signal 9 (SIGKILL)``."""
    error = reason.value
    if isinstance(error, ProcessDone):
        return "exited with status 0"
    if isinstance(error, ProcessTerminated):
        if error.signal is not None:
            try:
                name = signal.Signals(error.signal).name
            except ValueError:
                return "killed by signal %d" % (error.signal,)
            return "killed by signal %d (%s)" % (error.signal, name)
        return "exited with status %d" % (error.exitCode,)
    return "ended (%s)" % (error,)


class _Probe(Protocol):
    """Sends one request; ``answered`` fires once the reply starts like HTTP."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._head = b""
        self.answered: Deferred = Deferred(lambda _: self.transport.abortConnection())

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._head += data
        if len(self._head) < 5 or self.answered.called:
            return
        if self._head.startswith(b"HTTP/"):
            self.answered.callback(None)
        else:
            self.answered.errback(ValueError("the answer is not HTTP"))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.answered.called:
            self.answered.errback(reason)


class _OneProtocolFactory(Factory):
    noisy = False  # one log line per probe every 100 ms would drown the log

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr) -> Protocol:
        return self._protocol


class _AgentProcess(ProcessProtocol):
    """One agent process: feeds it its credentials, logs its output line by
    line, and says when it has ended."""

    def __init__(self, reactor, username: str, credentials: bytes) -> None:
        self._reactor = reactor
        self.username = username
        self._credentials = credentials
        self.pid: Optional[int] = None
        self.last_lines: Deque[str] = collections.deque(maxlen=LAST_LINES)
        self._partial: Dict[int, bytes] = {1: b"", 2: b""}
        self.exit_reason: Optional[Failure] = None
        self._drain: Optional[IDelayedCall] = None
        self._ended = False
        self._ended_waiters: List[Deferred] = []

    # -- life cycle ------------------------------------------------------

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.write(self._credentials)
        self.transport.closeStdin()
        self._credentials = b""

    def processExited(self, reason: Failure) -> None:
        self.exit_reason = reason
        self._sweep_group()
        # processEnded follows once the pipes close; don't wait for ever if a
        # leftover grandchild keeps them open.
        self._drain = self._reactor.callLater(OUTPUT_DRAIN_TIME, self._finish)

    def processEnded(self, reason: Failure) -> None:
        if self.exit_reason is None:
            self.exit_reason = reason
        self._finish()

    def _finish(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._drain is not None and self._drain.active():
            self._drain.cancel()
        for fd, rest in self._partial.items():
            if rest:
                self._log_line(fd, rest)
        self._partial = {1: b"", 2: b""}
        waiters, self._ended_waiters = self._ended_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _sweep_group(self) -> None:
        """Kill whatever the agent left behind in its process group.

        Runs right after the agent itself was reaped, in the same call, so the
        group id cannot have been reused yet.
        """
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    @property
    def ended(self) -> bool:
        return self._ended

    def when_ended(self) -> Deferred:
        """Fires (with None; see ``exit_reason``) once the process was reaped
        and its output read."""
        d = Deferred()
        if self._ended:
            d.callback(None)
        else:
            self._ended_waiters.append(d)
        return d

    @property
    def exit_description(self) -> str:
        return describe_exit(self.exit_reason) if self.exit_reason else "still running"

    # -- signals -----------------------------------------------------------

    def signal_group(self, signum: int) -> None:
        """Signal the agent's process group (the agent and its children).

        Right after the spawn, before ``setsid`` has run, there is no group
        yet; then the process itself gets the signal.
        """
        if self.pid is None or self.transport is None or self.transport.pid is None:
            return  # reaped already
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            try:
                self.transport.signalProcess(signum)
            except (ProcessExitedAlready, OSError):
                pass
        except PermissionError as error:
            log.warn("cannot signal the agent of {username} (pid {pid}): {error}",
                     username=self.username, pid=self.pid, error=error)

    # -- output --------------------------------------------------------------

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._partial.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        for line in lines:
            self._log_line(childFD, line)
        while len(rest) > MAX_LINE:
            self._log_line(childFD, rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self._partial[childFD] = rest

    def _log_line(self, fd: int, raw: bytes) -> None:
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        self.last_lines.append(line)
        log.info("agent {username}: {line}", username=self.username, line=line,
                 stream="stdout" if fd == 1 else "stderr", pid=self.pid)

    def says_address_in_use(self) -> bool:
        return any(marker in line.lower()
                   for line in self.last_lines for marker in _ADDRESS_IN_USE)

    def output_for_error(self) -> str:
        if not self.last_lines:
            return " It wrote no output."
        return " Its last output:\n" + "\n".join("  " + line for line in self.last_lines)


@attr.s(auto_attribs=True, eq=False)
class _Agent:
    """The provider's record of one user's agent, from start to reaping."""
    username: str
    data_dir: str
    credentials: bytes
    running: Optional[RunningAgent] = None
    stopping: bool = False
    #: the port of the current (or last) attempt; 0 before the first
    port: int = 0
    process: Optional[_AgentProcess] = None
    kill_timer: Optional[IDelayedCall] = None
    start_waiters: List[Deferred] = attr.Factory(list)
    stop_waiters: List[Deferred] = attr.Factory(list)


def _fire_all(waiters: List[Deferred], result) -> None:
    """Deliver one result to every waiter still waiting (some may have been
    cancelled by their callers)."""
    for waiter in waiters:
        if waiter.called:
            continue
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)


_READY, _EXITED, _TIMED_OUT = "ready", "exited", "timed out"


@implementer(IAgentProvider)
@attr.s(auto_attribs=True, eq=False)
class ProcessProvider:
    """Agents as local processes; see the module docstring for the guarantees.

    :param reactor: provides ``IReactorProcess``, ``IReactorTime`` and TCP.
    :param agent_command: a command line with ``{port}``, ``{data_dir}`` and
        ``{username}`` placeholders. It is split with :func:`shlex.split` and the
        placeholders are substituted inside each argument; no shell ever sees it.
    :param extra_env: added to the agent's minimal environment (and may
        override it).
    :param start_timeout: seconds an agent has to answer HTTP.
    :param stop_grace: seconds between SIGTERM and SIGKILL.
    :param choose_port: picks the port for a start (tests replace it to force
        a collision).
    """
    reactor: object
    agent_command: str
    extra_env: Optional[Mapping[str, str]] = None
    start_timeout: float = 60.0
    stop_grace: float = 10.0
    choose_port: Callable[[], int] = free_loopback_port

    name = "process"

    _argv: List[str] = attr.ib(init=False)
    _wrapper: List[str] = attr.ib(init=False)
    _agents: Dict[str, _Agent] = attr.ib(init=False, factory=dict)
    _callbacks: List[ExitCallback] = attr.ib(init=False, factory=list)
    _closing: bool = attr.ib(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        try:
            self._argv = shlex.split(self.agent_command)
        except ValueError as error:
            raise ValueError("agent command %r is not a valid command line: %s"
                             % (self.agent_command, error))
        if not self._argv:
            raise ValueError("the agent command is empty")
        if not any("{port}" in word for word in self._argv):
            raise ValueError("the agent command %r has no {port} placeholder, so the agent"
                             " cannot know where to listen" % (self.agent_command,))
        setpriv, setsid = shutil.which("setpriv"), shutil.which("setsid")
        if setpriv is None or setsid is None:
            raise RuntimeError("the process provider needs setpriv and setsid (util-linux)"
                               " on PATH")
        self._wrapper = [setpriv, "--pdeathsig", "SIGKILL", "--", setsid, "--"]

    # -- IAgentProvider ------------------------------------------------------

    def recover(self) -> Deferred:
        """Nothing to adopt: agents die with the manager (pdeathsig)."""
        return defer.succeed([])

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
            # a start during a stop: let the old one go, then start afresh
            d = self._wait(agent.stop_waiters)
            d.addCallback(lambda _: self.start(username, data_dir, credentials))
            return d
        if agent is not None and agent.running is not None:
            return defer.succeed(agent.running)
        if agent is not None:
            return self._wait(agent.start_waiters)  # one start in flight serves all
        # the agent runs in its data dir: a relative path would point elsewhere
        agent = _Agent(username, os.path.abspath(data_dir), credentials)
        self._agents[username] = agent
        d = self._wait(agent.start_waiters)
        defer.ensureDeferred(self._start(agent))
        return d

    def stop(self, username: str) -> Deferred:
        agent = self._agents.get(username)
        if agent is None:
            return defer.succeed(None)
        d = self._wait(agent.stop_waiters)
        if not agent.stopping:
            agent.stopping = True
            self._terminate(agent)
        return d

    def close(self) -> Deferred:
        self._closing = True
        stops = [self.stop(username) for username in list(self._agents)]
        return defer.gatherResults(stops, consumeErrors=True).addCallback(lambda _: None)

    # -- starting -------------------------------------------------------------

    async def _start(self, agent: _Agent) -> None:
        try:
            running = await self._launch(agent)
        except Exception as error:
            agent.credentials = b""
            if not isinstance(error, AgentStartError):
                log.failure("unexpected error starting the agent of {username}",
                            username=agent.username)
                error = AgentStartError("the agent of %s could not be started: %s"
                                        % (agent.username, error))
            self._forget(agent)
            _fire_all(agent.start_waiters, Failure(error))
            _fire_all(agent.stop_waiters, None)
            return
        agent.credentials = b""  # delivered; keep the password no longer than needed
        agent.running = running
        agent.process.when_ended().addCallback(lambda _: self._running_agent_ended(agent))
        log.info("agent of {username} running at {host}:{port} (pid {pid})",
                 username=agent.username, host=running.address.host,
                 port=running.address.port, pid=running.pid)
        _fire_all(agent.start_waiters, running)

    async def _launch(self, agent: _Agent) -> RunningAgent:
        """Spawn the agent until it answers HTTP, trying another port if it
        lost its port to somebody else; raise AgentStartError otherwise."""
        if not os.path.isdir(agent.data_dir):
            raise AgentStartError("the data directory %s of %s does not exist"
                                  % (agent.data_dir, agent.username))
        deadline = self.reactor.seconds() + self.start_timeout
        for attempt in range(1, PORT_ATTEMPTS + 1):
            # Never hand out a port another of our agents holds or is about to
            # bind: two agents on one port would let one user's readiness probe
            # be answered by the other user's agent.
            taken = {a.port for a in self._agents.values() if a is not agent}
            port = self.choose_port()
            while port in taken:
                port = free_loopback_port()
            process = self._spawn(agent, port)
            outcome = await self._until_ready(process, port, deadline)
            where = "%s:%d" % (LOOPBACK, port)
            if outcome == _READY and not agent.stopping:
                return RunningAgent(agent.username, AgentAddress(LOOPBACK, port),
                                    # the real reactor's clock is time.time()
                                    process.pid, self.reactor.seconds())
            if outcome == _TIMED_OUT:
                process.signal_group(signal.SIGKILL)
                await process.when_ended()
                raise AgentStartError(
                    "the agent of %s did not answer HTTP on %s within %g seconds, so it"
                    " was killed.%s" % (agent.username, where, self.start_timeout,
                                        process.output_for_error()))
            await process.when_ended()
            if agent.stopping:
                raise AgentStartError("the agent of %s was stopped while it was starting"
                                      % (agent.username,))
            if process.says_address_in_use() and attempt < PORT_ATTEMPTS:
                log.info("agent of {username} found port {port} taken; trying another",
                         username=agent.username, port=port)
                continue
            raise AgentStartError(
                "the agent of %s %s before it answered HTTP on %s.%s"
                % (agent.username, process.exit_description, where,
                   process.output_for_error()))
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self, agent: _Agent, port: int) -> _AgentProcess:
        values = {"port": str(port), "data_dir": agent.data_dir, "username": agent.username}
        argv = [_PLACEHOLDER.sub(lambda m: values[m.group(1)], word) for word in self._argv]
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "LANG": "C.UTF-8",
            "HOME": agent.data_dir,
            "DISPATCHER_LOGOUT_URL": "/auth/logout",
        }
        env.update(self.extra_env or {})
        process = _AgentProcess(self.reactor, agent.username, agent.credentials)
        command = self._wrapper + argv
        log.info("starting agent of {username} on port {port}: {argv}",
                 username=agent.username, port=port, argv=" ".join(map(shlex.quote, argv)))
        try:
            self.reactor.spawnProcess(process, command[0], command, env=env,
                                      path=agent.data_dir,
                                      childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as error:
            raise AgentStartError("the agent of %s could not be spawned: %s"
                                  % (agent.username, error))
        agent.process = process
        agent.port = port
        return process

    async def _until_ready(self, process: _AgentProcess, port: int, deadline: float) -> str:
        """Whichever comes first: the agent answers HTTP, exits, or the deadline."""
        outcome: Deferred = Deferred()

        def settle(result: str) -> None:
            if not outcome.called:
                outcome.callback(result)

        process.when_ended().addCallback(lambda _: settle(_EXITED))
        timer = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()),
                                       settle, _TIMED_OUT)
        probing = defer.ensureDeferred(
            self._probe_until_answered(port, lambda: not outcome.called))
        probing.addCallbacks(lambda _: settle(_READY),
                             lambda failure: failure.trap(CancelledError) and None)
        try:
            return await outcome
        finally:
            if timer.active():
                timer.cancel()
            probing.cancel()

    async def _probe_until_answered(self, port: int, wanted: Callable[[], bool]) -> None:
        """Ask ``HEAD /`` until any HTTP response comes back.

        HEAD, because a probe should not count as a visit; any status will do,
        because an agent that says 404 or 403 is up. ``wanted()`` turns false
        once the outcome is known: cancelling a connection attempt fails it
        with ConnectingCancelledError, not CancelledError, so the loop asks
        rather than trusting the exception type.
        """
        endpoint = TCP4ClientEndpoint(self.reactor, LOOPBACK, port, timeout=PROBE_TIMEOUT)
        request = (b"HEAD / HTTP/1.0\r\nHost: %s:%d\r\n"
                   b"User-Agent: pixelated-dispatcher readiness probe\r\n\r\n"
                   % (LOOPBACK.encode("ascii"), port))
        while True:
            probe = _Probe(request)
            answered = endpoint.connect(_OneProtocolFactory(probe))
            answered.addCallback(lambda _: probe.answered)
            answered.addTimeout(PROBE_TIMEOUT, self.reactor)
            try:
                await answered
                return
            except Exception:
                if not wanted():
                    raise CancelledError()
            await deferLater(self.reactor, PROBE_INTERVAL, lambda: None)

    # -- stopping -------------------------------------------------------------

    def _terminate(self, agent: _Agent) -> None:
        process = agent.process
        if process is None or process.ended:
            return
        log.info("stopping agent of {username} (pid {pid})",
                 username=agent.username, pid=process.pid)
        process.signal_group(signal.SIGTERM)
        agent.kill_timer = self.reactor.callLater(self.stop_grace, self._kill, agent, process)

    def _kill(self, agent: _Agent, process: _AgentProcess) -> None:
        agent.kill_timer = None
        if process.ended:
            return
        log.warn("agent of {username} (pid {pid}) ignored SIGTERM for {grace} seconds;"
                 " sending SIGKILL", username=agent.username, pid=process.pid,
                 grace=self.stop_grace)
        process.signal_group(signal.SIGKILL)

    def _running_agent_ended(self, agent: _Agent) -> None:
        reason = "stopped" if agent.stopping else agent.process.exit_description
        log.info("agent of {username} ended: {reason}", username=agent.username, reason=reason)
        self._forget(agent)
        for callback in list(self._callbacks):
            try:
                callback(agent.username, reason)
            except Exception:
                log.failure("exit callback failed for the agent of {username}",
                            username=agent.username)
        _fire_all(agent.stop_waiters, None)

    def _forget(self, agent: _Agent) -> None:
        if self._agents.get(agent.username) is agent:
            del self._agents[agent.username]
        if agent.kill_timer is not None and agent.kill_timer.active():
            agent.kill_timer.cancel()
        agent.kill_timer = None

    @staticmethod
    def _wait(waiters: List[Deferred]) -> Deferred:
        d = Deferred()
        waiters.append(d)
        return d
