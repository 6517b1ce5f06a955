"""The Docker Engine HTTP API, the few calls the docker and swarm providers need.

:class:`IDockerEngine` is the boundary; :class:`DockerEngine` speaks it with
treq over the engine's Unix socket (or plain TCP), and
``pixelated_dispatcher.testing.fake_docker.FakeDockerEngine`` is the in-memory
double. Both pass the same contract suite
(``tests/docker_engine_contract.py``), once against a real ``dockerd``, so
the fake stays honest. The swarm calls (:class:`ISwarmEngine`: nodes,
services, tasks, secrets) have their own suite,
``tests/swarm_engine_contract.py``, run against
``pixelated_dispatcher.testing.fake_swarm.FakeSwarmEngine`` and a real swarm.

Results are Docker's own JSON (dicts with Docker's key names); errors are the
named exceptions below and carry Docker's message. The API version is
negotiated from ``GET /version``: the newest version both sides speak, so the
same code talks to Debian 12's 20.10 (API 1.41) and to Docker 29 (API >= 1.44).

Streams (``/events``, image pulls) are read line by line as they arrive and
never buffered whole; ``attach`` hijacks the connection, which treq cannot do,
so it lives in :mod:`.docker_attach`.
"""
import base64
import json
import struct
from typing import (Any, Callable, Dict, Generator, Iterable, List, NoReturn, Optional, Tuple,
                    Type)
from urllib.parse import quote

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import (ConnectError, ConnectingCancelledError, ConnectionLost,
                                    TimeoutError as _Timeout)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import Attribute, Interface, implementer

from . import docker_attach

#: the API versions this client speaks (tested: 1.41; 1.44+ is what Docker 29 requires)
CLIENT_MIN_API = "1.40"
CLIENT_MAX_API = "1.47"

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"

#: what an ``inlineCallbacks`` method of the engine is: it yields Deferreds
#: and its Deferred fires with what it returns
_Calls = Generator[Deferred, Any, Any]


# --- errors ------------------------------------------------------------------

