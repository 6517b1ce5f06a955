"""Process-provider agents are limited like containers: a cgroup per agent
(cgroup v1 or v2, whichever the host's controllers are on), with the real
manager, proxy, ``pixelated-ctl`` and demo agents.

* an agent that allocates past ``--agent-memory`` is killed by the kernel,
  ``pixelated-ctl info`` says it failed "out of memory", and another user's
  agent keeps running;
* the agent's processes are in its cgroup from the first instruction on, its
  limits are the options', ``info`` shows them, and the cgroup goes with
  the agent.

Needs root (agents under their own uids, cgroups); fails under ``CI=true``
rather than skipping.
"""
import os

from pixelated_dispatcher.manager.providers.agent_cgroup import MiB

from .dispatcher_case import DispatcherCase, agent_pid, wait_until
from .process_fixtures import require_root

LIMIT = "96m"


def cgroup_dirs(pid):
    """The agent's cgroup directories (one per v1 hierarchy, or the v2 one)
    for its memory and pids controllers, from ``/proc/<pid>/cgroup``."""
    dirs = {}
    with open("/proc/%d/cgroup" % (pid,)) as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else ["unified"]:
                dirs[controller] = path
    return dirs


def info(dispatcher, name):
    result = dispatcher.ctl("info", name)
    assert result.returncode == 0, result.stderr
    return dict(line.split(None, 1) for line in result.stdout.splitlines() if " " in line)


class ProcessAgentLimits(DispatcherCase):
    prefix = "pxd-limits-"

    @classmethod
    def dispatcher_options(cls):
        return {"manager_args": ["--agent-memory", LIMIT, "--agent-pids", "64",
                                 "--agent-cpu-shares", "512"]}

    @classmethod
    def setUpClass(cls):
        if os.geteuid() == 0:
            super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        if os.geteuid() == 0:
            super().tearDownClass()

    @classmethod
    def prepare(cls):
        for name in ("alice", "bob", "carol"):
            cls.dispatcher.add_user(name, name + "'s password")

    def setUp(self):
        require_root(self)

    def logged_in(self, name):
        browser = self.browser()
        self.assertEqual(browser.log_in(name, name + "'s password").status, 303)
        page = browser.get("/")
        self.assertEqual(page.status, 200, page.text + self.logs())
        return browser

    def test_an_agent_past_its_memory_limit_is_killed_and_reported(self):
        bob = self.logged_in("bob")
        alice = self.logged_in("alice")
        pid = agent_pid(self.dispatcher, "alice")
        answer = alice.get("/hog?mib=400")  # far past 96 MiB
        self.assertNotEqual(answer.status, 200, answer.text)
        # the kernel kills it; the manager reaps it (the proxy's answer may
        # come first, while the process is still going)
        self.assertTrue(wait_until(lambda: not os.path.exists("/proc/%d" % (pid,)), 10),
                        "the agent outlived its memory limit\n" + self.logs())
        # The proxy asked for a new agent at once (the request in flight saw
        # the old one go); info keeps the failure and its reason.
        details = info(self.dispatcher, "alice")
        reason = details.get("reason") or details["last"]
        self.assertIn("killed for running out of memory (OOM-killed at its limit of 96 MiB)",
                      reason, details)
        self.assertIn("agent of alice was killed for running out of memory", self.logs(20000))
        # bob's agent never noticed
        self.assertEqual(info(self.dispatcher, "bob")["state"].strip(), "running")
        self.assertEqual(bob.get("/whoami").status, 200)
        # and alice gets a new agent on her next visit
        self.assertTrue(wait_until(lambda: alice.get("/").status == 200, 30), self.logs())

    def test_the_agent_is_in_its_cgroup_with_the_limits(self):
        self.logged_in("carol")
        pid = agent_pid(self.dispatcher, "carol")
        dirs = cgroup_dirs(pid)
        details = info(self.dispatcher, "carol")
        self.assertIn("memory 96 MiB, 64 processes, CPU shares 512", details["limits"])
        memory_root = "/sys/fs/cgroup/memory"
        if os.path.isdir(memory_root) and "memory" in dirs:  # cgroup v1
            memory = memory_root + dirs["memory"]
            pids = "/sys/fs/cgroup/pids" + dirs["pids"]
            self.assertTrue(memory.endswith("/carol"), memory)
            with open(os.path.join(memory, "memory.limit_in_bytes")) as f:
                self.assertEqual(int(f.read()), 96 * MiB)
            with open(os.path.join(pids, "pids.max")) as f:
                self.assertEqual(f.read().strip(), "64")
        else:  # cgroup v2
            directory = "/sys/fs/cgroup" + dirs["unified"]
            self.assertTrue(directory.endswith("/carol"), directory)
            with open(os.path.join(directory, "memory.max")) as f:
                self.assertEqual(int(f.read()), 96 * MiB)
            with open(os.path.join(directory, "pids.max")) as f:
                self.assertEqual(f.read().strip(), "64")
            memory = directory
        self.assertIn(os.path.dirname(memory), details["limits"])
        result = self.dispatcher.ctl("stop", "carol")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(wait_until(lambda: not os.path.exists(memory), 10),
                        "the cgroup %s outlived its agent" % (memory,))
