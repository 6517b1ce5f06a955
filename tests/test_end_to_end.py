"""The whole dispatcher as an operator runs it: both twistd plugins as real
processes, real TLS, the real pixelated-ctl, the demo agent as real processes,
and an HTTPS client acting as two browsers."""
import hashlib
import json
import os
import re
import shutil
import signal

import psutil

from .dispatcher_case import DispatcherCase, agent_pid, wait_until


def demo_agents_alive(directory):
    """Demo agent processes whose data dir is under ``directory``."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "pixelated_dispatcher.demo_agent" in cmdline and directory in cmdline:
            found.append(process.info["pid"])
    return found


class _DispatcherCase(DispatcherCase):
    keep_agents = False
    prefix = "pxd-e2e-"

    @classmethod
    def dispatcher_options(cls):
        return {"keep_agents": cls.keep_agents}


class TwoUsersTests(_DispatcherCase):

    @classmethod
    def prepare(cls):
        cls.dispatcher.add_user("alice", "alice's password")
        cls.dispatcher.add_user("bob", "bob's password")

    def test_each_browser_reaches_only_its_own_users_agent(self):
        alice, bob = self.browser(), self.browser()
        self.assertEqual(alice.log_in("alice", "alice's password").status, 303)
        self.assertEqual(bob.log_in("bob", "bob's password").status, 303)
        for _ in range(3):
            page_a, page_b = alice.get("/"), bob.get("/")
            self.assertEqual(page_a.status, 200, page_a.text)
            self.assertIn("Mailbox of alice", page_a.text)
            self.assertNotIn("bob", page_a.text)
            self.assertIn("Mailbox of bob", page_b.text)
            self.assertNotIn("alice", page_b.text)
        for browser, name in ((alice, "alice"), (bob, "bob")):
            whoami = browser.get("/whoami").json()
            self.assertEqual((whoami["username"], whoami["credentials_user"]), (name, name))
            self.assertTrue(whoami["authenticated"] and whoami["password_received"])
        self.assertNotEqual(agent_pid(self.dispatcher, "alice"), agent_pid(self.dispatcher, "bob"))

    def test_session_cookie_never_reaches_the_agent(self):
        browser = self.browser()
        browser.log_in("alice", "alice's password")
        name, token = browser.session_cookie()
        echoed = browser.get("/echo", headers={"Cookie": "theme=dark"}).json()
        received = " ".join(echoed["headers"].get("cookie", []))
        self.assertIn("theme=dark", received)
        self.assertNotIn(token, received)
        self.assertNotIn("pixelated", received)
        self.assertNotIn(token, repr(echoed))

    def test_wrong_password_and_unknown_user_are_refused_alike(self):
        wrong, unknown = self.browser(), self.browser()
        answer_wrong = wrong.log_in("alice", "not her password")
        answer_unknown = unknown.log_in("mallory", "alice's password")
        self.assertEqual(answer_wrong.status, answer_unknown.status)
        self.assertNotEqual(answer_wrong.status, 303)
        for browser, answer in ((wrong, answer_wrong), (unknown, answer_unknown)):
            self.assertIn("Invalid username or password", answer.text)
            self.assertFalse([k for k in browser.cookies if "session" in k])
            self.assertEqual(browser.get("/").status, 303)

    def test_without_a_session_browsers_are_sent_to_login_and_xhr_gets_401(self):
        browser = self.browser()
        page = browser.get("/inbox?page=2")
        self.assertEqual(page.status, 303)
        self.assertTrue(page.header("Location").split("?")[0].endswith("/auth/login"))
        xhr = browser.get("/inbox", headers={"X-Requested-With": "XMLHttpRequest"})
        self.assertEqual(xhr.status, 401)

    def test_a_stolen_looking_cookie_is_no_session(self):
        browser = self.browser()
        browser.log_in("alice", "alice's password")
        name, token = browser.session_cookie()
        forged = self.browser()
        forged.cookies[name] = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        self.assertEqual(forged.get("/").status, 303)

    def test_pixelated_ctl_lists_users_and_running_agents(self):
        browser = self.browser()
        browser.log_in("bob", "bob's password")
        browser.get("/")
        listing = self.dispatcher.ctl("list")
        self.assertEqual(listing.returncode, 0, listing.stderr)
        lines = listing.stdout.splitlines()
        self.assertEqual(lines[0].split(), ["USER", "AGENT"])
        self.assertIn(["bob", "running"], [line.split() for line in lines[1:]])
        running = self.dispatcher.ctl("running")
        self.assertIn("bob", running.stdout.split())

    def test_pixelated_ctl_errors_are_one_clear_sentence(self):
        cases = [(("add", "alice", "--password-stdin"), "pw", "exists already"),
                 (("remove", "nobody"), None, "no user named nobody"),
                 (("add", "Not Valid", "--password-stdin"), "pw", "invalid user name"),
                 (("info", "nobody"), None, "no user named nobody")]
        for args, password, message in cases:
            result = self.dispatcher.ctl(*args, password=password)
            self.assertNotEqual(result.returncode, 0, args)
            self.assertIn(message, result.stderr)
            self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
            self.assertNotIn("Traceback", result.stderr)

    def test_pixelated_ctl_without_a_manager_says_so(self):
        result = self.dispatcher.ctl("--socket", os.path.join(self.directory, "nope.sock"),
                                     "list")
        self.assertEqual(result.returncode, 3)
        self.assertIn("cannot reach the manager", result.stderr)

    def test_operator_start_and_stop(self):
        """The operator holds no session, so ``start`` cannot give a stopped
        agent its password: it refuses, and says when the agent starts."""
        self.dispatcher.add_user("carol", "carol's password")
        refused = self.dispatcher.ctl("start", "carol")
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn("starts only with the credentials sealed under carol's session",
                      refused.stderr)
        self.assertIsNone(agent_pid(self.dispatcher, "carol"))
        browser = self.browser()
        browser.log_in("carol", "carol's password")
        self.assertIn("Mailbox of carol", browser.get("/").text)
        started = self.dispatcher.ctl("start", "carol")
        self.assertEqual(started.returncode, 0, started.stderr)
        pid = agent_pid(self.dispatcher, "carol")
        self.assertIn("running at 127.0.0.1:", started.stdout)
        self.assertTrue(psutil.pid_exists(pid))
        stopped = self.dispatcher.ctl("stop", "carol")
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        self.assertTrue(wait_until(lambda: not psutil.pid_exists(pid)))
        again = self.dispatcher.ctl("stop", "carol")
        self.assertIn("not running", again.stderr)

    def test_logout_ends_the_session_and_stops_the_agent(self):
        self.dispatcher.add_user("dave", "dave's password")
        browser = self.browser()
        browser.log_in("dave", "dave's password")
        self.assertIn("Mailbox of dave", browser.get("/").text)
        name, token = browser.session_cookie()
        pid = agent_pid(self.dispatcher, "dave")
        self.assertTrue(pid and psutil.pid_exists(pid))
        answer = browser.log_out()
        self.assertEqual(answer.status, 303)
        self.assertTrue(answer.header("Location").endswith("/auth/login"))
        self.assertTrue(wait_until(lambda: not psutil.pid_exists(pid)),
                        "agent %d still alive after logout" % pid)
        self.assertIsNone(agent_pid(self.dispatcher, "dave"))
        replay = self.browser()
        replay.cookies[name] = token
        self.assertEqual(replay.get("/").status, 303, "the old session must be dead")

    def test_data_persists_across_agent_restarts(self):
        self.dispatcher.add_user("erin", "erin's password")
        browser = self.browser()
        browser.log_in("erin", "erin's password")
        pid = self.visit_count_page(browser)
        browser.log_out()
        self.assertTrue(wait_until(lambda: not psutil.pid_exists(pid[0])))
        browser.log_in("erin", "erin's password")
        again = self.visit_count_page(browser)
        self.assertNotEqual(pid[0], again[0], "a new agent process")
        self.assertEqual(again[1], pid[1] + 1, "the visit count survived the restart")

    def visit_count_page(self, browser):
        page = browser.get("/").text
        visits = int(re.search(r'id="visits">(\d+)<', page).group(1))
        return agent_pid(self.dispatcher, "erin"), visits


def credentials_sha256(whoami):
    """What the demo agent answering ``whoami`` shows when it got the login
    of its user (password "NAME's password") on its stdin."""
    return hashlib.sha256(json.dumps({
        "leap_provider_hostname": whoami["leap_provider_hostname"],
        "user": whoami["username"],
        "password": whoami["username"] + "'s password"}).encode() + b"\n").hexdigest()


class _SealedCredentials:

    def assert_serves_with_the_right_password(self, browser, username):
        """The next requests of ``browser`` reach the mailbox without a
        login page, and the agent shows it got the login's password."""
        def answer():
            page = browser.get("/", headers={"Accept": "text/html"})
            self.assertNotIn("/auth/login", page.header("Location") or "", self.logs())
            return page.status == 200 and "Mailbox of " + username in page.text
        self.assertTrue(wait_until(answer, timeout=20), self.logs())
        self.assertTrue([k for k in browser.cookies if "session" in k], "the same cookie")
        whoami = browser.get("/whoami").json()
        self.assertEqual((whoami["username"], whoami["credentials_user"]), (username, username))
        self.assertEqual(whoami["credentials_sha256"], credentials_sha256(whoami))


