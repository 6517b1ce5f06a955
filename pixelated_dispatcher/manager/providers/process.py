"""Run each user's agent as a local process of the manager.

This is the embedded default provider: it needs nothing installed beyond
util-linux and coreutils (Essential on Debian). What it guarantees, and why:

* **The manager picks the port** from the agents' own range
  (``agent_ports``: ``--agent-port-range``, outside the kernel's ephemeral
  ports; never one another user's agent gave up in the last ten minutes, so
  a proxy's cached address of a stopped agent cannot lead to someone
  else's), closes it to everybody but root and the proxy (``firewall``,
  :mod:`..agent_firewall`) *before* the agent exists, and passes it on the
  command line; an agent that loses the race for it ("address already in
  use") is retried on another port a few times.
* **Running means the agent answers**, not just anybody: once something
  answers HTTP on the port, the port's listeners (``/proc/net/tcp``) must
  all be the agent's uid. A squatter of another uid that bound the port
  first (it can read the port in ``/proc/<pid>/cmdline``) is never handed
  out: the attempt is killed and another port tried.
* **Credentials travel only on stdin**: one JSON line, then stdin is closed.
  Never argv (``/proc/<pid>/cmdline`` is world readable), never the
  environment, never a file.
* **Agents never run as root** when the manager gives it ``accounts``: each
  user's agent runs under its own uid and gid (``setpriv --reuid --regid
  --clear-groups``; never root's, a system account's or nobody's), with no
  capabilities at all (inheritable and bounding sets emptied) and
  ``no_new_privs``, so not even a set-uid program gives it privileges back.
  Its data directory is made the agent's (the whole tree, the first time or
  when the uid changed, never following a symlink) and mode 0700, so no other
  user's agent can read it; it enters it as itself (``env --chdir``). Without
  ``accounts`` (development: a manager that is not root) agents run as the
  manager's own user.
* **Its own process group and a minimal environment**: every agent runs
  under ``setsid``, so a stop signals everything it forked.
* **Running means answering HTTP**: an agent counts as started only once it
  answers any HTTP response on its port; if it exits first, or the start
  timeout passes, it is killed and the start fails with the last lines it
  logged, so the operator sees why.
* **Stop is polite, then firm**: SIGTERM to the group, SIGKILL after a grace
  period, and the Deferred fires only once the process has gone.
* **Agents outlive the manager** (``state_dir`` given and ``keep_on_close``):
  a restart or upgrade of the manager must not end the users' sessions, and
  the password an agent got at login is not available again. So each agent
  has a record ``<state_dir>/<user>.json`` (uid, port, argv; then pid,
  process start time, process group), written atomically before the spawn
  and completed right after it; its output goes to ``<state_dir>/<user>.log``
  (not to pipes, which would break when the manager exits), which never grows
  much over 10 MiB (rotated to ``<user>.log.1``). ``close()`` leaves running
  agents alone. The next manager's ``recover()`` adopts an agent only if its
  pid is alive with the recorded start time (a reused pid is never mistaken),
  it answers HTTP on its port, and that port's listener is the agent's uid;
  it kills the others, and every process of an agent's uid (or, for agents
  of the manager's own uid, with our marker in its environment) outside an
  adopted agent's group: an agent whose manager died between spawn and record
  is never left next to a second one. An adopted agent is not the manager's
  child: its end is seen through a pidfd (``/proc`` polled every second where
  ``pidfd_open`` is missing) and reported as "exited".
* **No orphans otherwise**: without ``state_dir``, or with ``keep_on_close``
  false, agents run under ``setpriv --pdeathsig SIGKILL``, so the kernel kills
  them if the manager dies, even by SIGKILL, and ``close()`` stops them.

What it needs of root: CAP_SETUID and CAP_SETGID (setpriv), CAP_SETPCAP (to
empty the agents' bounding set; without it setpriv quietly leaves it as it
is), CAP_CHOWN (data directories) and CAP_KILL (agents of other uids).
``tests/test_process_isolation.py`` runs a manager bounded to exactly these.
CAP_FOWNER only serves to make a data directory 0700 again after its agent
changed the mode; CAP_DAC_READ_SEARCH only to give a first-time tree whose
subdirectories are closed to root.

All file work (chown, records, logs) runs in the reactor's thread pool. Small
procfs reads (``/proc/<pid>/stat``) run on the reactor thread on purpose:
procfs never waits for a disk, and reading the start time in the same call
as the spawn is what makes it certain to be our process's.

This module holds the provider and its decisions; what they stand on is in
three others: ``process_files`` (the state dir, records, logs and data
directories: the thread pool's work), ``process_inspect`` (what ``/proc``
says about processes and sockets) and ``process_protocols`` (the Twisted
objects that watch an agent process and probe its port).
"""
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import attr
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ...fanout import fire_all
from ...protocol import AgentAddress
from ...usernames import is_valid_username
from ..agent_firewall import FirewallError, IAgentFirewall, NoFirewall
from .agent_ports import (DEFAULT_AGENT_PORTS, PORT_QUARANTINE, NoFreePort, PortAllocator,
                          PortRange)
