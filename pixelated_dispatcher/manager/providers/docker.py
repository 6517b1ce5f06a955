"""The docker provider: one hardened container per user, on the Docker engine.

Each agent runs in a container named ``<instance>-<username>`` (by default
``pixelated-agent-alice``) with the labels ``org.pixelated.dispatcher=<instance>``
and ``org.pixelated.dispatcher.user=<username>``, so that a restarted manager
finds its agents again (:meth:`DockerProvider.recover`) and leaves everybody
else's containers alone.

A start: create the container (memory and pids limits, every capability
dropped, ``no-new-privileges``, a non-root user, the user's data directory
bound at the data mount, the agent port published on 127.0.0.1 with an
ephemeral host port, no restart policy), pulling the image first if the engine
does not have it (progress to the log) and removing a stale container of that
name if there is one; start it; write the credentials line on its stdin
through attach and close stdin; read the host port back with inspect; wait
until the agent answers HTTP there. Whatever fails on the way removes the
container and fails the start with a clear :class:`AgentStartError` (with the
last lines of the container's log when the agent itself failed).

While the manager runs, the provider follows the engine's ``/events`` for its
containers: a container that dies (crash, OOM kill, ``docker kill``, a daemon
restart) is reported to the ``on_exit`` callbacks within moments, its log tail
goes to the manager's log, and it is removed. If the engine goes away, every
agent is reported ended ("container engine unavailable"), starts fail with
:class:`ContainerEngineUnavailable`, and the provider reconnects by itself:
when the engine is back it reconciles (adopts containers that still run,
removes the rest).
"""
import ipaddress
import math
import os
import shlex
import time
from calendar import timegm
from typing import Any, Callable, Dict, List, Optional

import re

import attr
from twisted.internet import task
from twisted.internet.threads import deferToThread
from twisted.internet.defer import (CancelledError, Deferred, DeferredList, DeferredLock,
                                    ensureDeferred, succeed)
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ...fanout import SharedResult
from ...protocol import AgentAddress
from ...usernames import is_valid_username
from ..agent_firewall import FirewallError, IAgentFirewall, NoFirewall
from .agent_ports import DEFAULT_AGENT_PORTS, NoFreePort, PortAllocator, PortRange, port_is_free
from .agent_cgroup import AgentLimits
from .docker_engine import (Conflict, DockerEngineError, EngineUnavailable, IDockerEngine,
                            IEventStream, NoSuchContainer, NoSuchImage, NoSuchNetwork, PullFailed,
                            log_tail_lines)
from .interface import (Accounts, AgentStartError, ExitCallback, IAgentProvider,
                        ILimitsAgents, IMeasuresMemory, RunningAgent, notify_exit)
from .loopback_guard import LoopbackGuard, LoopbackGuardFailed
from .process_inspect import listener_uids

#: label on every container of ours; its value is the provider's instance name
LABEL = "org.pixelated.dispatcher"
#: label naming the user whose agent the container is
USER_LABEL = "org.pixelated.dispatcher.user"

MiB = 1024 * 1024

#: the bridge driver's option that stops containers of one network from
#: talking to each other
ICC_OPTION = "com.docker.network.bridge.enable_icc"

#: (engine, network name) -> the lock under which that network is ensured
_NETWORK_LOCKS: Dict[tuple, DeferredLock] = {}

#: seconds during which a container that was created but never started may
#: be another provider's start in flight (while it waits for the network,
#: say): reconciling leaves it alone that long
FRESH_CONTAINER = 30.0

#: how often a start tries another host port when it is taken
PORT_ATTEMPTS = 5

#: what dockerd says when it cannot publish on the host port we chose
_PORT_TAKEN = re.compile(r"port is already allocated|address already in use", re.I)


class _PortTaken(Exception):
    """The chosen host port was taken by somebody else; try another."""


class ContainerEngineUnavailable(AgentStartError):
    """The Docker engine cannot be reached; the manager keeps trying."""


