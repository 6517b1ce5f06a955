"""Forwarding through real sockets: a browser (treq) → the proxy's site → an
agent stand-in (a small twisted.web server), all on 127.0.0.1."""
import hashlib
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from pixelated_dispatcher.protocol import AgentAddress

from .forwarding_setup import NAVIGATION, XHR, ForwardingSetup, RawBrowser, UpgradingAgent


class HangsUp(Protocol):
    """An 'agent' that reads the request and closes without a word."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.loseConnection()


class ForwardingTests(ForwardingSetup):
    """The basics, through real sockets."""

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
        self.assertEqual(json.loads(body)["headers"]["x-dup"], ["one", "two"])

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
    def test_agent_gone_script_gets_503_and_the_agent_is_started_again(self) -> Any:
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        free = port.getHost().port
        yield port.stopListening()
        self.manager.place_agent("alice", AgentAddress("127.0.0.1", free))
        ensures = self.manager.ensures
        response, body = yield self.request("GET", "/inbox", headers=XHR)
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"2"])
        self.assertEqual(json.loads(body), {"error": "mailbox starting"})
        self.assertGreater(self.manager.ensures, ensures)
        self.assertIn(self.token, self.manager.sessions)  # still logged in

    @inlineCallbacks
    def test_agent_gone_page_load_gets_the_waiting_page(self) -> Any:
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        free = port.getHost().port
        yield port.stopListening()
        self.manager.place_agent("alice", AgentAddress("127.0.0.1", free))
        response, body = yield self.request("GET", "/inbox?page=2", headers=NAVIGATION)
        self.assertEqual(response.code, 200)
        self.assertIn(b"Starting your mailbox", body)
        self.assertIn(b'http-equiv="refresh"', body)
        self.assertIn(b"/auth/starting?next=/inbox%3Fpage%3D2", body)
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])

    @inlineCallbacks
    def test_agent_hanging_up_is_an_agent_gone(self) -> Any:
        port = self.listen(Factory.forProtocol(HangsUp))
        self.manager.place_agent("alice", AgentAddress("127.0.0.1", port))
        response, _ = yield self.request("GET", "/inbox", headers=XHR)
        self.assertEqual(response.code, 503)

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
        self.assertEqual(response.headers.getRawHeaders(b"location"),
                         [b"/auth/login?next=/echo"])


class MoreForwardingTests(ForwardingSetup):
    """HTTP/1.1 details: keep-alive, framing, redirects and upgrades."""

    @inlineCallbacks
    def raw(self, data: bytes) -> Any:
        browser = RawBrowser()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port),
                              browser)
        self.addCleanup(browser.transport.loseConnection)
        if data:
            browser.transport.write(data)
        return browser

    def cookie_line(self) -> bytes:
        return b"Cookie: pixelated-session=%s\r\n" % (self.token.encode(),)

    @inlineCallbacks
    def test_agent_connections_are_kept_alive_and_reused(self) -> Any:
        ports = set()
        for _ in range(5):
            response, body = yield self.request("GET", "/port")
            self.assertEqual(response.code, 200)
            ports.add(body)
        self.assertEqual(len(ports), 1, ports)

    @inlineCallbacks
    def test_head_keeps_the_length_and_sends_no_body(self) -> Any:
        response, body = yield self.request("HEAD", "/sized")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"1234"])
        self.assertEqual(body, b"")
        response, body = yield self.request("GET", "/sized")
        self.assertEqual(len(body), 1234)

    @inlineCallbacks
    def test_not_modified_has_no_body(self) -> Any:
        response, body = yield self.request("GET", "/cached",
                                            headers={"If-None-Match": '"v1"'})
        self.assertEqual((response.code, body), (304, b""))
        self.assertEqual(response.headers.getRawHeaders(b"etag"), [b'"v1"'])
        # and the connection is still good for the next request
        response, body = yield self.request("GET", "/sized")
        self.assertEqual(len(body), 1234)

    @inlineCallbacks
    def test_chunked_answer_streams_through(self) -> Any:
        response, body = yield self.request("GET", "/chunked")
        self.assertEqual(body, b"first,second")

    @inlineCallbacks
    def test_agent_redirect_to_its_loopback_address_is_rewritten(self) -> Any:
        response, _ = yield self.request("GET", "/elsewhere",
                                         headers={"Host": "mail.example.org"})
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"),
                         [b"http://mail.example.org/inbox?x=1"])

    @inlineCallbacks
    def test_chunked_upload_arrives_with_its_length(self) -> Any:
        browser = yield self.raw(
            b"POST /echo HTTP/1.1\r\nHost: x\r\n" + self.cookie_line() +
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        received = yield browser.wait_for(b"}")
        body = received.split(b"\r\n\r\n", 1)[1]
        seen = json.loads(body[body.index(b"{"):body.rindex(b"}") + 1])
        self.assertEqual(seen["body_length"], 11)
        self.assertEqual(seen["headers"]["content-length"], ["11"])
        self.assertNotIn("transfer-encoding", seen["headers"])

    @inlineCallbacks
    def test_expect_100_continue(self) -> Any:
        browser = yield self.raw(
            b"POST /echo HTTP/1.1\r\nHost: x\r\n" + self.cookie_line() +
            b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        yield browser.wait_for(b"100 Continue")
        browser.transport.write(b"hello")
        received = yield browser.wait_for(b"body_sha256")
        self.assertIn(b"HTTP/1.1 200", received)
        self.assertIn(b'"body_length": 5', received)
        self.assertNotIn(b"expect", received.split(b"HTTP/1.1 200", 1)[1].lower())

    @inlineCallbacks
    def test_websocket_upgrade_is_tunnelled_after_the_session_check(self) -> Any:
        factory = Factory.forProtocol(UpgradingAgent)
        factory.heads = []
        port = self.listen(factory)
        self.manager.place_agent("alice", AgentAddress("127.0.0.1", port))
        browser = yield self.raw(
            b"GET /socket HTTP/1.1\r\nHost: mail.example.org\r\n" + self.cookie_line() +
            b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n")
        received = yield browser.wait_for(b"HELLO")
        head = received.split(b"\r\n\r\n", 1)[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertIn(b"sec-websocket-accept: abc", head.lower())
        self.assertNotIn(b"stolen", head)
        browser.transport.write(b"ping")
        yield browser.wait_for(b"PING")
        cache = self.site.cache
        self.assertIn("alice", cache.exchanges.tunnel_users())  # active while open
        browser.transport.loseConnection()
        yield browser.closed
        for _ in range(100):
            if "alice" not in cache.exchanges.tunnel_users():
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertNotIn("alice", cache.exchanges.tunnel_users())
        agent_head = factory.heads[0].lower()
        self.assertIn(b"upgrade: websocket", agent_head)
        self.assertIn(b"connection: upgrade", agent_head)
        self.assertNotIn(self.token.encode().lower(), agent_head)

    @inlineCallbacks
    def test_upgrade_without_a_session_is_not_tunnelled(self) -> Any:
        factory = Factory.forProtocol(UpgradingAgent)
        factory.heads = []
        port = self.listen(factory)
        self.manager.place_agent("alice", AgentAddress("127.0.0.1", port))
        browser = yield self.raw(
            b"GET /socket HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n")
        received = yield browser.wait_for(b"\r\n\r\n")
        self.assertTrue(received.startswith(b"HTTP/1.1 303"), received)
        self.assertEqual(factory.heads, [])


class TunnelOverTLS(ForwardingSetup):
    """The Upgrade tunnel also works when the browser speaks TLS (the
    channel's transport is then a TLS wrapper, not a TCP connection)."""

    @inlineCallbacks
    def test_websocket_upgrade_over_tls(self) -> Any:
        port = yield self.listen_tls()
        factory = Factory.forProtocol(UpgradingAgent)
        factory.heads = []
        agent_port = self.listen(factory)
        self.manager.place_agent("alice", AgentAddress("127.0.0.1", agent_port))
        browser = yield self.connect_tls(port)
        browser.transport.write(
            b"GET /socket HTTP/1.1\r\nHost: mail.example.org\r\n"
            b"Cookie: __Host-pixelated-session=%s\r\n"
            b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n" % (self.token.encode(),))
        received = yield browser.wait_for(b"HELLO")
        self.assertTrue(received.startswith(b"HTTP/1.1 101 "), received)
        browser.transport.write(b"over tls")
        yield browser.wait_for(b"OVER TLS")
        self.assertIn(b"x-forwarded-proto: https", factory.heads[0].lower())
