"""Privilege separation with real system accounts (as root, as CI runs).

The test makes its own groups and users, starts the real manager with them as
``--proxy-group`` and ``--admin-group``, runs the proxy dropped to the proxy
user, and runs the real pixelated-ctl as each kind of user.
"""
import grp
import json
import os
import pwd
import stat
import subprocess
import sys
import unittest

import psutil

from pixelated_dispatcher.demo import CTL

from .dispatcher_case import DispatcherCase

PROXY_USER, ADMIN_USER, OTHER_USER = "pxdt-proxy", "pxdt-operator", "pxdt-other"
PROXY_GROUP, ADMIN_GROUP = "pxdt-proxies", "pxdt-admins"


def _need_root():
    if os.getuid() != 0:
        if os.environ.get("CI") == "true":
            raise AssertionError("CI runs as root; these tests must not be skipped there")
        raise unittest.SkipTest("needs root to create system accounts")


def _run(*argv):
    subprocess.run(argv, check=True, capture_output=True)


def _make_accounts():
    _remove_accounts()
    _run("groupadd", "--system", ADMIN_GROUP)
    _run("groupadd", "--system", PROXY_GROUP)
    _run("useradd", "--system", "--no-create-home", "--gid", PROXY_GROUP,
         "--shell", "/usr/sbin/nologin", PROXY_USER)
    _run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
         "--user-group", "--groups", "%s,%s" % (ADMIN_GROUP, PROXY_GROUP), ADMIN_USER)
    _run("useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin",
         OTHER_USER)


def _remove_accounts():
    for user in (PROXY_USER, ADMIN_USER, OTHER_USER):
        subprocess.run(["userdel", user], capture_output=True)
    for group in (ADMIN_USER, OTHER_USER, ADMIN_GROUP, PROXY_GROUP):
        subprocess.run(["groupdel", group], capture_output=True)


class PrivilegeTests(DispatcherCase):
    prefix = "pxd-priv-"

    @classmethod
    def setUpClass(cls):
        _need_root()
        _make_accounts()
        super().setUpClass()

    @classmethod
    def dispatcher_options(cls):
        return {"manager_args": ["--proxy-group", PROXY_GROUP, "--admin-group", ADMIN_GROUP],
                "proxy_twistd_args": ["--uid", PROXY_USER, "--gid", PROXY_GROUP]}

    @classmethod
    def prepare(cls):
        cls.dispatcher.add_user("alice", "alice's password")
        cls.dispatcher.add_user("bob", "bob's password")

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        _remove_accounts()

    def ctl_as(self, user, *args):
        return subprocess.run(
            ["setpriv", "--reuid", user, "--regid", str(pwd.getpwnam(user).pw_gid), "--init-groups",
             "--"] + CTL
            + ["--socket", self.dispatcher.socket] + list(args),
            capture_output=True, text=True, timeout=60, input="pw\n")

    def amp_as(self, user, calls):
        """Run AMP ``calls`` (see ``pixelated_dispatcher.testing.amp_peer``)
        as ``user``; the answers. From ``/``: the clone may be closed to
        ``user``, the runtime copy is not."""
        result = subprocess.run(
            ["setpriv", "--reuid", user, "--regid", str(pwd.getpwnam(user).pw_gid),
             "--init-groups", "--", sys.executable, "-m", "pixelated_dispatcher.testing.amp_peer",
             self.dispatcher.socket],
            capture_output=True, text=True, timeout=60, input=json.dumps(calls), cwd="/")
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout)

    def test_a_proxy_reaches_an_agent_only_with_a_session_of_its_user(self):
        """A compromised proxy (a proxy-group peer) holding bob's session
        asks for alice's agent, for a user nobody has, and with no session:
        one answer, InvalidSession, telling nothing; with alice's own
        session it works. The admin asks without one."""
        answers = self.amp_as(PROXY_USER, [
            ["Authenticate", {"username": "alice", "password": "alice's password",
                              "client": "192.0.2.1"}],
            ["Authenticate", {"username": "bob", "password": "bob's password",
                              "client": "192.0.2.2"}],
            ["EnsureAgent", {"username": "alice"}],
            ["EnsureAgent", {"username": "alice", "token": "$1.token"}],
            ["EnsureAgent", {"username": "nobody", "token": "$1.token"}],
            ["LocateAgent", {"username": "alice", "token": "$1.token"}],
            ["EnsureAgent", {"username": "alice", "token": "not-a-session"}],
            ["EnsureAgent", {"username": "alice", "token": "$0.token"}],
            ["LocateAgent", {"username": "alice", "token": "$0.token"}],
            ["LocateAgent", {"username": "alice", "token": "$1.token"}],
            ["LocateAgent", {"username": "nobody", "token": "$1.token"}],
        ])
        refused = [answers[i] for i in (2, 3, 4, 5, 6, 9, 10)]
        self.assertEqual({(a.get("error"), a.get("message")) for a in refused},
                         {("INVALID_SESSION", "no such session, or it has expired")}, answers)
        started, located = answers[7]["answer"], answers[8]["answer"]
        self.assertEqual(started, located)
        self.assertEqual(started["host"], "127.0.0.1")
        self.assertIsNone(self.dispatcher.manager.poll())
        admin = self.amp_as(ADMIN_USER, [["LocateAgent", {"username": "alice"}],
                                         ["LocateAgent", {"username": "nobody"}]])
        self.assertEqual(admin[0], {"answer": started})
        self.assertEqual(admin[1]["error"], "UNKNOWN_USER")
        # bob's agent was never started by all this
        self.assertIn("stopped", self.dispatcher.ctl("info", "bob").stdout)

    def test_socket_belongs_to_the_proxy_group_and_is_not_world_accessible(self):
        gid = grp.getgrnam(PROXY_GROUP).gr_gid
        info = os.stat(self.dispatcher.socket)
        self.assertTrue(stat.S_ISSOCK(info.st_mode))
        self.assertEqual((info.st_mode & 0o777, info.st_gid), (0o660, gid))
        directory = os.stat(os.path.dirname(self.dispatcher.socket))
        self.assertEqual((directory.st_mode & 0o777, directory.st_gid), (0o750, gid))

    def test_other_users_cannot_even_reach_the_manager(self):
        result = self.ctl_as(OTHER_USER, "list")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("permission denied", result.stderr)
        self.assertNotIn("alice", result.stdout)

    def test_the_proxy_user_may_not_administer(self):
        for args in (("list",), ("add", "mallory", "--password-stdin"), ("remove", "alice")):
            result = self.ctl_as(PROXY_USER, *args)
            self.assertNotEqual(result.returncode, 0, args)
            self.assertIn("permission denied: the manager refuses this command to you",
                          result.stderr)
        self.assertNotIn("mallory", self.dispatcher.ctl("list").stdout)

    def test_admin_group_members_may_administer(self):
        result = self.ctl_as(ADMIN_USER, "list")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("alice", result.stdout)

    def test_the_proxy_runs_as_its_own_user_and_still_logs_users_in(self):
        uid = pwd.getpwnam(PROXY_USER).pw_uid
        proxy = psutil.Process(self.dispatcher.proxy.pid)
        self.assertEqual(proxy.uids().real, uid)
        self.assertEqual(proxy.uids().effective, uid)
        browser = self.browser()
        self.assertEqual(browser.log_in("alice", "alice's password").status, 303)
        self.assertIn("Mailbox of alice", browser.get("/").text)
