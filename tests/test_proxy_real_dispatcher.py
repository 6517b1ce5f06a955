"""The proxy's promises with the real manager behind it (both twistd plugins
as processes, TLS, the real pixelated-ctl, demo agents):

* ``pixelated-ctl logout`` and ``passwd`` end sessions in the proxy within a
  second, although the proxy caches sessions (pushed revocations);
* while the manager is away the proxy answers 503 with ``Retry-After`` and
  keeps the session; when it is back, the same cookie works;
* an agent that dies is started again: a page load gets the waiting page, a
  script 503 with ``Retry-After``, and the session stays valid.
"""
import os
import signal
import time

from .dispatcher_case import DispatcherCase, agent_pid, wait_until as until

NAVIGATION = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
XHR = {"X-Requested-With": "XMLHttpRequest"}


class RealDispatcherTests(DispatcherCase):
    prefix = "pxd-proxy-real-"

    @classmethod
    def dispatcher_options(cls):
        # As deployed: agents outlive a manager restart (the next one adopts
        # them), so a restart costs nobody their session.
        return {"keep_agents": True}

    @classmethod
    def prepare(cls):
        for name in ("alice", "bob", "carol", "dave"):
            cls.dispatcher.add_user(name, name + "'s password")

    def logged_in(self, name):
        browser = self.browser()
        answer = browser.log_in(name, name + "'s password")
        self.assertEqual(answer.status, 303, answer.text)
        page = browser.get("/")
        self.assertEqual(page.status, 200, page.text + self.logs())
        self.assertIn("Mailbox of " + name, page.text)
        return browser

    def assert_revoked_within_a_second(self, browser, *ctl_args, password=None):
        self.assertEqual(browser.get("/whoami").status, 200)  # cached now
        result = self.dispatcher.ctl(*ctl_args, password=password)
        self.assertEqual(result.returncode, 0, result.stderr)
        done = time.monotonic()
        self.assertTrue(until(lambda: browser.get("/whoami").status == 303, 1.0),
                        "session still usable a second after pixelated-ctl %s"
                        % (" ".join(ctl_args),))
        self.assertLess(time.monotonic() - done, 1.5)

    def test_ctl_logout_ends_cached_sessions_within_a_second(self):
        browser = self.logged_in("alice")
        self.assert_revoked_within_a_second(browser, "logout", "alice")

    def test_passwd_ends_cached_sessions_within_a_second(self):
        browser = self.logged_in("bob")
        self.assert_revoked_within_a_second(browser, "passwd", "bob", "--password-stdin",
                                            password="bob's new password")
        self.assertEqual(browser.log_in("bob", "bob's new password").status, 303)

    def test_dead_agent_is_started_again_and_the_session_stays(self):
        browser = self.logged_in("carol")
        pid = agent_pid(self.dispatcher, "carol")
        self.assertIsNotNone(pid)
        os.kill(pid, signal.SIGKILL)
        answers = []

        def restarted():
            xhr = browser.get("/whoami", headers=XHR)
            answers.append(xhr.status)
            self.assertIn(xhr.status, (200, 503), xhr.text)
            if xhr.status == 503:
                self.assertTrue(xhr.header("Retry-After"))
            page = browser.get("/", headers=NAVIGATION)
            answers.append(page.status)
            self.assertIn(page.status, (200, 503), page.text)
            if "Starting your mailbox" in page.text:
                answers.append("waiting")
            new = agent_pid(self.dispatcher, "carol")
            return page.status == 200 and "Mailbox of carol" in page.text and new != pid
        self.assertTrue(until(restarted, 30, 0.2), (answers, self.logs()))
        # Never sent to the login page, never a bare gateway error: 200 when
        # the new agent was ready within a second, else "come back later".
        self.assertEqual(set(answers) - {200, 503, "waiting"}, set(), answers)

    def test_manager_away_gives_503_and_keeps_the_session(self):
        browser = self.logged_in("dave")
        self.dispatcher.stop_manager()
        try:
            page = browser.get("/", headers=NAVIGATION)
            self.assertEqual(page.status, 503, page.text)
            self.assertTrue(page.header("Retry-After"))
            self.assertIn("temporarily unavailable", page.text)
            self.assertTrue([k for k in browser.cookies if "session" in k])
        finally:
            self.dispatcher.start_manager()
        self.assertTrue(until(lambda: browser.get("/").status == 200, 30, 0.2), self.logs())
        self.assertIn("Mailbox of dave", browser.get("/").text)
