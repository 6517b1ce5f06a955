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
import subprocess
import sys
import time

from pixelated_dispatcher.manager.agent_firewall import table_name_for

from .dispatcher_case import DispatcherCase, wait_until
from .netns import AttackNamespace
from .firewall_probes import (connect_as, fetch_as, granted_ports_of, nft_tables,
                              protected_ports_of, require_nft)

#: account names of this test run (runs of other worktrees at the same time
#: make their own: one run's teardown must not delete another's proxy user)
_RUN = "%04x" % (os.getpid() & 0xffff)
PROXY_USER, OTHER_USER, PROXY_GROUP = ("pxnet-proxy-" + _RUN, "pxnet-other-" + _RUN,
                                       "pxnet-proxies-" + _RUN)
PASSWORDS = {"alice": "alice's password", "bob": "bob's password"}


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
        require_nft(root_for="(accounts, nftables, namespaces)")
        make_accounts()
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

    def logged_in(self, name, password=None):
        browser = self.browser()
        self.assertEqual(browser.log_in(name, password or PASSWORDS[name]).status, 303)
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
        return protected_ports_of(self.table())


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


#: connect to every port of a range, as whoever runs it; prints the ports
#: that accepted
SCAN = """
import socket, sys
reached = []
for port in range(int(sys.argv[1]), int(sys.argv[2]) + 1):
    s = socket.socket()
    s.settimeout(0.5)
    try:
        s.connect(("127.0.0.1", port))
        reached.append(port)
    except OSError:
        pass
    finally:
        s.close()
print(" ".join(map(str, reached)))
"""


class CompromisedProxyTests(DeployedDispatcherCase):
    """What a compromised proxy gets: its own uid and primary group (what
    the real proxy runs with), connecting to agents directly instead of
    through the code it was meant to run. It reaches the agents of users
    with a live session, whose tokens it sees at their next request anyway,
    and never the agent of a user without one, running or not."""

    prefix = "pxd-proxyreach-"

    def proxy_reaches(self, port):
        return connect_as(*uid_of(PROXY_USER), port)

    def proxy_reads(self, port):
        return fetch_as(*uid_of(PROXY_USER), "http://127.0.0.1:%d/" % port)

    def scan(self, ports):
        """The agent ports the proxy's uid can connect to."""
        uid, gid = uid_of(PROXY_USER)
        out = subprocess.run(
            ["setpriv", "--reuid", str(uid), "--regid", str(gid), "--clear-groups", "--",
             sys.executable, "-c", SCAN, str(min(ports)), str(max(ports))],
            capture_output=True, text=True, timeout=120, check=True).stdout
        return {int(port) for port in out.split()} & set(ports)

    def test_the_proxy_reaches_the_agents_of_logged_in_users_only(self):
        bob = self.logged_in("bob")
        bobs_port = self.agent_port("bob")
        self.assertIn("Mailbox of bob", self.proxy_reads(bobs_port), "granted while bob is in")
        # an operator ends bob's sessions: his agent runs on (the idle culler
        # stops it hours later), but the proxy's reach ends at once
        self.assertEqual(self.dispatcher.ctl("logout", "bob").returncode, 0)
        self.assertIn(bobs_port, self.protected_ports(), "bob's agent still runs")
        self.assertEqual(connect_as(None, None, bobs_port), "connected", "root: the probe")
        self.assertEqual(self.proxy_reaches(bobs_port), "ConnectionRefusedError")
        self.assertNotIn("Mailbox", self.proxy_reads(bobs_port))
        # bob's revoked cookie opens nothing again
        self.assertNotIn("Mailbox of bob", bob.get("/").text)
        self.assertEqual(self.proxy_reaches(bobs_port), "ConnectionRefusedError")

        alice = self.logged_in("alice")
        alices_port = self.agent_port("alice")
        self.assertEqual(granted_ports_of(self.table()), {alices_port})
        self.assertIn("Mailbox of alice", self.proxy_reads(alices_port))
        # a scan of the whole agent port range by the proxy's uid finds alice
        # (other dispatchers' agents on this machine may show up: not bob's)
        found = self.scan(range(20000, 30000))
        self.assertIn(alices_port, found)
        self.assertNotIn(bobs_port, found)
        self.assertIn("Mailbox of alice", alice.get("/").text)

        # a second session of alice ends: the first one still holds the grant
        second = self.logged_in("alice")
        self.assertEqual(second.log_out().status, 303)
        self.assertIn("Mailbox of alice", self.proxy_reads(alices_port))
        # her password changes (every session ends): the agent runs on, closed
        # to the proxy
        result = self.dispatcher.ctl("passwd", "alice", "--password-stdin",
                                     password="alice's new password")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(connect_as(None, None, alices_port), "connected")
        self.assertEqual(self.proxy_reaches(alices_port), "ConnectionRefusedError")
        self.assertEqual(granted_ports_of(self.table()), set())
        # her next login: the proxy asks for the agent again (it dropped the
        # address with her sessions), which grants it anew
        self.logged_in("alice", "alice's new password")
        self.assertEqual(self.agent_port("alice"), alices_port, "the same agent, granted anew")
        self.assertEqual(granted_ports_of(self.table()), {alices_port})
        self.assertEqual(self.proxy_reaches(bobs_port), "ConnectionRefusedError")


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
        self.assertEqual(granted_ports_of(self.table()), {port}, "alice is logged in")
        # a stale entry (and grant) the previous manager left must go at recovery
        for set_name in ("agents", "granted"):
            subprocess.run(["nft", "add", "element", "inet", self.table(), set_name,
                            "{ 127.0.0.1 . 29999 }"], check=True)
        self.dispatcher.start_manager()
        self.assertTrue(wait_until(lambda: self.protected_ports() == {port}, 15),
                        self.protected_ports())
        # alice's session lives on: her agent's grant is kept over the restart
        self.assertTrue(wait_until(lambda: granted_ports_of(self.table()) == {port}, 15),
                        granted_ports_of(self.table()))
        self.assertIn("Mailbox of alice", alice.get("/").text)
        self.assertEqual(connect_as(*uid_of(OTHER_USER), port), "ConnectionRefusedError")
        self.dispatcher.stop_agents()
        self.dispatcher.stop_manager()
        # (other managers on this machine come and go: only ours is looked at)
        self.assertNotIn(table_line, nft_tables())
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
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if marker not in b" ".join(argv) or b"--port" not in argv:
            # a new process shows its parent's argv, or nothing, until it
            # execs the agent: look again next time
            if argv != [b""] and marker not in b" ".join(argv):
                seen.add(name)
            continue
        seen.add(name)
        port = int(argv[argv.index(b"--port") + 1])
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(16)
        except OSError as e:
            print("lost", port, e, flush=True)
            s.close()
            continue
        taken.append(port)
        print("squatting", port, flush=True)
        threading.Thread(target=serve, args=(s,), daemon=True).start()
