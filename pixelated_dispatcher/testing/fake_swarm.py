"""An in-memory swarm: :class:`FakeSwarmEngine` is the fake Docker engine
(:mod:`.fake_docker`) with the swarm calls of :class:`~.docker_engine.ISwarmEngine`.

It passes the same swarm contract suite as a real one-node swarm
(``tests/swarm_engine_contract.py``) and behaves as swarmkit does where the
swarm provider depends on it: a service gets one task per replica, placed on a
``ready``/``active`` node that satisfies its constraints (``node.id==``,
``node.hostname==``, ``node.labels.K==V``), else the task stays ``pending``
with "no suitable node"; a node without the image rejects the task with "No
such image"; a host-mode port published as 0 gets a port from the node, read
back in the task's ``PortStatus``; secrets are never shown with their data;
and -- the part that matters most -- a node that goes down keeps reporting its
tasks as ``running`` (only the node's state says otherwise), while a drained
node shuts its tasks down.

Test knobs: :meth:`add_node`, :meth:`node_down` / :meth:`node_up`,
:meth:`drain`, :meth:`end_task` (a container that dies), :meth:`task_files`
(what a task's container sees in ``/run/secrets``), ``on_task_start``,
``fail_next_tasks``; a node's ``no_new_privileges`` answers the swarm
provider's one-shot check (a command that greps ``NoNewPrivs``), and a
node's ``firewall`` the firewall probe (:mod:`..manager.providers.swarm_firewall`)
as a real swarm does: a probe from another node is refused by a node with
the ``DOCKER-USER`` rule and reaches an agent on one without it; a probe on
the agent's own node always reaches it (Docker's own path, not the rule's).
"""
import hashlib
import itertools
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

import attr
from twisted.internet.defer import Deferred
from zope.interface import implementer

from ..manager.providers.docker_engine import (Conflict, DockerAPIError, ISwarmEngine,
                                               NoSuchNode, NoSuchSecret, NoSuchService,
                                               NotSwarmManager)
from ..manager.providers.swarm_firewall import PROBE_SCRIPT, REACHED, REFUSED
from .fake_docker import FakeDockerEngine, _normal

NOT_A_MANAGER = ("This node is not a swarm manager. Use \"docker swarm init\" or \"docker swarm"
                 " join\" to connect this node to swarm and try again.")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())


_sequence = itertools.count(1)


