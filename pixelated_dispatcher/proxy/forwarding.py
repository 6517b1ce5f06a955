"""Sending a browser's request to its user's agent and the answer back.

:class:`IForwarder` is the seam: the session gate decides *whom* a request
belongs to and hands it to a forwarder with the agent's address.
:class:`StreamingForwarder` is the one in use. It keeps the server side a
plain ``twisted.web`` resource tree and replaces the client side of
``twisted.web.proxy.ReverseProxyResource`` with :mod:`.agent_client`:

* HTTP/1.1 to the agent over kept-alive, pooled connections (the stock
  resource opens a new HTTP/1.0 connection per request);
* the request body goes from the file ``twisted.web`` spooled it into
  (memory up to 100 kB, a temporary file above) to the agent with
  back-pressure, never read whole into memory;
* the response streams back with back-pressure: a slow browser pauses the
  agent's connection instead of filling the proxy's memory;
* headers pass through :mod:`.header_policy` in both directions (repeated
  headers and several ``Set-Cookie`` kept, hop-by-hop dropped,
  ``X-Forwarded-*`` set, the dispatcher's cookies kept away, ``Location``
  pointing at the agent's loopback address moved to the public origin);
* ``HEAD``, ``204``/``304`` and chunked answers are framed correctly
  (``twisted.web`` re-chunks bodies of unknown length);
* when the browser leaves, the agent connection is dropped at once;
* an agent that cannot be reached before it answered is reported to the
  caller (the session gate turns that into the "starting your mailbox"
  page or a 503), one that fails mid-answer cuts the browser's connection so
  the browser sees a truncated response rather than a wrong one;
* an agent that stays silent for ``--agent-timeout`` seconds while an answer
  is due (:mod:`.agent_client` times it) is hung, not gone: before the
  response head the browser gets ``504`` ("did not answer in time"), after
  it the browser's connection is cut; the agent connection is closed either
  way, and the agent is not restarted (its other connections carry on).

``Upgrade`` requests (WebSocket) go over a connection of their own; when the
agent answers ``101``, the browser's connection becomes a byte tunnel to the
agent (:meth:`.channel.ProxyChannel.become_tunnel`), with the ``101`` head
filtered by the same header policy. The tunnel has back-pressure both ways:
a side that does not read pauses the reading of the other, so a flood in
either direction waits in its sender rather than in the proxy.
"""
from typing import Any, Callable, List, Optional, Tuple

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, toChunk
from twisted.web.server import Request
from zope.interface import Interface, implementer

from ..protocol import AgentAddress
from . import pages
from .agent_client import AGENT_TIMEOUT, AgentConnection, AgentPool, AgentTimedOut, IExchange
from .browser_connection import client_ip
from .header_policy import (browser_response_head, request_head, request_header_pairs,
                            response_header_groups, switching_protocols_head)

log = Logger()

#: Methods that may be sent again on a fresh connection when a kept-alive
#: one turns out to have been closed by the agent before it answered.
IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"])

#: Answers up to this size are passed on without registering the agent's
#: connection as the browser's producer (they fit in the transport buffer).
SMALL_BODY = 64 * 1024

#: Methods whose requests carry a body (``Content-Length: 0`` when empty).
BODY_METHODS = frozenset([b"POST", b"PUT", b"PATCH"])

AgentGone = Callable[[Request], None]


def _discard(data: bytes) -> None:
    """``Request.write`` of an answer that has no body (``HEAD``, 204, 304),
    as twisted.web does it."""


class IForwarder(Interface):
    """Something that passes one browser request on to an agent."""

    def forward(request: Request, address: AgentAddress, agent_gone: AgentGone,
                user: str = "") -> None:
        """Send ``request`` to the agent at ``address`` (an
        :class:`~pixelated_dispatcher.protocol.AgentAddress`) and write the
        agent's answer to ``request``, finishing it. If the agent cannot be
        reached (refused, closed without answering), call
        ``agent_gone(request)`` instead, which answers the request.
        ``user`` (whose agent it is) names it in log lines."""

    def close() -> None:
        """Let go of every connection to an agent (the proxy stops)."""


def public_origin(request: Request) -> bytes:
    """``https://host[:port]`` as the browser addressed the proxy."""
    host = request.getHeader(b"host") or b"localhost"
    return (b"https://" if request.isSecure() else b"http://") + host


def body_of(request: Request) -> Tuple[Any, Optional[int]]:
    """The spooled request body and its length (None: the request has none)."""
    headers = request.requestHeaders
    if not (headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding")
            or request.method in BODY_METHODS):
        return None, None
    content = request.content
    if content is None:
        return None, 0
    content.seek(0, 2)
    length = content.tell()
    content.seek(0, 0)
    return content, length