"""


#: the demo agent, started after a second, as the real Pixelated agent (which
#: takes seconds to bind its port): time enough for any squatter to win
SLOW_AGENT = (
    "%s -c 'import os, sys, time; time.sleep(1); os.execv(sys.executable, [sys.executable,"
    " \"-m\", \"pixelated_dispatcher.demo_agent\"] + sys.argv[1:])'"
    " --port {port} --data-dir {data_dir} --username {username}" % (sys.executable,))


class PortSquatterTests(DeployedDispatcherCase):
    """A squatter of another uid binds every starting agent's port before the
    agent does. It can make starts fail (it can bind ports; only a network
    namespace per agent would stop that), but no browser ever sees it."""

    prefix = "pxd-squat-"

    @classmethod
    def dispatcher_options(cls):
        options = super().dispatcher_options()
        options["manager_args"] = options["manager_args"] + ["--agent-command", SLOW_AGENT]
        return options

    def squatter(self):
        squatter = subprocess.Popen(
            ["setpriv", "--reuid", OTHER_USER, "--regid", OTHER_USER, "--clear-groups", "--",
             sys.executable, "-c", SQUATTER, self.dispatcher.directory, "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(squatter.wait)
        self.addCleanup(squatter.kill)
        time.sleep(1)  # it has seen what runs already
        return squatter

    def visit(self):
        """Log alice in and wait for the agent's page or the proxy's error."""
        browser = self.browser()
        self.assertEqual(browser.log_in("alice", PASSWORDS["alice"]).status, 303)
        page = browser.get("/")
        deadline = time.monotonic() + 60
        while page.status == 200 and "Mailbox" not in page.text \
                and "SQUATTED" not in page.text and time.monotonic() < deadline:
            time.sleep(0.3)  # the waiting page
            page = browser.get("/")
        return browser, page

    def test_the_browser_never_sees_a_squatter_and_alice_gets_in_once_it_is_gone(self):
        squatter = self.squatter()
        for _ in range(2):
            browser, page = self.visit()
            self.assertNotIn("SQUATTED", page.text)
            self.assertNotIn("Mailbox of alice", page.text)
            info = self.dispatcher.ctl("info", "alice").stdout
            self.assertIn("took its port first", info)
            self.assertIn(str(uid_of(OTHER_USER)[0]), info)
            browser.log_out()
        squatter.kill()
        out, err = squatter.communicate()
        squatted = [line for line in out.splitlines() if line.startswith("squatting")]
        self.assertGreaterEqual(len(squatted), 2, "the squatter lost: no proof (%s)" % err)
        browser, page = self.visit()
        self.assertIn("Mailbox of alice", page.text, self.logs())
