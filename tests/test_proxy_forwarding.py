"""Forwarding through real sockets: a browser (treq) → the proxy's site → an
agent stand-in (a small twisted.web server), all on 127.0.0.1."""
import hashlib
import json
from typing import Any, Dict, List, Optional

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from pixelated_dispatcher.protocol import AgentAddress
from pixelated_dispatcher.proxy.fake_manager import FakeManager
from pixelated_dispatcher.proxy.site import make_site


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


class HangsUp(Protocol):
    """An 'agent' that reads the request and closes without a word."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.loseConnection()


class ForwardingTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.listeners: List[WrappingFactory] = []
        self.agent = AgentStandIn()
        agent_port = self.listen(Site(self.agent))
        self.manager = FakeManager()
        self.manager.add_user("alice", "secret")
        self.manager.place_agent("alice", AgentAddress("127.0.0.1", agent_port))
        self.token = self.manager.open_session("alice")
        self.proxy_port = self.listen(make_site(self.manager, reactor))
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
    def test_request_reaches_the_agent_unchanged(self) -> Any:
        upload = bytes(range(256)) * 1200  # 300 KiB, beyond the in-memory buffer
        response, body = yield self.request(
            "POST", "/echo/a%2Fb/%7Euser?x=1&y=a+b", data=upload,
            headers={"X-Custom": "hello", "Content-Type": "application/octet-stream"})
        self.assertEqual(response.code, 200)
        seen = json.loads(body)
        self.assertEqual(seen["method"], "POST")
        self.assertEqual(seen["uri"], "/echo/a%2Fb/%7Euser?x=1&y=a+b")
        self.assertEqual(seen["body_length"], len(upload))
        self.assertEqual(seen["body_sha256"], hashlib.sha256(upload).hexdigest())
        self.assertEqual(seen["headers"]["x-custom"], ["hello"])
        self.assertEqual(seen["headers"]["content-type"], ["application/octet-stream"])

    @inlineCallbacks
    def test_agent_never_sees_our_cookies_but_sees_its_own(self) -> Any:
        _, body = yield self.request("GET", "/echo", cookie=(
            "XSRF-TOKEN=abc; pixelated-session=%s; lang=en; pixelated-csrf=zzz"
            % (self.token,)))
        seen = json.loads(body)["headers"]
        self.assertEqual(seen["cookie"], ["XSRF-TOKEN=abc; lang=en"])
        self.assertNotIn(self.token, json.dumps(seen))

    @inlineCallbacks
    def test_host_is_kept_and_forwarding_headers_are_ours(self) -> Any:
        _, body = yield self.request("GET", "/echo", headers={
            "Host": "mail.example.org",
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example"})
        seen = json.loads(body)["headers"]
        self.assertEqual(seen["host"], ["mail.example.org"])
        self.assertEqual(seen["x-forwarded-for"], ["127.0.0.1"])
        self.assertEqual(seen["x-forwarded-proto"], ["http"])
        self.assertEqual(seen["x-forwarded-host"], ["mail.example.org"])

    @inlineCallbacks
    def test_repeated_request_headers_all_arrive(self) -> Any:
        _, body = yield self.request("GET", "/echo", headers={"X-Dup": ["one", "two"]})
        self.assertEqual(json.loads(body)["headers"]["x-dup"], ["one, two"])

    @inlineCallbacks
    def test_agent_answer_comes_back(self) -> Any:
        response, body = yield self.request("GET", "/created")
        self.assertEqual(response.code, 201)
        self.assertEqual(body, b"created")
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/mails/1"])
        self.assertEqual(response.headers.getRawHeaders(b"x-agent"), [b"demo"])
        self.assertFalse(any(b"Twisted" in v for v in
                             response.headers.getRawHeaders(b"server", [])))

    @inlineCallbacks
    def test_agent_cannot_set_our_cookies(self) -> Any:
        response, _ = yield self.request("GET", "/set-cookies")
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"),
                         [b"XSRF-TOKEN=abc; Path=/", b"lang=en"])

    @inlineCallbacks
    def test_agent_down_gives_502(self) -> Any:
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        free = port.getHost().port
        yield port.stopListening()
        self.manager.place_agent("alice", AgentAddress("127.0.0.1", free))
        response, body = yield self.request("GET", "/inbox")
        self.assertEqual(response.code, 502)
        self.assertIn(b"not answering", body)
        self.assertEqual(response.headers.getRawHeaders(b"x-frame-options"), [b"SAMEORIGIN"])

    @inlineCallbacks
    def test_agent_hanging_up_gives_502(self) -> Any:
        port = self.listen(Factory.forProtocol(HangsUp))
        self.manager.place_agent("alice", AgentAddress("127.0.0.1", port))
        response, _ = yield self.request("GET", "/inbox")
        self.assertEqual(response.code, 502)

    @inlineCallbacks
    def test_browser_leaving_closes_the_agent_connection(self) -> Any:
        browser = Protocol()
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port), browser)
        browser.transport.write(
            b"GET /slow HTTP/1.1\r\nHost: x\r\nCookie: pixelated-session=%s\r\n\r\n"
            % (self.token.encode(),))
        yield self.agent.slow_started
        browser.transport.loseConnection()
        yield self.agent.slow_lost.addTimeout(5, reactor)

    @inlineCallbacks
    def test_no_session_is_not_forwarded(self) -> Any:
        response, _ = yield self.request("GET", "/echo", cookie="lang=en")
        self.assertEqual(response.code, 303)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/auth/login"])
