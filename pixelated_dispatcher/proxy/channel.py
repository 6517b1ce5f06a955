"""The browser's HTTP/1.1 connection: strict about what it accepts, and able
to become a raw tunnel after an ``Upgrade``.

``twisted.web``'s ``HTTPChannel`` accepts things a front-end proxy must not
pass on, and which versions refuse differs (22.4 keeps CR inside values,
folds continuation lines, accepts ``Transfer-Encoding`` next to
``Content-Length`` in some orders, and closes over-long lines without a
word). :class:`ProxyChannel` checks every line itself, the same way on every
Twisted, *before* ``HTTPChannel`` sees it, and answers ``400 Bad Request``
and closes the connection for:

* a request line that is not ``METHOD SP target SP HTTP/1.x`` in visible
  ASCII;
* a header line with a bad name, a value holding CR, LF, NUL or another
  control character (header injection), or an obsolete folded line;
* ``Content-Length`` together with ``Transfer-Encoding``, more than one
  ``Content-Length`` or ``Transfer-Encoding`` header, a ``Content-Length``
  that is not a number, a ``Transfer-Encoding`` other than ``chunked``;
* several ``Host`` headers, or none on HTTP/1.1;
* a line over :attr:`MAX_LENGTH` bytes, more than :attr:`maxHeaders`
  headers, or more than :attr:`totalHeadersSize` bytes of head.

Nothing of such a request reaches the resource tree, so no agent sees it.

Request bodies are spooled by ``twisted.web`` (to a temporary file above
100 kB) before anything is rendered, so who may send one is decided here,
from the head, before a byte of body is accepted (and before ``100
Continue`` is sent):

* the proxy's own pages (``/auth/...``: the login and logout forms) may
  carry at most :data:`MAX_ANONYMOUS_BODY`, with or without a session;
* a request for an agent may carry a body (up to :data:`MAX_BODY`) only
  once its session cookie resolved to a live session. Reading stops
  (the transport is paused) while the session is resolved over AMP; at most
  what one ``recv`` already brought (:data:`TRANSPORT_BUFFER`) is held
  meanwhile, in memory. Without a session (no cookie, a bogus, expired or
  revoked one) the body is never read: the request is handed to the
  resource tree with an empty body, which answers it (``401`` for
  scripts, the login page for browsers) and the connection closes.

Above a limit the answer is ``413`` and the connection closes. Chunked
bodies are counted as they arrive.

:meth:`ProxyChannel.become_tunnel` turns the connection into a byte pipe to
an agent once the agent accepted an ``Upgrade`` (WebSocket): a byte-level
tunnel rather than ``twisted.web.websocket`` (Twisted 25.5+ only). The
tunnel has back-pressure both ways, as ``twisted.protocols.portforward``
does it: the agent's side takes the channel's place as the producer
registered with the browser's transport (a browser that does not read pauses
the agent), and the agent's transport pauses the browser's reading (see
:meth:`.agent_client.AgentConnection.link_tunnel`).
"""
import re
from typing import Any, Callable, List, Optional

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

from .cookie_policy import session_token
from .twisted_internals import (forget_body_decoder, handling_request, hold_for_later,
                                network_producer, refuse_bad_request, take_held)

_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [\x21-\x7e]+ HTTP/1\.[01]")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Control characters other than horizontal tab, and DEL.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: First letters (lower case) of the headers counted below.
_FRAMING_INITIALS = frozenset(b"cth")


#: Largest request body of a logged-in browser (attachments, imports).
MAX_BODY = 4 * 2 ** 30
#: Largest request body without a session cookie (the login form).
MAX_ANONYMOUS_BODY = 64 * 1024

_TOO_LARGE = (b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n"
              b"Content-Length: 0\r\n\r\n")

#: Bytes read per ``recv`` and buffered for writing before the producer
#: (the agent connection) is paused: large enough that a big download is not
#: paused and resumed every 64 KiB, small enough to bound memory per browser.
TRANSPORT_BUFFER = 512 * 1024


def widen_buffers(transport: Any) -> None:
    """Let a TCP transport (or the TCP under a TLS one) read and buffer
    :data:`TRANSPORT_BUFFER` bytes at a time, and send small answers at once
    (no Nagle delay)."""
    while transport is not None:
        if hasattr(transport, "SEND_LIMIT") and hasattr(transport, "bufferSize"):
            transport.bufferSize = TRANSPORT_BUFFER
            transport.SEND_LIMIT = TRANSPORT_BUFFER
            try:
                transport.setTcpNoDelay(True)
            except (AttributeError, OSError):
                pass  # not TCP (a Unix socket listener)
            return
        transport = getattr(transport, "transport", None)


