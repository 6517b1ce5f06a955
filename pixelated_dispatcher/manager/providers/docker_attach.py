"""Write one line on a container's stdin through Docker's hijacking attach.

``POST /containers/{id}/attach?stream=1&stdin=1`` answers ``101 UPGRADED``
(or ``200``) and then the HTTP connection *is* the container's stdin: raw
bytes, no framing. treq and ``Agent`` cannot hand over a connection like
that, so this small protocol sends the request by hand, reads the status line
and headers, writes the data, and half-closes the connection. With
``OpenStdin`` and ``StdinOnce`` set at create time, the half-close closes the
container's stdin. The engine would keep the connection open until the
container stops (that is how ``docker run -i`` waits), so once our half-close
has gone out (the data is in the engine's socket buffer, followed by EOF) we
consider it delivered and close the connection ourselves.
"""
import json
from typing import Any, List, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (IHalfCloseableProtocol, IReactorTime,
                                         IStreamClientEndpoint)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer


class AttachRefused(Exception):
    """The engine answered the attach with an HTTP error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__("attach refused (%d): %s" % (status, message))
        self.status = status
        self.message = message


class AttachConnectionFailed(Exception):
    """No connection to the engine, or it was lost before the data was delivered."""


_HEADERS, _RAW, _ERROR = "headers", "raw", "error"


@implementer(IHalfCloseableProtocol)
class AttachStdinProtocol(Protocol):
    """Sends the attach request, then ``data`` on the hijacked stream, then EOF."""

    #: once connected, a half-closeable stream transport (loseWriteConnection)
    transport: Any

    def __init__(self, path: str, data: bytes, done: Deferred, engine_host: str) -> None:
        self._request = (
            "POST %s?stream=1&stdin=1&stdout=0&stderr=0 HTTP/1.1\r\n"
            "Host: docker\r\n"
            "Content-Type: text/plain\r\n"
            "Content-Length: 0\r\n"
            "Connection: Upgrade\r\n"
            "Upgrade: tcp\r\n"
            "\r\n" % (path,)).encode("ascii")
        self._data = data
        self._done = done
        self._host = engine_host
        self._state = _HEADERS
        self._buffer = b""
        self._status = 0
        self._body_length: Optional[int] = None
        self._chunked = False
        self.delivered = False

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self._state == _RAW:
            return                      # stdout/stderr were not asked for
        self._buffer += data
        if self._state == _HEADERS:
            head, sep, rest = self._buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            lines = head.decode("latin-1").split("\r\n")
            try:
                self._status = int(lines[0].split(" ", 2)[1])
            except (IndexError, ValueError):
                self._fail(AttachConnectionFailed(
                    "the Docker engine at %s answered the attach with %r"
                    % (self._host, lines[0])))
                return
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self._buffer = rest
            if self._status in (101, 200):
                self._state = _RAW
                self._buffer = b""
                self.transport.write(self._data)
                self.transport.loseWriteConnection()
                return
            self._state = _ERROR
            if "content-length" in headers:
                self._body_length = int(headers["content-length"])
            self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if self._state == _ERROR:
            body = self._error_body()
            if body is not None:
                self._fail(AttachRefused(self._status, error_message(body)))
                self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        # everything we wrote, and then EOF, has been handed to the engine
        if self._state == _RAW:
            self.delivered = True
            if not self._done.called:
                self._done.callback(None)
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def _error_body(self) -> Optional[bytes]:
        if self._body_length is not None:
            if len(self._buffer) >= self._body_length:
                return self._buffer[:self._body_length]
            return None
        if self._chunked:
            if not self._buffer.endswith(b"0\r\n\r\n"):
                return None
            body, rest = b"", self._buffer
            while rest:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0] or b"0", 16)
                if size == 0:
                    break
                body, rest = body + rest[:size], rest[size + 2:]
            return body
        return None

    def _fail(self, error: Exception) -> None:
        if not self._done.called:
            self._done.errback(Failure(error))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        if self._state == _RAW:
            self._fail(AttachConnectionFailed(
                "the Docker engine at %s closed the attach connection before the data"
                " was written: %s" % (self._host, reason.getErrorMessage())))
        elif self._state == _ERROR:
            self._fail(AttachRefused(self._status, error_message(self._buffer)))
        else:
            self._fail(AttachConnectionFailed(
                "the Docker engine at %s closed the attach connection before answering: %s"
                % (self._host, reason.getErrorMessage())))


def error_message(body: bytes) -> str:
    """The ``message`` of a Docker error body (JSON), or the body as text."""
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict) and "message" in parsed:
            return str(parsed["message"])
    except ValueError:
        pass
    return body.decode("utf-8", "replace").strip() or "(no message)"


def attach_stdin(endpoint: IStreamClientEndpoint, path: str, data: bytes, reactor: IReactorTime,
                 timeout: float = 30.0,
                 engine_host: str = "the Docker engine") -> Deferred:
    """Connect with ``endpoint``, attach at ``path``, deliver ``data``, close stdin.

    Fires None once the data and EOF have been handed to the engine; fails
    with :class:`AttachRefused` (an HTTP error, e.g. no such container) or
    :class:`AttachConnectionFailed`.
    """
    done: Deferred = Deferred()
    protocols: List[AttachStdinProtocol] = []

    def build() -> AttachStdinProtocol:
        proto = AttachStdinProtocol(path, data, done, engine_host)
        protocols.append(proto)
        return proto

    def connect_failed(failure: Failure) -> None:
        if not done.called:
            done.errback(AttachConnectionFailed(
                "cannot reach the Docker engine at %s: %s"
                % (engine_host, failure.getErrorMessage())))

    connecting = endpoint.connect(Factory.forProtocol(build))
    connecting.addErrback(connect_failed)

    def timed_out() -> None:
        if done.called:
            return
        proto = protocols[0] if protocols else None
        done.errback(AttachConnectionFailed(
            "the attach to the container's stdin did not complete within %g s" % timeout))
        if proto is not None and proto.transport is not None:
            proto.transport.abortConnection()
        elif not connecting.called:
            connecting.cancel()

    timer = reactor.callLater(timeout, timed_out)

    def cancel_timer(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result
    done.addBoth(cancel_timer)
    return done
