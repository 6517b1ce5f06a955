"""From the login form to the agent's page: ``next`` (local paths only), the
waiting page while the agent starts, rate-limited and capacity answers, the
operator's banner, and both kinds of CSRF double submit on logout."""
import re
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.protocol import AgentAddress
from pixelated_dispatcher.testing.fake_manager import FakeManager
from pixelated_dispatcher.proxy.next_path import local_path, with_next
from pixelated_dispatcher.proxy.site import make_root

from .helpers import Browser, RecordingForwarder, header, set_cookies


NAVIGATION = {b"Accept": [b"text/html"], b"Sec-Fetch-Mode": [b"navigate"]}
XHR = {b"X-Requested-With": [b"XMLHttpRequest"]}


class NextPath(SynchronousTestCase):
    @settings(max_examples=500)
    @given(st.binary(max_size=60))
    def test_next_is_always_a_local_path(self, value: bytes) -> None:
        target = local_path(value)
        self.assertTrue(target.startswith(b"/"))
        self.assertFalse(target.startswith(b"//"))
        self.assertNotIn(b"\\", target)
        for byte in target:
            self.assertTrue(0x21 <= byte <= 0x7e, target)
        # what a browser makes of it stays on this origin
        self.assertNotRegex(target, rb"^/[/\\]")

    @settings(max_examples=300)
    @given(st.text(max_size=40))
    def test_next_survives_the_round_trip_through_a_query(self, text: str) -> None:
        from urllib.parse import parse_qs, urlsplit
        target = local_path(text.encode("utf-8", "surrogatepass"))
        link = with_next(b"/auth/login", target).decode("ascii")
        query = parse_qs(urlsplit(link).query)
        self.assertEqual(query.get("next", ["/"])[0].encode(), target)

    def test_examples(self) -> None:
        for bad in (b"//evil.example/", b"/\\evil.example", b"https://evil.example/",
                    b"javascript:alert(1)", b"/a\\b", b"evil", b"/a b", b"/\x00",
                    b"/auth/logout", b"/auth/login?next=/x", b"/AUTH/STARTING/", b""):
            self.assertEqual(local_path(bad), b"/", bad)
        for good in (b"/", b"/inbox", b"/inbox?page=2&x=%2F%2F", b"/a/b#frag", b"/auth/x"):
            self.assertEqual(local_path(good), good)