class DockerEngineError(Exception):
    """Docker refused or failed a call; ``str()`` is Docker's message."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class EngineUnavailable(DockerEngineError):
    """The engine cannot be reached (not running, socket missing, connection lost)."""


class UnsupportedEngine(DockerEngineError):
    """The engine speaks no API version that this client speaks."""


class NoSuchContainer(DockerEngineError):
    """404 for a container."""


class NoSuchImage(DockerEngineError):
    """404 for an image (inspect, or create from an image that is not there)."""


class Conflict(DockerEngineError):
    """409: e.g. the container name is taken, or removal of a running container."""


class NoSuchNetwork(DockerEngineError):
    """404 for a network."""


class PullFailed(DockerEngineError):
    """An image pull failed, before or inside its 200 progress stream."""


class DockerAPIError(DockerEngineError):
    """Any other error answer of the engine."""


class NoSuchService(DockerEngineError):
    """404 for a swarm service."""


class NoSuchSecret(DockerEngineError):
    """404 for a swarm secret."""


class NoSuchNode(DockerEngineError):
    """404 for a swarm node."""


class NotSwarmManager(DockerEngineError):
    """503: the engine is not a manager of a swarm (not in one, or a worker)."""


# --- the boundary ------------------------------------------------------------

class IEventStream(Interface):
    """A followed ``/events`` stream."""

    done = Attribute("Deferred: fires None when stopped, fails with EngineUnavailable "
                     "when the engine closed or lost the stream.")

    def stop() -> None:
        """Stop following; ``done`` fires None."""


class IDockerEngine(Interface):
    """The calls of the Docker Engine API that the docker provider uses.

    Every method returns a Deferred. Dicts are Docker's JSON unchanged.
    """

    host = Attribute("The engine's address, e.g. 'unix:///var/run/docker.sock'.")
    api_version = Attribute("The negotiated API version ('1.41'), None before negotiation.")

    def version() -> Deferred:
        """``GET /version``; negotiates ``api_version``; fires with Docker's dict."""

    def ping() -> Deferred:
        """Fires None when the engine answers, fails with EngineUnavailable otherwise."""

    def create_container(name: str, config: Dict[str, Any]) -> Deferred:
        """``POST /containers/create``; fires with the new container's id."""

    def start_container(container_id: str) -> Deferred:
        """Start it (an already running container is fine)."""

    def stop_container(container_id: str, timeout: float) -> Deferred:
        """SIGTERM (the image's stop signal), SIGKILL after ``timeout`` seconds."""

    def kill_container(container_id: str, signal: str = "SIGKILL") -> Deferred:
        """Send a signal to the container's main process."""

    def remove_container(container_id: str) -> Deferred:
        """Remove it, even when running (``force``), with its anonymous volumes."""

    def rename_container(container_id: str, name: str) -> Deferred:
        """Give it another name (``POST /containers/{id}/rename``); Conflict
        if the name is taken."""

    def inspect_container(container_id: str) -> Deferred:
        """``GET /containers/{id}/json``."""

    def list_containers(labels: Iterable[str], all: bool = True) -> Deferred:
        """Containers carrying every label in ``labels`` (``"key"`` or
        ``"key=value"``), stopped ones too unless ``all`` is false."""

    def container_logs(container_id: str, tail: int) -> Deferred:
        """The last ``tail`` lines of stdout and stderr, as a list of str."""

    def container_stats(container_id: str) -> Deferred:
        """One stats sample (``stream=false``) as Docker's dict."""

    def inspect_image(reference: str) -> Deferred:
        """``GET /images/{name}/json``; NoSuchImage if missing."""

    def pull_image(reference: str, on_progress: Callable[[Dict[str, Any]], None]) -> Deferred:
        """Pull ``reference`` (tag ``latest`` when none is given), calling
        ``on_progress(dict)`` for every progress message; fails with
        PullFailed, also for an error reported inside the 200 stream."""

    def attach_stdin(container_id: str, data: bytes) -> Deferred:
        """Attach to the container's stdin, write ``data``, close stdin."""

    def inspect_network(name: str) -> Deferred:
        """The network's inspect document; NoSuchNetwork if there is none."""

    def list_networks(name: str) -> Deferred:
        """The networks called exactly ``name`` (Docker may hold several:
        creation does not check names atomically); their id, Name, Created."""

    def create_network(name: str, config: Dict[str, Any]) -> Deferred:
        """``POST /networks/create`` with ``config`` (Driver, Options, IPAM,
        Labels); fires with its id; Conflict if the name is taken."""

    def remove_network(name: str) -> Deferred:
        """Remove a network (NoSuchNetwork if there is none)."""

    def close() -> Deferred:
        """Close idle connections (the manager stops); fires None."""

    def follow_events(on_event: Callable[[Dict[str, Any]], None],
                      labels: Iterable[str]) -> Deferred:
        """Follow container events of containers carrying ``labels``.

        Fires with an :class:`IEventStream` once the engine has accepted the
        subscription (events from then on are delivered); ``on_event(dict)``
        is called for each event as it arrives.
        """


class ISwarmEngine(IDockerEngine):
    """The swarm calls of the Engine API that the swarm provider adds.

    Swarm objects are Docker's JSON unchanged. Calls made to an engine that
    is not a swarm manager fail with :class:`NotSwarmManager`.
    """

    def info() -> Deferred:
        """``GET /info`` (``Swarm``: this node's id, state and managers)."""

    def list_nodes() -> Deferred:
        """``GET /nodes``: every node of the swarm."""

    def inspect_node(node_id: str) -> Deferred:
        """``GET /nodes/{id}``; NoSuchNode if unknown."""

    def create_secret(name: str, data: bytes, labels: Dict[str, str]) -> Deferred:
        """``POST /secrets/create`` with ``data`` (bytes); fires with its id."""

    def inspect_secret(secret_id: str) -> Deferred:
        """``GET /secrets/{id}``: its spec, never its data; NoSuchSecret."""

    def list_secrets(labels: Iterable[str]) -> Deferred:
        """Secrets carrying every label in ``labels``."""

    def remove_secret(secret_id: str) -> Deferred:
        """Remove it (Conflict while a service uses it); NoSuchSecret."""

    def create_service(spec: dict) -> Deferred:
        """``POST /services/create``; fires with the new service's id
        (Conflict when the name is taken)."""

    def inspect_service(service_id: str) -> Deferred:
        """``GET /services/{id}`` by id or name; NoSuchService."""

    def list_services(labels: Iterable[str]) -> Deferred:
        """Services carrying every label in ``labels``."""

    def remove_service(service_id: str) -> Deferred:
        """Remove it; its tasks' containers are shut down by their nodes."""

    def list_tasks(services: Iterable[str]) -> Deferred:
        """Tasks of the services named (by id or name) in ``services``."""

    def list_running_tasks() -> Deferred:
        """Every task the swarm wants running (desired state ``running``), of
        every service: one call however many services there are."""