class RestartTests(_SealedCredentials, _DispatcherCase):
    """As deployed: agents outlive the manager and the next one adopts them."""
    keep_agents = True

    def test_after_a_manager_restart_a_killed_agent_restarts_with_the_password(self):
        """Log in, restart the manager, kill -9 the agent: the next request
        with the same cookie gets the mailbox, and the agent got the
        password of the login (sealed under the session), without a login."""
        self.dispatcher.add_user("ivan", "ivan's password")
        browser = self.browser()
        browser.log_in("ivan", "ivan's password")
        self.assertIn("Mailbox of ivan", browser.get("/").text)
        self.dispatcher.stop_manager()
        self.dispatcher.start_manager()
        pid = wait_until(lambda: agent_pid(self.dispatcher, "ivan"), timeout=20)
        self.assertTrue(pid, "adopted after the restart")
        os.kill(pid, signal.SIGKILL)
        self.assertTrue(wait_until(lambda: agent_pid(self.dispatcher, "ivan") != pid))
        self.assert_serves_with_the_right_password(browser, "ivan")
        self.assertNotEqual(agent_pid(self.dispatcher, "ivan"), pid, "a new agent")

    def test_the_state_directory_holds_no_password(self):
        password = "a password nobody may find 7f3a"
        self.dispatcher.add_user("judy", password)
        browser = self.browser()
        browser.log_in("judy", password)
        self.assertIn("Mailbox of judy", browser.get("/").text)
        _, token = browser.session_cookie()
        copy = os.path.join(self.directory, "state-copy")
        shutil.copytree(self.dispatcher.state_dir, copy, symlinks=True,
                        ignore=shutil.ignore_patterns("*.sock"))
        self.addCleanup(shutil.rmtree, copy, True)
        names = [os.path.relpath(os.path.join(root, name), copy)
                 for root, _, files in os.walk(copy) for name in files]
        self.assertIn("dispatcher.sqlite", names)
        self.assertIn("dispatcher.sqlite-wal", names)
        needles = [password.encode(), json.dumps(password).encode(), token.encode()]
        found = [(name, needle) for name in names for needle in needles
                 if needle in open(os.path.join(copy, name), "rb").read()]
        self.assertEqual(found, [], "the password (or the token) is in the state directory")

    def test_sessions_survive_restarts_and_the_manager_adopts_running_agents(self):
        self.dispatcher.add_user("alice", "alice's password")
        browser = self.browser()
        browser.log_in("alice", "alice's password")
        self.assertIn("Mailbox of alice", browser.get("/").text)
        pid = agent_pid(self.dispatcher, "alice")
        self.dispatcher.stop_proxy()
        self.dispatcher.start_proxy()
        self.assertIn("Mailbox of alice", browser.get("/").text)
        self.dispatcher.stop_manager()
        self.assertTrue(psutil.pid_exists(pid), "the agent outlives the manager")
        self.dispatcher.start_manager()
        self.assertTrue(wait_until(lambda: browser.get("/").status == 200, timeout=20))
        page = browser.get("/").text
        self.assertIn("Mailbox of alice", page)
        self.assertEqual(agent_pid(self.dispatcher, "alice"), pid, "adopted, not restarted")
        whoami = browser.get("/whoami").json()
        self.assertTrue(whoami["password_received"], "it still has the login's credentials")
        browser.log_out()
        self.assertTrue(wait_until(lambda: not psutil.pid_exists(pid)),
                        "an adopted agent stops at logout like any other")


