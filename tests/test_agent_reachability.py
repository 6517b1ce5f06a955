"""Only the proxy reaches an agent: the real dispatcher as deployed (root
manager, proxy dropped to its own user and group, agents under their own
uids), attacked as other local users, as another user's agent, from another
"host" (a network namespace), and by a port squatter.

Needs root and nft; skips elsewhere, fails under CI=true.
"""
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
import unittest

from pixelated_dispatcher.manager.agent_firewall import table_name_for

from .dispatcher_case import DispatcherCase, wait_until
from .netns import AttackNamespace
from .test_agent_firewall import connect_as, nft_tables

PROXY_USER, OTHER_USER, PROXY_GROUP = "pxnet-proxy", "pxnet-other", "pxnet-proxies"
PASSWORDS = {"alice": "alice's password", "bob": "bob's password"}


def need_root_and_nft():
    reason = None
    if os.getuid() != 0:
        reason = "needs root (accounts, nftables, namespaces)"
    elif shutil.which("nft") is None:
        reason = "needs nft (apt-get install nftables)"
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        raise AssertionError(reason + " (CI=true: a failure, not a skip)")
    raise unittest.SkipTest(reason)


def _run(*argv):
    subprocess.run(argv, check=True, capture_output=True)


def make_accounts():
    remove_accounts()
    _run("groupadd", "--system", PROXY_GROUP)
    _run("useradd", "--system", "--no-create-home", "--gid", PROXY_GROUP,
         "--shell", "/usr/sbin/nologin", PROXY_USER)
    _run("useradd", "--system", "--no-create-home", "--user-group",
         "--shell", "/usr/sbin/nologin", OTHER_USER)


def remove_accounts():
    for user in (PROXY_USER, OTHER_USER):
        subprocess.run(["userdel", user], capture_output=True)
    for group in (OTHER_USER, PROXY_GROUP):
        subprocess.run(["groupdel", group], capture_output=True)


def uid_of(user):
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


