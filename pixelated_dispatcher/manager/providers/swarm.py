"""The swarm provider: one replicated service per user's agent on a Docker Swarm.

Each running agent is the service ``<instance>-<username>`` (replicas 1) with
the docker provider's labels (:data:`.docker.LABEL`, :data:`.docker.USER_LABEL`)
and hardening (same ``--agent-*`` options: memory, pids, non-root uid, every
capability dropped), plus a CPU limit, a read-only root file system with the
user's data directory bound at the data mount and a tmpfs on ``/tmp``, and a
restart policy ``on-failure`` with a small limit (it matters only while no
manager watches: a running manager removes a service whose task ended).

Services cannot be attached on stdin, so the credentials line travels as a
Swarm secret made for this one start (mode 0400, owned by the agent's uid,
mounted on a tmpfs inside the container) whose path is in
``$PIXELATED_CREDENTIALS_FILE``; the image's entrypoint feeds it to the
agent's stdin. The secret is removed with the service.

The node is chosen once per user (:mod:`.swarm_placement`) and pinned with a
``node.id==`` constraint. The task publishes the agent port in host mode with
PublishedPort 0: the node picks the port, read back from the task's
``PortStatus``; the agent's address is the node's address and that port.
Ready = the task runs and the agent answers HTTP there. Only the proxy host
may reach that port (a ``DOCKER-USER`` rule on each node): before the first
agent on a node is handed out, and every ``firewall_recheck`` seconds while
agents run there, a one-shot task on another node checks that it cannot
(:mod:`.swarm_firewall`).

Swarm has no task events: the provider polls nodes and tasks every
``poll_interval`` seconds. A task that is no longer running, a node that is
down or drained (a dead node's tasks still *say* "running"), a service that
vanished: the agent is reported ended and its service and secret removed. At
manager start, labelled services whose task runs and answers are adopted; the
others are removed with their secrets. On Engine API < 1.44 (no per-service
no-new-privileges) each node's dockerd must run with ``--no-new-privileges``:
the provider checks it once per node with a one-shot task before the node's
first agent, and refuses to start agents there if it is off.
"""
import os
import secrets
import time
from typing import Any, Callable, Dict, List, Optional, Set

import attr
from twisted.internet import task
from twisted.internet.defer import (CancelledError, Deferred, DeferredList, ensureDeferred,
                                    succeed)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ...fanout import SharedResult
from ...protocol import AgentAddress
from ...usernames import is_valid_username
from .docker import (FRESH_CONTAINER, LABEL, USER_LABEL, ContainerEngineUnavailable,
                     DockerAgentSettings, _started_at, exit_reason, http_answers,
                     prepare_data_dir)
from .docker_engine import (Conflict, DockerEngineError, EngineUnavailable, ISwarmEngine,
                            NoSuchImage, NoSuchSecret, NoSuchService, NotSwarmManager,
                            parse_version)
from .interface import (AgentStartError, ExitCallback, IAgentProvider, IRunsOnNodes,
                        RunningAgent, notify_exit)
from .swarm_firewall import (NO_ANSWER, NO_NC, REACHED, REFUSED, FirewallCheckError,
                             FirewallVerdicts, could_not_check, is_local_address, probe_command,
                             probers, unsafe_reason)
from .swarm_placement import (NodeView, PlacementBook, PlacementError, choose_node,
                              recorded_node)

#: where the credentials secret appears in the container, and the variable naming it
CREDENTIALS_FILE = "/run/secrets/pixelated-credentials"
CREDENTIALS_VARIABLE = "PIXELATED_CREDENTIALS_FILE"
#: the first Engine API whose ContainerSpec has Privileges.NoNewPrivileges
NNP_API = (1, 44)
#: nodes a firewall probe is tried on when the swarm rejects it (e.g. no image there)
PROBERS_TRIED = 3

_FINAL_STATES = frozenset({"complete", "failed", "shutdown", "rejected", "orphaned", "remove"})


