"""A proxy site in front of an agent stand-in, both on 127.0.0.1, and the
parts the forwarding tests share: the stand-in web app, an agent that
switches protocols, a browser that speaks raw bytes, and the request headers
of an XHR and of a navigation."""
import hashlib
import json
from typing import Any, Dict, List, Optional

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from pixelated_dispatcher.protocol import AgentAddress
from pixelated_dispatcher.testing.fake_manager import FakeManager
from pixelated_dispatcher.proxy.site import make_site

from .helpers import make_certificate, temporary_directory


class AgentStandIn(Resource):
    """A single-user web app: echoes what it received, sets cookies, or
    answers slowly, depending on the path."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.slow_started: Deferred = Deferred()
        self.slow_lost: Deferred = Deferred()

    def render(self, request: Any) -> Any:
        if request.path == b"/set-cookies":
            for cookie in (b"pixelated-session=stolen; Path=/",
                           b"__Host-pixelated-session=stolen; Path=/; Secure",
                           b"PIXELATED-CSRF=x", b"XSRF-TOKEN=abc; Path=/", b"lang=en"):
                request.responseHeaders.addRawHeader(b"set-cookie", cookie)
            return b"cookies set"
        if request.path == b"/created":
            request.setResponseCode(201)
            request.setHeader(b"location", b"/mails/1")
            request.setHeader(b"x-agent", b"demo")
            return b"created"
        if request.path == b"/port":
            return b"%d" % (request.getClientAddress().port,)
        if request.path == b"/sized":
            request.setHeader(b"content-length", b"1234")
            return b"x" * 1234 if request.method != b"HEAD" else b""
        if request.path == b"/cached":
            request.setResponseCode(304)
            request.setHeader(b"etag", b'"v1"')
            return b""
        if request.path == b"/chunked":
            request.write(b"first,")
            reactor.callLater(0.01, lambda: (request.write(b"second"), request.finish()))
            return NOT_DONE_YET
        if request.path == b"/elsewhere":
            request.setResponseCode(302)
            request.setHeader(b"location", b"http://127.0.0.1:%d/inbox?x=1"
                              % (request.getHost().port,))
            return b""
        if request.path == b"/slow":
            request.notifyFinish().addErrback(lambda f: self.slow_lost.callback(None))
            self.slow_started.callback(None)
            return NOT_DONE_YET
        body = request.content.read()
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "headers": {name.decode().lower(): [v.decode("latin-1") for v in values]
                        for name, values in request.requestHeaders.getAllRawHeaders()},
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }).encode()


XHR = {"X-Requested-With": "XMLHttpRequest"}


NAVIGATION = {"Accept": "text/html,*/*", "Sec-Fetch-Mode": "navigate"}


class UpgradingAgent(Protocol):
    """An agent that accepts a WebSocket-like upgrade, then echoes upper-cased."""

    def connectionMade(self) -> None:
        self.buffer = b""
        self.upgraded = False
        self.factory.heads.append(None)

    def dataReceived(self, data: bytes) -> None:
        if self.upgraded:
            self.transport.write(data.upper())
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            self.factory.heads[-1] = head
            self.upgraded = True
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: abc\r\n"
                                 b"Set-Cookie: pixelated-session=stolen\r\n\r\nHELLO")
            if rest:
                self.transport.write(rest.upper())


class ForwardingSetup(TestCase):
    """A proxy site in front of an agent stand-in, both on 127.0.0.1."""

    timeout = 20

    def setUp(self) -> None:
        self.listeners: List[WrappingFactory] = []
        self.agent = AgentStandIn()
        agent_port = self.listen(Site(self.agent))
        self.manager = FakeManager()
        self.manager.add_user("alice", "secret")
        self.manager.place_agent("alice", AgentAddress("127.0.0.1", agent_port))
        self.token = self.manager.open_session("alice")
        site = make_site(self.manager, reactor)
        self.addCleanup(site.forwarder.close)
        self.site = site
        self.proxy_port = self.listen(site)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def listen(self, factory: Factory) -> int:
        """Listen on 127.0.0.1:0; cleanup closes the port and its connections."""
        tracked = WrappingFactory(factory)
        self.listeners.append(tracked)
        port = reactor.listenTCP(0, tracked, interface="127.0.0.1")
        self.addCleanup(self.close_all, tracked, port)
        return port.getHost().port

    @inlineCallbacks
    def close_all(self, tracked: WrappingFactory, port: Any) -> Any:
        yield port.stopListening()
        for protocol in list(tracked.protocols):
            protocol.transport.loseConnection()
        while tracked.protocols:
            yield deferLater(reactor, 0.01, lambda: None)

    def url(self, path: str) -> str:
        return "http://127.0.0.1:%d%s" % (self.proxy_port, path)

    @inlineCallbacks
    def request(self, method: str, path: str, cookie: Optional[str] = None,
                headers: Optional[Dict[str, Any]] = None, **kwargs: Any) -> Any:
        headers = dict(headers or {})
        headers.setdefault("Cookie", cookie if cookie is not None
                           else "pixelated-session=" + self.token)
        response = yield treq.request(method, self.url(path), headers=headers,
                                      pool=self.pool, allow_redirects=False, **kwargs)
        body = yield response.content()
        return response, body

    @inlineCallbacks
    def listen_tls(self) -> Any:
        """Another listener of the proxy's site, speaking TLS: its port."""
        from pixelated_dispatcher.proxy.tls import parse_listen
        key, cert = make_certificate(temporary_directory(self))
        listener = parse_listen("ssl:0:privateKey=%s:certKey=%s:interface=127.0.0.1"
                                % (key, cert))
        site = make_site(self.manager, reactor)
        self.addCleanup(site.forwarder.close)
        tracked = WrappingFactory(site)
        port = yield listener.endpoint(reactor).listen(tracked)
        self.addCleanup(self.close_all, tracked, port)
        return port.getHost().port

    @inlineCallbacks
    def connect_tls(self, port: int) -> Any:
        """A :class:`RawBrowser` connected over TLS to ``port``."""
        from twisted.internet import ssl
        from twisted.internet.endpoints import SSL4ClientEndpoint
        browser = RawBrowser()
        yield connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port,
                                                 ssl.CertificateOptions()), browser)
        self.addCleanup(browser.transport.loseConnection)
        return browser


class RawBrowser(Protocol):
    """A browser speaking bytes, collecting every byte it gets."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred = Deferred()
        self._waiting: List[Any] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for marker, d in list(self._waiting):
            if marker in self.received:
                self._waiting.remove((marker, d))
                d.callback(self.received)

    def wait_for(self, marker: bytes, timeout: float = 5) -> Deferred:
        d: Deferred = Deferred()
        if marker in self.received:
            d.callback(self.received)
        else:
            self._waiting.append((marker, d))
        return d.addTimeout(timeout, reactor)

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(self.received)