def _created() -> str:
    """Creation times that sort in creation order, as swarmkit's do."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".%09dZ" % next(_sequence)


@attr.s(auto_attribs=True)
class FakeNode:
    id: str
    hostname: str
    address: str
    labels: Dict[str, str]
    images: Any  # a set of image ids, or _LiveImages
    role: str = "worker"
    #: whether its dockerd runs with --no-new-privileges
    no_new_privileges: bool = True
    #: whether its DOCKER-USER rule lets only the proxy host reach published ports
    firewall: bool = True
    state: str = "ready"
    availability: str = "active"
    version: int = 1

    def as_json(self) -> dict:
        node = {"ID": self.id, "Version": {"Index": self.version},
                "Spec": {"Labels": dict(self.labels), "Role": self.role,
                         "Availability": self.availability},
                "Description": {"Hostname": self.hostname,
                                "Engine": {"EngineVersion": "20.10.24+dfsg1"}},
                "Status": {"State": self.state, "Addr": self.address}}
        if self.role == "manager":
            node["ManagerStatus"] = {"Leader": True, "Reachability": "reachable",
                                     "Addr": self.address + ":2377"}
        return node


@attr.s(auto_attribs=True)
class _Task:
    id: str
    service_id: str
    node_id: str
    spec: dict
    state: str
    desired: str = "running"
    err: Optional[str] = None
    port: int = 0
    exit_code: int = 0
    files: Dict[str, dict] = attr.Factory(dict)
    created: str = attr.Factory(lambda: _created())

    def as_json(self) -> dict:
        status: Dict[str, Any] = {"Timestamp": _now(), "State": self.state,
                                  "Message": self.state}
        if self.err:
            status["Err"] = self.err
        if self.state in ("running", "failed", "complete", "shutdown"):
            container_id = hashlib.sha256(self.id.encode()).hexdigest()
            status["ContainerStatus"] = {"ContainerID": container_id,
                                         "PID": 20000 if self.state == "running" else 0,
                                         "ExitCode": self.exit_code}
        ports = []
        if self.state == "running":
            for port in (self.spec.get("_ports") or []):
                ports.append(dict(port, PublishedPort=self.port or port.get("PublishedPort")))
        status["PortStatus"] = {"Ports": ports} if ports else {}
        spec = {k: v for k, v in self.spec.items() if not k.startswith("_")}
        return {"ID": self.id, "ServiceID": self.service_id, "Slot": 1,
                "CreatedAt": self.created,
                "NodeID": self.node_id if self.state not in ("pending",) else "",
                "Spec": spec, "Status": status, "DesiredState": self.desired,
                "Version": {"Index": 1}}


@implementer(ISwarmEngine)
class FakeSwarmEngine(FakeDockerEngine):
    """A fake engine that is the manager of a swarm (``swarm=False``: of none)."""

    def __init__(self, images: Iterable[str] = ("pixelated/pixelated-user-agent:latest",),
                 swarm: bool = True, address: str = "127.0.0.1", **kwargs: Any) -> None:
        super().__init__(images=images, **kwargs)
        self.swarm = swarm
        self.nodes: Dict[str, FakeNode] = {}
        self.services: Dict[str, dict] = {}
        self.secrets: Dict[str, dict] = {}
        self.tasks: Dict[str, _Task] = {}
        self.security_options = ["name=seccomp,profile=default"]
        self.on_task_start: Optional[Callable[[dict, FakeNode], None]] = None
        #: that many next tasks fail at once (exit code 3), as a broken agent would
        self.fail_next_tasks = 0
        #: the no-new-privileges checks run until :meth:`finish_checks`
        self.hold_checks = False
        self._object_ids = itertools.count(1)
        self._node_ports: Dict[str, itertools.count] = {}
        self.self_node = self.add_node("manager-1", address, role="manager",
                                       images=None, labels={})

    # -- test knobs --

    def add_node(self, hostname: str, address: str, labels: Optional[Dict[str, str]] = None,
                 images: Optional[Iterable[str]] = (), role: str = "worker") -> FakeNode:
        """A node; ``images=None``: it shares this engine's own images."""
        node = FakeNode(id=self._new_id("node"), hostname=hostname, address=address,
                        labels=dict(labels or {}), role=role,
                        images=self._own_images if images is None
                        else {self._image_id(ref) for ref in images})
        self.nodes[node.id] = node
        self._node_ports[node.id] = itertools.count(30000)
        return node

    def node_down(self, node_id: str) -> None:
        """Its dockerd died: the node is ``down``; its tasks still say ``running``."""
        self.nodes[node_id].state = "down"

    def node_up(self, node_id: str) -> None:
        """It is back: its orphaned tasks (their services removed meanwhile) are gone;
        pending tasks are placed."""
        self.nodes[node_id].state = "ready"
        self._reschedule()

    def drain(self, node_id: str, availability: str = "drain") -> None:
        node = self.nodes[node_id]
        node.availability = availability
        node.version += 1
        if availability == "drain":
            for task in list(self.tasks.values()):
                if task.node_id == node_id and task.desired == "running":
                    task.desired, task.state = "shutdown", "shutdown"
                    self._replace(task)
        else:
            self._reschedule()

    def end_task(self, task_id: str, exit_code: int = 137) -> None:
        """The task's container dies (``docker kill`` on its node)."""
        task = self.tasks[task_id]
        if task.state != "running":
            return
        task.exit_code = exit_code
        if exit_code == 0:
            task.state, task.desired = "complete", "shutdown"
        else:
            task.state, task.desired = "failed", "shutdown"
            task.err = "task: non-zero exit (%d)" % exit_code
        service = self.services.get(task.service_id)
        policy = (service or {}).get("Spec", {}).get("TaskTemplate", {}).get("RestartPolicy", {})
        condition = policy.get("Condition", "any")
        if service is None or condition == "none" or (condition == "on-failure" and
                                                      exit_code == 0):
            return
        restarts = service.setdefault("_restarts", 0)
        if policy.get("MaxAttempts") and restarts >= policy["MaxAttempts"]:
            return
        service["_restarts"] = restarts + 1
        self._replace(task)

    def finish_checks(self) -> None:
        """The held no-new-privileges checks end (as their node's flag says)."""
        for task in self.tasks.values():
            if task.spec.get("_check") and task.state == "running":
                ok = self.nodes[task.node_id].no_new_privileges
                task.exit_code = 0 if ok else 1
                task.state = "complete" if ok else "failed"
                task.desired = "shutdown"

    def task_files(self, task_id: str) -> Dict[str, dict]:
        """``{path: {"data", "uid", "gid", "mode"}}`` under /run/secrets of a task."""
        return self.tasks[task_id].files

    def running_tasks(self, service_name: str) -> List[dict]:
        service = self._service(service_name)
        return [t.as_json() for t in self.tasks.values()
                if t.service_id == service["ID"] and t.state == "running"]

    # -- internals --

    @property
    def _own_images(self) -> "_LiveImages":
        return _LiveImages(self)

    def _image_id(self, reference: str) -> str:
        return "sha256:" + hashlib.sha256(_normal(reference).encode()).hexdigest()

    def _new_id(self, kind: str) -> str:
        return hashlib.sha256(b"%s%d" % (kind.encode(), next(self._object_ids))).hexdigest()[:25]

    def _swarm_call(self, what: str, fn: Callable[..., Any], *args: Any) -> Deferred:
        def call() -> Any:
            if not self.swarm:
                raise NotSwarmManager(NOT_A_MANAGER, 503)
            return fn(*args)
        return self._call(what, call)

    def _service(self, ref: str) -> dict:
        for service in self.services.values():
            if ref in (service["ID"], service["Spec"]["Name"]) or (
                    len(ref) >= 4 and service["ID"].startswith(ref)):
                return service
        raise NoSuchService("service %s not found" % ref, 404)

    def _secret(self, ref: str) -> dict:
        for secret in self.secrets.values():
            if ref in (secret["ID"], secret["Spec"]["Name"]):
                return secret
        raise NoSuchSecret("secret %s not found" % ref, 404)

    def _eligible(self, constraints: List[str]) -> List[FakeNode]:
        found = []
        for node in self.nodes.values():
            if node.state != "ready" or node.availability != "active":
                continue
            if all(_satisfies(node, constraint) for constraint in constraints):
                found.append(node)
        return found

    def _place(self, service: dict) -> None:
        template = service["Spec"].get("TaskTemplate") or {}
        constraints = (template.get("Placement") or {}).get("Constraints") or []
        container = template.get("ContainerSpec") or {}
        spec = dict(template)
        ports = ((service["Spec"].get("EndpointSpec") or {}).get("Ports") or [])
        spec["_ports"] = [dict(p) for p in ports if p.get("PublishMode") == "host"]
        task = _Task(id=self._new_id("task"), service_id=service["ID"], node_id="",
                     spec=spec, state="pending")
        self.tasks[task.id] = task
        nodes = self._eligible(constraints)
        if not nodes:
            task.err = "no suitable node (scheduling constraints not satisfied on %d node%s)" \
                % (len(self.nodes), "" if len(self.nodes) == 1 else "s")
            return
        node = min(nodes, key=lambda n: sum(1 for t in self.tasks.values()
                                            if t.node_id == n.id and t.state == "running"))
        self._run_on(task, node, container)

    def _run_on(self, task: _Task, node: FakeNode, container: dict) -> None:
        task.node_id, task.err = node.id, None
        image = container.get("Image", "")
        wanted = image if image.startswith("sha256:") else self._image_id(image)
        if wanted not in node.images:
            task.state, task.desired = "rejected", "shutdown"
            task.err = "No such image: %s" % image
            return
        for reference in container.get("Secrets") or []:
            secret = self.secrets.get(reference.get("SecretID"))
            if secret is None:
                continue
            target = reference["File"]["Name"]
            path = target if target.startswith("/") else "/run/secrets/" + target
            task.files[path] = {"data": secret["_data"], "uid": reference["File"].get("UID"),
                                "gid": reference["File"].get("GID"),
                                "mode": reference["File"].get("Mode")}
        command = " ".join(container.get("Command") or [])
        if "NoNewPrivs" in command and self.hold_checks:
            task.state = "running"              # finishes at finish_checks()
            task.spec["_check"] = True
            return
        if "NoNewPrivs" in command:
            # the one-shot check of the swarm provider: grep /proc/self/status
            task.exit_code = 0 if node.no_new_privileges else 1
            task.state, task.desired = ("complete" if task.exit_code == 0 else "failed",
                                        "shutdown")
            return
        if container.get("Command", [])[:3] == ["sh", "-c", PROBE_SCRIPT]:
            self._probe(task, node, *container["Command"][3:5])
            return
        if self.fail_next_tasks:
            self.fail_next_tasks -= 1
            task.exit_code, task.state, task.desired = 3, "failed", "shutdown"
            task.err = "task: non-zero exit (3)"
            return
        task.state = "running"
        if task.spec["_ports"]:
            task.port = next(self._node_ports[node.id])
        if self.on_task_start is not None:
            self.on_task_start(task.as_json(), node)

    def _probe(self, task: _Task, node: FakeNode, host: str, port: str) -> None:
        """The firewall probe on ``node``: a TCP connection to ``host:port``."""
        targets = [n for n in self.nodes.values() if n.address == host and n.state == "ready"]
        listening = targets and any(
            t.node_id == targets[0].id and t.state == "running" and t.port == int(port)
            for t in self.tasks.values())
        if not listening:
            code = REFUSED
        elif targets[0] is node or not targets[0].firewall:
            code = REACHED
        else:
            code = REFUSED
        task.exit_code, task.state, task.desired = code, "failed", "shutdown"
        task.err = "task: non-zero exit (%d)" % code

    def _replace(self, old: _Task) -> None:
        service = self.services.get(old.service_id)
        if service is not None:
            self._place(service)

    def _reschedule(self) -> None:
        for task in list(self.tasks.values()):
            if task.state != "pending":
                continue
            service = self.services.get(task.service_id)
            if service is None:
                continue
            template = service["Spec"].get("TaskTemplate") or {}
            constraints = (template.get("Placement") or {}).get("Constraints") or []
            nodes = self._eligible(constraints)
            if nodes:
                self._run_on(task, nodes[0], template.get("ContainerSpec") or {})

    # -- ISwarmEngine --

    def info(self) -> Deferred:
        def info() -> dict:
            swarm = {"NodeID": self.self_node.id if self.swarm else "",
                     "LocalNodeState": "active" if self.swarm else "inactive",
                     "ControlAvailable": self.swarm}
            return {"ServerVersion": self.engine_version, "Swarm": swarm,
                    "SecurityOptions": list(self.security_options)}
        return self._call("info", info)

    def list_nodes(self) -> Deferred:
        return self._swarm_call("list_nodes",
                                lambda: [n.as_json() for n in self.nodes.values()])

    def inspect_node(self, node_id: str) -> Deferred:
        def inspect() -> dict:
            for node in self.nodes.values():
                if node_id in (node.id, node.hostname):
                    return node.as_json()
            raise NoSuchNode("node %s not found" % node_id, 404)
        return self._swarm_call("inspect_node", inspect)

    def create_secret(self, name: str, data: bytes, labels: Dict[str, str]) -> Deferred:
        def create() -> str:
            if any(s["Spec"]["Name"] == name for s in self.secrets.values()):
                raise Conflict("rpc error: code = AlreadyExists desc = secret %s already exists"
                               % name, 409)
            secret_id = self._new_id("secret")
            self.secrets[secret_id] = {
                "ID": secret_id, "Version": {"Index": 1}, "CreatedAt": _now(),
                "UpdatedAt": _now(), "Spec": {"Name": name, "Labels": dict(labels)},
                "_data": bytes(data)}
            return secret_id
        return self._swarm_call("create_secret", create)

    def inspect_secret(self, secret_id: str) -> Deferred:
        return self._swarm_call("inspect_secret", lambda: _public(self._secret(secret_id)))

    def list_secrets(self, labels: Iterable[str]) -> Deferred:
        return self._swarm_call("list_secrets", lambda: [
            _public(s) for s in self.secrets.values()
            if _has_labels(s["Spec"].get("Labels"), labels)])

    def remove_secret(self, secret_id: str) -> Deferred:
        def remove() -> None:
            secret = self._secret(secret_id)
            users = [s["Spec"]["Name"] for s in self.services.values()
                     if any(ref.get("SecretID") == secret["ID"] for ref in
                            s["Spec"]["TaskTemplate"]["ContainerSpec"].get("Secrets") or [])]
            if users:
                raise DockerAPIError(
                    "rpc error: code = InvalidArgument desc = secret '%s' is in use by the"
                    " following service: %s" % (secret["Spec"]["Name"], ", ".join(users)), 400)
            del self.secrets[secret["ID"]]
        return self._swarm_call("remove_secret", remove)

    def create_service(self, spec: dict) -> Deferred:
        def create() -> str:
            name = spec.get("Name", "")
            if any(s["Spec"]["Name"] == name for s in self.services.values()):
                raise Conflict("rpc error: code = AlreadyExists desc = name conflicts with an"
                               " existing object: service %s already exists" % name, 409)
            container = (spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}
            for reference in container.get("Secrets") or []:
                if reference.get("SecretID") not in self.secrets:
                    raise DockerAPIError("rpc error: code = InvalidArgument desc = secret"
                                         " reference %s not found"
                                         % reference.get("SecretName"), 400)
            service_id = self._new_id("service")
            service = {"ID": service_id, "Version": {"Index": 1}, "CreatedAt": _now(),
                       "UpdatedAt": _now(), "Spec": _copy(spec)}
            self.services[service_id] = service
            replicas = ((spec.get("Mode") or {}).get("Replicated") or {}).get("Replicas", 1)
            for _ in range(replicas):
                self._place(service)
            return service_id
        return self._swarm_call("create_service", create)

    def inspect_service(self, service_id: str) -> Deferred:
        return self._swarm_call("inspect_service", lambda: _public(self._service(service_id)))

    def list_services(self, labels: Iterable[str]) -> Deferred:
        return self._swarm_call("list_services", lambda: [
            _public(s) for s in self.services.values()
            if _has_labels(s["Spec"].get("Labels"), labels)])

    def remove_service(self, service_id: str) -> Deferred:
        def remove() -> None:
            service = self._service(service_id)
            del self.services[service["ID"]]
            for task in list(self.tasks.values()):
                if task.service_id == service["ID"]:
                    # a down node's tasks go once it is back; ours at once
                    del self.tasks[task.id]
        return self._swarm_call("remove_service", remove)

    def list_tasks(self, services: Iterable[str]) -> Deferred:
        def listing() -> List[dict]:
            ids = {self._service(ref)["ID"] for ref in services}
            return [t.as_json() for t in self.tasks.values() if t.service_id in ids]
        return self._swarm_call("list_tasks", listing)

    def list_running_tasks(self) -> Deferred:
        return self._swarm_call("list_running_tasks", lambda: [
            t.as_json() for t in self.tasks.values() if t.desired == "running"])


class _LiveImages:
    """The images of the manager's own engine, as a node's image set."""

    def __init__(self, engine: FakeSwarmEngine) -> None:
        self._engine = engine

    def __contains__(self, image_id: object) -> bool:
        return any(info["Id"] == image_id for info in self._engine.images.values())


def _satisfies(node: FakeNode, constraint: str) -> bool:
    negate = "!=" in constraint
    key, _, value = constraint.replace("!=", "==").partition("==")
    key, value = key.strip(), value.strip()
    if key == "node.id":
        actual = node.id
    elif key == "node.hostname":
        actual = node.hostname
    elif key == "node.role":
        actual = node.role
    elif key.startswith("node.labels."):
        actual = node.labels.get(key[len("node.labels."):], "")
    else:
        return False
    return (actual != value) if negate else (actual == value)


def _has_labels(have: Optional[Dict[str, str]], wanted: Iterable[str]) -> bool:
    have = have or {}
    for item in wanted:
        key, eq, value = item.partition("=")
        if key not in have or (eq and have[key] != value):
            return False
    return True


def _public(obj: dict) -> dict:
    """What the API shows: no data, no fake bookkeeping."""
    return _copy({k: v for k, v in obj.items() if not k.startswith("_")})


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
