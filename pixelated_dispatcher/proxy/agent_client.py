"""HTTP/1.1 to the agents over kept-alive connections: a lean client, one
pool per proxy.

The forwarding path is the proxy's hot path, so this client does no more than
forwarding needs: it writes a request head that the caller built (one
``write``), sends the body from a file with back-pressure, parses the status
line and headers of the answer, and hands the body to its
:class:`IExchange` as it arrives (``Content-Length``, chunked or
until-close framing), decoded, without buffering it. The exchange decides
what reaches the browser and may pause and resume the connection (the
browser's back-pressure).

A connection returns to the pool after a complete, keep-alive answer to a
completely sent request; anything else (the browser left, the agent said
``close``, the body was framed by closing) closes it. Idle connections are
closed after :data:`IDLE_TIMEOUT` seconds, and at most :data:`MAX_IDLE` are
kept per agent.

A hung agent (deadlocked, stopped, swapping) accepts a connection and then
says nothing. While an answer is due, the pool's ``agent_timeout`` (the
proxy's ``--agent-timeout``, nginx's ``proxy_read_timeout``) bounds how long
the agent may stay silent: from the moment the request is written until the
response head, and between two reads of the body. Any byte from the agent
restarts it, and so does the agent taking another piece of a large request
body (one that stops reading an upload is just as hung). It is suspended
while the browser's back-pressure keeps the connection paused (a slow
browser is not the agent's fault), stops with the response, and does not
apply to a switched (``101``) tunnel, where silence is normal. When it runs
out, the connection is aborted (never pooled again) and the exchange fails
with :class:`AgentTimedOut`. It costs one ``callLater`` per request and a
timestamp per read.

A switched tunnel has back-pressure both ways: the connection is the
producer registered with the browser's transport (a browser that does not
read pauses the agent), and the browser's reading is the producer registered
with the connection's transport (an agent that does not read pauses the
browser), as in ``twisted.protocols.portforward``; either side's end
unregisters both and closes the other.

Only documented Twisted APIs that exist since 22.4 are used.
"""
from typing import Any, Dict, List, Optional, Tuple, cast

import attr
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

#: Longest response head (status line and headers) accepted from an agent.
MAX_HEAD = 64 * 1024

#: Idle connections kept per agent address.
MAX_IDLE = 64

#: Seconds an idle connection is kept.
IDLE_TIMEOUT = 60.0

#: Seconds to wait for a TCP connection to an agent.
CONNECT_TIMEOUT = 10.0

#: Seconds an agent may stay silent while an answer is due (0: forever).
AGENT_TIMEOUT = 60.0

#: Request bodies up to this size are written together with the head.
INLINE_BODY = 64 * 1024

NO_BODY_CODES = frozenset([204, 304])


class AgentProtocolError(Exception):
    """The agent answered something that is not HTTP/1.x."""


def parse_status_line(line: bytes) -> Tuple[int, bytes, bool]:
    """``(code, reason, http11)`` of an agent's status line
    (``HTTP/1.1 200 OK``); :class:`AgentProtocolError` if it is not HTTP/1.x."""
    status = line.split(b" ", 2)
    if len(status) < 2 or not status[0].startswith(b"HTTP/1.") \
            or len(status[1]) != 3 or not status[1].isdigit():
        raise AgentProtocolError("not an HTTP/1.x status line")
    return int(status[1]), status[2] if len(status) > 2 else b"", status[0] == b"HTTP/1.1"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ResponseFraming:
    """What a response head says about itself and its body."""
    #: ``(lower-case name, value)`` in the agent's order
    headers: List[Tuple[bytes, bytes]]
    #: ``Content-Length``, or None
    length: Optional[int]
    #: ``Transfer-Encoding: chunked`` (then ``length`` does not count)
    chunked: bool
    #: whether the connection may carry another request afterwards
    keep_alive: bool


