"""An in-memory :class:`IDockerEngine` for tests of the docker provider.

It answers like the real engine (the same dict shapes, the same named errors,
the same events), and it passes the same contract suite as the real engine
(``tests/docker_engine_contract.py``), so tests that use it test something
real. It runs no processes: a started container just "runs" until a test
makes it end (:meth:`FakeDockerEngine.crash`, ``kill``, ``stop``), except a
container whose command is ``["echo", ...]``, which logs its arguments and
exits 0, as busybox would.

Extra knobs for tests: ``reachable`` (set by :meth:`stop_daemon` /
:meth:`start_daemon`), ``registry`` (references that a pull can fetch),
``stdin`` (what each container received on stdin), ``on_start`` (called with
the container id and its published host ports when a container starts).
"""
import hashlib
import itertools
import signal as _signal
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from ..manager.providers.docker_engine import (
    Conflict, DockerAPIError, EngineUnavailable, IDockerEngine, IEventStream, NoSuchContainer,
    NoSuchImage, NoSuchNetwork, PullFailed, choose_api_version, split_reference)


def _normal(reference: str) -> str:
    name, tag = split_reference(reference)
    return "%s:%s" % (name, tag) if tag else name


class _Container:
    def __init__(self, cid: str, name: str, config: dict, image: dict) -> None:
        self.id = cid
        self.name = name
        self.config = config
        self.image = image
        self.state = "created"
        self.exit_code = 0
        self.oom_killed = False
        self.pid = 0
        self.started_at = "0001-01-01T00:00:00Z"
        self.ports: Dict[str, list] = {}
        self.logs: List[str] = []
        self.stdin = b""
        self.memory_usage = 8 * 1024 * 1024

    @property
    def labels(self) -> dict:
        return dict(self.config.get("Labels") or {})

    @property
    def running(self) -> bool:
        return self.state == "running"


@implementer(IEventStream)
class _FakeEventStream:
    def __init__(self, engine: "FakeDockerEngine",
                 on_event: Optional[Callable[[Dict[str, Any]], None]],
                 labels: Iterable[str]) -> None:
        self._engine = engine
        self.on_event = on_event
        self.labels = list(labels)
        self.done: Deferred = Deferred()

    def matches(self, container: _Container) -> bool:
        labels = container.labels
        for wanted in self.labels:
            key, eq, value = wanted.partition("=")
            if key not in labels or (eq and labels[key] != value):
                return False
        return True

    def stop(self) -> None:
        if self in self._engine._streams:
            self._engine._streams.remove(self)
        if not self.done.called:
            self.done.callback(None)