@attr.s(frozen=True, auto_attribs=True)
class SwarmSettings:
    """What the swarm provider adds to :class:`DockerAgentSettings`."""
    #: nodes that may run agents carry this label
    node_label: "tuple[str, str]" = ("pixelated.agents", "true")
    #: CPU limit of each agent (cores)
    cpus: float = 1.0
    #: seconds between polls of nodes and tasks
    poll_interval: float = 2.0
    #: restarts by the swarm itself (only while no manager watches)
    restart_attempts: int = 2
    restart_delay: float = 5.0
    tmpfs_size: int = 64 * 1024 * 1024
    #: probe each agent node's firewall from another node (:mod:`.swarm_firewall`)
    firewall_check: bool = True
    #: seconds a node's firewall verdict is kept (then: rechecked while agents run
    #: there, else at the next start there)
    firewall_recheck: float = 300.0

    def service_spec(self, agent: DockerAgentSettings, username: str, data_dir: str,
                     user: str, image_id: str, node_id: str, secret_id: str,
                     secret_name: str, no_new_privileges: bool) -> dict:
        """The body of ``POST /services/create`` for ``username``'s agent."""
        uid, gid = user.split(":")
        environment = dict(agent.environment, **{CREDENTIALS_VARIABLE: CREDENTIALS_FILE})
        labels = {LABEL: agent.instance, USER_LABEL: username}
        container: dict = {
            "Image": image_id,
            "Labels": dict(labels),
            "User": user,
            "Env": ["%s=%s" % item for item in sorted(environment.items())],
            "ReadOnly": True,
            "CapabilityDrop": ["ALL"],
            "Mounts": [
                {"Type": "bind", "Source": data_dir, "Target": agent.data_mount,
                 "ReadOnly": False},
                {"Type": "tmpfs", "Target": "/tmp",
                 "TmpfsOptions": {"SizeBytes": self.tmpfs_size, "Mode": 0o1777}}],
            "Secrets": [{"File": {"Name": os.path.basename(CREDENTIALS_FILE),
                                  "UID": uid, "GID": gid, "Mode": 0o400},
                         "SecretID": secret_id, "SecretName": secret_name}],
            "StopGracePeriod": int(agent.stop_grace * 1e9),
        }
        if no_new_privileges:
            container["Privileges"] = {"NoNewPrivileges": True}
        command = agent.command_for(username)
        if command is not None:
            container["Command"] = command
        return {
            "Name": agent.container_name(username),
            "Labels": labels,
            "TaskTemplate": {
                "ContainerSpec": container,
                "Resources": {"Limits": {"MemoryBytes": agent.memory,
                                         "NanoCPUs": int(self.cpus * 1e9),
                                         "Pids": agent.pids}},
                "RestartPolicy": {"Condition": "on-failure",
                                  "MaxAttempts": self.restart_attempts,
                                  "Delay": int(self.restart_delay * 1e9)},
                "Placement": {"Constraints": ["node.id==%s" % node_id]},
            },
            "Mode": {"Replicated": {"Replicas": 1}},
            "EndpointSpec": {"Mode": "dnsrr",
                             "Ports": [{"Protocol": "tcp", "TargetPort": agent.port,
                                        "PublishedPort": 0, "PublishMode": "host"}]},
        }


@attr.s(auto_attribs=True)
class _Agent:
    service_id: str
    secret_id: Optional[str]
    task_id: str
    node: NodeView
    agent: RunningAgent


def _task_port(task_json: dict, target: int) -> Optional[int]:
    for port in ((task_json.get("Status") or {}).get("PortStatus") or {}).get("Ports") or []:
        if port.get("TargetPort") == target and port.get("PublishedPort"):
            return int(port["PublishedPort"])
    return None


def _task_state(task_json: dict) -> str:
    return (task_json.get("Status") or {}).get("State", "")


def _task_exit(task_json: dict) -> str:
    status = task_json.get("Status") or {}
    code = int((status.get("ContainerStatus") or {}).get("ExitCode") or 0)
    err = status.get("Err") or ""
    if status.get("State") in ("failed", "complete") and code:
        return exit_reason(code, False, 0)
    if status.get("State") == "complete":
        return "exited with code 0"
    return "ended (%s%s)" % (status.get("State", "?"), ": " + err if err else "")


#: task states on the way to "running"
STARTING_TASK_STATES = frozenset(("new", "pending", "assigned", "accepted", "preparing",
                                  "ready", "starting"))


