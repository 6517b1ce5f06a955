"""A real headless Chromium (Debian's chromium and chromium-driver, driven by
selenium) against the real dispatcher (twistd manager and proxy, TLS, the
demo agent): log in through the form, see the waiting page, reach the
mailbox, reload, follow a link, log out; a second profile as another user
never sees the first user's page. Screenshots of every step go to
``test-artifacts/browser/``.

Without a browser these tests are skipped with one line, except in CI
(``CI=true``), where a missing browser is a failure.
"""
import os
import shutil
import sys
import tempfile
import time
import unittest
from typing import Callable, List, Optional

import pytest

from pixelated_dispatcher.demo import Dispatcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "test-artifacts", "browser")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--window-size=1000,800"]


def missing_browser() -> Optional[str]:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return "%s not found (apt-get install %s)" % (path, package)
    return None


def setUpModule() -> None:
    reason = missing_browser()
    if reason is not None:
        if os.environ.get("CI") == "true":
            raise AssertionError("browser tests cannot run in CI: " + reason)
        raise unittest.SkipTest(reason)


class Profile:
    """One browser profile: its own user data directory, cookies and all."""

    def __init__(self, name: str, base_url: str, directory: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        self.name = name
        self.base_url = base_url.rstrip("/")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        self.user_data = tempfile.mkdtemp(prefix="chromium-%s-" % name, dir=directory)
        options.add_argument("--user-data-dir=" + self.user_data)
        options.accept_insecure_certs = True  # the test's self-signed certificate
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.driver.set_page_load_timeout(60)
        self.step = 0

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    def shot(self, label: str) -> str:
        os.makedirs(ARTIFACTS, exist_ok=True)
        self.step += 1
        path = os.path.join(ARTIFACTS, "%s-%02d-%s.png" % (self.name, self.step, label))
        self.driver.save_screenshot(path)
        return path

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except Exception:  # the page is changing under us
                pass
            time.sleep(0.05)
        self.shot("timeout")
        raise AssertionError("%s: waited %ds for %s; at %s titled %r"
                             % (self.name, timeout, what, self.driver.current_url,
                                self.driver.title))

    def text(self) -> str:
        from selenium.webdriver.common.by import By
        return self.driver.find_element(By.TAG_NAME, "body").text

    def log_in(self, username: str, password: str) -> List[str]:
        """Fill in the form as a person would; returns the titles seen."""
        from selenium.webdriver.common.by import By
        by_label = {}
        for label in self.driver.find_elements(By.TAG_NAME, "label"):
            by_label[label.text] = self.driver.find_element(By.ID, label.get_attribute("for"))
        by_label["Username"].send_keys(username)
        by_label["Password"].send_keys(password)
        self.shot("login-filled")
        before = self.driver.title
        self.driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        # The proxy may hold the answer up to a second while a quick agent
        # starts; give the navigation that long (a refused login stays here).
        deadline = time.monotonic() + 5
        while self.driver.title == before and time.monotonic() < deadline:
            time.sleep(0.05)
        return [self.driver.title]

    def quit(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.user_data, ignore_errors=True)


@pytest.mark.whole_system
class BrowserTests(unittest.TestCase):

    @classmethod
    def setUpClass(cls) -> None:
        cls.directory = tempfile.mkdtemp(prefix="pxd-browser-")
        os.chmod(cls.directory, 0o711)  # agents run under their own uids
        proxy_args = ["--allow-root"] if os.geteuid() == 0 else []
        banner = os.path.join(cls.directory, "banner.txt")
        with open(banner, "w") as f:
            f.write("Test instance: data is thrown away after the test.")
        # Agents that take a moment to start, as the real one does, so that
        # the browser meets the waiting page (a quick start skips it).
        slow_agent = ("sh -c 'sleep 1.5; exec %s -m pixelated_dispatcher.demo_agent"
                      " --port {port} --data-dir {data_dir} --username {username}'"
                      % sys.executable)
        cls.dispatcher = Dispatcher(cls.directory, proxy_args=proxy_args + ["--banner", banner],
                                    manager_args=["--agent-command", slow_agent])
        cls.profiles: List[Profile] = []
        try:
            cls.dispatcher.start()
            cls.dispatcher.add_user("alice", "alice's password")
            cls.dispatcher.add_user("bob", "bob's password")
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        for profile in cls.profiles:
            profile.quit()
        cls.dispatcher.stop()
        shutil.rmtree(cls.directory, ignore_errors=True)

    def profile(self, name: str) -> Profile:
        profile = Profile(name, self.dispatcher.url, self.directory)
        self.profiles.append(profile)
        return profile

    def logs(self) -> str:
        return self.dispatcher.log_tails(3000)

    def test_a_day_in_the_life_of_two_users(self) -> None:
        alice = self.profile("alice")
        alice.open("/about")
        self.assertTrue(alice.driver.title.startswith("Log in"), alice.driver.title)
        self.assertIn("/auth/login?next=/about", alice.driver.current_url)
        self.assertIn("Test instance", alice.text())
        alice.shot("login-page")

        titles = alice.log_in("alice", "alice's password")
        if titles[0].startswith("Starting your mailbox"):
            alice.shot("waiting-page")
        self.assertTrue(titles[0].startswith("Starting your mailbox"),
                        "expected the waiting page first, got %r\n%s" % (titles, self.logs()))
        alice.wait_for(lambda: alice.driver.title == "About", "the page first asked for")
        self.assertTrue(alice.driver.current_url.endswith("/about"), alice.driver.current_url)
        self.assertIn("serving alice", alice.text())
        alice.shot("first-page")

        alice.open("/")
        alice.wait_for(lambda: alice.driver.title == "Mailbox of alice", "the mailbox")
        alice.shot("mailbox")
        visits = int(alice.driver.find_element("id", "visits").text)
        alice.driver.refresh()
        alice.wait_for(lambda: int(alice.driver.find_element("id", "visits").text) == visits + 1,
                       "the reloaded mailbox")
        alice.shot("reloaded")

        from selenium.webdriver.common.by import By
        alice.driver.find_element(By.LINK_TEXT, "About this agent").click()
        alice.wait_for(lambda: alice.driver.title == "About", "the linked page")
        alice.shot("followed-link")

        bob = self.profile("bob")
        bob.open("/")
        bob.log_in("bob", "bob's password")
        bob.wait_for(lambda: bob.driver.title == "Mailbox of bob", "bob's mailbox")
        bob.shot("mailbox")
        self.assertNotIn("alice", bob.driver.page_source)
        for path in ("/", "/about", "/whoami"):
            bob.open(path)
            self.assertNotIn("alice", bob.driver.page_source, path)
        names = {c["name"] for c in bob.driver.get_cookies()}
        self.assertIn("__Host-pixelated-session", names)
        session = [c for c in bob.driver.get_cookies() if c["name"] == "__Host-pixelated-session"]
        self.assertTrue(session[0]["httpOnly"] and session[0]["secure"])
        self.assertEqual(session[0]["sameSite"], "Lax")

        alice.open("/auth/logout")
        alice.shot("logout-confirmation")
        alice.driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        alice.wait_for(lambda: alice.driver.title.startswith("Log in"), "the login page")
        alice.shot("logged-out")
        alice.open("/")
        self.assertTrue(alice.driver.title.startswith("Log in"), alice.driver.title)

        # bob is not affected by alice's logout
        bob.open("/")
        bob.wait_for(lambda: bob.driver.title == "Mailbox of bob", "bob's mailbox again")

    def test_login_page_works_without_javascript_and_fails_neutrally(self) -> None:
        mallory = self.profile("mallory")
        mallory.driver.execute_cdp_cmd("Emulation.setScriptExecutionDisabled",
                                       {"value": True})
        mallory.open("/auth/login")
        mallory.log_in("alice", "not her password")
        self.assertTrue(mallory.driver.title.startswith("Log in"), mallory.driver.title)
        self.assertIn("Invalid username or password", mallory.text())
        mallory.shot("refused")
        self.assertFalse([c for c in mallory.driver.get_cookies() if "session" in c["name"]])