def parse_header_lines(lines: List[bytes], keep_alive: bool) -> ResponseFraming:
    """The header lines of a response head (``lines[0]``, the status line,
    is skipped); ``keep_alive`` is what the protocol version implies.
    :class:`AgentProtocolError` for a malformed line or conflicting lengths."""
    headers: List[Tuple[bytes, bytes]] = []
    length: Optional[int] = None
    chunked = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in b" \t" or name[:1] in b" \t":
            raise AgentProtocolError("bad header line")
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise AgentProtocolError("bad Content-Length")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value.lower().endswith(b"chunked")
            if not chunked:
                keep_alive = False
        elif name == b"connection":
            tokens = value.lower()
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
        headers.append((name, value))
    return ResponseFraming(headers, length, chunked, keep_alive)


class AgentTimedOut(Exception):
    """The agent stayed silent longer than the pool's ``agent_timeout``
    while an answer was due."""


class IExchange(Interface):
    """One request to an agent, as the client reports its progress."""

    def response_head(code: int, reason: bytes, headers: List[Tuple[bytes, bytes]],
                      length: Optional[int]) -> None:
        """The status line and headers arrived. ``headers`` is a list of
        ``(name, value)`` byte pairs in the agent's order, with ``name``
        lower-cased; ``length`` is the body length when the agent gave
        ``Content-Length``, else None."""

    def response_data(data: bytes) -> None:
        """A piece of the (de-chunked) body."""

    def response_done() -> None:
        """The body is complete."""

    def exchange_failed(reason: Failure, answered: bool) -> None:
        """The exchange ended early (``answered``: whether the head had
        arrived). Never called after ``response_done``."""


class _ChunkedDecoder:
    """``Transfer-Encoding: chunked``, decoded as it arrives."""

    __slots__ = ("_data", "_done", "_remaining", "_buffer", "_state")

    def __init__(self, data: Any, done: Any) -> None:
        self._data = data
        self._done = done
        self._remaining = 0
        self._buffer = b""
        self._state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailers

    def feed(self, data: bytes) -> bytes:
        """Decode ``data``; return what follows the body (if it ended)."""
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        while buffer:
            state = self._state
            if state == 1:
                n = self._remaining
                if len(buffer) <= n:
                    self._remaining = n - len(buffer)
                    self._data(buffer)
                    if self._remaining == 0:
                        self._state = 2
                    return b""
                self._data(buffer[:n])
                buffer = buffer[n:]
                self._remaining = 0
                self._state = 2
            elif state == 0 or state == 2 or state == 3:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 4096:
                        raise AgentProtocolError("chunk line too long")
                    self._buffer = buffer
                    return b""
                line = buffer[:end]
                buffer = buffer[end + 2:]
                if state == 2:
                    if line:
                        raise AgentProtocolError("no CRLF after a chunk")
                    self._state = 0
                elif state == 0:
                    size = line.split(b";", 1)[0].strip()
                    try:
                        self._remaining = int(size, 16)
                    except ValueError:
                        raise AgentProtocolError("bad chunk size")
                    if self._remaining < 0:
                        raise AgentProtocolError("bad chunk size")
                    self._state = 1 if self._remaining else 3
                elif not line:  # end of trailers
                    self._done()
                    return buffer
        return b""