def _current_task(tasks: List[dict]) -> Optional[dict]:
    """The task the swarm wants running (the newest), else the newest."""
    wanted = [t for t in tasks if t.get("DesiredState") == "running"]
    pool = wanted or tasks
    return max(pool, key=lambda t: t.get("CreatedAt", "")) if pool else None


@implementer(IAgentProvider, IRunsOnNodes)
class SwarmProvider:
    """Agents as swarm services, one per user (see the module docstring)."""

    name = "swarm"
    log = Logger()

    def __init__(self, reactor: Any, engine: ISwarmEngine,
                 settings: DockerAgentSettings = DockerAgentSettings(),
                 swarm: SwarmSettings = SwarmSettings(),
                 placements: Optional[PlacementBook] = None,
                 probe: Optional[Callable[[str, int], Deferred]] = None,
                 keep_on_close: bool = True,
                 is_local: Callable[[str], bool] = is_local_address) -> None:
        self._reactor = reactor
        self._engine = engine
        self.settings = settings
        self.swarm = swarm
        self.keep_on_close = keep_on_close
        self.placements = placements if placements is not None else PlacementBook(None)
        self._probe = probe or (lambda host, port: http_answers(reactor, host, port))
        #: ``accounts(username) -> Deferred[(uid, gid)]``, set by the manager
        self.accounts: Optional[Callable[[str], Deferred]] = None
        self._agents: Dict[str, _Agent] = {}
        self._starting: Dict[str, SharedResult] = {}
        self._stopping: Dict[str, SharedResult] = {}
        self._abort: Set[str] = set()
        self._callbacks: List[ExitCallback] = []
        self._secrets_to_remove: Set[str] = set()
        self._nnp_checked: Dict[str, bool] = {}
        #: per node: did a probe from another node reach an agent there?
        self.firewall = FirewallVerdicts(swarm.firewall_recheck)
        #: whether an address is this (the proxy) host's: never a prober
        self._is_local = is_local
        #: the background round of firewall checks of nodes running agents
        self._node_checks: Optional[Deferred] = None
        #: node id -> when to try again a check of its running agents that failed
        self._unchecked_until: Dict[str, float] = {}
        #: names of the one-shot check services running now (not stale)
        self._checks: Set[str] = set()
        self._nodes: Dict[str, NodeView] = {}
        self._loop: Optional[Deferred] = None
        self._first: Optional[SharedResult] = None
        #: fires with the agents adopted at the first reconcile
        self._first_fired: Deferred = Deferred()
        self._engine_up = False
        self._engine_problem = ""
        self._closing = False
        self._wake: Optional[Deferred] = None

    # -- IAgentProvider --

    def recover(self) -> Deferred:
        """Start polling; fire with the agents adopted at the first reconcile."""
        if self._first is None:
            self._first = SharedResult(self._first_fired)
            self._loop = ensureDeferred(self._poll_loop())
            self._loop.addErrback(self._loop_ended)
        return self._first.wait()

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
        return ensureDeferred(self._close())

    async def _close(self) -> None:
        self._closing = True
        if self._loop is not None and not self._loop.called:
            self._loop.cancel()
        if self._node_checks is not None:
            self._node_checks.cancel()
            await DeferredList([self._node_checks], consumeErrors=True)
        await DeferredList([s.wait() for s in list(self._starting.values())],
                           consumeErrors=True)
        if self.keep_on_close:
            self._agents.clear()
        else:
            await DeferredList([self.stop(u) for u in list(self._agents)], consumeErrors=True)
        await DeferredList([s.wait() for s in list(self._stopping.values())],
                           consumeErrors=True)
        await self._engine.close()

    # -- extras for the manager --

    def node_of(self, username: str) -> Optional[str]:
        """The host name of the node ``username``'s agent runs on (None if none)."""
        entry = self._agents.get(username)
        return entry.node.hostname or entry.node.id if entry is not None else None

    def agents_per_node(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for entry in self._agents.values():
            name = entry.node.hostname or entry.node.id
            counts[name] = counts.get(name, 0) + 1
        return counts

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
        try:
            return await self._start(username, data_dir, credentials)
        except EngineUnavailable as error:
            self._engine_up = False
            raise ContainerEngineUnavailable("container engine unavailable: %s" % error.message)
        except NotSwarmManager as error:
            raise AgentStartError("the Docker engine at %s is not a swarm manager: %s"
                                  % (self._engine.host, error.message))
        except (PlacementError, FirewallCheckError) as error:
            raise AgentStartError(str(error))
        except DockerEngineError as error:
            raise AgentStartError("the swarm refused to run the agent of %s: %s"
                                  % (username, error.message))

    def _check_abort(self, username: str) -> None:
        if username in self._abort:
            raise AgentStartError("the agent of %s was stopped while it was starting" % username)
        if self._closing:
            raise AgentStartError("the manager is shutting down")

    async def _image_id(self) -> str:
        image = self.settings.image
        if image.startswith("sha256:"):
            return image
        try:
            return (await self._engine.inspect_image(image))["Id"]
        except NoSuchImage:
            raise AgentStartError(
                "the agent image %s is not on the swarm manager: load it on the manager and"
                " on every agent node (docker save | docker load, docs/cluster.rst)" % image)

    async def _node_for(self, username: str) -> NodeView:
        nodes = [NodeView.from_json(n) for n in await self._engine.list_nodes()]
        self._nodes = {n.id: n for n in nodes}
        refused = self.firewall.unsafe(self._reactor.seconds())
        recorded = self.placements.get(username)
        if recorded is not None:
            node = recorded_node(nodes, recorded, username)
            if node.id in refused:
                raise PlacementError("the agent of %s is not started: %s"
                                     % (username, refused[node.id]))
            return node
        running: Dict[str, int] = {}
        for entry in self._agents.values():
            running[entry.node.id] = running.get(entry.node.id, 0) + 1
        node = choose_node(nodes, running, self.swarm.node_label, refused)
        self.placements.record(username, node.id)
        self.log.info("the agent of {username} is placed on node {node}",
                      username=username, node=node.describe())
        return node

    def _no_new_privileges_in_spec(self) -> bool:
        version = self._engine.api_version
        return version is not None and parse_version(str(version)) >= NNP_API

    async def _start(self, username: str, data_dir: str, credentials: bytes) -> RunningAgent:
        self._check_abort(username)
        if self._engine.api_version is None:
            await self._engine.version()
        user = self.settings.user
        if self.accounts is not None:
            user = "%d:%d" % tuple(await self.accounts(username))
        prepare_data_dir(data_dir, user)  # this host's copy; other nodes: docs/cluster.rst
        image_id = await self._image_id()
        fresh = self.placements.get(username) is None
        node = await self._node_for(username)
        in_spec = self._no_new_privileges_in_spec()
        if not in_spec:
            await self._check_node_no_new_privileges(node, image_id)
        self._check_abort(username)
        name = self.settings.container_name(username)
        secret_name = "%s-%s" % (name, secrets.token_hex(6))
        secret_id = await self._engine.create_secret(
            secret_name, credentials, {LABEL: self.settings.instance, USER_LABEL: username})
        service_id = None
        try:
            spec = self.swarm.service_spec(self.settings, username, data_dir, user, image_id,
                                           node.id, secret_id, secret_name, in_spec)
            try:
                service_id = await self._engine.create_service(spec)
            except Conflict:
                # a stale service of that name (ended while no manager watched)
                await self._remove_service(name)
                service_id = await self._engine.create_service(spec)
            task_json = await self._wait_ready(service_id, username, node)
            port = _task_port(task_json, self.settings.port)
            assert port is not None             # _wait_ready returns a task with one
            if self.swarm.firewall_check and self.firewall.needs_check(
                    node.id, self._reactor.seconds()):
                try:
                    await self._check_node_firewall(node, image_id, port, username)
                except AgentStartError:
                    if fresh and node.id in self.firewall.unsafe(self._reactor.seconds()):
                        self.placements.forget(username)    # place anew next time
                    raise
        except BaseException:
            if service_id is not None:
                await self._remove_service(service_id)
            await self._remove_secret(secret_id)
            raise
        agent = RunningAgent(username=username, address=AgentAddress(node.address, port),
                             pid=0, started=_started_at(task_json.get("CreatedAt", ""))
                             or time.time())
        self._agents[username] = _Agent(service_id, secret_id, task_json["ID"], node, agent)
        return agent

    async def _wait_ready(self, service_id: str, username: str, node: NodeView) -> dict:
        timeout = self.settings.start_timeout
        began = self._reactor.seconds()
        while True:
            self._check_abort(username)
            tasks = await self._engine.list_tasks([service_id])
            current = _current_task(tasks)
            failed = [t for t in tasks if _task_state(t) in _FINAL_STATES]
            if failed:
                raise AgentStartError("the agent of %s %s on node %s before it answered HTTP"
                                      % (username, _task_exit(failed[0]), node.describe()))
            if current is not None and _task_state(current) == "running":
                port = _task_port(current, self.settings.port)
                if port is None:
                    raise AgentStartError("the swarm published no host port for the agent"
                                          " of %s" % username)
                if await self._probe(node.address, port):
                    return current
            waited = self._reactor.seconds() - began
            if waited >= timeout:
                state = _task_state(current) if current else "no task"
                err = ((current or {}).get("Status") or {}).get("Err")
                raise AgentStartError(
                    "the agent of %s did not answer HTTP on node %s within %g s (task %s%s)"
                    % (username, node.describe(), timeout, state, ": " + err if err else ""))
            await self._sleep(0.05 if waited < 3 else 0.2 if waited < 15 else 0.5)

    def _sleep(self, seconds: float) -> Deferred:
        return task.deferLater(self._reactor, seconds, lambda: None)

    async def _run_check(self, node: NodeView, image_id: str, command: List[str],
                         what: str) -> dict:
        """Run ``command`` once as a task on ``node`` (the agents' user, no
        capabilities, read-only root, default bridge network); the ``Status``
        of its ended task. ``what`` names the check in errors."""
        name = "%s-check-%s" % (self.settings.instance, secrets.token_hex(4))
        container: dict = {
            "Image": image_id, "User": self.settings.user, "ReadOnly": True,
            "CapabilityDrop": ["ALL"], "Labels": {LABEL: self.settings.instance},
            "Command": command}
        if self._no_new_privileges_in_spec():
            container["Privileges"] = {"NoNewPrivileges": True}
        spec = {
            "Name": name, "Labels": {LABEL: self.settings.instance},
            "TaskTemplate": {
                "ContainerSpec": container,
                "RestartPolicy": {"Condition": "none"},
                "Placement": {"Constraints": ["node.id==%s" % node.id]}},
            "Mode": {"Replicated": {"Replicas": 1}}}
        self._checks.add(name)
        try:
            service_id = await self._engine.create_service(spec)
        except BaseException:
            self._checks.discard(name)
            raise
        try:
            deadline = self._reactor.seconds() + self.settings.start_timeout
            while True:
                tasks = await self._engine.list_tasks([service_id])
                done = [t for t in tasks if _task_state(t) in _FINAL_STATES]
                if done:
                    break
                if self._reactor.seconds() >= deadline:
                    raise AgentStartError("could not check %s on node %s: the check did not"
                                          " finish" % (what, node.describe()))
                await self._sleep(0.1)
        finally:
            await self._remove_service(service_id)
            self._checks.discard(name)
        return done[0].get("Status") or {}

    async def _check_node_no_new_privileges(self, node: NodeView, image_id: str) -> None:
        """On Engine API < 1.44 the node's dockerd must set no-new-privileges
        itself: a one-shot task on the node reads its own NoNewPrivs flag."""
        if self._nnp_checked.get(node.id):
            return
        status = await self._run_check(
            node, image_id, ["sh", "-c", "grep -q '^NoNewPrivs:[[:space:]]*1' /proc/self/status"],
            "no-new-privileges")
        if status.get("State") == "complete":
            self._nnp_checked[node.id] = True
            return
        code = (status.get("ContainerStatus") or {}).get("ExitCode")
        if status.get("State") == "failed" and code == 1:
            raise AgentStartError(
                "the dockerd of node %s does not run with --no-new-privileges: on Engine API"
                " %s (< 1.44) a service cannot ask for it, so agents are not started there"
                " (docs/cluster.rst)" % (node.describe(), self._engine.api_version))
        raise AgentStartError("could not check no-new-privileges on node %s: %s"
                              % (node.describe(), status.get("Err") or status.get("State")))

    async def _check_node_firewall(self, node: NodeView, image_id: str, port: int,
                                   username: str) -> None:
        """Only the proxy host may reach agent ports: a one-shot task on another
        node connects to this agent (:mod:`.swarm_firewall`). If it gets through,
        the node is refused agents (this one, and the others running there, are
        stopped) until a recheck; if the check cannot be made, the start fails."""
        candidates = probers(self._nodes.values(), node, self.swarm.node_label, self._is_local)
        if not candidates:
            raise could_not_check(node, "no other ready node that is not the proxy host to"
                                        " connect from")
        for prober in candidates[:PROBERS_TRIED]:
            status = await self._run_check(prober, image_id, probe_command(node.address, port),
                                           "the firewall")
            state = status.get("State")
            if state != "rejected":
                break                           # rejected: e.g. no image there; next node
        code = (status.get("ContainerStatus") or {}).get("ExitCode")
        now = self._reactor.seconds()
        if state == "failed" and code in (REFUSED, NO_ANSWER):
            self.firewall.record(node.id, True, "", now)
            self.log.info("node {node}: a probe from node {prober} did not reach the agent"
                          " of {username} ({how})", node=node.describe(),
                          prober=prober.describe(), username=username,
                          how="refused" if code == REFUSED else "no answer")
            return
        if state == "failed" and code == REACHED:
            reason = unsafe_reason(node, prober, node.address, port)
            self.firewall.record(node.id, False, reason, now)
            self.log.error("{reason}", reason=reason)
            for other, entry in list(self._agents.items()):
                if entry.node.id == node.id and other not in self._stopping:
                    await self._ended(other, "was stopped: " + reason)
            raise AgentStartError("the agent of %s is not started: %s" % (username, reason))
        if state == "failed" and code == NO_NC:
            why = "the agent image has no nc (the check needs sh and nc)"
        else:
            why = "the probe on node %s ended %s" % (
                prober.describe(), status.get("Err") or state or "without a state")
        raise could_not_check(node, why)

    def _check_running_nodes(self) -> None:
        """In the background, one round at a time: the firewall of each node
        that runs agents and is due a check -- a new manager has no verdicts
        (its adopted agents), and a node may lose its rule while agents run
        (so every ``firewall_recheck`` seconds). A node found unsafe has its
        agents stopped; one that cannot be checked is logged as an error and
        tried again after ``firewall_recheck`` seconds."""
        if not self.swarm.firewall_check or self._closing or self._node_checks is not None:
            return
        now = self._reactor.seconds()
        due: Dict[str, str] = {}
        for username, entry in self._agents.items():
            node_id = entry.node.id
            if (username not in self._stopping and self.firewall.needs_check(node_id, now)
                    and self._unchecked_until.get(node_id, 0) <= now):
                due.setdefault(node_id, username)
        if not due:
            return
        checks = ensureDeferred(self._check_nodes_of(list(due.values())))
        if not checks.called:
            self._node_checks = checks
            checks.addBoth(lambda _: setattr(self, "_node_checks", None))

    async def _check_nodes_of(self, usernames: List[str]) -> None:
        try:
            try:
                image_id = await self._image_id()
            except (AgentStartError, DockerEngineError) as error:
                self.log.error("cannot check the firewall of the agents' nodes: {error}",
                               error=getattr(error, "message", None) or error)
                later = self._reactor.seconds() + self.swarm.firewall_recheck
                for username in usernames:
                    entry = self._agents.get(username)
                    if entry is not None:
                        self._unchecked_until[entry.node.id] = later
                return
            for username in usernames:
                entry = self._agents.get(username)
                now = self._reactor.seconds()
                if entry is None or not self.firewall.needs_check(entry.node.id, now):
                    continue
                try:
                    await self._check_node_firewall(entry.node, image_id,
                                                    entry.agent.address.port, username)
                except (AgentStartError, FirewallCheckError, DockerEngineError) as error:
                    if entry.node.id in self.firewall.unsafe(self._reactor.seconds()):
                        continue                # logged, its agents stopped
                    self._unchecked_until[entry.node.id] = (self._reactor.seconds()
                                                            + self.swarm.firewall_recheck)
                    self.log.error("agents on node {node} run unchecked: {error}",
                                   node=entry.node.describe(),
                                   error=getattr(error, "message", None) or error)
        except CancelledError:
            pass
        except Exception:
            self.log.failure("checking the firewall of the agents' nodes failed")

    # -- stopping and ending --

    async def _stop(self, username: str) -> None:
        if username in self._starting:
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
        await self._remove_service(entry.service_id)
        if entry.secret_id is not None:
            await self._remove_secret(entry.secret_id)
        self._notify(username, "stopped")

    async def _ended(self, username: str, reason: str) -> None:
        entry = self._agents.pop(username, None)
        if entry is None:
            return
        self.log.warn("agent of {username} on node {node} {reason}", username=username,
                      node=entry.node.describe(), reason=reason)
        await self._remove_service(entry.service_id)
        if entry.secret_id is not None:
            await self._remove_secret(entry.secret_id)
        self._notify(username, reason)

    async def _remove_service(self, service: str) -> None:
        try:
            await self._engine.remove_service(service)
        except NoSuchService:
            pass
        except DockerEngineError as error:
            self.log.warn("could not remove service {service}: {error}", service=service,
                          error=error.message)

    async def _remove_secret(self, secret_id: str) -> None:
        """Remove it now, or (still in use for a moment) at the next poll."""
        try:
            await self._engine.remove_secret(secret_id)
            self._secrets_to_remove.discard(secret_id)
        except NoSuchSecret:
            self._secrets_to_remove.discard(secret_id)
        except DockerEngineError:
            self._secrets_to_remove.add(secret_id)

    def _notify(self, username: str, reason: str) -> None:
        notify_exit(self._callbacks, username, reason)

    # -- polling the swarm --

    def _loop_ended(self, failure: Failure) -> None:
        if not failure.check(CancelledError) or not self._closing:
            self.log.failure("swarm poller crashed", failure)
        if not self._first_fired.called:
            self._first_fired.callback([])

    async def _poll_loop(self) -> None:
        reconciled = False
        while not self._closing:
            try:
                if not reconciled:
                    adopted = await self._reconcile()
                    reconciled = True
                    if not self._engine_up:
                        self.log.info("swarm manager at {host} is available",
                                      host=self._engine.host)
                    self._engine_up = True
                    if not self._first_fired.called:
                        self._first_fired.callback(adopted)
                    self._check_running_nodes()
                else:
                    await self._poll()
            except (EngineUnavailable, NotSwarmManager) as error:
                if self._closing:
                    break
                if self._engine_up or error.message != self._engine_problem:
                    self.log.error("swarm manager unavailable: {problem}",
                                   problem=error.message)
                self._engine_problem = error.message
                self._engine_up = False
                reconciled = False
                for username in list(self._agents):
                    self._agents.pop(username, None)
                    self._notify(username, "container engine unavailable")
                if not self._first_fired.called:
                    self._first_fired.callback([])
            except DockerEngineError as error:
                self.log.warn("polling the swarm failed: {error}", error=error.message)
            except Exception:
                if self._closing:
                    break
                # an answer we did not expect must not end the watching for good
                self.log.failure("polling the swarm failed")
            if not self._first_fired.called and not reconciled:
                self._first_fired.callback([])      # recover() does not wait for the swarm
            if self._closing:
                break
            await self._sleep(self.swarm.poll_interval)

    async def _poll(self) -> None:
        """One look at nodes and tasks: report the agents that ended."""
        nodes = {n["ID"]: NodeView.from_json(n) for n in await self._engine.list_nodes()}
        self._nodes = nodes
        for node_id in list(self._nnp_checked):
            if node_id not in nodes or nodes[node_id].state != "ready":
                del self._nnp_checked[node_id]      # its dockerd may come back otherwise
        self.firewall.forget_safe([node_id for node_id, node in nodes.items()
                                   if node.state == "ready"])
        for secret_id in list(self._secrets_to_remove):
            await self._remove_secret(secret_id)
        if not self._agents:
            return
        wanted = {t["ID"]: t for t in await self._engine.list_running_tasks()}
        for username, entry in list(self._agents.items()):
            if username in self._stopping or self._agents.get(username) is not entry:
                continue
            reason = await self._check_agent(entry, nodes, wanted)
            if reason is not None and self._agents.get(username) is entry:
                await self._ended(username, reason)
        self._check_running_nodes()

    async def _check_agent(self, entry: _Agent, nodes: Dict[str, NodeView],
                           wanted: Dict[str, dict]) -> Optional[str]:
        """Why the agent ended, or None while it runs. ``wanted``: every task
        the swarm wants running; only an agent whose task is not among them,
        or no longer runs, costs a call of its own (for the reason)."""
        node = nodes.get(entry.node.id)
        if node is None:
            return "is gone (its node %s left the swarm)" % entry.node.describe()
        if node.state != "ready":
            return "is unreachable: its node %s is %s" % (node.describe(), node.state)
        if node.availability != "active":
            return "was stopped: its node %s is %s" % (node.describe(), node.availability)
        current = wanted.get(entry.task_id)
        if current is not None and _task_state(current) == "running":
            return None
        try:
            tasks = await self._engine.list_tasks([entry.service_id])
        except NoSuchService:
            return "is gone (its service was removed)"
        ours = [t for t in tasks if t["ID"] == entry.task_id]
        if not ours:
            return "is gone (its task was removed)"
        if _task_state(ours[0]) != "running":
            return _task_exit(ours[0])
        return None

    async def _reconcile(self) -> List[RunningAgent]:
        """Adopt our services whose task runs and answers; remove the others
        and secrets no service of ours uses."""
        ours = ["%s=%s" % (LABEL, self.settings.instance)]
        nodes = {n["ID"]: NodeView.from_json(n) for n in await self._engine.list_nodes()}
        self._nodes = nodes
        services = await self._engine.list_services(ours)
        in_use: Set[str] = set()
        adopted: List[RunningAgent] = []
        known = {entry.service_id for entry in self._agents.values()}
        for service in services:
            spec = service.get("Spec") or {}
            username = (spec.get("Labels") or {}).get(USER_LABEL, "")
            refs = ((spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}).get(
                "Secrets") or []
            if spec.get("Name") in self._checks:
                continue                        # a check of a start in flight
            if service["ID"] in known or username in self._starting:
                in_use.update(r.get("SecretID") for r in refs)
                continue
            agent = None
            if is_valid_username(username) and username not in self._agents:
                agent = await self._adopt(username, service, nodes, refs)
            if agent is None and await self._start_in_flight(service):
                continue    # maybe another provider's (a manager starting over)
            if agent is None:
                self.log.info("removing service {name}", name=spec.get("Name"))
                await self._remove_service(service["ID"])
            else:
                in_use.update(r.get("SecretID") for r in refs)
                adopted.append(agent)
        for secret in await self._engine.list_secrets(ours):
            if secret["ID"] not in in_use and not self._starting:
                await self._remove_secret(secret["ID"])
        # agents we knew before an outage whose service is gone
        return adopted

    async def _start_in_flight(self, service: dict) -> bool:
        """A service made moments ago whose task is not running yet: someone's
        start, to be left alone (a reconcile removing it would fail that
        start with "service not found")."""
        if time.time() - _started_at(service.get("CreatedAt", "")) >= FRESH_CONTAINER:
            return False
        try:
            current = _current_task(await self._engine.list_tasks([service["ID"]]))
        except NoSuchService:
            return False
        return current is None or _task_state(current) in STARTING_TASK_STATES

    async def _adopt(self, username: str, service: dict, nodes: Dict[str, NodeView],
                     refs: List[dict]) -> Optional[RunningAgent]:
        try:
            tasks = await self._engine.list_tasks([service["ID"]])
        except NoSuchService:
            return None
        current = _current_task(tasks)
        if current is None or _task_state(current) != "running":
            return None
        node = nodes.get(current.get("NodeID", ""))
        port = _task_port(current, self.settings.port)
        if node is None or not node.usable or port is None:
            return None
        if not await self._probe(node.address, port):
            return None
        if username in self._agents:
            return None
        agent = RunningAgent(username=username, address=AgentAddress(node.address, port),
                             pid=0, started=_started_at(current.get("CreatedAt", ""))
                             or time.time())
        secret_id = refs[0].get("SecretID") if refs else None
        self._agents[username] = _Agent(service["ID"], secret_id, current["ID"], node, agent)
        if self.placements.get(username) is None:
            self.placements.record(username, node.id)
        self.log.info("adopted the running agent of {username} on node {node} at"
                      " {host}:{port}", username=username, node=node.describe(),
                      host=node.address, port=port)
        return agent