from .agent_cgroup import AgentCgroups, out_of_memory_reason
from .interface import (Accounts, AgentStartError, ExitCallback, IAgentProvider,
                        ILimitsAgents, RunningAgent, notify_exit)
from .process_files import (RECORD_VERSION, delete_record, is_int, prepare_data_dir,
                            prepare_spawn, read_tail, scan_records, trim_logs, write_record)
from .process_inspect import (AGENT_MARKER, LOOPBACK, MIN_AGENT_UID, RECOVER_KILL_WAIT,
                              is_agent_uid, kill_orphans, listener_uids, open_pidfd,
                              process_start_time)
from .process_protocols import AdoptedProcess, AgentProcess, OneProtocolFactory, Probe

log = Logger()

#: the bundled demo agent, run by the Python that runs the manager
DEMO_AGENT_COMMAND = (
    shlex.quote(sys.executable)
    + " -m pixelated_dispatcher.demo_agent --port {port} --data-dir {data_dir}"
      " --username {username}")

#: how often a start tries another port after "address already in use", or
#: after finding its port held by another uid (a squatter)
PORT_ATTEMPTS = 5


#: readiness probe: one try at most this long, a new try this often
PROBE_TIMEOUT = 1.0
PROBE_INTERVAL = 0.1

#: how long ``recover()`` gives a recorded agent to answer HTTP
RECOVER_PROBE_TIME = 3.0

#: how often the logs of running agents are looked at (``process_files.LOG_LIMIT``)
LOG_CHECK_INTERVAL = 600.0

_PLACEHOLDER = re.compile(r"\{(port|data_dir|username)\}")



def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks it (no guessing, no fixed ranges); the agent binds it
    next. Another program may take it in between, which the provider detects
    and answers by retrying on a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@attr.s(auto_attribs=True, eq=False)
class _Agent:
    """The provider's record of one user's agent, from start to its end."""
    username: str
    data_dir: str
    credentials: bytes
    running: Optional[RunningAgent] = None
    stopping: bool = False
    #: the port of the current (or last) attempt; 0 before the first
    port: int = 0
    process: Optional["_Process"] = None
    kill_timer: Optional[IDelayedCall] = None
    start_waiters: List[Deferred] = attr.Factory(list)
    stop_waiters: List[Deferred] = attr.Factory(list)
    #: left running at close() for the next manager
    handed_over: bool = False
    #: why it ended when the provider knows better than the exit status
    #: (its cgroup says the kernel killed it for memory)
    end_reason: str = ""


#: an agent's process: one this provider spawned, or one it adopted
_Process = Union[AgentProcess, AdoptedProcess]

_READY, _EXITED, _TIMED_OUT = "ready", "exited", "timed out"


def _check_state_dir(instance: object, attribute: object, value: Optional[str]) -> None:
    if value is not None and not os.path.isabs(value):
        raise ValueError("state_dir must be an absolute path, not %r" % (value,))