@attr.s(frozen=True, auto_attribs=True)
class DockerAgentSettings:
    """How agent containers are made (the ``--agent-*`` options)."""
    image: str = "pixelated/pixelated-user-agent"
    memory: int = 512 * MiB
    pids: int = 256
    #: relative CPU weight under contention (Docker's CpuShares; 1024 normal)
    cpu_shares: int = 1024
    user: str = "65534:65534"
    port: int = 4567
    data_mount: str = "/mnt/user"
    start_timeout: float = 60.0
    #: command line with {port}, {data_dir} and {username}; None: the image's own
    command: Optional[str] = None
    stop_grace: float = 10.0
    #: container name prefix and value of :data:`LABEL`
    instance: str = "pixelated-agent"
    environment: Dict[str, str] = attr.Factory(
        lambda: {"DISPATCHER_LOGOUT_URL": "/auth/logout"})
    #: lines of the container's log quoted in errors and in the manager's log
    log_lines: int = 20
    #: the agents' own Docker network (made if missing, containers on it
    #: cannot talk to each other; None: ``<instance>-net``) and its subnet
    #: (None: Docker chooses from its address pools)
    network: Optional[str] = None
    network_subnet: Optional[str] = None
    #: where published ports come from (``--agent-port-range``)
    host_ports: PortRange = DEFAULT_AGENT_PORTS

    @property
    def network_name(self) -> str:
        return self.network or "%s-net" % (self.instance,)

    def network_config(self) -> dict:
        """The body of ``POST /networks/create`` for :attr:`network`."""
        config = {"Driver": "bridge", "CheckDuplicate": True,
                  "Options": {ICC_OPTION: "false"},
                  "Labels": {LABEL: self.instance}}
        if self.network_subnet:
            config["IPAM"] = {"Config": [{"Subnet": self.network_subnet,
                                          "Gateway": _first_host(self.network_subnet)}]}
        return config

    def container_name(self, username: str) -> str:
        return "%s-%s" % (self.instance, username)

    def container_port(self) -> str:
        return "%d/tcp" % (self.port,)


    def command_for(self, username: str) -> Optional[List[str]]:
        if self.command is None:
            return None
        return [word.format(port=self.port, data_dir=self.data_mount, username=username)
                for word in shlex.split(self.command)]

    def container_config(self, username: str, data_dir: str, user: Optional[str] = None,
                         host_port: Optional[int] = None) -> dict:
        """The body of ``POST /containers/create`` for ``username``'s agent
        (``user``: its ``UID:GID``, by default :attr:`user`; ``host_port``:
        where it is published on 127.0.0.1, None: wherever Docker likes)."""
        config = {
            "Image": self.image,
            "User": user or self.user,
            "Env": ["%s=%s" % item for item in sorted(self.environment.items())],
            "Labels": {LABEL: self.instance, USER_LABEL: username},
            "ExposedPorts": {self.container_port(): {}},
            # stdin open for exactly one attach: the credentials line, then EOF
            "OpenStdin": True,
            "StdinOnce": True,
            "AttachStdin": False,
            "Tty": False,
            "HostConfig": {
                "Memory": self.memory,
                "MemorySwap": self.memory,
                "PidsLimit": self.pids,
                "CpuShares": self.cpu_shares,
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                "Mounts": [{"Type": "bind", "Source": data_dir, "Target": self.data_mount,
                            "ReadOnly": False}],
                "PortBindings": {self.container_port(): [{
                    "HostIp": "127.0.0.1", "HostPort": str(host_port or "")}]},
                "NetworkMode": self.network_name,
                "RestartPolicy": {"Name": "no"},
            },
        }
        command = self.command_for(username)
        if command is not None:
            config["Cmd"] = command
        return config


@attr.s(auto_attribs=True)
class _Agent:
    container_id: str
    agent: RunningAgent


@attr.s(auto_attribs=True)
class _StartWatch:
    """What the event stream learnt about a container that is being started."""
    username: str
    died: Optional[int] = None