# --- helpers shared by the real engine and the fake ------------------------------

def parse_version(text: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in str(text).split("."))


def choose_api_version(server_max: str, server_min: Optional[str]) -> str:
    """The newest version both sides speak, or UnsupportedEngine."""
    chosen = min(parse_version(server_max), parse_version(CLIENT_MAX_API))
    lowest = max(parse_version(server_min or "1.12"), parse_version(CLIENT_MIN_API))
    if chosen < lowest:
        raise UnsupportedEngine(
            "the Docker engine speaks API %s to %s; this dispatcher speaks %s to %s"
            % (server_min or "?", server_max, CLIENT_MIN_API, CLIENT_MAX_API))
    return "%d.%d" % chosen


def split_reference(reference: str) -> Tuple[str, str]:
    """``(fromImage, tag)`` for a pull: tag ``latest`` unless given (a
    pull without tag would fetch *every* tag); digests pass unchanged."""
    if "@" in reference:
        return reference, ""
    last = reference.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = reference.rsplit(":", 1)
        return name, tag
    return reference, "latest"


def demultiplex(data: bytes) -> bytes:
    """Docker's multiplexed stdout/stderr stream (no TTY) to plain bytes.

    Frames are ``[stream, 0, 0, 0, size (uint32 BE)] payload``; anything that
    does not look like that is returned unchanged (a TTY's raw stream).
    """
    out: List[bytes] = []
    offset = 0
    while offset < len(data):
        header = data[offset:offset + 8]
        if len(header) < 8 or header[0] not in (0, 1, 2) or header[1:4] != b"\0\0\0":
            return data if offset == 0 else b"".join(out) + data[offset:]
        (size,) = struct.unpack(">I", header[4:])
        out.append(data[offset + 8:offset + 8 + size])
        offset += 8 + size
    return b"".join(out)


_message = docker_attach.error_message


# --- the real engine -----------------------------------------------------------

@implementer(IAgentEndpointFactory)
class _EngineEndpointFactory:
    """Every URL goes to the engine, whatever host name it names."""

    def __init__(self, reactor: Any, host: str, timeout: float) -> None:
        self._reactor = reactor
        self._host = host
        self._timeout = timeout

    def endpoint(self) -> IStreamClientEndpoint:
        if self._host.startswith("unix://"):
            return UNIXClientEndpoint(self._reactor, self._host[len("unix://"):],
                                      timeout=self._timeout)
        hostport = self._host[len("tcp://"):]
        host, _, port = hostport.rpartition(":")
        return TCP4ClientEndpoint(self._reactor, host, int(port), timeout=self._timeout)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return self.endpoint()


def check_docker_host(host: str) -> str:
    """Return ``host`` if it is an address this client can use, else ValueError."""
    if host.startswith("unix://") and len(host) > len("unix://"):
        return host
    if host.startswith("tcp://"):
        _, _, port = host[len("tcp://"):].rpartition(":")
        if port.isdigit():
            return host
    raise ValueError("unsupported Docker host %r: use unix:///path/to/docker.sock"
                     " or tcp://HOST:PORT" % (host,))


_log = Logger()

#: no message of a JSON stream is anywhere near this long
_MAX_LINE = 1024 * 1024

_UNREACHABLE = (ConnectError, ConnectingCancelledError, ConnectionLost, _Timeout, OSError)


class _JSONLines(Protocol):
    """Body consumer for newline-delimited JSON streams, one dict at a time."""

    #: once delivered to, the response body's transport (a push producer)
    transport: Any

    def __init__(self, on_object: Callable[[dict], None], finished: Deferred,
                 engine_host: str) -> None:
        self._on_object = on_object
        self._finished = finished
        self._buffer = b""
        self._stopped = False
        self._host = engine_host

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            try:
                self._on_object(obj)
            except Exception:
                _log.failure("handling {obj!r} from the Docker engine failed", obj=obj)
        if len(self._buffer) > _MAX_LINE:
            _log.warn("dropped an over-long line from the Docker engine ({size} bytes)",
                      size=len(self._buffer))
            self._buffer = b""

    def stop(self) -> None:
        self._stopped = True
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._buffer.strip():
            self.dataReceived(b"\n")
        if self._stopped:
            self._finished.callback("stopped")
        elif reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback("end")
        else:
            self._finished.errback(EngineUnavailable(
                "lost the stream from the Docker engine at %s: %s"
                % (self._host, reason.getErrorMessage())))