class ManagerStopTests(_SealedCredentials, _DispatcherCase):
    """With --stop-agents-on-exit (what make demo uses)."""

    def test_stopping_the_manager_leaves_no_agent_process(self):
        for name in ("frank", "grace"):
            self.dispatcher.add_user(name, "pw-" + name)
            browser = self.browser()
            browser.log_in(name, "pw-" + name)
            self.assertIn("Mailbox of " + name, browser.get("/").text)
        self.assertGreaterEqual(len(demo_agents_alive(self.directory)), 2)
        self.dispatcher.stop_manager()
        # twistd re-raises SIGTERM after a clean shutdown, hence -15
        self.assertIn(self.dispatcher.manager.returncode, (0, -15), self.logs()[-3000:])
        self.assertTrue(wait_until(lambda: not demo_agents_alive(self.directory), timeout=10),
                        demo_agents_alive(self.directory))
        self.dispatcher.start_manager()

    def test_after_a_restart_without_agents_the_next_request_starts_the_agent(self):
        """The agents did not survive (a reboot); the session did (SQLite),
        and so did the password, sealed under it: the next request with the
        same cookie starts the agent with the right password, no login."""
        self.dispatcher.add_user("heidi", "heidi's password")
        browser = self.browser()
        browser.log_in("heidi", "heidi's password")
        whoami = browser.get("/whoami").json()
        self.assertEqual(whoami["credentials_sha256"], credentials_sha256(whoami))
        self.dispatcher.stop_manager()
        self.assertFalse(demo_agents_alive(self.directory))
        self.dispatcher.start_manager()
        self.assert_serves_with_the_right_password(browser, "heidi")