class ProxyChannel(HTTPChannel):
    """``HTTPChannel`` that refuses malformed and ambiguous requests."""

    #: Longest request line or header line.
    MAX_LENGTH = 8192
    #: Request line plus all headers.
    totalHeadersSize = 16384
    maxHeaders = 100

    #: connected: the TCP or TLS transport (a producer and consumer too)
    transport: Any
    #: set by the site that made the channel (``ProxySite``)
    site: Any
    #: the request line being read: its target and protocol version, and how
    #: many ``Host`` headers came (set for every request before its headers)
    _px_target: bytes
    _px_version: bytes
    _px_host: int

    _px_body_limit = MAX_BODY
    _px_body_seen = 0
    _px_secure = None
    _px_host_address = None
    _px_peer_address = None

    def connectionMade(self) -> None:
        super().connectionMade()
        widen_buffers(self.transport)

    # These do not change during a connection; twisted.web asks several
    # times per request (an interface adaptation, a getsockname call).
    def isSecure(self) -> bool:
        secure = self._px_secure
        if secure is None:
            secure = self._px_secure = super().isSecure()
        return secure

    def getHost(self) -> Any:
        address = self._px_host_address
        if address is None:
            address = self._px_host_address = super().getHost()
        return address

    def getPeer(self) -> Any:
        address = self._px_peer_address
        if address is None:
            address = self._px_peer_address = super().getPeer()
        return address

    _px_in_head = False
    _px_refused = False
    _px_tunnel = False

    def _px_refuse(self) -> None:
        self._px_refused = True
        refuse_bad_request(self)

    def dataReceived(self, data: bytes) -> None:
        if self._px_refused:
            return
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        # Pipelined requests that arrive in one segment with the one being
        # handled: keep them for later, as Twisted 26 does (22.4 would hand
        # them to a body decoder that is gone).
        if self._px_refused:
            return
        if self._px_unread_body:
            # The body of a request without a session: never read, and the
            # connection closes after the answer.
            self._px_pause_reading()
            return
        if self._px_held_body is not None:
            # Body bytes that came with the head while the session resolves.
            self._px_held_body.append(data)
            self._px_pause_reading()
            return
        if handling_request(self):
            hold_for_later(self, data)
            return
        if self.length is None:  # chunked: count what comes
            self._px_body_seen += len(data)
            if self._px_body_seen > self._px_body_limit + 65536:
                return self._px_too_large()
        super().rawDataReceived(data)

    #: Body bytes received while the session is being resolved (else None).
    _px_held_body: Optional[List[bytes]] = None
    #: The current request's body is not read (no live session).
    _px_unread_body = False

    def allHeadersReceived(self) -> None:
        self._px_body_seen = 0
        if self._px_target.startswith(b"/auth/"):
            return self._px_grant_body(MAX_ANONYMOUS_BODY)
        if self.length == 0:
            return super().allHeadersReceived()  # no body: nothing to decide
        cache = getattr(self.site, "cache", None)
        request = self.requests[-1]
        request.parseCookies()
        token = session_token(request)
        if cache is None or token is None:
            return self._px_refuse_body()
        if cache.cached_user(token) is not None:
            return self._px_grant_body(MAX_BODY)
        # Resolve the session before a byte of the body is read.
        self._px_held_body = []
        self._px_pause_reading()
        self._px_deciding = True
        try:
            cache.resolve(token).addCallbacks(self._px_session_live, self._px_no_session)
        finally:
            self._px_deciding = False

    #: Inside :meth:`allHeadersReceived` (an answer that comes at once is
    #: acted on by ``HTTPChannel.lineReceived`` when it returns).
    _px_deciding = False

    def _px_pause_reading(self) -> None:
        producer = network_producer(self)
        producer.pauseProducing()

    def _px_grant_body(self, limit: int) -> None:
        self._px_body_limit = limit
        if self.length is not None and self.length > limit:
            return self._px_too_large()
        super().allHeadersReceived()

    def _px_refuse_body(self) -> None:
        """Hand the request on with an empty body (the resource tree answers
        "not logged in"); the body is never read, the connection closes
        after the answer."""
        self._px_unread_body = True
        self.length = 0
        forget_body_decoder(self)
        # No "100 Continue": the browser must not send the body.
        self.requests[-1].requestHeaders.removeHeader(b"expect")
        super().allHeadersReceived()
        self.persistent = False
        self._px_pause_reading()

    def _px_session_live(self, _username: str) -> None:
        held, self._px_held_body = self._px_held_body, None
        if self._px_refused or self.transport is None or self._px_lost:
            return
        self._px_grant_body(MAX_BODY)
        if self._px_refused:
            return
        if held:
            self.rawDataReceived(b"".join(held))
        if not self._px_refused and not self._px_lost:
            producer = network_producer(self)
            producer.resumeProducing()

    def _px_no_session(self, _failure: Any) -> None:
        self._px_held_body = None
        if self._px_refused or self._px_lost:
            return
        self._px_refuse_body()
        if not self._px_deciding:
            self.allContentReceived()

    _px_lost = False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._px_lost = True
        super().connectionLost(reason)

    def _px_too_large(self) -> None:
        self._px_refused = True
        self.transport.write(_TOO_LARGE)
        self.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._px_refuse()

    def lineReceived(self, line: bytes) -> None:
        if self._px_refused:
            return
        if handling_request(self):
            # A pipelined request while one is being handled (Twisted 22.4
            # keeps parsing lines here; 26 buffers): keep it for later.
            hold_for_later(self, line + b"\r\n")
            self.setRawMode()
            return
        if self._px_in_head:
            if not line:
                self._px_in_head = False
                if self._px_host != 1 and (self._px_host or self._px_version == b"HTTP/1.1"):
                    return self._px_refuse()
            elif not self._px_header_ok(line):
                return self._px_refuse()
        elif line:
            if _REQUEST_LINE.fullmatch(line) is None:
                return self._px_refuse()
            self._px_in_head = True
            self._px_version = line[-8:]
            self._px_target = line.split(b" ", 2)[1]
            self._px_host = 0
            self._px_length = 0
            self._px_transfer = 0
        super().lineReceived(line)

    def _px_header_ok(self, line: bytes) -> bool:
        colon = line.find(b":")
        if colon <= 0 or _HEADER_NAME.fullmatch(line, 0, colon) is None:
            return False  # also catches folded lines (leading space or tab)
        if _BAD_VALUE.search(line, colon) is not None:
            return False
        if line[0] | 0x20 not in _FRAMING_INITIALS:
            return True
        lower = line[:colon].lower()
        value = line[colon + 1:]
        if lower == b"content-length":
            self._px_length += 1
            value = value.strip(b" \t")
            return (self._px_length == 1 and not self._px_transfer
                    and value.isdigit() and len(value) <= 18)
        if lower == b"transfer-encoding":
            self._px_transfer += 1
            return (self._px_transfer == 1 and not self._px_length
                    and value.strip(b" \t").lower() == b"chunked")
        if lower == b"host":
            self._px_host += 1
        return True

    # --- the tunnel ----------------------------------------------------------

    _px_tunnel_agent = None

    def become_tunnel(self, to_agent: Callable[[bytes], Any],
                      lost: Callable[[Any], Any], agent: Any = None) -> None:
        """From now on, every byte from the browser goes to ``to_agent`` and
        the end of the connection to ``lost``; HTTP parsing stops.

        ``agent``, an ``IPushProducer`` (the agent's connection), replaces the
        channel as the producer registered with the browser's transport: while
        the browser does not read and the transport's buffer is full, the
        agent is paused. :meth:`end_tunnel` unregisters it again."""
        self._px_tunnel = True
        self.setTimeout(None)
        transport: Any = self.transport
        if agent is not None and transport is not None \
                and IPushProducer.providedBy(self.transport):
            # HTTPChannel.connectionMade registered the channel itself, which
            # would pause only a request's producer; a transport takes one.
            transport.unregisterProducer()
            transport.registerProducer(agent, True)
            self._px_tunnel_agent = agent
        buffered = take_held(self)
        self.dataReceived = to_agent  # type: ignore[method-assign,assignment]

        def connection_lost(reason: Any) -> None:
            self.end_tunnel()
            lost(reason)
            # Let the request learn it is over (notifyFinish), as usual.
            HTTPChannel.connectionLost(self, reason)
        self.connectionLost = connection_lost  # type: ignore[method-assign,assignment]
        if transport is not None:
            transport.resumeProducing()  # before the agent may pause it again
        if buffered:
            to_agent(buffered)

    def end_tunnel(self) -> None:
        """Unregister the agent's side from the browser's transport (once),
        before it is closed: a TLS transport does not close while a producer
        is registered, a TCP one not while that producer is paused."""
        if self._px_tunnel_agent is not None:
            self._px_tunnel_agent = None
            self.transport.unregisterProducer()