@implementer(IEventStream)
class _EventStream:
    def __init__(self, lines: _JSONLines, finished: Deferred, host: str) -> None:
        self._lines = lines
        self.done: Deferred = Deferred()

        def ended(result: str) -> None:
            if result == "end":
                raise EngineUnavailable("the Docker engine at %s ended the event stream" % host)
            return None
        finished.addCallback(ended).chainDeferred(self.done)

    def stop(self) -> None:
        self._lines.stop()


@implementer(ISwarmEngine)
class DockerEngine:
    """:class:`IDockerEngine` over HTTP with treq; ``host`` as in DOCKER_HOST."""

    def __init__(self, reactor: Any, host: str = DEFAULT_DOCKER_HOST,
                 timeout: float = 30.0) -> None:
        self.host = check_docker_host(host)
        self.api_version: Optional[str] = None
        self._reactor = reactor
        self._timeout = timeout
        self._endpoints = _EngineEndpointFactory(reactor, self.host, timeout)
        self._pool = pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 4
        pool.cachedConnectionTimeout = 30
        self._http = HTTPClient(Agent.usingEndpointFactory(reactor, self._endpoints, pool=pool))
        # streams hold their connection for as long as they run: never pooled
        self._stream_http = HTTPClient(Agent.usingEndpointFactory(
            reactor, self._endpoints, pool=HTTPConnectionPool(reactor, persistent=False)))

    # -- plumbing --

    def _unavailable(self, failure: Failure) -> NoReturn:
        failure.trap(*_UNREACHABLE, *_treq_errors())
        self.api_version = None      # renegotiate with whatever engine comes back
        raise EngineUnavailable("cannot reach the Docker engine at %s: %s"
                                % (self.host, failure.getErrorMessage()))

    @inlineCallbacks
    def _call(self, method: str, path: str, params: Optional[Dict[str, str]] = None,
              body: Any = None, expect: Tuple[int, ...] = (200,),
              not_found: Type[DockerEngineError] = DockerAPIError,
              timeout: Optional[float] = None, versioned: bool = True,
              raw: bool = False) -> _Calls:
        if versioned and self.api_version is None:
            yield self.version()
        prefix = "/v%s" % (self.api_version,) if versioned else ""
        kwargs: Dict[str, Any] = {"params": params or {}, "timeout": timeout or self._timeout}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode("utf-8")
            kwargs["headers"] = {b"Content-Type": [b"application/json"]}
        try:
            response = yield self._http.request(method, "http://docker" + prefix + path,
                                                **kwargs)
            content = yield treq.content(response)
        except Exception:
            self._unavailable(Failure())
        if response.code not in expect:
            raise _error_for(response.code, _message(content), not_found)
        if raw:
            return content
        return json.loads(content) if content.strip() else None

    @inlineCallbacks
    def _stream(self, method: str, path: str, params: Dict[str, str],
                on_object: Callable[[dict], None],
                not_found: Type[DockerEngineError] = DockerAPIError) -> _Calls:
        """Start a streaming call; fires ``(lines, finished)`` once the 200 arrived."""
        if self.api_version is None:
            yield self.version()
        url = "http://docker/v%s%s" % (self.api_version, path)
        try:
            response = yield self._stream_http.request(method, url, params=params,
                                                       unbuffered=True)
        except Exception:
            self._unavailable(Failure())
        if response.code != 200:
            content = yield treq.content(response)
            raise _error_for(response.code, _message(content), not_found)
        finished: Deferred = Deferred()
        lines = _JSONLines(on_object, finished, self.host)
        response.deliverBody(lines)
        return (lines, finished)

    # -- IDockerEngine --

    @inlineCallbacks
    def version(self) -> _Calls:
        info = yield self._call("GET", "/version", versioned=False)
        self.api_version = choose_api_version(info["ApiVersion"], info.get("MinAPIVersion"))
        return info

    @inlineCallbacks
    def ping(self) -> _Calls:
        yield self._call("GET", "/_ping", versioned=False, raw=True, timeout=5)

    @inlineCallbacks
    def create_container(self, name: str, config: Dict[str, Any]) -> _Calls:
        result = yield self._call("POST", "/containers/create", params={"name": name},
                                  body=config, expect=(201,), not_found=NoSuchImage)
        return result["Id"]

    def start_container(self, container_id: str) -> Deferred:
        return self._call("POST", "/containers/%s/start" % quote(container_id),
                          expect=(204, 304), not_found=NoSuchContainer)

    def stop_container(self, container_id: str, timeout: float) -> Deferred:
        return self._call("POST", "/containers/%s/stop" % quote(container_id),
                          params={"t": str(int(timeout))}, expect=(204, 304),
                          not_found=NoSuchContainer, timeout=timeout + self._timeout)

    def kill_container(self, container_id: str, signal: str = "SIGKILL") -> Deferred:
        return self._call("POST", "/containers/%s/kill" % quote(container_id),
                          params={"signal": signal}, expect=(204,), not_found=NoSuchContainer)

    def remove_container(self, container_id: str) -> Deferred:
        return self._call("DELETE", "/containers/%s" % quote(container_id),
                          params={"force": "1", "v": "1"}, expect=(204,),
                          not_found=NoSuchContainer)

    def rename_container(self, container_id: str, name: str) -> Deferred:
        return self._call("POST", "/containers/%s/rename" % quote(container_id),
                          params={"name": name}, expect=(204,), not_found=NoSuchContainer)

    def inspect_container(self, container_id: str) -> Deferred:
        return self._call("GET", "/containers/%s/json" % quote(container_id),
                          not_found=NoSuchContainer)

    def list_containers(self, labels: Iterable[str], all: bool = True) -> Deferred:
        return self._call("GET", "/containers/json",
                          params={"all": "1" if all else "0",
                                  "filters": json.dumps({"label": list(labels)})})

    @inlineCallbacks
    def container_logs(self, container_id: str, tail: int) -> _Calls:
        data = yield self._call("GET", "/containers/%s/logs" % quote(container_id),
                                params={"stdout": "1", "stderr": "1", "tail": str(int(tail))},
                                not_found=NoSuchContainer, raw=True)
        text = demultiplex(data).decode("utf-8", "replace")
        return text.splitlines()[-int(tail):] if tail else []

    @inlineCallbacks
    def container_stats(self, container_id: str) -> _Calls:
        if self.api_version is None:
            yield self.version()
        assert self.api_version is not None    # version() just negotiated it
        params = {"stream": "false"}
        if parse_version(self.api_version) >= (1, 41):
            params["one-shot"] = "true"
        stats = yield self._call("GET", "/containers/%s/stats" % quote(container_id),
                                 params=params, not_found=NoSuchContainer)
        return stats

    def inspect_image(self, reference: str) -> Deferred:
        return self._call("GET", "/images/%s/json" % quote(reference, safe="/:@"),
                          not_found=NoSuchImage)

    def inspect_network(self, name: str) -> Deferred:
        return self._call("GET", "/networks/%s" % quote(name), not_found=NoSuchNetwork)

    @inlineCallbacks
    def list_networks(self, name: str) -> _Calls:
        found = yield self._call("GET", "/networks",
                                 params={"filters": json.dumps({"name": [name]})})
        # the filter matches parts of names
        return [network for network in found or [] if network.get("Name") == name]

    @inlineCallbacks
    def create_network(self, name: str, config: Dict[str, Any]) -> _Calls:
        result = yield self._call("POST", "/networks/create",
                                  body=dict(config, Name=name, CheckDuplicate=True),
                                  expect=(201,))
        return result["Id"]

    def remove_network(self, name: str) -> Deferred:
        return self._call("DELETE", "/networks/%s" % quote(name), expect=(204, 200),
                          not_found=NoSuchNetwork)

    @inlineCallbacks
    def pull_image(self, reference: str,
                   on_progress: Callable[[Dict[str, Any]], None]) -> _Calls:
        from_image, tag = split_reference(reference)
        params = {"fromImage": from_image}
        if tag:
            params["tag"] = tag
        errors: List[str] = []

        def progress(obj: Dict[str, Any]) -> None:
            if "error" in obj:
                errors.append(obj.get("errorDetail", {}).get("message") or obj["error"])
            else:
                on_progress(obj)
        try:
            _lines, finished = yield self._stream("POST", "/images/create", params, progress,
                                                  not_found=PullFailed)
            yield finished
        except PullFailed:
            raise
        except EngineUnavailable:
            raise
        except DockerEngineError as error:
            raise PullFailed(error.message, error.status)
        if errors:
            raise PullFailed(errors[-1], 200)

    def attach_stdin(self, container_id: str, data: bytes) -> Deferred:
        def attach(_: object) -> Deferred:
            return docker_attach.attach_stdin(
                self._endpoints.endpoint(),
                "/v%s/containers/%s/attach" % (self.api_version, quote(container_id)),
                data, self._reactor, timeout=self._timeout, engine_host=self.host)

        d = self.version() if self.api_version is None else _succeed(None)
        d.addCallback(attach)
        d.addErrback(self._attach_error)
        return d

    def _attach_error(self, failure: Failure) -> Failure:
        error = failure.value
        if isinstance(error, docker_attach.AttachRefused):
            raise _error_for(error.status, error.message, NoSuchContainer)
        if failure.check(docker_attach.AttachConnectionFailed):
            self.api_version = None
            raise EngineUnavailable(str(failure.value))
        return failure

    def close(self) -> Deferred:
        return self._pool.closeCachedConnections()

    @inlineCallbacks
    def follow_events(self, on_event: Callable[[Dict[str, Any]], None],
                      labels: Iterable[str]) -> _Calls:
        params = {"filters": json.dumps({"type": ["container"], "label": list(labels)})}
        lines, finished = yield self._stream("GET", "/events", params, on_event)
        return _EventStream(lines, finished, self.host)

    # -- ISwarmEngine --

    def info(self) -> Deferred:
        return self._call("GET", "/info")

    def list_nodes(self) -> Deferred:
        return self._call("GET", "/nodes")

    def inspect_node(self, node_id: str) -> Deferred:
        return self._call("GET", "/nodes/%s" % quote(node_id), not_found=NoSuchNode)

    @inlineCallbacks
    def create_secret(self, name: str, data: bytes, labels: Dict[str, str]) -> _Calls:
        body = {"Name": name, "Labels": dict(labels),
                "Data": base64.b64encode(data).decode("ascii")}
        result = yield self._call("POST", "/secrets/create", body=body, expect=(201,))
        return result["ID"]

    def inspect_secret(self, secret_id: str) -> Deferred:
        return self._call("GET", "/secrets/%s" % quote(secret_id), not_found=NoSuchSecret)

    def list_secrets(self, labels: Iterable[str]) -> Deferred:
        return self._call("GET", "/secrets", params=_label_filter(labels))

    def remove_secret(self, secret_id: str) -> Deferred:
        return self._call("DELETE", "/secrets/%s" % quote(secret_id), expect=(200, 204),
                          not_found=NoSuchSecret)

    @inlineCallbacks
    def create_service(self, spec: dict) -> _Calls:
        result = yield self._call("POST", "/services/create", body=spec, expect=(200, 201))
        return result["ID"]

    def inspect_service(self, service_id: str) -> Deferred:
        return self._call("GET", "/services/%s" % quote(service_id), not_found=NoSuchService)

    def list_services(self, labels: Iterable[str]) -> Deferred:
        return self._call("GET", "/services", params=_label_filter(labels))

    def remove_service(self, service_id: str) -> Deferred:
        return self._call("DELETE", "/services/%s" % quote(service_id), expect=(200, 204),
                          not_found=NoSuchService)

    def list_tasks(self, services: Iterable[str]) -> Deferred:
        return self._call("GET", "/tasks",
                          params={"filters": json.dumps({"service": list(services)})},
                          not_found=NoSuchService)

    def list_running_tasks(self) -> Deferred:
        return self._call("GET", "/tasks",
                          params={"filters": json.dumps({"desired-state": ["running"]})})


def _label_filter(labels: Iterable[str]) -> Dict[str, str]:
    return {"filters": json.dumps({"label": list(labels)})}


def _succeed(value: Any) -> Deferred:
    d: Deferred = Deferred()
    d.callback(value)
    return d


def _treq_errors() -> Tuple[Type[BaseException], ...]:
    from twisted.web._newclient import (RequestGenerationFailed, RequestTransmissionFailed,
                                        ResponseFailed, ResponseNeverReceived)
    from twisted.internet.defer import CancelledError
    return (ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed,
            RequestGenerationFailed, CancelledError)


def _error_for(status: int, message: str,
               not_found: Type[DockerEngineError]) -> DockerEngineError:
    if status == 404:
        return not_found(message, status)
    if status == 409:
        return Conflict(message, status)
    if status == 503:
        return NotSwarmManager(message, status)
    return DockerAPIError(message, status)


def log_tail_lines(lines: List[str], limit: int = 20) -> str:
    """The last lines of a log, indented for an error message."""
    lines = lines[-limit:]
    if not lines:
        return "(the container wrote nothing)"
    return "\n".join("    " + line for line in lines)