@implementer(IAgentProvider, ILimitsAgents)
@attr.s(auto_attribs=True, eq=False)
class ProcessProvider:
    """Agents as local processes; see the module docstring for the guarantees.

    :param reactor: provides ``IReactorProcess``, ``IReactorTime``,
        ``IReactorFDSet``, ``IReactorThreads`` and TCP.
    :param agent_command: a command line with ``{port}``, ``{data_dir}`` and
        ``{username}`` placeholders. It is split with :func:`shlex.split` and the
        placeholders are substituted inside each argument; no shell ever sees it.
    :param extra_env: added to the agent's minimal environment (and may
        override it).
    :param start_timeout: seconds an agent has to answer HTTP.
    :param stop_grace: seconds between SIGTERM and SIGKILL.
    :param choose_port: picks the port for a start (tests replace it to force
        a collision).
    :param accounts: ``accounts(username)`` → Deferred ``(uid, gid)`` the
        user's agent runs as (the manager allocates them); None: agents run
        as the manager's own user (development; a root manager must not).
    :param state_dir: an absolute path of a directory the provider owns
        (created mode 0700): agent records and logs. None: no records, output
        through pipes into the manager's log, agents die with the manager.
    :param keep_on_close: with a ``state_dir``, ``close()`` leaves running
        agents for the next manager's ``recover()``; without one (or when
        false) ``close()`` stops them.
    """
    reactor: Any
    agent_command: str
    extra_env: Optional[Dict[str, str]] = None
    start_timeout: float = 60.0
    stop_grace: float = 10.0
    choose_port: Optional[Callable[[], int]] = None
    accounts: Optional[Accounts] = None
    state_dir: Optional[str] = attr.ib(default=None, validator=_check_state_dir)
    keep_on_close: bool = True
    port_quarantine: float = PORT_QUARANTINE
    agent_ports: PortRange = DEFAULT_AGENT_PORTS
    firewall: IAgentFirewall = attr.Factory(NoFirewall)
    #: resource limits: each agent in a cgroup of its own (None: no limits)
    cgroups: Optional[AgentCgroups] = None

    name = "process"

    _argv: List[str] = attr.ib(init=False)
    _agents: Dict[str, _Agent] = attr.ib(init=False, factory=dict)
    _ports: PortAllocator = attr.ib(init=False)
    _callbacks: List[ExitCallback] = attr.ib(init=False, factory=list)
    _closing: bool = attr.ib(init=False, default=False)
    #: per user, the last file operation queued (they run one after another)
    _disk: Dict[str, Deferred] = attr.ib(init=False, factory=dict)
    _log_trimmer: Optional[LoopingCall] = attr.ib(init=False, default=None)
    _setpriv: str = attr.ib(init=False)
    _setsid: str = attr.ib(init=False)
    _env: str = attr.ib(init=False)
    _sh: str = attr.ib(init=False, default="/bin/sh")

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
        if "=" in self._argv[0]:
            raise ValueError("the agent command %r must start with the program, not with an"
                             " assignment" % (self.agent_command,))
        setpriv, setsid, env = (shutil.which(name) for name in ("setpriv", "setsid", "env"))
        if setpriv is None or setsid is None or env is None:
            raise RuntimeError("the process provider needs setpriv and setsid (util-linux)"
                               " and env (coreutils) on PATH")
        self._setpriv, self._setsid, self._env = setpriv, setsid, env
        self._ports = PortAllocator(self.reactor, self.agent_ports, self.port_quarantine)
        self._sh = shutil.which("sh") or "/bin/sh"

    @property
    def keeps_agents(self) -> bool:
        """Whether agents outlive this provider (and are recovered by the next)."""
        return self.keep_on_close and self.state_dir is not None

    def wrapper(self, owner: Optional[Tuple[int, int]], cwd: str) -> List[str]:
        """What runs before the agent command: setpriv, setsid, and ``env``
        to enter ``cwd`` as the agent (root entering an agent's 0700 data
        directory would need CAP_DAC_READ_SEARCH)."""
        words = [self._setpriv]
        if not self.keeps_agents:
            words += ["--pdeathsig", "SIGKILL"]
        words += ["--no-new-privs"]
        if owner is not None:
            uid, gid = owner
            words += ["--reuid", str(uid), "--regid", str(gid), "--clear-groups",
                      "--inh-caps=-all", "--bounding-set=-all"]
        return words + ["--", self._setsid, "--", self._env, "--chdir=" + cwd, "--"]

    # -- IAgentProvider ------------------------------------------------------

    def recover(self) -> Deferred:
        """Adopt the agents a previous manager left running (see the module
        docstring); fires with the adopted RunningAgents. The firewall's
        table is installed (or repaired) first, and afterwards holds exactly
        the adopted agents' ports."""
        return defer.ensureDeferred(self._recover_behind_firewall())

    async def _recover_behind_firewall(self) -> List[RunningAgent]:
        await self.firewall.start()
        adopted = [] if self.state_dir is None else await self._recover()
        await self.firewall.retain_only([(a.address.host, a.address.port) for a in adopted])
        return adopted

    def running(self) -> Dict[str, RunningAgent]:
        return {name: agent.running for name, agent in self._agents.items()
                if agent.running is not None and not agent.stopping}

    def on_exit(self, callback: ExitCallback) -> None:
        self._callbacks.append(callback)

    def start(self, username: str, data_dir: str, credentials: bytes) -> Deferred:
        if not is_valid_username(username):
            # it names files in state_dir: never let it name another place
            return defer.fail(AgentStartError("not starting an agent for the invalid user"
                                              " name %r" % (username,)))
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
        """Stop the agents, or with ``keeps_agents`` leave the running ones
        (records in place) for the next manager; starts in flight are stopped
        either way. Fires once that is done and every record is on disk."""
        self._closing = True
        if self._log_trimmer is not None and self._log_trimmer.running:
            self._log_trimmer.stop()
        stops, handed = [], []
        for username, agent in list(self._agents.items()):
            if (self.keeps_agents and agent.running is not None and not agent.stopping
                    and agent.process is not None and not agent.process.ended):
                self._hand_over(agent)
                handed.append(agent)
            else:
                stops.append(self.stop(username))
        kept = bool(handed)
        d = defer.gatherResults(stops, consumeErrors=True)
        d.addCallback(lambda _: defer.gatherResults(
            [self._queue_disk(name, lambda: None) for name in list(self._disk)],
            consumeErrors=True))
        cgroups = self.cgroups
        if cgroups is not None:
            # Empty by now unless agents were handed over (then they stay).
            d.addCallback(lambda _: self._in_thread(cgroups.remove_bases))
        # the table goes unless agents run on for the next manager
        d.addCallback(lambda _: self.firewall.close(keep=kept))
        return d.addCallback(lambda _: None)

    def _hand_over(self, agent: _Agent) -> None:
        # close() hands over only running agents with a live process
        assert agent.running is not None and agent.process is not None
        log.info("leaving the agent of {username} (pid {pid}) running for the next manager",
                 username=agent.username, pid=agent.running.pid)
        agent.handed_over = True
        agent.process.hand_over()
        self._forget(agent)

    # -- file work, one operation at a time per user ----------------------------

    def _in_thread(self, function: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), function, *args)

    def _queue_disk(self, username: str, function: Callable[..., Any], *args: Any,
                    quiet: bool = True) -> Deferred:
        """Run ``function(*args)`` in a thread after the user's earlier file
        operations (a record must never be deleted before it was written);
        fires with its result. With ``quiet``, errors are logged, not raised:
        a missing record costs an adoption, not the agent."""
        previous = self._disk.get(username)
        mine: Deferred = Deferred()
        self._disk[username] = mine
        result: Deferred = Deferred()

        def finish(outcome: Any) -> None:
            if self._disk.get(username) is mine:
                del self._disk[username]
            mine.callback(None)  # lets the next operation run
            if isinstance(outcome, Failure) and quiet:
                log.failure("file work for the agent of {username} failed", outcome,
                            username=username)
                outcome = None
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        def run(_: object) -> None:
            self._in_thread(function, *args).addBoth(finish)

        if previous is None:
            run(None)
        else:
            previous.addCallback(run)
        return result

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
            fire_all(agent.start_waiters, Failure(error))
            fire_all(agent.stop_waiters, None)
            return
        agent.credentials = b""  # delivered; keep the password no longer than needed
        process = agent.process
        assert isinstance(process, AgentProcess)  # _launch spawned it
        self._now_running(agent, running)
        if process.record is not None:
            # the next manager adopts it as this very RunningAgent
            record = dict(process.record, started=running.started)
            self._queue_disk(agent.username, write_record, self.state_dir, record)
        log.info("agent of {username} running at {host}:{port} (pid {pid})",
                 username=agent.username, host=running.address.host,
                 port=running.address.port, pid=running.pid)
        fire_all(agent.start_waiters, running)

    def _now_running(self, agent: _Agent, running: RunningAgent) -> None:
        agent.running = running
        assert agent.process is not None  # started or adopted: it has its process
        agent.process.when_ended().addCallback(lambda _: self._running_agent_ended(agent))

    async def _owner(self, agent: _Agent) -> Optional[Tuple[int, int]]:
        """The (uid, gid) the agent runs as, its data dir made theirs."""
        owner = None
        if self.accounts is not None:
            try:
                uid, gid = await defer.maybeDeferred(self.accounts, agent.username)
            except Exception as error:
                raise AgentStartError("no uid for the agent of %s: %s"
                                      % (agent.username, error))
            if not (is_int(uid) and is_int(gid) and is_agent_uid(uid) and is_agent_uid(gid)):
                raise AgentStartError(
                    "refusing to run the agent of %s as uid %r, gid %r: an agent's ids are"
                    " its own, from %d up, never root's, a system account's or nobody's"
                    % (agent.username, uid, gid, MIN_AGENT_UID))
            owner = (uid, gid)
        try:
            await self._in_thread(prepare_data_dir, agent.data_dir, owner)
        except AgentStartError as error:
            raise AgentStartError("cannot start the agent of %s: %s" % (agent.username, error))
        return owner

    async def _launch(self, agent: _Agent) -> RunningAgent:
        """Spawn the agent until it answers HTTP, trying another port if it
        lost its port to somebody else; raise AgentStartError otherwise."""
        deadline = self.reactor.seconds() + self.start_timeout
        owner = await self._owner(agent)
        if agent.stopping:
            raise AgentStartError("the agent of %s was stopped while it was starting"
                                  % (agent.username,))
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = await self._claim_port(agent)
            process = await self._spawn(agent, port, owner)
            outcome = await self._until_ready(port, deadline - self.reactor.seconds(), process)
            where = "%s:%d" % (LOOPBACK, port)
            if outcome == _READY and not agent.stopping:
                strangers = await self._strangers_on(port, owner)
                if not strangers:
                    assert process.pid is not None  # set as spawnProcess connected it
                    return RunningAgent(agent.username, AgentAddress(LOOPBACK, port),
                                        # the real reactor's clock is time.time()
                                        process.pid, self.reactor.seconds())
                # Something answered, but not (only) the agent: a squatter
                # bound the port first (the agent then fails to bind it).
                # Never hand out its address; try another port.
                log.warn("port {port} of the agent of {username} is held by uid {uids}, not"
                         " only by the agent; trying another port", port=port,
                         username=agent.username, uids=strangers)
                process.signal_group(signal.SIGKILL)
                await process.when_ended()
                await self._give_up_port(port)
                if attempt < PORT_ATTEMPTS:
                    continue
                raise AgentStartError(
                    "the agent of %s could not start: %d times, another program (uid %s)"
                    " took its port first" % (agent.username, PORT_ATTEMPTS,
                                              ", ".join(map(str, strangers))))
            if outcome == _TIMED_OUT:
                process.signal_group(signal.SIGKILL)
                await process.when_ended()
                await self._collect_output(process)
                raise AgentStartError(
                    "the agent of %s did not answer HTTP on %s within %g seconds, so it"
                    " was killed.%s" % (agent.username, where, self.start_timeout,
                                        process.output_for_error()))
            await process.when_ended()
            if agent.stopping:
                raise AgentStartError("the agent of %s was stopped while it was starting"
                                      % (agent.username,))
            await self._collect_output(process)
            if process.says_address_in_use() and attempt < PORT_ATTEMPTS:
                log.info("agent of {username} found port {port} taken; trying another",
                         username=agent.username, port=port)
                await self._give_up_port(port)
                continue
            raise AgentStartError(
                "the agent of %s %s before it answered HTTP on %s.%s"
                % (agent.username, process.exit_description, where,
                   process.output_for_error()))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _claim_port(self, agent: _Agent) -> int:
        """A port for this start, protected by the firewall before the agent
        exists (nobody but root and the proxy can connect to it even in the
        moment the agent binds it)."""
        # Never a port another of our agents holds or is about to bind: two
        # agents on one port would let one user's readiness probe be
        # answered by the other user's agent. Nor one another user's agent
        # gave up lately (agent_ports.PORT_QUARANTINE).
        taken = {a.port for a in self._agents.values() if a is not agent}
        try:
            port = self.choose_port() if self.choose_port is not None else None
            if port is None or port in taken or port in self._ports.quarantined(agent.username):
                port = self._ports.choose(agent.username, taken)
        except NoFreePort as error:
            raise AgentStartError(str(error))
        agent.port = port  # ours from now on, before any wait
        try:
            await self.firewall.protect(LOOPBACK, port)
        except FirewallError as error:
            agent.port = 0
            raise AgentStartError("not starting the agent of %s: its port could not be"
                                  " closed to other local users: %s" % (agent.username, error))
        return port

    async def _give_up_port(self, port: int) -> None:
        """An attempt's port that no agent of ours listens on any more."""
        try:
            await self.firewall.release(LOOPBACK, port)
        except FirewallError as error:
            log.warn("{error}", error=str(error))

    async def _strangers_on(self, port: int, owner: Optional[Tuple[int, int]]) -> List[int]:
        """The uids other than the agent's that listen on ``port``: a
        listener that is not provably the agent is never handed out."""
        uid = owner[0] if owner is not None else os.getuid()
        return [other for other in await self._in_thread(listener_uids, port) if other != uid]

    async def _collect_output(self, process: AgentProcess) -> None:
        if process.log_path is not None:
            lines = await self._in_thread(read_tail, process.log_path, process.log_offset)
            process.last_lines.clear()
            process.last_lines.extend(lines)

    async def _spawn(self, agent: _Agent, port: int,
                     owner: Optional[Tuple[int, int]]) -> AgentProcess:
        values = {"port": str(port), "data_dir": agent.data_dir, "username": agent.username}
        argv = [_PLACEHOLDER.sub(lambda m: values[m.group(1)], word) for word in self._argv]
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "LANG": "C.UTF-8",
            "HOME": agent.data_dir,
            "DISPATCHER_LOGOUT_URL": "/auth/logout",
        }
        env.update(self.extra_env or {})
        if self.state_dir is not None:
            env[AGENT_MARKER] = self.state_dir
        command = (await self._enter_cgroup(agent)) + self.wrapper(owner, agent.data_dir) + argv
        record = {
            "version": RECORD_VERSION, "username": agent.username, "pid": None,
            "start_time": None, "pgid": None, "port": port, "started": time.time(),
            "argv": argv, "data_dir": agent.data_dir,
            "uid": owner[0] if owner else os.getuid(),
            "gid": owner[1] if owner else os.getgid(),
        }
        log_path = log_fd = None
        log_offset = 0
        if self.state_dir is not None:
            log_path = os.path.join(self.state_dir, agent.username + ".log")
            header = "--- %s agent of %s starting on port %d%s\n" % (
                time.strftime("%Y-%m-%dT%H:%M:%S%z"), agent.username, port,
                " as uid %d" % (owner[0],) if owner else "")
            try:
                # the record is on disk before the agent exists: a manager
                # killed right after the spawn leaves no agent nobody knows of
                log_fd, log_offset = await self._queue_disk(
                    agent.username, prepare_spawn, self.state_dir, record, log_path, header,
                    quiet=False)
            except OSError as error:
                raise AgentStartError("cannot write the record or the log of the agent of %s"
                                      " in %s: %s" % (agent.username, self.state_dir, error))
        process = AgentProcess(self.reactor, agent.username, agent.credentials,
                                log_path, log_offset)
        child_fds = {0: "w", 1: "r", 2: "r"} if log_fd is None else {0: "w", 1: log_fd,
                                                                    2: log_fd}
        try:
            if agent.stopping:
                raise AgentStartError("the agent of %s was stopped while it was starting"
                                      % (agent.username,))
            log.info("starting agent of {username} on port {port}: {argv}",
                     username=agent.username, port=port,
                     argv=" ".join(map(shlex.quote, argv)))
            try:
                self.reactor.spawnProcess(process, command[0], command, env=env,
                                          path="/", childFDs=child_fds)
            except OSError as error:
                raise AgentStartError("the agent of %s could not be spawned: %s"
                                      % (agent.username, error))
        except AgentStartError:
            if self.state_dir is not None:
                self._queue_disk(agent.username, delete_record, self.state_dir, agent.username)
            raise
        finally:
            if log_fd is not None:
                os.close(log_fd)  # the agent has its own copy
        agent.process = process
        agent.port = port
        self._watch_cgroup(agent, process)
        if self.state_dir is not None:
            self._record(agent, process, record)
            self._trim_logs_from_now_on()
        return process

    # -- resource limits (agent_cgroup) -------------------------------------------

    async def _enter_cgroup(self, agent: _Agent) -> List[str]:
        """Make the agent's cgroup; the argv prefix that puts the agent in it
        before it runs (nothing without limits)."""
        if self.cgroups is None:
            return []
        try:
            await self._queue_disk(agent.username, self.cgroups.create, agent.username,
                                   quiet=False)
        except OSError as error:
            raise AgentStartError("cannot make the cgroup that limits the agent of %s: %s"
                                  % (agent.username, error))
        return self.cgroups.enter_argv(agent.username, self._sh)

    def _watch_cgroup(self, agent: _Agent, process: Any) -> None:
        """When the agent ends: learn whether the kernel killed it for memory
        (read before the removal, in this same turn), then remove its cgroup."""
        cgroups = self.cgroups
        if cgroups is None:
            return

        def ended(_: object) -> None:
            if agent.handed_over:
                return  # the next manager's
            if cgroups.limits.memory and cgroups.oom_killed(agent.username):
                agent.end_reason = out_of_memory_reason(cgroups.limits.memory)
                log.warn("agent of {username} {reason}", username=agent.username,
                         reason=agent.end_reason)
            if self._agents.get(agent.username) in (None, agent):
                self._queue_disk(agent.username, cgroups.remove, agent.username)
        process.when_ended().addCallback(ended)

    def limits(self) -> str:
        """The agents' resource limits, for ``pixelated-ctl info``."""
        if self.cgroups is None:
            return ("none (the manager is not root)" if self.accounts is None
                    else "none")
        return self.cgroups.describe()

    def _trim_logs_from_now_on(self) -> None:
        if self._log_trimmer is None:
            self._log_trimmer = LoopingCall(self._trim_logs)
            self._log_trimmer.clock = self.reactor
            self._log_trimmer.start(LOG_CHECK_INTERVAL, now=False)

    def _trim_logs(self) -> Deferred:
        assert self.state_dir is not None  # only agents with records have their logs trimmed
        paths = [os.path.join(self.state_dir, username + ".log") for username in self._agents]
        return self._in_thread(trim_logs, paths).addErrback(
            lambda f: log.failure("trimming agent logs failed", f))

    def _record(self, agent: _Agent, process: AgentProcess, intent: dict) -> None:
        """Complete the record with the pid, and delete it when the process ends."""
        pid = process.pid
        assert pid is not None  # set as spawnProcess connected it
        process.when_ended().addCallback(
            lambda _: None if process.handed_over else
            self._queue_disk(agent.username, delete_record, self.state_dir,
                             agent.username, pid))
        # read now, in the spawn's reactor turn: our child cannot have been
        # reaped yet, so this start time is surely our agent's
        start_time = process_start_time(pid)
        if start_time is None:
            return  # gone already; the start fails on its own, the record goes
        process.record = dict(intent, pid=pid, start_time=start_time, pgid=pid)
        self._queue_disk(agent.username, write_record, self.state_dir, process.record)

    async def _until_ready(self, port: int, seconds: float,
                           process: Optional[AgentProcess] = None) -> str:
        """Whichever comes first: something answers HTTP on ``port``
        (_READY), ``process`` exits (_EXITED; never without a ``process``),
        or ``seconds`` pass (_TIMED_OUT).

        A start gives the agent it spawned until its start deadline; an
        adoption gives a recorded port RECOVER_PROBE_TIME, and looks at the
        adopted process itself afterwards.
        """
        outcome: Deferred = Deferred()

        def settle(result: str) -> None:
            if not outcome.called:
                outcome.callback(result)

        if process is not None:
            process.when_ended().addCallback(lambda _: settle(_EXITED))
        timer = self.reactor.callLater(max(0.0, seconds), settle, _TIMED_OUT)
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
            probe = Probe(request)
            answered = endpoint.connect(OneProtocolFactory(probe))
            answered.addCallback(lambda _: probe.answered)
            answered.addTimeout(PROBE_TIMEOUT, self.reactor)
            try:
                await answered
                return
            except Exception:
                if not wanted():
                    raise CancelledError()
            await deferLater(self.reactor, PROBE_INTERVAL, lambda: None)

    # -- recovering ---------------------------------------------------------------

    async def _recover(self) -> List[RunningAgent]:
        records, uids = await self._in_thread(scan_records, self.state_dir)
        results = await defer.gatherResults(
            [defer.ensureDeferred(self._adopt(record)) for record in records],
            consumeErrors=True)
        adopted = [running for running in results if running is not None]
        if adopted and not self._closing:
            self._trim_logs_from_now_on()
        # then whatever runs without a record: never two agents for one user
        known = [agent.process.pid for agent in self._agents.values()
                 if agent.process is not None and agent.process.pid is not None]
        await self._in_thread(kill_orphans, self.state_dir, uids, known)
        if self.cgroups is not None:
            stale = await self._in_thread(self.cgroups.clean_stale,
                                          [running.username for running in adopted])
            if stale:
                log.info("removed the cgroups of agents that were not adopted: {users}",
                         users=" ".join(stale))
        return adopted

    async def _adopt(self, record: dict) -> Optional[RunningAgent]:
        username, pid, port = record["username"], record["pid"], record["port"]
        if username in self._agents:
            return None  # recover() runs before any start; never two agents anyway
        same, pidfd = open_pidfd(pid, record["start_time"])
        if not same:
            log.info("agent of {username} (pid {pid}) is gone; discarding its record",
                     username=username, pid=pid)
            await self._queue_disk(username, delete_record, self.state_dir, username, pid)
            return None
        process = AdoptedProcess(self.reactor, username, pid, record["start_time"], pidfd)
        process.watch()
        agent = _Agent(username, record.get("data_dir", ""), b"", process=process, port=port)
        self._agents[username] = agent  # holds the port and the user while we probe
        answers = await self._until_ready(port, RECOVER_PROBE_TIME) == _READY
        # and it is the agent that answers, not a stranger on its old port
        owners = await self._in_thread(listener_uids, port) if answers else []
        if answers and record["uid"] not in owners:
            log.warn("port {port} of the agent of {username} is held by uid {owners}, not by"
                     " the agent's uid {uid}", port=port, username=username, owners=owners,
                     uid=record["uid"])
        if answers and record["uid"] in owners and not process.ended:
            running = RunningAgent(username, AgentAddress(LOOPBACK, port), pid,
                                   float(record["started"]))
            self._watch_cgroup(agent, process)
            self._now_running(agent, running)
            process.when_ended().addCallback(
                lambda _: self._queue_disk(username, delete_record, self.state_dir,
                                           username, pid))
            log.info("adopted the agent of {username} (pid {pid}) at {host}:{port}",
                     username=username, pid=pid, host=LOOPBACK, port=port)
            fire_all(agent.start_waiters, running)
            return running
        log.warn("agent of {username} (pid {pid}) no longer answers HTTP on port {port};"
                 " killing it", username=username, pid=pid, port=port)
        process.signal_group(signal.SIGKILL)
        timer = self.reactor.callLater(RECOVER_KILL_WAIT, process._gone)
        await process.when_ended()
        if timer.active():
            timer.cancel()
        self._forget(agent)
        fire_all(agent.start_waiters, Failure(AgentStartError(
            "the agent of %s that the previous manager left did not answer HTTP, so it was"
            " killed; try again" % (username,))))
        fire_all(agent.stop_waiters, None)
        await self._queue_disk(username, delete_record, self.state_dir, username, pid)
        return None

    # -- stopping -------------------------------------------------------------

    def _terminate(self, agent: _Agent) -> None:
        process = agent.process
        if process is None or process.ended:
            return
        log.info("stopping agent of {username} (pid {pid})",
                 username=agent.username, pid=process.pid)
        process.signal_group(signal.SIGTERM)
        agent.kill_timer = self.reactor.callLater(self.stop_grace, self._kill, agent, process)

    def _kill(self, agent: _Agent, process: _Process) -> None:
        agent.kill_timer = None
        if process.ended:
            return
        log.warn("agent of {username} (pid {pid}) ignored SIGTERM for {grace} seconds;"
                 " sending SIGKILL", username=agent.username, pid=process.pid,
                 grace=self.stop_grace)
        process.signal_group(signal.SIGKILL)

    def _running_agent_ended(self, agent: _Agent) -> None:
        if agent.handed_over:
            return  # the next manager's business
        assert agent.process is not None  # it ended: it had a process
        reason = ("stopped" if agent.stopping
                  else agent.end_reason or agent.process.exit_description)
        log.info("agent of {username} ended: {reason}", username=agent.username, reason=reason)
        self._forget(agent)
        notify_exit(self._callbacks, agent.username, reason)
        fire_all(agent.stop_waiters, None)

    def _forget(self, agent: _Agent) -> None:
        if self._agents.get(agent.username) is agent:
            del self._agents[agent.username]
        if agent.port:
            self._ports.released(agent.port, agent.username)
            if not agent.handed_over:
                # gone: its port is nobody's now (a handed over agent keeps
                # its entry for the next manager)
                self.firewall.release(LOOPBACK, agent.port).addErrback(
                    lambda f: log.warn("{error}", error=f.getErrorMessage()))
        if agent.kill_timer is not None and agent.kill_timer.active():
            agent.kill_timer.cancel()
        agent.kill_timer = None

    @staticmethod
    def _wait(waiters: List[Deferred]) -> Deferred:
        d: Deferred = Deferred()
        waiters.append(d)
        return d
