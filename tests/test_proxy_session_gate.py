"""Every path but the proxy's own goes to the logged-in user's agent, and
only there; without a session, the browser goes to the login form."""
import json

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from pixelated_dispatcher.protocol import AgentAddress
from pixelated_dispatcher.testing.fake_manager import FakeManager
from pixelated_dispatcher.proxy.site import make_root

from .helpers import Browser, RecordingForwarder, header, set_cookies


XHR = {b"X-Requested-With": [b"XMLHttpRequest"]}
ALICE_AGENT = AgentAddress("127.0.0.1", 41001)
BOB_AGENT = AgentAddress("127.0.0.1", 41002)


class SessionGateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.manager = FakeManager()
        self.manager.add_user("alice", "a-secret")
        self.manager.add_user("bob", "b-secret")
        self.manager.place_agent("alice", ALICE_AGENT)
        self.manager.place_agent("bob", BOB_AGENT)
        self.forwarder = RecordingForwarder()
        self.root = make_root(self.manager, self.forwarder)

    def logged_in(self, username: str, password: str) -> Browser:
        browser = Browser(self, self.root)
        response, _ = browser.login(username, password)
        self.assertEqual(response.code, 303)
        return browser

    def test_anonymous_browser_goes_to_login(self) -> None:
        response, _ = Browser(self, self.root).get("/inbox?page=2")
        self.assertEqual(response.code, 303)
        self.assertEqual(header(response, b"location"), b"/auth/login?next=/inbox%3Fpage%3D2")
        self.assertEqual(self.forwarder.forwarded, [])

    def test_anonymous_script_gets_401(self) -> None:
        response, body = Browser(self, self.root).get("/mails", headers=XHR)
        self.assertEqual(response.code, 401)
        self.assertEqual(json.loads(body)["login"], "/auth/login")
        self.assertEqual(self.forwarder.forwarded, [])

    def test_forged_session_cookie_goes_to_login_and_is_cleared(self) -> None:
        browser = Browser(self, self.root)
        response, _ = browser.get(
            "/", headers={b"Cookie": [b"pixelated-session=" + b"A" * 43]})
        self.assertEqual(response.code, 303)
        self.assertIn("Max-Age=0", set_cookies(response)["pixelated-session"])
        self.assertEqual(self.forwarder.forwarded, [])

    def test_each_session_reaches_only_its_own_agent(self) -> None:
        alice = self.logged_in("alice", "a-secret")
        bob = self.logged_in("bob", "b-secret")
        alice_page = alice.get("/inbox?page=2")
        bob_page = bob.get("/")
        self.assertEqual(alice_page[1], b"agent 127.0.0.1:41001")
        self.assertEqual(bob_page[1], b"agent 127.0.0.1:41002")
        self.assertEqual(self.forwarder.forwarded,
                         [(b"/inbox?page=2", ALICE_AGENT), (b"/", BOB_AGENT)])

    def test_other_auth_paths_belong_to_the_agent(self) -> None:
        alice = self.logged_in("alice", "a-secret")
        _, body = alice.get("/auth/something")
        self.assertEqual(body, b"agent 127.0.0.1:41001")

    def test_agent_start_failure_is_explained_to_browsers(self) -> None:
        self.manager.fail_agent_start("alice", "/var/lib/secret/path exploded")
        response, body = self.logged_in("alice", "a-secret").get("/")
        self.assertEqual(response.code, 503)
        self.assertIn(b"Your mailbox could not be started", body)
        self.assertNotIn(b"/var/lib/secret", body)
        self.assertEqual(header(response, b"x-frame-options"), b"SAMEORIGIN")

    def test_agent_start_failure_tells_scripts_when_to_retry(self) -> None:
        self.manager.fail_agent_start("alice")
        response, _ = self.logged_in("alice", "a-secret").get("/mails", headers=XHR)
        self.assertEqual(response.code, 503)
        self.assertIsNotNone(header(response, b"retry-after"))

    def test_manager_down_gives_503_with_retry_after(self) -> None:
        alice = self.logged_in("alice", "a-secret")
        self.manager.reachable = False
        response, body = alice.get("/")
        self.assertEqual(response.code, 503)
        self.assertIsNotNone(header(response, b"retry-after"))
        self.assertIn(b"temporarily unavailable", body)

    def test_removed_user_is_sent_to_login(self) -> None:
        alice = self.logged_in("alice", "a-secret")
        del self.manager.users["alice"]
        self.manager.revoke_sessions("alice")  # as the manager does on removal
        response, _ = alice.get("/")
        self.assertEqual(header(response, b"location"), b"/auth/login")
        self.assertEqual(self.forwarder.forwarded, [])

    def raw_request(self, raw: bytes) -> StringTransport:
        """Feed one raw HTTP request to the site; the transport shows the answer."""
        site = Site(self.root, timeout=None, reactor=Clock())
        client = IPv4Address("TCP", "127.0.0.1", 50000)
        channel = site.buildProtocol(client)
        transport = StringTransport(peerAddress=client)
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        self.channel = channel
        return transport

    def test_proxy_style_request_target_is_refused(self) -> None:
        token = self.manager.open_session("alice")
        transport = self.raw_request(
            b"GET http://elsewhere.example/ HTTP/1.1\r\nHost: dispatcher.example\r\n"
            b"Cookie: pixelated-session=%s\r\n\r\n" % (token.encode(),))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "), transport.value())
        self.assertEqual(self.forwarder.forwarded, [])

    def test_browser_gone_before_manager_answered_is_left_alone(self) -> None:
        token = self.manager.open_session("alice")
        pending: Deferred = Deferred()
        self.manager.resolve_session = lambda token: pending
        transport = self.raw_request(
            b"GET /inbox HTTP/1.1\r\nHost: dispatcher.example\r\n"
            b"Cookie: pixelated-session=%s\r\n\r\n" % (token.encode(),))
        self.channel.connectionLost(Failure(ConnectionDone("browser closed the tab")))
        pending.callback("alice")
        self.assertEqual(self.forwarder.forwarded, [])
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.flushLoggedErrors(), [])