class DeployedDispatcherCase(DispatcherCase):
    """Root manager, proxy as PROXY_USER in PROXY_GROUP, users alice and bob."""

    @classmethod
    def setUpClass(cls):
        need_root_and_nft()
        make_accounts()
        cls.tables_before = nft_tables()
        try:
            super().setUpClass()
        except Exception:
            remove_accounts()
            raise

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        remove_accounts()

    @classmethod
    def dispatcher_options(cls):
        return {"manager_args": ["--proxy-group", PROXY_GROUP],
                "proxy_twistd_args": ["--uid", PROXY_USER, "--gid", PROXY_GROUP]}

    @classmethod
    def prepare(cls):
        for name, password in PASSWORDS.items():
            cls.dispatcher.add_user(name, password)

    def logged_in(self, name):
        browser = self.browser()
        self.assertEqual(browser.log_in(name, PASSWORDS[name]).status, 303)
        page = browser.get("/")
        self.assertIn("Mailbox of " + name, page.text)
        return browser

    def agent_port(self, name):
        info = self.dispatcher.ctl("info", name).stdout
        match = re.search(r"address\s+127\.0\.0\.1:(\d+)", info)
        self.assertIsNotNone(match, info)
        return int(match.group(1))

    def agent_record(self, name):
        with open(os.path.join(self.dispatcher.state_dir, "agents", name + ".json")) as f:
            return json.load(f)

    def table(self):
        return table_name_for(self.dispatcher.state_dir)

    def protected_ports(self):
        out = subprocess.run(["nft", "-j", "list", "set", "inet", self.table(), "agents"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            return None
        ports = set()
        for item in json.loads(out.stdout)["nftables"]:
            for element in (item.get("set") or {}).get("elem", []):
                ports.add(element["concat"][1])
        return ports


class OnlyTheProxyReachesAgentsTests(DeployedDispatcherCase):
    prefix = "pxd-reach-"

    def test_other_users_other_agents_and_other_hosts_are_refused(self):
        alice = self.logged_in("alice")
        self.logged_in("bob")
        port = self.agent_port("alice")
        self.assertIn(port, range(20000, 30000))
        self.assertEqual(self.protected_ports(), {port, self.agent_port("bob")})
        # another local account
        self.assertEqual(connect_as(*uid_of(OTHER_USER), port), "ConnectionRefusedError")
        # bob's agent, with exactly its uid and gid
        bob = self.agent_record("bob")
        self.assertNotEqual(bob["uid"], self.agent_record("alice")["uid"])
        self.assertEqual(connect_as(bob["uid"], bob["gid"], port), "ConnectionRefusedError")
        # another "host" sending to 127.0.0.1 through the host's veth
        with AttackNamespace() as other_host:
            with _unprotected_listener() as control:
                # the path is real: an ordinary loopback port is reached this way
                self.assertEqual(other_host.connect("127.0.0.1", control), "connected")
            self.assertEqual(other_host.connect("127.0.0.1", port), "TimeoutError")
            self.assertNotEqual(other_host.connect(other_host.host_ip, port), "connected")
        # root (the manager's probe) still connects, and the proxy still serves alice
        self.assertEqual(connect_as(None, None, port), "connected")
        self.assertIn("Mailbox of alice", alice.get("/").text)

    def test_a_stopped_agents_port_is_released(self):
        self.logged_in("alice")
        port = self.agent_port("alice")
        self.assertIn(port, self.protected_ports())
        self.assertEqual(self.dispatcher.ctl("stop", "alice").returncode, 0)
        self.assertTrue(wait_until(lambda: port not in self.protected_ports(), 10))


class _unprotected_listener:
    """A loopback listener nobody protects: the control of an attack path."""

    def __enter__(self):
        import socket
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        return self.socket.getsockname()[1]

    def __exit__(self, *exc):
        self.socket.close()


class ManagerRestartTests(DeployedDispatcherCase):
    """Agents kept over a manager restart keep their protection, and
    nothing is left behind once the last agent and the manager stop."""

    prefix = "pxd-restart-"

    @classmethod
    def dispatcher_options(cls):
        return dict(super().dispatcher_options(), keep_agents=True)

    def test_the_table_outlives_a_restart_and_goes_with_the_last_agent(self):
        alice = self.logged_in("alice")
        port = self.agent_port("alice")
        table_line = "table inet %s" % self.table()
        self.assertIn(table_line, nft_tables())
        self.dispatcher.stop_manager()
        # the agent runs on, still closed to others while no manager runs
        self.assertEqual(self.protected_ports(), {port})
        self.assertEqual(connect_as(*uid_of(OTHER_USER), port), "ConnectionRefusedError")
        # a stale entry the previous manager left must go at recovery
        subprocess.run(["nft", "add", "element", "inet", self.table(), "agents",
                        "{ 127.0.0.1 . 29999 }"], check=True)
        self.dispatcher.start_manager()
        self.assertTrue(wait_until(lambda: self.protected_ports() == {port}, 15),
                        self.protected_ports())
        self.assertIn("Mailbox of alice", alice.get("/").text)
        self.assertEqual(connect_as(*uid_of(OTHER_USER), port), "ConnectionRefusedError")
        self.dispatcher.stop_agents()
        self.dispatcher.stop_manager()
        self.assertNotIn(table_line, nft_tables())
        self.assertEqual(nft_tables(), self.tables_before)
        self.dispatcher.start_manager()  # for tearDownClass


#: a squatter: watches /proc for agents of this dispatcher and binds their
#: port as fast as it can, serving a page of its own
SQUATTER = r"""
import os, socket, sys, threading, time
marker, deadline = sys.argv[1].encode(), time.monotonic() + float(sys.argv[2])
taken, seen = [], set()
def serve(s):
    while True:
        try:
            c, _ = s.accept()
        except OSError:
            return
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\nSQUATTED by mallory")
        c.close()
while time.monotonic() < deadline:
    for name in os.listdir("/proc"):
        if not name.isdigit() or name in seen:
            continue
        seen.add(name)
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if marker not in b" ".join(argv) or b"--port" not in argv:
            continue
        port = int(argv[argv.index(b"--port") + 1])
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(16)
        except OSError:
            s.close()
            continue
        taken.append(port)
        print("squatting", port, flush=True)
        threading.Thread(target=serve, args=(s,), daemon=True).start()
"""


class PortSquatterTests(DeployedDispatcherCase):
    prefix = "pxd-squat-"

    def test_the_browser_never_sees_a_squatter(self):
        squatter = subprocess.Popen(
            ["setpriv", "--reuid", OTHER_USER, "--regid", OTHER_USER, "--clear-groups", "--",
             sys.executable, "-c", SQUATTER, self.dispatcher.directory, "120"],
            stdout=subprocess.PIPE, text=True)
        self.addCleanup(squatter.wait)
        self.addCleanup(squatter.kill)
        time.sleep(1)  # it has seen what runs already
        mailboxes = 0
        deadline = time.monotonic() + 90
        for attempt in range(6):
            if time.monotonic() > deadline:
                break
            browser = self.browser()
            self.assertEqual(browser.log_in("alice", PASSWORDS["alice"]).status, 303)
            page = browser.get("/")
            for _ in range(100):
                if page.status != 200 or "SQUATTED" in page.text or "Mailbox" in page.text:
                    break
                time.sleep(0.2)  # the waiting page
                page = browser.get("/")
            self.assertNotIn("SQUATTED", page.text)
            if "Mailbox of alice" in page.text:
                mailboxes += 1
            browser.log_out()
            wait_until(lambda: "stopped" in self.dispatcher.ctl("info", "alice").stdout, 10)
        squatter.kill()
        squatted = [line for line in squatter.communicate()[0].splitlines()
                    if line.startswith("squatting")]
        self.assertTrue(squatted, "the squatter never got a port: the test proves nothing")
        self.assertGreater(mailboxes, 0, self.logs())