class _HTTPProbe(Protocol):
    #: once connected, a TCP transport (abortConnection)
    transport: Any

    def __init__(self, answer: Deferred) -> None:
        self._answer = answer
        self._seen = b""

    def connectionMade(self) -> None:
        self.transport.write(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                             b"User-Agent: pixelated-manager readiness probe\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._seen += data
        if len(self._seen) >= 5 and not self._answer.called:
            self._answer.callback(self._seen.startswith(b"HTTP/"))
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._answer.called:
            self._answer.callback(False)


def http_answers(reactor: Any, host: str, port: int, timeout: float = 2.0) -> Deferred:
    """Fires True if something answers HTTP at ``host:port`` within ``timeout``.

    A connection that is accepted and then closed (Docker's port proxy does
    that while nothing listens in the container) is not an answer.
    """
    answer: Deferred = Deferred()
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    protocols: List[_HTTPProbe] = []

    def build() -> _HTTPProbe:
        proto = _HTTPProbe(answer)
        protocols.append(proto)
        return proto
    connecting = endpoint.connect(Factory.forProtocol(build))

    def not_connected(_: Failure) -> None:
        if not answer.called:
            answer.callback(False)
    connecting.addErrback(not_connected)

    def give_up() -> None:
        if not answer.called:
            answer.callback(False)
        for proto in protocols:
            if proto.transport is not None:
                proto.transport.abortConnection()
        if not connecting.called:
            connecting.cancel()
    timer = reactor.callLater(timeout, give_up)
    answer.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
    return answer


def _started_at(text: str) -> float:
    """Docker's ``2026-11-28T10:32:50.559951769Z`` as a POSIX time, to the
    microsecond (0 when unknown). The same container always gives the same
    value, so an adopted agent equals the one that was started."""
    try:
        whole = timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    except (TypeError, ValueError):
        return 0.0
    fraction = text[19:].rstrip("Z")
    if fraction.startswith(".") and fraction[1:7].isdigit():
        return whole + int(fraction[1:7].ljust(6, "0")) / 1e6
    return float(whole)


def _host_port(info: dict, container_port: str) -> Optional[int]:
    bindings = ((info.get("NetworkSettings") or {}).get("Ports") or {}).get(container_port)
    for binding in bindings or []:
        if binding.get("HostIp") == "127.0.0.1" and str(binding.get("HostPort", "")).isdigit():
            return int(binding["HostPort"])
    return None


def _first_host(subnet: str) -> str:
    """The first address of ``subnet``: where a Docker bridge sits by default."""
    network = ipaddress.IPv4Network(subnet, strict=False)
    return str(network.network_address + 1)


def _mib(value: int) -> str:
    return "%g MiB" % (value / MiB) if value % MiB == 0 else "%d bytes" % value


def prepare_data_dir(data_dir: str, user: str) -> None:
    """The agent runs as ``user`` (``UID:GID``): give it its data directory."""
    if os.geteuid() != 0:
        return
    uid, gid = (int(part) for part in user.split(":"))
    try:
        status = os.stat(data_dir)
        if (status.st_uid, status.st_gid) != (uid, gid):
            os.chown(data_dir, uid, gid)
    except OSError as error:
        raise AgentStartError("cannot give the data directory %s to the agent (%s): %s"
                              % (data_dir, user, error.strerror or error))


def exit_reason(exit_code: int, oom: bool, memory: int) -> str:
    """How an agent's container ended, for ``on_exit`` and the log (the
    docker and the swarm provider say it alike)."""
    if oom:
        return ("was killed for running out of memory (OOM-killed at its limit of %s)"
                % _mib(memory))
    if exit_code == 137:
        return "was killed by signal 9 (SIGKILL, exit code 137)"
    if exit_code == 143:
        return "was terminated by signal 15 (SIGTERM, exit code 143)"
    return "exited with code %d" % exit_code


@implementer(IAgentProvider, IMeasuresMemory, ILimitsAgents)
class DockerProvider:
    """Agents as Docker containers, one per user (see the module docstring)."""

    name = "docker"
    log = Logger()

    def __init__(self, reactor: Any, engine: IDockerEngine,
                 settings: DockerAgentSettings = DockerAgentSettings(),
                 probe: Optional[Callable[[str, int], Deferred]] = None,
                 loopback_guard: Optional[LoopbackGuard] = None, keep_on_close: bool = True,
                 firewall: Optional[IAgentFirewall] = None,
                 ports: Optional[PortAllocator] = None) -> None:
        """
        :param keep_on_close: ``close()`` leaves the agents running for the
            next manager to adopt (the default); if false it stops them.
        :param firewall: closes the published ports and the agents' network
            to everybody but root and the proxy (see ``agent_firewall``).
        :param ports: chooses host ports (default: from ``settings.host_ports``).
        """
        self._reactor = reactor
        self.keep_on_close = keep_on_close
        self._engine = engine
        self.settings = settings
        self._probe = probe or (lambda host, port: http_answers(reactor, host, port))
        self._guard = loopback_guard
        self._firewall: IAgentFirewall = firewall if firewall is not None else NoFirewall()
        #: the engine is on this machine: its ports and listeners can be checked here
        self._local = engine.host.startswith("unix:")
        self._ports = ports or PortAllocator(
            reactor, settings.host_ports,
            is_free=port_is_free if self._local else lambda port: True)
        self._firewall_problem: Optional[str] = None
        self._network_ready = False
        #: the agents' network's id once ensured (names can be ambiguous in Docker)
        self._network_id: Optional[str] = None
        self._network_ensuring: Optional[SharedResult] = None
        #: set by the manager when it gives every user an own uid:
        #: ``accounts(username) -> Deferred[(uid, gid)]``; else ``settings.user``
        self.accounts: Optional[Accounts] = None
        self._agents: Dict[str, _Agent] = {}
        self._by_id: Dict[str, str] = {}
        self._starting: Dict[str, SharedResult] = {}
        self._stopping: Dict[str, SharedResult] = {}
        self._abort: set = set()
        self._start_watch: Dict[str, _StartWatch] = {}
        self._oom: set = set()
        self._callbacks: List[ExitCallback] = []
        self._pulls: Dict[str, SharedResult] = {}
        self._stream: Optional[IEventStream] = None
        self._watcher: Optional[Deferred] = None
        #: fires with the agents adopted at the first reconcile (the watcher
        #: that recover() starts fires it)
        self._first_reconcile: Deferred = Deferred()
        self._first_reconciled = SharedResult(self._first_reconcile)
        self._engine_up = False
        self._engine_problem = "not contacted yet"
        self._closing = False

    # -- IAgentProvider --

    def limits(self) -> str:
        """The limits of every agent container, for ``pixelated-ctl info``."""
        settings = self.settings
        return "%s (container)" % (AgentLimits(settings.memory, settings.pids,
                                               settings.cpu_shares).describe(),)

    def recover(self) -> Deferred:
        """Start following the engine; fire with the agents adopted at the
        first reconcile ([] when the engine cannot be reached: the provider
        keeps trying and reconciles when it appears)."""
        if self._watcher is None:
            self._watcher = ensureDeferred(self._watch())
            self._watcher.addErrback(self._watcher_ended)
        return self._first_reconciled.wait()

    def start(self, username: str, data_dir: str, credentials: bytes) -> Deferred:
        if username in self._agents and username not in self._stopping:
            return succeed(self._agents[username].agent)
        if username in self._starting:
            return self._starting[username].wait()
        shared = SharedResult(ensureDeferred(
            self._start_after_stop(username, data_dir, credentials)))
        if not shared.done:
            self._starting[username] = shared
            shared.wait().addBoth(lambda _: self._starting.pop(username, None))
        return shared.wait()

    def stop(self, username: str) -> Deferred:
        if username in self._stopping:
            return self._stopping[username].wait()
        shared = SharedResult(ensureDeferred(self._stop(username)))
        if not shared.done:
            self._stopping[username] = shared
            shared.wait().addBoth(lambda _: self._stopping.pop(username, None))
        return shared.wait()

    def running(self) -> Dict[str, RunningAgent]:
        return {username: entry.agent for username, entry in self._agents.items()}

    def on_exit(self, callback: ExitCallback) -> None:
        self._callbacks.append(callback)

    def close(self) -> Deferred:
        """The manager stops: starts in flight end (their containers are
        removed), then the running agents are left to the next manager
        (``keep_on_close``, they are no longer this provider's) or stopped;
        the event stream is closed. Later starts fail."""
        return ensureDeferred(self._close())

    async def _close(self) -> None:
        self._closing = True
        if self._stream is not None:
            self._stream.stop()
        if self._watcher is not None and not self._watcher.called:
            self._watcher.cancel()              # whatever it waits for: a call, a sleep
        await DeferredList([shared.wait() for shared in list(self._starting.values())],
                           consumeErrors=True)
        kept = False
        if self.keep_on_close:
            kept = bool(self._agents)
            self._agents.clear()
            self._by_id.clear()
        else:
            await DeferredList([self.stop(username) for username in list(self._agents)],
                               consumeErrors=True)
        await DeferredList([shared.wait() for shared in list(self._stopping.values())],
                           consumeErrors=True)
        if self._network_ensuring is not None and not self._network_ensuring.done:
            try:
                await self._network_ensuring.wait()  # its calls end before the engine
            except Exception:
                pass
        # the rules and the network go unless agents run on
        try:
            await self._firewall.close(keep=kept)
        except FirewallError as error:
            self.log.warn("{error}", error=str(error))
        if not kept and self._network_ready:
            await self._remove_network()
        await self._engine.close()

    # -- extras for the manager (ctl stats) --

    def memory_usage(self) -> Deferred:
        """Fires with ``{username: bytes}``: the memory each running agent
        uses (the stats endpoint, ``stream=false``, less the inactive page
        cache, as ``docker stats`` shows it). Agents whose stats cannot be
        read are left out."""
        return ensureDeferred(self._memory_usage())

    async def _memory_usage(self) -> Dict[str, int]:
        agents = list(self._agents.items())
        results = await DeferredList(
            [self._engine.container_stats(entry.container_id) for _, entry in agents],
            consumeErrors=True)
        usage = {}
        for (username, _entry), (ok, stats) in zip(agents, results):
            if not ok:
                continue
            memory = stats.get("memory_stats") or {}
            inner = memory.get("stats") or {}
            cache = inner.get("total_inactive_file", inner.get("inactive_file", 0))
            used = memory.get("usage", 0)
            usage[username] = used - cache if 0 < cache < used else used
        return usage

    def engine_available(self) -> bool:
        return self._engine_up

    # -- starting --

    async def _start_after_stop(self, username: str, data_dir: str,
                                credentials: bytes) -> RunningAgent:
        if username in self._stopping:
            try:
                await self._stopping[username].wait()
            except Exception:
                pass
        return await self._start(username, data_dir, credentials)

    def _check_abort(self, username: str) -> None:
        if username in self._abort:
            raise AgentStartError("the agent of %s was stopped while it was starting" % username)
        if self._closing:
            raise AgentStartError("the manager is shutting down")

    async def _start(self, username: str, data_dir: str, credentials: bytes) -> RunningAgent:
        try:
            return await self._start_container(username, data_dir, credentials)
        except EngineUnavailable as error:
            self._engine_up = False
            raise ContainerEngineUnavailable("container engine unavailable: %s" % error.message)
        except PullFailed as error:
            raise AgentStartError(
                "the agent image %s is not on this machine and pulling it failed: %s"
                % (self.settings.image, error.message))
        except DockerEngineError as error:
            raise AgentStartError("Docker refused to run the agent of %s: %s"
                                  % (username, error.message))

    async def _start_container(self, username: str, data_dir: str,
                               credentials: bytes) -> RunningAgent:
        if self._closing:
            raise AgentStartError("the manager is shutting down")
        if self._guard is not None:
            try:
                await self._guard.ensure(self._engine)
            except LoopbackGuardFailed as error:
                raise AgentStartError(str(error))
        if self._firewall_problem is not None:
            raise AgentStartError("not starting agents: %s" % (self._firewall_problem,))
        await self._ensure_network()
        user = self.settings.user
        if self.accounts is not None:
            user = "%d:%d" % tuple(await self.accounts(username))
        self._prepare_data_dir(data_dir, user)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = await self._claim_port(username)
            try:
                return await self._start_on(username, data_dir, credentials, user, port)
            except _PortTaken as taken:
                self._release_port(username, port, quarantine=False)
                self.log.warn("host port {port} for the agent of {username} was taken"
                              " ({why}); trying another", port=port, username=username,
                              why=str(taken))
                if attempt == PORT_ATTEMPTS:
                    raise AgentStartError(
                        "the agent of %s could not be published: %d times its host port was"
                        " taken by another program first (%s)"
                        % (username, PORT_ATTEMPTS, taken))
            except BaseException:
                self._release_port(username, port)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _claim_port(self, username: str) -> int:
        """A host port for this start, closed by the firewall to all but root
        and the proxy before the container exists."""
        busy = {entry.agent.address.port for entry in self._agents.values()}
        try:
            port = self._ports.choose(username, busy)
        except NoFreePort as error:
            raise AgentStartError(str(error))
        try:
            await self._firewall.protect("127.0.0.1", port)
        except FirewallError as error:
            raise AgentStartError("not starting the agent of %s: its port could not be closed"
                                  " to other local users: %s" % (username, error))
        return port

    def _release_port(self, username: str, port: int, quarantine: bool = True) -> None:
        """No agent of ours is published on ``port`` any more."""
        if quarantine:
            self._ports.released(port, username)
        self._firewall.release("127.0.0.1", port).addErrback(
            lambda f: self.log.warn("{error}", error=f.getErrorMessage()))

    async def _start_on(self, username: str, data_dir: str, credentials: bytes, user: str,
                        port: int) -> RunningAgent:
        name = self.settings.container_name(username)
        config = self.settings.container_config(username, data_dir, user, port)
        config["HostConfig"]["NetworkMode"] = self._network_id or self.settings.network_name
        # optimistic: the image is usually there and the name usually free, so
        # create first and fix up only when the engine says otherwise
        pulled = removed = False
        while True:
            try:
                container_id = await self._engine.create_container(name, config)
                break
            except NoSuchImage:
                if pulled:
                    raise
                await self._ensure_image()
                pulled = True
            except Conflict:
                if removed:
                    raise
                removed = True
                # a stale container of that name (an agent that ended while no
                # manager watched, or whose engine went away): a fresh one
                await self._clear_name(name)
        watch = self._start_watch[container_id] = _StartWatch(username)
        try:
            try:
                self._check_abort(username)         # a stop or close came meanwhile
                try:
                    await self._engine.start_container(container_id)
                except DockerEngineError as error:
                    if _PORT_TAKEN.search(error.message or ""):
                        raise _PortTaken(error.message)
                    raise
                await self._engine.attach_stdin(container_id, credentials)
                self._check_abort(username)
                info = await self._engine.inspect_container(container_id)
                state = info.get("State") or {}
                if not state.get("Running") and watch.died is None:
                    watch.died = int(state.get("ExitCode") or 0)   # gone already
                published = _host_port(info, self.settings.container_port())
                if published != port and watch.died is None:
                    raise AgentStartError(
                        "Docker did not publish the agent of %s on 127.0.0.1:%d (%s)"
                        % (username, port, published))
                await self._wait_ready(container_id, username, port, watch)
                await self._check_listeners(port)
            except BaseException:
                await self._remove_quietly(container_id)
                raise
            state = info.get("State") or {}
            agent = RunningAgent(username=username, address=AgentAddress("127.0.0.1", port),
                                 pid=int(state.get("Pid") or 0),
                                 started=_started_at(state.get("StartedAt", "")) or time.time())
            self._agents[username] = _Agent(container_id, agent)
            self._by_id[container_id] = username
        finally:
            self._start_watch.pop(container_id, None)
        if watch.died is not None:
            # it died in the moment between its answer and our bookkeeping
            self._reactor.callLater(0, self._container_died, container_id, watch.died)
        return agent

    async def _remove_twin(self, network_id: str) -> None:
        """Remove a network that has the agents' network's name but is not
        the one we use (Docker refuses while containers use it: it stays)."""
        try:
            await self._engine.remove_network(network_id)
        except EngineUnavailable:
            raise
        except DockerEngineError as error:
            self.log.warn("a second Docker network named {name} ({id}) stays: {error}",
                          name=self.settings.network_name, id=network_id[:12],
                          error=error.message)

    async def _remove_network(self) -> None:
        """Remove the agents' network once no agent of ours uses it (another
        manager's containers on it make Docker refuse: then it stays)."""
        name = self.settings.network_name
        try:
            await self._engine.remove_network(name)
            self.log.info("removed the agents' Docker network {name}", name=name)
        except NoSuchNetwork:
            pass
        except DockerEngineError as error:
            self.log.info("the Docker network {name} stays: {error}", name=name,
                          error=error.message)
        self._network_ready = False
        self._network_id = None

    async def _check_listeners(self, port: int) -> None:
        """What answered on the published port must be Docker's: the port
        is bound by dockerd's port proxy (``docker-proxy``, root) from the
        container's start (a squatter who bound it first made the start
        fail: "address already in use"). Any listener of another uid is a
        squatter; its address is never handed out. (A remote engine's ports
        cannot be checked from here.)"""
        if not self._local:
            return
        strangers = [uid for uid in await deferToThread(listener_uids, port) if uid != 0]
        if strangers:
            raise _PortTaken("uid %s listens on it too" % ", ".join(map(str, strangers)))

    async def _ensure_network(self) -> None:
        """The agents' network exists (made if missing, inter-container
        traffic off) and its subnet is closed by the firewall; one at a time
        (two creations at once would make two networks of one name)."""
        if self._network_ready:
            return
        if self._network_ensuring is None or self._network_ensuring.done:
            # one at a time per engine and name in this process, too (a
            # restarted provider next to the old one, as in the tests)
            key = (self._engine.host, self.settings.network_name)
            lock = _NETWORK_LOCKS.setdefault(key, DeferredLock())
            self._network_ensuring = SharedResult(
                lock.run(lambda: ensureDeferred(self._make_network())))
        await self._network_ensuring.wait()

    async def _make_network(self) -> None:
        name = self.settings.network_name
        try:
            found = await self._engine.list_networks(name)
            if not found:
                try:
                    await self._engine.create_network(name, self.settings.network_config())
                    self.log.info("created the agents' Docker network {name}", name=name)
                except Conflict:
                    pass                        # another manager made it meanwhile
                found = await self._engine.list_networks(name)
            if not found:
                raise AgentStartError("the agents' Docker network %s vanished as it was made"
                                      % (name,))
            # Docker does not check names atomically: of twins made at the
            # same moment, every manager takes the oldest, and drops its own
            chosen = min(found, key=lambda n: (str(n.get("Created", "")), n["Id"]))
            for twin in found:
                if twin["Id"] != chosen["Id"]:
                    await self._remove_twin(twin["Id"])
            info = await self._engine.inspect_network(chosen["Id"])
        except EngineUnavailable:
            raise
        except DockerEngineError as error:
            raise AgentStartError("the agents' Docker network %s cannot be made: %s"
                                  % (name, error.message))
        if (info.get("Options") or {}).get(ICC_OPTION) != "false":
            self.log.warn("the Docker network {name} lets its containers talk to each other"
                          " ({option} is not false): give the agents a network of their own",
                          name=name, option=ICC_OPTION)
        for config in (info.get("IPAM") or {}).get("Config") or []:
            subnet, gateway = config.get("Subnet", ""), config.get("Gateway", "")
            if ":" in subnet or not subnet:
                continue                        # IPv6: agents are published on IPv4 only
            try:
                # Docker 20.10 leaves out the gateway it took: the first address
                await self._firewall.protect_network(subnet, gateway or _first_host(subnet))
            except FirewallError as error:
                raise AgentStartError("the agents' network %s cannot be closed to other local"
                                      " users: %s" % (subnet, error))
        self._network_id = chosen["Id"]
        self._network_ready = True

    async def _wait_ready(self, container_id: str, username: str, port: int,
                          watch: _StartWatch) -> None:
        timeout = self.settings.start_timeout
        began = self._reactor.seconds()
        deadline = began + timeout
        next_inspect = began + 1.0
        while True:
            if watch.died is None and self._reactor.seconds() >= next_inspect:
                # the event stream may be down: ask the engine directly now and then
                next_inspect = self._reactor.seconds() + 1.0
                state = (await self._engine.inspect_container(container_id)).get("State") or {}
                if not state.get("Running"):
                    watch.died = int(state.get("ExitCode") or 0)
            if watch.died is not None:
                reason = await self._death_reason(container_id, watch.died)
                tail = await self._log_tail(container_id)
                raise AgentStartError(
                    "the agent of %s %s before it answered HTTP; last lines of its log:\n%s"
                    % (username, reason, tail))
            self._check_abort(username)
            if await self._probe("127.0.0.1", port):
                return
            if self._reactor.seconds() >= deadline:
                tail = await self._log_tail(container_id)
                raise AgentStartError(
                    "the agent of %s did not answer HTTP on 127.0.0.1:%d within %g s;"
                    " last lines of its log:\n%s" % (username, port, timeout, tail))
            # a probe is one loopback connection: poll tightly while a start is
            # typical (every ms counts at login), then relax for slow agents
            waited = self._reactor.seconds() - began
            delay = 0.01 if waited < 3 else 0.1 if waited < 15 else 0.5
            await task.deferLater(self._reactor, delay, lambda: None)

    async def _ensure_image(self) -> None:
        image = self.settings.image
        try:
            await self._engine.inspect_image(image)
            return
        except NoSuchImage:
            pass
        if image not in self._pulls:
            self.log.info("agent image {image} is not here: pulling it", image=image)
            shared = SharedResult(ensureDeferred(self._pull(image)))
            if shared.done:
                await shared.wait()
                return
            self._pulls[image] = shared
            shared.wait().addBoth(lambda _: self._pulls.pop(image, None))
        await self._pulls[image].wait()

    async def _pull(self, image: str) -> None:
        seen: Dict[str, str] = {}

        def progress(message: dict) -> None:
            status = message.get("status", "")
            layer = message.get("id", "")
            if seen.get(layer) != status:        # status changes, not every byte
                seen[layer] = status
                self.log.info("pulling {image}: {layer}{status}", image=image,
                              layer=(layer + ": ") if layer else "", status=status)
        try:
            await self._engine.pull_image(image, progress)
        except PullFailed as error:
            self.log.error("pulling {image} failed: {message}", image=image,
                           message=error.message)
            raise
        self.log.info("pulled {image}", image=image)

    def _prepare_data_dir(self, data_dir: str, user: str) -> None:
        prepare_data_dir(data_dir, user)

    # -- stopping and dying --

    async def _stop(self, username: str) -> None:
        if username in self._starting:
            # a stop asked during a start ends that start (it cleans up after itself)
            self._abort.add(username)
            try:
                await self._starting[username].wait()
            except Exception:
                pass
            finally:
                self._abort.discard(username)
        entry = self._agents.pop(username, None)
        if entry is None:
            return
        self._by_id.pop(entry.container_id, None)
        try:
            await self._engine.stop_container(entry.container_id,
                                              math.ceil(self.settings.stop_grace))
        except NoSuchContainer:
            pass
        except EngineUnavailable as error:
            self.log.warn("could not stop the agent of {username}: {error}",
                          username=username, error=error.message)
        await self._remove_quietly(entry.container_id)
        self._release_port(username, entry.agent.address.port)
        self._notify(username, "stopped")

    def _on_event(self, event: dict) -> None:
        action = event.get("Action") or event.get("status") or ""
        container_id = event.get("id") or (event.get("Actor") or {}).get("ID")
        if not container_id:
            return
        if action == "oom":
            self._oom.add(container_id)
        elif action == "die":
            attributes = (event.get("Actor") or {}).get("Attributes") or {}
            try:
                exit_code = int(attributes.get("exitCode", "0"))
            except ValueError:
                exit_code = 0
            if container_id in self._start_watch:
                self._start_watch[container_id].died = exit_code
            elif container_id in self._by_id:
                self._container_died(container_id, exit_code)
        elif action == "destroy":
            self._oom.discard(container_id)

    def _container_died(self, container_id: str, exit_code: int) -> Deferred:
        username = self._by_id.pop(container_id, None)
        if username is None or username not in self._agents:
            return succeed(None)
        port = self._agents.pop(username).agent.address.port
        return ensureDeferred(self._report_death(username, container_id, exit_code, port))

    async def _report_death(self, username: str, container_id: str, exit_code: int,
                            port: int) -> None:
        reason = await self._death_reason(container_id, exit_code)
        tail = await self._log_tail(container_id)
        self.log.warn("agent of {username} {reason}; last lines of its log:\n{tail}",
                      username=username, reason=reason, tail=tail)
        await self._remove_quietly(container_id)
        self._release_port(username, port)
        self._notify(username, reason)

    async def _death_reason(self, container_id: str, exit_code: int) -> str:
        oom = container_id in self._oom
        try:
            state = (await self._engine.inspect_container(container_id)).get("State") or {}
            oom = oom or bool(state.get("OOMKilled"))
            exit_code = int(state.get("ExitCode", exit_code))
        except NoSuchContainer:
            if exit_code < 0:
                return "is gone (its container was removed)"
        except DockerEngineError:
            pass
        self._oom.discard(container_id)
        return exit_reason(exit_code, oom, self.settings.memory)

    async def _log_tail(self, container_id: str) -> str:
        try:
            lines = await self._engine.container_logs(container_id, self.settings.log_lines)
        except DockerEngineError as error:
            return "    (log not available: %s)" % error.message
        return log_tail_lines(lines, self.settings.log_lines)

    async def _remove_quietly(self, container: str) -> None:
        try:
            await self._engine.remove_container(container)
        except NoSuchContainer:
            pass
        except DockerEngineError as error:
            self.log.warn("could not remove container {container}: {error}",
                          container=container, error=error.message)

    async def _clear_name(self, name: str) -> None:
        """Free ``name`` of a stale container: remove it, or, if the engine
        cannot, rename it aside so that the user's agent can start again.

        dockerd 20.10 that stops while a container starts can leave that
        container's root file system mounted, and then fails every removal
        ("device or resource busy") until the operator unmounts it; without
        this, its user could not get an agent until then (found by
        ``bench/soak``'s dockerd restarts). The renamed container keeps our
        labels, so later reconciliations try to remove it again.
        """
        try:
            await self._engine.remove_container(name)
            return
        except NoSuchContainer:
            return
        except DockerEngineError as error:
            reason = error.message
        aside = "%s-defunct-%s" % (name, os.urandom(4).hex())
        try:
            await self._engine.rename_container(name, aside)
        except NoSuchContainer:
            return
        except DockerEngineError as error:
            self.log.warn("could not remove container {container} ({reason}) nor rename it"
                          " aside: {error}", container=name, reason=reason, error=error.message)
            return
        self.log.warn("could not remove container {container} ({reason}); renamed it {aside}"
                      " so that a new one can start: remove it once Docker can",
                      container=name, reason=reason, aside=aside)

    def _notify(self, username: str, reason: str) -> None:
        notify_exit(self._callbacks, username, reason)

    # -- following the engine --

    def _watcher_ended(self, failure: Failure) -> None:
        if not failure.check(CancelledError) or not self._closing:
            self.log.failure("engine watcher crashed", failure)
        if not self._first_reconcile.called:
            self._first_reconcile.callback([])

    async def _watch(self) -> None:
        try:
            await self._firewall.start()
        except FirewallError as error:
            # fail closed: no agent starts unprotected
            self._firewall_problem = str(error)
            self.log.error("{error}", error=self._firewall_problem)
        delay = 0.5
        while not self._closing:
            try:
                await self._engine.version()
                if self._guard is not None:
                    try:
                        await self._guard.ensure(self._engine)
                    except LoopbackGuardFailed as error:
                        self.log.error("{error}", error=str(error))
                self._stream = stream = await self._engine.follow_events(
                    self._on_event, ["%s=%s" % (LABEL, self.settings.instance)])
                if not self._engine_up and self._engine_problem != "not contacted yet":
                    self.log.info("container engine at {host} is available again",
                                  host=self._engine.host)
                self._engine_up = True
                try:
                    await self._ensure_network()
                except AgentStartError as error:
                    self.log.error("{error}", error=str(error))
                adopted = await self._reconcile()
                if not self._first_reconcile.called:
                    await self._retain_only_agents()
                    self._first_reconcile.callback(adopted)
                delay = 0.5
                await stream.done
                if self._closing:
                    return
                # the stream ended: is the engine still there?
                await self._engine.ping()
            except DockerEngineError as error:
                if self._closing:
                    break
                self._engine_lost(error.message)
            if not self._first_reconcile.called:
                self._first_reconcile.callback([])
            if self._closing:
                break
            await task.deferLater(self._reactor, delay, lambda: None)
            delay = min(delay * 2, 5.0)
        if not self._first_reconcile.called:
            self._first_reconcile.callback([])

    async def _retain_only_agents(self) -> None:
        """After the first reconcile the firewall holds exactly the ports of
        the agents (a previous manager may have left entries of agents that
        ended while no manager watched)."""
        if self._firewall_problem is not None:
            return
        try:
            await self._firewall.retain_only(
                [("127.0.0.1", entry.agent.address.port) for entry in self._agents.values()])
        except FirewallError as error:
            self.log.warn("{error}", error=str(error))

    def _engine_lost(self, problem: str) -> None:
        self._stream = None
        if self._engine_up or problem != self._engine_problem:
            self.log.error("container engine unavailable: {problem}", problem=problem)
        self._engine_problem = problem
        self._engine_up = False
        lost = list(self._agents.items())
        self._agents.clear()
        self._by_id.clear()
        for username, _entry in lost:
            self._notify(username, "container engine unavailable")

    async def _reconcile(self) -> List[RunningAgent]:
        """Adopt our running containers, remove the others; fire with the adopted."""
        containers = await self._engine.list_containers(
            ["%s=%s" % (LABEL, self.settings.instance)])
        running_ids = set()
        candidates = []
        for container in containers:
            container_id = container["Id"]
            username = (container.get("Labels") or {}).get(USER_LABEL, "")
            if container_id in self._start_watch or username in self._starting:
                continue                        # a start in flight owns it
            if (container.get("State") == "created"
                    and time.time() - float(container.get("Created") or 0) < FRESH_CONTAINER):
                continue                        # maybe another provider's start in flight
            if container.get("State") == "running":
                running_ids.add(container_id)
                if self._by_id.get(container_id) == username:
                    continue                    # known and fine
                if is_valid_username(username) and username not in self._agents:
                    candidates.append((username, container_id))
                    continue
            self.log.info("removing container {name} ({state})",
                          name=(container.get("Names") or [container_id])[0],
                          state=container.get("State"))
            await self._remove_quietly(container_id)
        for container_id, username in list(self._by_id.items()):
            if container_id not in running_ids:
                await self._container_died(container_id, -1)
        results = await DeferredList([ensureDeferred(self._adopt(u, c)) for u, c in candidates])
        return [agent for ok, agent in results if ok and agent is not None]

    async def _adopt(self, username: str, container_id: str) -> Optional[RunningAgent]:
        try:
            info = await self._engine.inspect_container(container_id)
        except DockerEngineError:
            return None
        port = _host_port(info, self.settings.container_port())
        state = info.get("State") or {}
        if port is None or not state.get("Running") or not await self._probe("127.0.0.1", port):
            self.log.info("removing the container of {username}: it does not answer HTTP",
                          username=username)
            await self._remove_quietly(container_id)
            return None
        if username in self._agents:            # a start finished meanwhile
            return None
        agent = RunningAgent(username=username, address=AgentAddress("127.0.0.1", port),
                             pid=int(state.get("Pid") or 0),
                             started=_started_at(state.get("StartedAt", "")) or time.time())
        self._agents[username] = _Agent(container_id, agent)
        self._by_id[container_id] = username
        try:
            await self._firewall.protect("127.0.0.1", port)
        except FirewallError as error:
            self.log.warn("{error}", error=str(error))
        self.log.info("adopted the running agent of {username} at 127.0.0.1:{port}",
                      username=username, port=port)
        return agent