class AdministrationTests(_DispatcherCase):

    def add_and_log_in(self, name):
        self.dispatcher.add_user(name, "pw of " + name)
        browser = self.browser()
        self.assertEqual(browser.log_in(name, "pw of " + name).status, 303)
        self.assertIn("Mailbox of " + name, browser.get("/").text)
        return browser

    def ok(self, *args, password=None):
        result = self.dispatcher.ctl(*args, password=password)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def test_passwd_ends_sessions_at_once_and_only_the_new_password_works(self):
        browser = self.add_and_log_in("henry")
        self.ok("passwd", "henry", "--password-stdin", password="new pw")
        self.assertTrue(wait_until(lambda: browser.get("/").status == 303, timeout=1.5))
        self.assertNotEqual(self.browser().log_in("henry", "pw of henry").status, 303)
        self.assertEqual(self.browser().log_in("henry", "new pw").status, 303)

    def test_logout_name_revokes_every_session_and_sessions_lists_them(self):
        first, second = self.add_and_log_in("ivy"), self.browser()
        second.log_in("ivy", "pw of ivy")
        listing = self.ok("sessions", "ivy").splitlines()
        self.assertEqual(listing[0].split(), ["LOGIN", "LAST", "SEEN", "CLIENT"])
        self.assertEqual(len(listing), 3)
        self.assertIn("127.0.0.1", listing[1])
        self.assertIn("ended 2 sessions of ivy", self.ok("logout", "ivy"))
        for browser in (first, second):
            self.assertTrue(wait_until(lambda: browser.get("/").status == 303, timeout=1.5))

    def test_info_and_stats_report_uptime_and_memory(self):
        self.add_and_log_in("jack")
        info = dict(line.split(None, 1) for line in self.ok("info", "jack").splitlines()
                    if line and not line.startswith("last"))
        self.assertEqual(info["state"], "running")
        self.assertTrue(info["memory"].endswith("MiB") and float(info["memory"].split()[0]) > 1)
        self.assertRegex(info["uptime"], r"^\d+:\d\d:\d\d$")
        stats = json.loads(self.ok("stats", "--json"))
        self.assertGreaterEqual(stats["running"], 1)
        self.assertIn("jack", [agent["username"] for agent in stats["agents"]])
        self.assertGreater(stats["memory"], 1024 * 1024)
        listed = json.loads(self.ok("list", "--json"))
        self.assertIn({"username": "jack", "state": "running"}, listed)

    def test_remove_purge_and_reset_data_delete_the_data(self):
        self.add_and_log_in("kate")
        data = os.path.join(self.dispatcher.state_dir, "users", "kate", "data")
        self.assertTrue(os.listdir(data), "the demo agent keeps a visit counter there")
        self.ok("reset-data", "kate")
        self.assertEqual(os.listdir(data), [])
        self.ok("remove", "kate")
        self.assertTrue(os.path.isdir(data), "plain remove keeps the data")
        self.dispatcher.add_user("kate", "again")
        self.ok("remove", "kate", "--purge")
        self.assertFalse(os.path.exists(os.path.dirname(data)))