class LoginFlow(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.manager = FakeManager()
        self.manager.add_user("alice", "secret")
        self.manager.place_agent("alice", AgentAddress("127.0.0.1", 41001))
        self.forwarder = RecordingForwarder()
        self.root = make_root(self.manager, self.forwarder, clock=self.clock,
                              banner="Maintenance tonight at <b>22:00</b>.\n\nBe nice.")
        self.root.cache.start()
        self.browser = Browser(self, self.root)

    def login_with_next(self, next_path: str, password: str = "secret") -> Any:
        response, body = self.browser.get("/auth/login?next=" + next_path)
        csrf = re.search(rb'name="csrf_token" value="([^"]+)"', body).group(1).decode()
        fields = {"username": "alice", "password": password, "csrf_token": csrf}
        hidden = re.search(rb'name="next" value="([^"]+)"', body)
        if hidden:
            fields["next"] = hidden.group(1).decode()
        return self.browser.post("/auth/login", fields)

    def test_page_first_asked_for_is_reached_through_the_waiting_page(self) -> None:
        self.manager.slow_start("alice")
        first, _ = self.browser.get("/inbox?page=2", headers=NAVIGATION)
        self.assertEqual(header(first, b"location"), b"/auth/login?next=/inbox%3Fpage%3D2")
        login, _ = self.login_with_next("/inbox%3Fpage%3D2")
        self.assertEqual(login.code, 303)
        waiting_url = header(login, b"location")
        self.assertEqual(waiting_url, b"/auth/starting?next=/inbox%3Fpage%3D2")
        self.assertEqual(self.manager.ensures, 1)  # the start began at login
        page, body = self.browser.get(waiting_url.decode(),
                                      meanwhile=lambda: self.clock.advance(1.0))
        self.assertEqual(page.code, 200)
        self.assertIn(b"Starting your mailbox", body)
        self.assertIn(b'<meta http-equiv="refresh" content="1;url=/auth/starting?next='
                      b'/inbox%3Fpage%3D2"', body)
        self.assertNotIn(b"<script", body)
        self.assertEqual(header(page, b"cache-control"), b"no-store")
        self.manager.finish_start("alice")
        ready, _ = self.browser.get(waiting_url.decode())
        self.assertEqual(ready.code, 303)
        self.assertEqual(header(ready, b"location"), b"/inbox?page=2")
        self.assertEqual(self.manager.ensures, 1)

    def test_a_quick_start_goes_on_without_the_waiting_page(self) -> None:
        self.manager.slow_start("alice")
        login, _ = self.login_with_next("/inbox")
        waiting_url = header(login, b"location").decode()

        def ready_soon() -> None:
            self.clock.advance(0.4)
            self.manager.finish_start("alice")
        page, body = self.browser.get(waiting_url, meanwhile=ready_soon)
        self.assertEqual(page.code, 303)
        self.assertEqual(header(page, b"location"), b"/inbox")
        self.assertNotIn(b"Starting your mailbox", body)

    def test_open_redirects_are_refused(self) -> None:
        login, _ = self.login_with_next("//evil.example/x")
        self.assertEqual(header(login, b"location"), b"/auth/starting")
        ready, _ = self.browser.get("/auth/starting?next=https://evil.example/")
        self.assertEqual(header(ready, b"location"), b"/")

    def test_start_failure_shows_a_message_and_the_way_back(self) -> None:
        self.manager.fail_agent_start("alice", "disk full")
        login, _ = self.login_with_next("/")
        page, body = self.browser.get(header(login, b"location").decode())
        self.assertEqual(page.code, 503)
        self.assertIn(b"could not be started", body)
        self.assertIn(b'href="/auth/login"', body)

    def test_capacity_reached_is_a_friendly_page_with_retry_after(self) -> None:
        self.manager.reach_capacity("alice")
        login, _ = self.login_with_next("/")
        page, body = self.browser.get(header(login, b"location").decode())
        self.assertEqual(page.code, 503)
        self.assertEqual(header(page, b"retry-after"), b"60")
        self.assertIn(b"Too many mailboxes", body)
        script, body = self.browser.get("/mails", headers=XHR)
        self.assertEqual((script.code, header(script, b"retry-after")), (503, b"60"))

    def test_slow_start_gives_scripts_503_after_a_moment(self) -> None:
        self.login_with_next("/")
        self.manager.stop_agent("alice")
        self.manager.slow_start("alice")
        d = self.browser.stub.request("GET", self.browser.origin + "/mails", headers=XHR)
        self.browser.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.browser.stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 503)
        self.assertEqual(header(response, b"retry-after"), b"2")

    def test_slow_start_gives_page_loads_the_waiting_page(self) -> None:
        self.login_with_next("/")
        self.manager.stop_agent("alice")
        self.manager.slow_start("alice")
        d = self.browser.stub.request("GET", self.browser.origin + "/about",
                                      headers=NAVIGATION)
        self.browser.stub.flush()
        self.clock.advance(1.0)
        self.browser.stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        body = self.successResultOf(self.browser.stub.content(response))
        self.assertIn(b"/auth/starting?next=/about", body)
        self.manager.finish_start("alice")
        again, _ = self.browser.get("/about", headers=NAVIGATION)
        self.assertEqual(again.code, 200)
        self.assertEqual(self.forwarder.forwarded[-1][0], b"/about")

    def test_rate_limited_login_gets_the_neutral_message_and_a_wait_hint(self) -> None:
        self.manager.rate_limit(120)
        response, body = self.login_with_next("/")
        self.assertEqual(response.code, 429)
        self.assertEqual(header(response, b"retry-after"), b"120")
        self.assertIn(b"Invalid username or password", body)
        self.assertIn(b"Please wait 120 seconds", body)
        self.assertNotIn("pixelated-session", set_cookies(response))

    def test_banner_is_shown_escaped(self) -> None:
        _, body = self.browser.get("/auth/login")
        self.assertIn(b"Maintenance tonight at &lt;b&gt;22:00&lt;/b&gt;.", body)
        self.assertIn(b"<p>Be nice.</p>", body)
        self.assertIn(b'<label for="username">', body)
        self.assertIn(b'<label for="password">', body)

    def test_cross_origin_login_post_is_refused(self) -> None:
        _, body = self.browser.get("/auth/login")
        csrf = re.search(rb'name="csrf_token" value="([^"]+)"', body).group(1).decode()
        fields = {"username": "alice", "password": "secret", "csrf_token": csrf}
        for headers in ({b"Origin": [b"https://evil.example"]},
                        {b"Sec-Fetch-Site": [b"cross-site"]}):
            response, _ = self.browser.post("/auth/login", fields, headers=headers)
            self.assertEqual(response.code, 403)
        response, _ = self.browser.post("/auth/login", fields, headers={
            b"Origin": [self.browser.origin.encode()], b"Sec-Fetch-Site": [b"same-origin"]})
        self.assertEqual(response.code, 303)

    def test_the_agents_own_logout_double_submit_is_accepted(self) -> None:
        self.login_with_next("/")
        token = [t for t, u in self.manager.sessions.items() if u == "alice"][0]
        refused, _ = self.browser.post("/auth/logout", {"csrftoken": "abc"}, headers={
            b"Cookie": [b"XSRF-TOKEN=other; pixelated-session=" + token.encode()]})
        self.assertEqual(refused.code, 403)
        self.assertIn(token, self.manager.sessions)
        response, _ = self.browser.post("/auth/logout", {"csrftoken": "abc"}, headers={
            b"Cookie": [b"XSRF-TOKEN=abc; pixelated-session=" + token.encode()]})
        self.assertEqual(response.code, 303)
        self.assertEqual(header(response, b"location"), b"/auth/login")
        self.assertNotIn(token, self.manager.sessions)

    def test_logout_is_effective_at_once_despite_the_cache(self) -> None:
        self.login_with_next("/")
        self.browser.get("/inbox")
        self.assertEqual(len(self.forwarder.forwarded), 1)
        page, body = self.browser.get("/auth/logout")
        csrf = re.search(rb'name="csrf_token" value="([^"]+)"', body).group(1).decode()
        self.browser.post("/auth/logout", {"csrf_token": csrf})
        after, _ = self.browser.get("/inbox")
        self.assertEqual(after.code, 303)
        self.assertEqual(len(self.forwarder.forwarded), 1)

    def test_manager_away_gives_503_and_keeps_the_session(self) -> None:
        self.login_with_next("/")
        self.manager.disconnect()
        self.manager.reachable = False
        response, _ = self.browser.get("/inbox", headers=NAVIGATION)
        self.assertEqual(response.code, 503)
        self.assertEqual(header(response, b"retry-after"), b"5")
        self.assertNotIn("pixelated-session", set_cookies(response))
        self.manager.reachable = True
        again, _ = self.browser.get("/inbox", headers=NAVIGATION)
        self.assertEqual(again.code, 200)