@implementer(IExchange)
class Exchange:
    """One browser request forwarded to one agent."""

    __slots__ = ("_forwarder", "_request", "_address", "_head", "_body", "_length",
                 "_agent_gone", "_user", "_connection", "_gone", "_retried", "_producing",
                 "_head_out")

    def __init__(self, forwarder: "StreamingForwarder", request: Request,
                 address: Tuple[str, int], head: bytes, body: Any,
                 length: Optional[int], agent_gone: AgentGone, user: str = "") -> None:
        self._forwarder = forwarder
        self._request = request
        self._address = address
        self._head = head
        self._body = body
        self._length = length
        self._agent_gone = agent_gone
        self._user = user
        self._connection: Optional[AgentConnection] = None
        self._gone = False
        self._retried = False
        self._producing = False
        self._head_out: Optional[bytes] = None

    def start(self) -> None:
        self._request.notifyFinish().addErrback(self._browser_gone)
        connection = self._forwarder.pool.idle_connection(self._address)
        if connection is not None:
            self._send(connection)
        else:
            self._connect()

    def _connect(self) -> None:
        self._forwarder.pool.connect(self._address).addCallbacks(
            self._send, self._connect_failed)

    def _send(self, connection: AgentConnection) -> None:
        if self._gone:
            connection.abort()
            return
        self._connection = connection
        if self._body is not None:
            self._body.seek(0, 0)
        connection.send(self, self._head, self._body, self._length or 0,
                        self._request.method == b"HEAD")

    def _connect_failed(self, reason: Failure) -> None:
        if self._gone:
            return
        self._unreachable(reason)

    def _unreachable(self, reason: Failure) -> None:
        log.info("Agent at {host}:{port} unreachable: {why}", host=self._address[0],
                 port=self._address[1], why=reason.getErrorMessage())
        self._forwarder.pool.forget_agent(self._address)
        self._agent_gone(self._request)

    def _browser_gone(self, reason: Failure) -> None:
        self._gone = True
        connection, self._connection = self._connection, None
        if connection is not None and connection.exchange is self:
            connection.abort()

    # --- IExchange -------------------------------------------------------------

    def response_head(self, code: int, reason: bytes,
                      headers: List[Tuple[bytes, bytes]], length: Optional[int]) -> None:
        request = self._request
        if self._gone:
            return
        request.setResponseCode(code, reason or None)
        groups = response_header_groups(
            headers, agent_authorities=self._forwarder.authorities(self._address),
            public_origin=public_origin(request) if b"location" in
            [name for name, _ in headers] else None)
        no_body = request.method == b"HEAD" or code in NO_BODY_CODES
        if length is None:
            groups.pop(b"content-length", None)
        chunked = (length is None and not no_body and request.clientproto == b"HTTP/1.1")
        if request.cookies:
            groups.setdefault(b"set-cookie", []).extend(request.cookies)
        # The head goes out with the first piece of the body, in one write
        # (one TLS record for a small answer), built here rather than by
        # twisted.web's Request.write: the same bytes for less work.
        self._head_out = browser_response_head(
            request.clientproto, code, request.code_message,
            request.responseHeaders.getAllRawHeaders(), groups, chunked)
        request.startedWriting = 1
        request.chunked = 1 if chunked else 0
        if no_body:
            request.write = _discard  # type: ignore[method-assign]
        if length is None or length > SMALL_BODY:
            # Back-pressure: a slow browser pauses the agent's connection.
            request.registerProducer(self._connection, True)
            self._producing = True

    def response_data(self, data: bytes) -> None:
        if self._gone:
            return
        head = self._head_out
        if head is None:
            self._request.write(data)
            return
        self._head_out = None
        request = self._request
        request.sentLength += len(data)
        if request.chunked:
            request.channel.writeSequence([head, *toChunk(data)])
        else:
            request.channel.writeSequence([head, data])

    def response_done(self) -> None:
        if self._gone:
            return
        request = self._request
        head = self._head_out
        if head is not None:
            self._head_out = None
            request.channel.write(head)
        if self._producing:
            self._producing = False
            request.unregisterProducer()
        self._connection = None
        request.finish()

    def exchange_failed(self, reason: Failure, answered: bool) -> None:
        if self._gone:
            return
        request = self._request
        connection, self._connection = self._connection, None
        if self._producing:
            self._producing = False
            request.unregisterProducer()
        if reason.check(AgentTimedOut):
            self._timed_out(answered)
            return
        if not answered:
            if (connection is not None and connection.reused and not self._retried
                    and (request.method in IDEMPOTENT or self._length is None)):
                # A kept-alive connection the agent had closed meanwhile.
                self._retried = True
                self._connect()
                return
            self._unreachable(reason)
            return
        log.warn("Agent at {host}:{port} failed mid-answer: {why}",
                 host=self._address[0], port=self._address[1],
                 why=reason.getErrorMessage())
        self._cut_response()

    def _cut_response(self) -> None:
        """The head is out: the only honest thing left is to cut the
        response, so the browser sees it incomplete rather than short."""
        transport = getattr(self._request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _timed_out(self, answered: bool) -> None:
        """The agent is hung (its connection is already closed): no retry,
        no restart; a 504 if the browser has no head yet."""
        log.warn("Agent of {user} at {host}:{port} sent nothing for {seconds:g} s {when} "
                 "a {method} request: {outcome}; agent connection closed",
                 user=self._user or "(unknown user)",
                 host=self._address[0], port=self._address[1],
                 seconds=self._forwarder.pool.agent_timeout,
                 when="in the middle of answering" if answered else "after",
                 method=self._request.method.decode("ascii", "replace"),
                 outcome="browser connection cut" if answered else "504 to the browser")
        if answered:
            self._cut_response()
        else:
            pages.agent_timed_out(self._request)


def wants_upgrade(request: Request) -> bool:
    """Whether the browser asks to switch protocols (WebSocket) on a channel
    that can become a tunnel."""
    if not request.requestHeaders.hasHeader(b"upgrade"):
        return False
    tokens = b",".join(request.requestHeaders.getRawHeaders(b"connection", [])).lower()
    return (b"upgrade" in [t.strip() for t in tokens.split(b",")]
            and hasattr(request.channel, "become_tunnel"))


class UpgradeExchange(Exchange):
    """A request asking to switch protocols: on ``101`` the browser's
    connection and a dedicated agent connection are spliced together."""

    __slots__ = ()

    def start(self) -> None:
        self._request.notifyFinish().addErrback(self._browser_gone)
        self._connect()  # never a pooled connection: it will not come back

    def _send(self, connection: AgentConnection) -> None:
        if self._gone:
            connection.abort()
            return
        self._connection = connection
        connection.send(self, self._head, None, 0, False, upgrade=True)

    def switched(self, headers: List[Tuple[bytes, bytes]], rest: bytes) -> None:
        request = self._request
        connection = self._connection
        if self._gone or connection is None:
            return
        channel: Any = request.channel  # a ProxyChannel
        transport: Any = channel.transport
        transport.write(switching_protocols_head(
            headers, agent_authorities=self._forwarder.authorities(self._address),
            public_origin=public_origin(request)))
        if rest:
            transport.write(rest)
        agent: Any = connection.transport

        def browser_lost(reason: Any) -> None:
            self._gone = True
            connection.close_tunnel()
        # Back-pressure both ways, as twisted.protocols.portforward: the
        # agent's full transport pauses the browser's reading, the browser's
        # full transport pauses the agent connection.
        connection.link_tunnel(transport)
        channel.become_tunnel(agent.write, browser_lost, connection)

    def tunnel_data(self, data: bytes) -> None:
        if not self._gone:
            channel: Any = self._request.channel  # a ProxyChannel
            channel.transport.write(data)

    def tunnel_closed(self) -> None:
        if not self._gone:
            self._gone = True
            channel: Any = self._request.channel  # a ProxyChannel
            channel.end_tunnel()  # else the transport waits for its producer
            channel.transport.loseConnection()


@implementer(IForwarder)
class StreamingForwarder:
    """Forwards requests over a pool of kept-alive HTTP/1.1 connections."""

    def __init__(self, reactor: Any, pool: Optional[AgentPool] = None, *,
                 agent_timeout: float = AGENT_TIMEOUT) -> None:
        """``agent_timeout`` (seconds, 0: none) applies to the pool made here;
        a given ``pool`` keeps its own."""
        self.reactor = reactor
        self.pool = (pool if pool is not None
                     else AgentPool(reactor, agent_timeout=agent_timeout))
        self._authorities: dict = {}

    def authorities(self, address: Tuple[str, int]) -> Tuple[bytes, ...]:
        """How an agent at ``address`` may name itself in a ``Location``."""
        found = self._authorities.get(address)
        if found is None:
            host, port = address
            names = {host, "localhost", "127.0.0.1", "[::1]"}
            found = tuple(("%s:%d" % (name, port)).encode("ascii") for name in names)
            if port == 80:
                found += tuple(name.encode("ascii") for name in names)
            self._authorities[address] = found
        return found

    def forward(self, request: Request, address: AgentAddress,
                agent_gone: AgentGone, user: str = "") -> None:
        upgrade = wants_upgrade(request)
        body, length = body_of(request)
        pairs = request_header_pairs(request.requestHeaders, client_ip=client_ip(request),
                                     secure=request.isSecure(), upgrade=upgrade)
        head = request_head(request.method, request.uri, pairs, length)
        if upgrade:
            UpgradeExchange(self, request, (address.host, address.port), head, body,
                            length, agent_gone, user).start()
        else:
            Exchange(self, request, (address.host, address.port), head, body, length,
                     agent_gone, user).start()

    def close(self) -> None:
        self.pool.close()