class LegacyImportTests(_DispatcherCase):

    def make_legacy_user(self, root, name, password, salt="3139303037363439"):
        import hashlib
        directory = os.path.join(root, name)
        os.makedirs(os.path.join(directory, "data"))
        digest = hashlib.scrypt(password.encode(), salt=salt.encode(), n=16384, r=8, p=1,
                                dklen=64).hex()
        with open(os.path.join(directory, "user.cfg"), "w") as f:
            f.write("[auth]\nsalt = %s\nhashed_password = %s\n" % (salt, digest))
        with open(os.path.join(directory, "data", "mail.txt"), "w") as f:
            f.write("old mail of " + name)

    def test_legacy_users_log_in_with_their_old_passwords_and_keep_their_data(self):
        root = os.path.join(self.directory, "legacy")
        self.make_legacy_user(root, "olduser", "old secret")
        self.make_legacy_user(root, "other", "other secret", salt="3331")
        os.makedirs(os.path.join(root, "providers", "keys"))
        os.makedirs(os.path.join(root, "Bad Name"))
        os.makedirs(os.path.join(root, "nocfg"))
        first = self.dispatcher.ctl("import-legacy", root)
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertIn("imported olduser: data moved", first.stdout)
        self.assertIn("skipped  Bad Name: the name breaks the user name rule", first.stdout)
        self.assertIn("skipped  nocfg: no user.cfg", first.stdout)
        self.assertNotIn("providers", first.stdout)
        self.assertIn("2 imported, 2 skipped", first.stdout)
        again = self.dispatcher.ctl("import-legacy", root)
        self.assertIn("skipped  olduser: imported already", again.stdout)
        self.assertIn("0 imported, 4 skipped", again.stdout)
        browser = self.browser()
        self.assertNotEqual(browser.log_in("olduser", "wrong").status, 303)
        self.assertEqual(browser.log_in("olduser", "old secret").status, 303)
        self.assertIn("Mailbox of olduser", browser.get("/").text)
        data = os.path.join(self.dispatcher.state_dir, "users", "olduser", "data")
        with open(os.path.join(data, "mail.txt")) as f:
            self.assertEqual(f.read(), "old mail of olduser")
        # the first login replaced the old scrypt hash with argon2id
        import sqlite3
        with sqlite3.connect(os.path.join(self.dispatcher.state_dir, "dispatcher.sqlite")) as db:
            (stored,) = db.execute("SELECT password_hash FROM users WHERE username = 'olduser'"
                                   ).fetchone()
        self.assertTrue(stored.startswith("$argon2id$"), stored)
        self.assertEqual(self.browser().log_in("olduser", "old secret").status, 303)