@implementer(IDockerEngine)
class FakeDockerEngine:
    """In-memory Docker engine (one per test)."""

    def __init__(self, images: Iterable[str] = ("pixelated/pixelated-user-agent:latest",),
                 registry: Iterable[str] = (),
                 server_api_version: str = "1.41", server_min_api_version: str = "1.12",
                 engine_version: str = "20.10.24+dfsg1") -> None:
        self.host = "fake://docker"
        self.api_version: Optional[str] = None
        self.server_api_version = server_api_version
        self.server_min_api_version = server_min_api_version
        self.engine_version = engine_version
        self.reachable = True
        self.images: Dict[str, dict] = {}
        for ref in images:
            self.add_image(ref)
        self.registry = {_normal(ref) for ref in registry}
        self.containers: Dict[str, _Container] = {}
        self.on_start: Optional[Callable[[str, Dict[str, int]], None]] = None
        #: ids of containers whose removal fails, as with dockerd 20.10 when
        #: it stopped while the container started and left its root file
        #: system mounted ("device or resource busy")
        self.unremovable: Set[str] = set()
        self.calls: List[str] = []
        self._streams: List[_FakeEventStream] = []
        self._ids = itertools.count(1)
        self._ports = itertools.count(32768)
        self.networks: Dict[str, dict] = {}
        #: host ports something other than the engine holds (a squatter):
        #: publishing on one fails as dockerd's bind would
        self.taken_host_ports: set = set()
        self._subnets = itertools.count(1)

    # -- test knobs --

    def add_image(self, reference: str, cmd: Sequence[str] = ("/entrypoint",)) -> None:
        ref = _normal(reference)
        digest = hashlib.sha256(ref.encode()).hexdigest()
        self.images[ref] = {"Id": "sha256:" + digest, "RepoTags": [ref],
                            "Config": {"Cmd": list(cmd)}}

    def stop_daemon(self) -> None:
        """The daemon goes away: calls fail, streams break, containers die."""
        self.reachable = False
        for container in self.containers.values():
            if container.running:
                container.state, container.exit_code = "exited", 143
        streams, self._streams = self._streams, []
        for stream in streams:
            stream.done.errback(EngineUnavailable(
                "lost the stream from the Docker engine at %s: connection lost" % self.host))

    def start_daemon(self) -> None:
        self.reachable = True

    def crash(self, container_id: str, exit_code: int = 1, oom: bool = False) -> None:
        """The container's main process ends by itself (``oom``: killed by the kernel)."""
        container = self._get(container_id)
        if oom:
            container.oom_killed = True
            self._emit(container, "oom")
            exit_code = 137
        self._die(container, exit_code)

    def write_log(self, container_id: str, line: str) -> None:
        self._get(container_id).logs.append(line)

    def by_name(self, name: str) -> Optional[_Container]:
        for container in self.containers.values():
            if container.name == name:
                return container
        return None

    # -- internals --

    def _check(self, what: str) -> None:
        self.calls.append(what)
        if not self.reachable:
            raise EngineUnavailable("cannot reach the Docker engine at %s: connection refused"
                                    % self.host)

    def _get(self, ref: str) -> _Container:
        if ref in self.containers:
            return self.containers[ref]
        for container in self.containers.values():
            if container.name == ref or (len(ref) >= 4 and container.id.startswith(ref)):
                return container
        raise NoSuchContainer("No such container: %s" % ref, 404)

    def _emit(self, container: _Container, action: str, **attributes: Any) -> None:
        now = time.time()
        attrs = dict(container.labels, name=container.name,
                     image=container.config.get("Image", ""))
        attrs.update({k: str(v) for k, v in attributes.items()})
        event = {"status": action, "id": container.id, "from": attrs["image"],
                 "Type": "container", "Action": action,
                 "Actor": {"ID": container.id, "Attributes": attrs},
                 "scope": "local", "time": int(now), "timeNano": int(now * 1e9)}
        for stream in list(self._streams):
            if stream.on_event is not None and stream.matches(container):
                stream.on_event(dict(event))

    def _die(self, container: _Container, exit_code: int) -> None:
        if not container.running:
            return
        container.state, container.exit_code, container.pid = "exited", exit_code, 0
        container.ports = {}
        self._emit(container, "die", exitCode=exit_code)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Deferred:
        try:
            self._check(what)
            return succeed(fn(*args))
        except Exception as error:
            return fail(error)

    # -- IDockerEngine --

    def version(self) -> Deferred:
        def version() -> Any:
            self.api_version = choose_api_version(self.server_api_version,
                                                  self.server_min_api_version)
            return {"Version": self.engine_version, "ApiVersion": self.server_api_version,
                    "MinAPIVersion": self.server_min_api_version, "Os": "linux"}
        return self._call("version", version)

    def ping(self) -> Deferred:
        return self._call("ping", lambda: None)

    def create_container(self, name: str, config: Dict[str, Any]) -> Deferred:
        def create() -> Any:
            ref = _normal(config.get("Image", ""))
            if ref not in self.images:
                raise NoSuchImage("No such image: %s" % config.get("Image"), 404)
            existing = self.by_name(name)
            if existing is not None:
                raise Conflict('Conflict. The container name "/%s" is already in use by'
                               ' container "%s". You have to remove (or rename) that'
                               ' container to be able to reuse that name.'
                               % (name, existing.id), 409)
            cid = hashlib.sha256(b"container%d" % next(self._ids)).hexdigest()
            container = _Container(cid, name, dict(config), self.images[ref])
            self.containers[cid] = container
            self._emit(container, "create")
            return cid
        return self._call("create_container", create)

    def start_container(self, container_id: str) -> Deferred:
        def start() -> Any:
            container = self._get(container_id)
            if container.running:
                return None
            container.state, container.exit_code, container.oom_killed = "running", 0, False
            container.pid = 10000 + len(self.containers)
            container.started_at = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
            host_config = container.config.get("HostConfig") or {}
            published = {}
            for port, bindings in (host_config.get("PortBindings") or {}).items():
                for binding in bindings or [{}]:
                    wanted = binding.get("HostPort")
                    if wanted and int(wanted) in self.taken_host_ports:
                        raise DockerAPIError(
                            "driver failed programming external connectivity on endpoint %s:"
                            " Error starting userland proxy: listen tcp4 %s:%s: bind: address"
                            " already in use" % (container.name, binding.get("HostIp"),
                                                 wanted), 500)
                    if wanted and any(b.get("HostPort") == wanted
                                      for other in self.containers.values() if other.running
                                      for bs in other.ports.values() for b in bs):
                        raise DockerAPIError(
                            "driver failed programming external connectivity on endpoint %s:"
                            " Bind for %s:%s failed: port is already allocated"
                            % (container.name, binding.get("HostIp"), wanted), 500)
            for port, bindings in (host_config.get("PortBindings") or {}).items():
                container.ports[port] = []
                for binding in bindings or [{}]:
                    host_port = binding.get("HostPort") or str(next(self._ports))
                    container.ports[port].append({"HostIp": binding.get("HostIp") or "0.0.0.0",
                                                  "HostPort": host_port})
                    published[port] = int(host_port)
            self._emit(container, "start")
            cmd = container.config.get("Cmd") or container.image["Config"]["Cmd"]
            if cmd and cmd[0] == "echo":
                container.logs.append(" ".join(cmd[1:]))
                self._die(container, 0)
            elif self.on_start is not None:
                self.on_start(container.id, published)
            return None
        return self._call("start_container", start)

    def stop_container(self, container_id: str, timeout: float) -> Deferred:
        def stop() -> Any:
            container = self._get(container_id)
            if container.running:
                self._emit(container, "kill", signal=int(_signal.SIGTERM))
                self._die(container, 0)
                self._emit(container, "stop")
            return None
        return self._call("stop_container", stop)

    def kill_container(self, container_id: str, signal: str = "SIGKILL") -> Deferred:
        def kill() -> Any:
            container = self._get(container_id)
            if not container.running:
                raise Conflict("Cannot kill container: %s: Container %s is not running"
                               % (container_id, container.id), 409)
            number = int(getattr(_signal, signal, signal))
            self._emit(container, "kill", signal=number)
            self._die(container, 128 + number)
            return None
        return self._call("kill_container", kill)

    def remove_container(self, container_id: str) -> Deferred:
        def remove() -> Any:
            container = self._get(container_id)
            if container.id in self.unremovable:
                raise DockerAPIError(
                    'container %s: driver "overlay2" failed to remove root filesystem:'
                    ' unlinkat /var/lib/docker/overlay2/%s/merged: device or resource busy'
                    % (container.id, container.id[:12]), 500)
            if container.running:
                self._emit(container, "kill", signal=int(_signal.SIGKILL))
                self._die(container, 137)
            del self.containers[container.id]
            self._emit(container, "destroy")
            return None
        return self._call("remove_container", remove)

    def rename_container(self, container_id: str, name: str) -> Deferred:
        def rename() -> Any:
            container = self._get(container_id)
            existing = self.by_name(name)
            if existing is not None and existing is not container:
                raise Conflict('Conflict. The container name "/%s" is already in use by'
                               ' container "%s".' % (name, existing.id), 409)
            container.name = name
            self._emit(container, "rename")
            return None
        return self._call("rename_container", rename)

    def inspect_container(self, container_id: str) -> Deferred:
        def inspect() -> Any:
            c = self._get(container_id)
            config = dict(c.config)
            config.setdefault("Cmd", c.image["Config"]["Cmd"])
            config["Labels"] = c.labels
            host_config = dict(config.pop("HostConfig", None) or {})
            return {
                "Id": c.id, "Name": "/" + c.name, "Image": c.image["Id"],
                "Config": config, "HostConfig": host_config,
                "State": {"Status": c.state, "Running": c.running,
                          "OOMKilled": c.oom_killed, "Pid": c.pid,
                          "ExitCode": c.exit_code, "StartedAt": c.started_at},
                "NetworkSettings": {"Ports": {k: list(v) for k, v in c.ports.items()},
                                    "Networks": self._container_networks(c)},
            }
        return self._call("inspect_container", inspect)

    def list_containers(self, labels: Iterable[str], all: bool = True) -> Deferred:
        def listing() -> Any:
            probe = _FakeEventStream(self, None, labels)
            return [{"Id": c.id, "Names": ["/" + c.name], "Image": c.config.get("Image"),
                     "Labels": c.labels, "State": c.state}
                    for c in self.containers.values()
                    if probe.matches(c) and (all or c.running)]
        return self._call("list_containers", listing)

    def container_logs(self, container_id: str, tail: int) -> Deferred:
        return self._call("container_logs",
                          lambda: list(self._get(container_id).logs[-int(tail):]) if tail else [])

    def container_stats(self, container_id: str) -> Deferred:
        def stats() -> Any:
            c = self._get(container_id)
            limit = (c.config.get("HostConfig") or {}).get("Memory") or 2 ** 34
            usage = c.memory_usage if c.running else 0
            return {"id": c.id, "name": "/" + c.name,
                    "memory_stats": {"usage": usage, "limit": limit} if c.running else {}}
        return self._call("container_stats", stats)

    def _container_networks(self, container: _Container) -> Dict[str, dict]:
        mode = (container.config.get("HostConfig") or {}).get("NetworkMode") or "bridge"
        network = next((n for n in self.networks.values() if mode in (n["Name"], n["Id"])),
                       None)
        if network is None or not container.running:
            return {mode: {"IPAddress": ""}}
        base = network["IPAM"]["Config"][0]["Subnet"].split("/")[0].rsplit(".", 1)[0]
        return {mode: {"IPAddress": "%s.%d" % (base, 2 + list(self.containers).index(
            container.id) % 250)}}

    def _network(self, ref: str) -> dict:
        for network in self.networks.values():
            if ref in (network["Name"], network["Id"]):
                return network
        raise NoSuchNetwork("network %s not found" % ref, 404)

    def inspect_network(self, name: str) -> Deferred:
        return self._call("inspect_network", lambda: dict(self._network(name)))

    def list_networks(self, name: str) -> Deferred:
        return self._call("list_networks", lambda: [
            dict(network) for network in self.networks.values() if network["Name"] == name])

    def create_network(self, name: str, config: Dict[str, Any]) -> Deferred:
        def create() -> Any:
            if name in self.networks:
                raise Conflict("network with name %s already exists" % name, 409)
            ipam = [dict(c) for c in (config.get("IPAM") or {}).get("Config") or []] or [{}]
            if not ipam[0].get("Subnet"):
                ipam[0]["Subnet"] = "172.30.%d.0/24" % next(self._subnets)
            if not ipam[0].get("Gateway"):
                ipam[0]["Gateway"] = ipam[0]["Subnet"].rsplit(".", 1)[0] + ".1"
            network_id = hashlib.sha256(name.encode()).hexdigest()
            self.networks[name] = {"Name": name, "Id": network_id, "Created": time.time(),
                                   "Driver": config.get("Driver", "bridge"),
                                   "Options": dict(config.get("Options") or {}),
                                   "Labels": dict(config.get("Labels") or {}),
                                   "IPAM": {"Driver": "default", "Config": ipam}}
            return network_id
        return self._call("create_network", create)

    def remove_network(self, name: str) -> Deferred:
        def remove() -> Any:
            del self.networks[self._network(name)["Name"]]
        return self._call("remove_network", remove)

    def inspect_image(self, reference: str) -> Deferred:
        def inspect() -> Any:
            ref = _normal(reference)
            if ref not in self.images:
                raise NoSuchImage("No such image: %s" % reference, 404)
            return dict(self.images[ref])
        return self._call("inspect_image", inspect)

    def pull_image(self, reference: str, on_progress: Callable[[Dict[str, Any]], None]) -> Deferred:
        def pull() -> Any:
            ref = _normal(reference)
            if ref not in self.registry:
                first = ref.split("/")[0]
                registry = first if "/" in ref and ("." in first or ":" in first) \
                    else "registry-1.docker.io"
                raise PullFailed('Get "https://%s/v2/": dial tcp %s: connect: connection refused'
                                 % (registry, registry), 500)
            on_progress({"status": "Pulling from %s" % ref, "id": split_reference(ref)[1]})
            on_progress({"status": "Downloading", "progressDetail": {"current": 1, "total": 2},
                         "id": "0123456789ab"})
            on_progress({"status": "Download complete", "id": "0123456789ab"})
            self.add_image(ref)
            on_progress({"status": "Status: Downloaded newer image for %s" % ref})
            return None
        return self._call("pull_image", pull)

    def attach_stdin(self, container_id: str, data: bytes) -> Deferred:
        def attach() -> Any:
            container = self._get(container_id)
            if container.config.get("OpenStdin"):
                container.stdin += data
            return None
        return self._call("attach_stdin", attach)

    def close(self) -> Deferred:
        return succeed(None)

    def follow_events(self, on_event: Callable[[Dict[str, Any]], None],
                      labels: Iterable[str]) -> Deferred:
        def follow() -> Any:
            stream = _FakeEventStream(self, on_event, labels)
            self._streams.append(stream)
            return stream
        return self._call("follow_events", follow)

