"""The login and logout pages, driven through the real twisted.web stack in
memory (StubTreq) against the in-memory manager."""
import re

from hypothesis import given, settings, strategies as st, HealthCheck
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.testing.fake_manager import FakeManager
from pixelated_dispatcher.proxy.site import make_root

from .helpers import Browser, RecordingForwarder, cookie_value, header, set_cookies

NEUTRAL = b"Invalid username or password"


class LoginPage(SynchronousTestCase):
    def setUp(self) -> None:
        self.manager = FakeManager()
        self.manager.add_user("alice", "correct horse")
        self.root = make_root(self.manager, RecordingForwarder())

    def browser(self, secure: bool = False) -> Browser:
        return Browser(self, self.root, secure=secure)

    def test_form_has_the_fields_and_a_csrf_cookie(self) -> None:
        response, body = self.browser().get("/auth/login")
        self.assertEqual(response.code, 200)
        self.assertIn(b'name="username"', body)
        self.assertIn(b'type="password"', body)
        self.assertIn(b'name="password"', body)
        csrf = re.search(rb'name="csrf_token" value="([^"]+)"', body).group(1).decode()
        cookie = set_cookies(response)["pixelated-csrf"]
        self.assertEqual(cookie_value(cookie), csrf)
        self.assertIn("HttpOnly", cookie)
        self.assertIn("SameSite=strict", cookie)
        self.assertNotIn("Secure", cookie)

    def test_form_loads_nothing_from_elsewhere(self) -> None:
        _, body = self.browser().get("/auth/login")
        self.assertNotIn(b"<script", body)
        self.assertNotIn(b"src=", body)
        self.assertNotIn(b"http", body.split(b"<body>", 1)[1])

    def test_own_pages_carry_the_security_headers(self) -> None:
        response, _ = self.browser().get("/auth/login")
        self.assertEqual(header(response, b"x-frame-options"), b"SAMEORIGIN")
        self.assertEqual(header(response, b"x-content-type-options"), b"nosniff")
        self.assertEqual(header(response, b"referrer-policy"), b"same-origin")
        self.assertEqual(header(response, b"cache-control"), b"no-store")
        self.assertIn(b"frame-ancestors 'self'",
                      header(response, b"content-security-policy"))
        self.assertTrue(header(response, b"content-type").startswith(b"text/html"))

    def test_server_software_is_not_announced(self) -> None:
        response, _ = self.browser().get("/auth/login")
        self.assertIsNone(header(response, b"server"))

    def test_hsts_only_over_tls(self) -> None:
        plain, _ = self.browser().get("/auth/login")
        secure, _ = self.browser(secure=True).get("/auth/login")
        self.assertIsNone(header(plain, b"strict-transport-security"))
        self.assertIn(b"max-age=", header(secure, b"strict-transport-security"))

    def test_tls_cookies_are_secure_and_host_prefixed(self) -> None:
        browser = self.browser(secure=True)
        form, _ = browser.get("/auth/login")
        csrf = set_cookies(form)["__Host-pixelated-csrf"]
        self.assertIn("Secure", csrf)
        self.assertIn("Path=/", csrf)
        response, _ = browser.login("alice", "correct horse")
        self.assertEqual(response.code, 303)
        session = set_cookies(response)["__Host-pixelated-session"]
        for attribute in ("Secure", "HttpOnly", "SameSite=lax", "Path=/"):
            self.assertIn(attribute, session)
        self.assertNotIn("Domain", session)

    def test_right_password_opens_a_session_and_goes_home(self) -> None:
        response, _ = self.browser().login("alice", "correct horse")
        self.assertEqual(response.code, 303)
        self.assertEqual(header(response, b"location"), b"/auth/starting")
        session = set_cookies(response)["pixelated-session"]
        for attribute in ("HttpOnly", "SameSite=lax", "Path=/"):
            self.assertIn(attribute, session)
        self.assertEqual(self.manager.sessions[cookie_value(session)], "alice")
        self.assertEqual(self.manager.logins, [("alice", "127.0.0.1")])

    def test_every_login_gets_a_new_session_token(self) -> None:
        browser = self.browser()
        first, _ = browser.login("alice", "correct horse")
        second, _ = browser.login("alice", "correct horse")
        self.assertNotEqual(set_cookies(first)["pixelated-session"].split(";")[0],
                            set_cookies(second)["pixelated-session"].split(";")[0])

    def test_failed_logins_look_all_the_same(self) -> None:
        answers = []
        for username, password in [("alice", "wrong"), ("nobody", "correct horse"),
                                   ("Not A Valid Name!", "correct horse")]:
            response, body = self.browser().login(username, password)
            self.assertEqual(response.code, 401)
            self.assertIn(NEUTRAL, body)
            self.assertNotIn("pixelated-session", set_cookies(response))
            self.assertEqual(header(response, b"cache-control"), b"no-store")
            # Only the echoed name and the form's CSRF token may differ.
            answers.append(re.sub(rb'value="[^"]*"', b'value=""', body))
        self.assertEqual(answers[0], answers[1])
        self.assertEqual(answers[1], answers[2])
        # The invalid name never reached the manager.
        self.assertEqual([u for u, _ in self.manager.logins], ["alice", "nobody"])

    def test_user_input_is_escaped(self) -> None:
        _, body = self.browser().login('"><script>alert(1)</script>', "x")
        self.assertNotIn(b"<script>alert", body)
        self.assertIn(NEUTRAL, body)

    def test_post_without_csrf_cookie_is_refused(self) -> None:
        response, body = self.browser().post(
            "/auth/login", {"username": "alice", "password": "correct horse",
                            "csrf_token": "a" * 43})
        self.assertEqual(response.code, 403)
        self.assertNotIn("pixelated-session", set_cookies(response))
        self.assertEqual(self.manager.logins, [])

    def test_post_with_another_csrf_token_is_refused(self) -> None:
        browser = self.browser()
        browser.csrf_from_form()
        response, _ = browser.post("/auth/login", {
            "username": "alice", "password": "correct horse",
            "csrf_token": self.browser().csrf_from_form()})
        self.assertEqual(response.code, 403)
        self.assertEqual(self.manager.logins, [])

    def test_post_without_csrf_field_is_refused(self) -> None:
        browser = self.browser()
        browser.csrf_from_form()
        response, _ = browser.post("/auth/login", {"username": "alice",
                                                   "password": "correct horse"})
        self.assertEqual(response.code, 403)

    def test_manager_down_gives_a_retry_page(self) -> None:
        browser = self.browser()
        csrf = browser.csrf_from_form()
        self.manager.reachable = False
        response, body = browser.post("/auth/login", {
            "username": "alice", "password": "correct horse", "csrf_token": csrf})
        self.assertEqual(response.code, 503)
        self.assertIsNotNone(header(response, b"retry-after"))
        self.assertIn(b"temporarily unavailable", body)
        self.assertNotIn("pixelated-session", set_cookies(response))

    def test_other_methods_are_not_allowed(self) -> None:
        response, _ = self.browser().request("PUT", "/auth/login")
        self.assertEqual(response.code, 405)
        self.assertIn(b"POST", header(response, b"allow"))

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(username=st.text(max_size=80), password=st.text(max_size=80))
    def test_any_text_gets_the_form_back_or_logs_in(self, username: str,
                                                    password: str) -> None:
        manager = FakeManager()
        manager.add_user("alice", "correct horse")
        browser = Browser(self, make_root(manager, RecordingForwarder()))
        response, body = browser.login(username, password)
        if (username, password) == ("alice", "correct horse"):
            self.assertEqual(response.code, 303)
        else:
            self.assertEqual(response.code, 401)
            self.assertIn(NEUTRAL, body)
            self.assertNotIn("pixelated-session", set_cookies(response))