@implementer(IPushProducer)
class AgentConnection(Protocol):
    """One kept-alive HTTP/1.1 connection to one agent."""

    #: once connected, a TCP transport (also a producer and consumer, with
    #: abortConnection): more than ``ITransport`` says
    transport: Any

    def __init__(self, pool: "AgentPool", address: Tuple[str, int]) -> None:
        self._pool = pool
        self.address = address
        self.exchange: Any = None  # the IExchange in progress, or None
        self.reused = False
        self.lost = False
        self.idle_since = 0.0
        self.connected_deferred: Optional[Deferred] = None
        #: When the agent last gave a sign of life (a read, or taking a
        #: piece of the request body) during the current exchange.
        self.heard_at = 0.0
        self._seconds = pool._reactor.seconds
        self._deadline: Optional[IDelayedCall] = None
        self._reset()

    def connectionMade(self) -> None:
        from .channel import widen_buffers
        widen_buffers(self.transport)
        d, self.connected_deferred = self.connected_deferred, None
        if d is not None:
            d.callback(self)

    def _reset(self) -> None:
        self._head = b""
        self._in_head = True
        self._answered = False
        self._no_body = False
        self._remaining: Optional[int] = None
        self._chunked: Optional[_ChunkedDecoder] = None
        self._keep_alive = True
        self._body_sent = True
        self._sender: Optional[FileSender] = None
        self._paused = False
        self._upgrade = False
        self._tunnel = False

    # --- sending -------------------------------------------------------------

    def send(self, exchange: Any, head: bytes, body: Any, length: int,
             no_body: bool, upgrade: bool = False) -> None:
        """Write a request: ``head`` ends with the blank line; ``body`` is a
        file with ``length`` bytes from its current position (or None);
        ``no_body`` says the answer has no body (``HEAD``); with ``upgrade``
        a ``101`` answer turns the connection into a tunnel (the exchange's
        ``switched``, ``tunnel_data`` and ``tunnel_closed``)."""
        self._reset()
        self.exchange = exchange
        self._no_body = no_body
        self._upgrade = upgrade
        transport = self.transport
        if not length:
            transport.write(head)
        elif length <= INLINE_BODY:
            transport.write(head + body.read(length))
        else:
            transport.write(head)
            self._body_sent = False
            self._sender = FileSender()
            self._sender.CHUNK_SIZE = 65536
            d = self._sender.beginFileTransfer(body, _BodyConsumer(self, transport))
            d.addCallbacks(self._body_done, self._body_failed)
        self._start_deadline()

    def _body_done(self, _: Any) -> None:
        # The transport asked for more, so the agent took the last piece:
        # the wait for its answer starts now.
        self.heard_at = self._seconds()
        self._body_sent = True
        self._sender = None
        if self.exchange is None and not self.lost:
            # The answer came before the whole body went: not reusable.
            self.transport.loseConnection()

    def _body_failed(self, reason: Failure) -> None:
        self._sender = None
        if not self.lost:
            self.transport.abortConnection()

    # --- receiving -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Nothing was asked: an idle agent has nothing to say.
            self.transport.abortConnection()
            return
        if self._tunnel:
            exchange.tunnel_data(data)
            return
        self.heard_at = self._seconds()
        try:
            if self._in_head:
                body = self._parse_head(data)
                if body is None or self.exchange is None:
                    return
                data = body
            if self._chunked is not None:
                rest = self._chunked.feed(data)
                if rest and self.exchange is None:
                    self.transport.abortConnection()
            elif self._remaining is None:
                if data:
                    exchange.response_data(data)
            else:
                n = self._remaining
                if len(data) < n:
                    self._remaining = n - len(data)
                    exchange.response_data(data)
                else:
                    if n:
                        exchange.response_data(data[:n] if len(data) > n else data)
                    self._remaining = 0
                    if len(data) > n:
                        self._keep_alive = False
                    self._finished()
        except AgentProtocolError as e:
            self._fail(Failure(e))

    def _parse_head(self, data: bytes) -> Optional[bytes]:
        """Take bytes of a response head: once it is complete, hand it to
        the exchange and return what follows it (body bytes), else None."""
        head = self._head + data if self._head else data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HEAD:
                raise AgentProtocolError("response head too long")
            self._head = head
            return None
        self._head = b""
        rest = head[end + 4:]
        lines = head[:end].split(b"\r\n")
        code, reason, http11 = parse_status_line(lines[0])
        if 100 <= code < 200 and not (code == 101 and self._upgrade):
            # Interim answers (100 Continue, 103 Early Hints) are for this hop.
            return self._parse_head(rest) if rest else None
        framing = parse_header_lines(lines, keep_alive=http11)
        self._in_head = False
        self._answered = True
        self._keep_alive = framing.keep_alive
        if code == 101:
            # The agent switched protocols: from now on, raw bytes both ways,
            # and an idle tunnel is normal.
            self._stop_deadline()
            self._tunnel = True
            self._keep_alive = False
            self.exchange.switched(framing.headers, rest)
            return None
        return self._begin_body(code, reason, framing, rest)

    def _begin_body(self, code: int, reason: bytes, framing: "ResponseFraming",
                    rest: bytes) -> Optional[bytes]:
        """Hand the head to the exchange and get ready for the body its
        framing announces; the bytes that belong to the body, or None."""
        no_body = self._no_body or code in NO_BODY_CODES
        length = None if framing.chunked else framing.length
        exchange = self.exchange
        exchange.response_head(code, reason, framing.headers,
                               None if no_body and length is None else length)
        if self.exchange is None:
            return None
        if no_body:
            if rest:
                self._keep_alive = False
            self._finished()
            return None
        if framing.chunked:
            self._chunked = _ChunkedDecoder(exchange.response_data, self._finished)
        elif length is not None:
            self._remaining = length
            if length == 0:
                if rest:
                    self._keep_alive = False
                self._finished()
                return None
        else:
            self._keep_alive = False  # framed by closing
        return rest

    def _finished(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        self.exchange = None
        self._stop_deadline()
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        exchange.response_done()
        if self.lost:
            return
        if self._keep_alive and self._body_sent:
            self._pool._release(self)
        elif self._body_sent:
            self.transport.loseConnection()
        # else: _body_done closes it

    def _fail(self, reason: Failure) -> None:
        exchange = self.exchange
        self.exchange = None
        self._stop_deadline()
        if not self.lost:
            self.transport.abortConnection()
        if exchange is not None:
            exchange.exchange_failed(reason, self._answered)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = True
        self._stop_deadline()
        self._pool._forget(self)
        if self._sender is not None:
            self._sender.stopProducing()
        exchange = self.exchange
        if exchange is None:
            return
        if self._tunnel:
            self.exchange = None
            self._unlink_tunnel()
            exchange.tunnel_closed()
            return
        if not self._in_head and self._remaining is None and self._chunked is None:
            # Body framed by the end of the connection: this is the end.
            self.exchange = None
            exchange.response_done()
            return
        self.exchange = None
        exchange.exchange_failed(reason, self._answered)

    # --- the agent's silence ------------------------------------------------------

    def _start_deadline(self) -> None:
        """The request is on its way: from now on the agent must keep
        giving signs of life until the answer is complete."""
        self._stop_deadline()
        timeout = self._pool.agent_timeout
        if timeout and self.exchange is not None and not self.lost:
            self.heard_at = self._seconds()
            self._deadline = self._pool._reactor.callLater(timeout, self._deadline_passed)

    def _stop_deadline(self) -> None:
        deadline = self._deadline
        if deadline is not None:
            self._deadline = None
            deadline.cancel()

    def _deadline_passed(self) -> None:
        """Check the silence; wait on if the agent spoke meanwhile (cheaper
        than moving the timer at every read), else give up on it."""
        self._deadline = None
        timeout = self._pool.agent_timeout
        if not timeout or self.exchange is None or self.lost or self._tunnel:
            return
        now = self._seconds()
        if self._paused:
            self.heard_at = now  # the browser is the slow one
        silent = now - self.heard_at
        if silent < timeout:
            self._deadline = self._pool._reactor.callLater(timeout - silent,
                                                           self._deadline_passed)
            return
        self._fail(Failure(AgentTimedOut(
            "no answer from the agent for %g s" % (timeout,))))

    # --- what the exchange may do ---------------------------------------------

    def abort(self) -> None:
        """The browser went away: drop this exchange and the connection."""
        self.exchange = None
        self._stop_deadline()
        if not self.lost:
            self.transport.abortConnection()

    def pauseProducing(self) -> None:
        if not self._paused and not self.lost:
            self._paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._paused and not self.lost:
            self._paused = False
            # The agent's silence counts from here, not from the pause.
            self.heard_at = self._seconds()
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abort()

    # --- a switched tunnel ------------------------------------------------------

    #: The browser's reading, registered with this connection's transport.
    _peer_reading: Optional["_PeerReading"] = None

    def link_tunnel(self, peer: Any) -> None:
        """Back-pressure towards the browser in a switched tunnel: while this
        connection's transport cannot take more (the agent does not read),
        ``peer`` (the browser's transport, an ``IPushProducer``) does not
        read either. (The other way round, the browser's channel registers
        this connection with ``peer``.)"""
        if self.lost or self._peer_reading is not None:
            return
        reading = self._peer_reading = _PeerReading(peer)
        self.transport.registerProducer(reading, True)

    def close_tunnel(self) -> None:
        """The browser's side of the tunnel is gone: drop the agent's."""
        self._unlink_tunnel()
        self.abort()

    def _unlink_tunnel(self) -> None:
        if self._peer_reading is not None:
            self._peer_reading = None
            self.transport.unregisterProducer()


@implementer(IPushProducer)
class _PeerReading:
    """The reading of a tunnel's other side, as this side's transport
    pauses and resumes it. It is not stopped through here: the end of either
    side closes the other through the tunnel's own callbacks (a transport
    would close it as it goes, before TLS could say goodbye)."""

    __slots__ = ("_transport",)

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IConsumer)
class _BodyConsumer:
    """The agent's transport as the request body's ``FileSender`` sees it.

    ``FileSender`` is a pull producer: it writes the next piece only when the
    transport has passed the previous one to the kernel, i.e. when the agent
    is reading. Each piece is therefore a sign of life; an agent that stops
    reading an upload is as hung as one that stops answering."""

    __slots__ = ("_connection", "_transport")

    def __init__(self, connection: AgentConnection, transport: Any) -> None:
        self._connection = connection
        self._transport = transport

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()

    def write(self, data: bytes) -> None:
        connection = self._connection
        connection.heard_at = connection._seconds()
        self._transport.write(data)