class LogoutPage(SynchronousTestCase):
    def setUp(self) -> None:
        self.manager = FakeManager()
        self.manager.add_user("alice", "correct horse")
        self.root = make_root(self.manager, RecordingForwarder())
        self.browser = Browser(self, self.root)
        response, _ = self.browser.login("alice", "correct horse")
        self.token = cookie_value(set_cookies(response)["pixelated-session"])
        self.browser.get("/inbox")  # starts the agent
        self.assertIn("alice", self.manager.running)

    def test_logout_ends_the_session_and_stops_the_agent(self) -> None:
        csrf = self.browser.csrf_from_form("/auth/logout")
        response, _ = self.browser.post("/auth/logout", {"csrf_token": csrf})
        self.assertEqual(response.code, 303)
        self.assertEqual(header(response, b"location"), b"/auth/login")
        self.assertNotIn(self.token, self.manager.sessions)
        self.assertNotIn("alice", self.manager.running)
        expired = set_cookies(response)["pixelated-session"]
        self.assertIn("Max-Age=0", expired)
        # The browser is logged out: its next request goes to the login form.
        after, _ = self.browser.get("/inbox")
        self.assertEqual(header(after, b"location"), b"/auth/login?next=/inbox")

    def test_logout_without_csrf_token_is_refused(self) -> None:
        response, _ = self.browser.post("/auth/logout", {})
        self.assertEqual(response.code, 403)
        self.assertIn(self.token, self.manager.sessions)

    def test_cross_site_logout_is_refused(self) -> None:
        attacker = Browser(self, self.root)
        response, _ = self.browser.post(
            "/auth/logout", {"csrf_token": attacker.csrf_from_form()})
        self.assertEqual(response.code, 403)
        self.assertIn(self.token, self.manager.sessions)

    def test_logout_confirmation_page_posts_the_csrf_token(self) -> None:
        response, body = self.browser.get("/auth/logout")
        self.assertEqual(response.code, 200)
        self.assertIn(b'action="/auth/logout"', body)
        self.assertIn(b'method="post"', body)
        self.assertIn(b'name="csrf_token"', body)

    def test_logout_page_without_session_goes_to_login(self) -> None:
        response, _ = Browser(self, self.root).get("/auth/logout")
        self.assertEqual(response.code, 303)
        self.assertEqual(header(response, b"location"), b"/auth/login")

    def test_manager_down_keeps_the_session_cookie(self) -> None:
        csrf = self.browser.csrf_from_form("/auth/logout")
        self.manager.reachable = False
        response, _ = self.browser.post("/auth/logout", {"csrf_token": csrf})
        self.assertEqual(response.code, 503)
        self.assertNotIn("pixelated-session", set_cookies(response))
        self.assertIn(self.token, self.manager.sessions)

    def test_logout_of_an_already_ended_session_still_logs_out(self) -> None:
        csrf = self.browser.csrf_from_form("/auth/logout")
        del self.manager.sessions[self.token]
        response, _ = self.browser.post("/auth/logout", {"csrf_token": csrf})
        self.assertEqual(response.code, 303)
        self.assertIn("Max-Age=0", set_cookies(response)["pixelated-session"])