class _ConnectingFactory(ClientFactory):
    """Makes one connection and fires ``deferred`` with it once connected."""

    noisy = False

    def __init__(self, pool: "AgentPool", address: Tuple[str, int]) -> None:
        self.pool = pool
        self.address = address
        self.deferred: Optional[Deferred] = Deferred()

    def buildProtocol(self, addr: Any) -> AgentConnection:
        connection = AgentConnection(self.pool, self.address)
        connection.connected_deferred, self.deferred = self.deferred, None
        return connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        d, self.deferred = self.deferred, None
        if d is not None:
            d.errback(reason)


class AgentPool:
    """Kept-alive connections to agents, keyed by ``(host, port)``."""

    def __init__(self, reactor: Any, *, max_idle: int = MAX_IDLE,
                 idle_timeout: float = IDLE_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 agent_timeout: float = AGENT_TIMEOUT) -> None:
        self._reactor = reactor
        #: Seconds an agent may stay silent while an answer is due; 0: forever.
        self.agent_timeout = agent_timeout
        self._idle: Dict[Tuple[str, int], List[AgentConnection]] = {}
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._sweeper: Any = None
        self.opened = 0

    def idle_connection(self, address: Tuple[str, int]) -> Optional[AgentConnection]:
        """A kept-alive connection to ``address``, if one is free."""
        idle = self._idle.get(address)
        while idle:
            connection = idle.pop()
            if not connection.lost:
                connection.reused = True
                return connection
        return None

    def connect(self, address: Tuple[str, int]) -> Deferred:
        """A Deferred new connection to ``address``."""
        factory = _ConnectingFactory(self, address)
        d = cast(Deferred, factory.deferred)  # set until the connection is made
        self._reactor.connectTCP(address[0], address[1], factory,
                                 timeout=self.connect_timeout)
        self.opened += 1
        return d

    def _release(self, connection: AgentConnection) -> None:
        idle = self._idle.setdefault(connection.address, [])
        if len(idle) >= self.max_idle:
            connection.transport.loseConnection()
            return
        connection.idle_since = self._reactor.seconds()
        idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self.idle_timeout / 4, self._sweep)

    def _forget(self, connection: AgentConnection) -> None:
        idle = self._idle.get(connection.address)
        if idle and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.address]

    def _sweep(self) -> None:
        self._sweeper = None
        limit = self._reactor.seconds() - self.idle_timeout
        for address, idle in list(self._idle.items()):
            for connection in [c for c in idle if c.idle_since <= limit]:
                idle.remove(connection)
                connection.transport.loseConnection()
            if not idle:
                del self._idle[address]
        if self._idle:
            self._sweeper = self._reactor.callLater(self.idle_timeout / 4, self._sweep)

    def forget_agent(self, address: Tuple[str, int]) -> None:
        """Close the idle connections to an agent that is gone."""
        for connection in self._idle.pop(address, []):
            connection.transport.loseConnection()

    def close(self) -> None:
        """Close every idle connection (at shutdown)."""
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for address in list(self._idle):
            self.forget_agent(address)

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())
