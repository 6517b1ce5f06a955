"""agent_cgroup without root: where the cgroups go on cgroup v1 and v2 hosts
(from ``/proc`` and ``/sys`` laid out in a temporary directory, as the kernel
shows them on Debian 12 (v2) and on a hybrid host (v1)), what is written,
the pre-exec step, the options. The real kernel is in
``tests/test_process_limits.py``."""
import os
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.manager.providers.agent_cgroup import (
    AgentLimits, CgroupUnavailable, MiB, V1Cgroups, V2Cgroups, cpu_weight, find_cgroups,
    group_name, limits_from_config, out_of_memory_reason)

LIMITS = AgentLimits(memory=64 * MiB, pids=100, cpu_shares=512)

V2_MOUNTINFO = "30 23 0:26 / {root}/sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
V1_MOUNTINFO = "".join(
    "3%d 31 0:2%d / {root}/sys/fs/cgroup/%s rw - cgroup cgroup rw,%s\n" % (n, n, name, opts)
    for n, (name, opts) in enumerate([("cpu,cpuacct", "cpu,cpuacct"), ("memory", "memory"),
                                      ("pids", "pids")])) + \
    "40 31 0:38 / {root}/sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def read(path):
    with open(path) as f:
        return f.read()


class Host:
    """A fake ``/proc`` and ``/sys/fs/cgroup`` (files only: no kernel rules,
    except EBUSY on v2's subtree_control of a cgroup that holds processes)."""

    def __init__(self, case, mountinfo, proc_cgroup, pid=4242):
        self.root = tempfile.mkdtemp()
        case.addCleanup(subprocess.call, ["rm", "-rf", self.root])
        self.pid = pid
        write(os.path.join(self.root, "proc/self/mountinfo"), mountinfo.format(root=self.root))
        write(os.path.join(self.root, "proc/%d/cgroup" % pid), proc_cgroup)

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def find(self):
        return find_cgroups(LIMITS, "pixelated-agents-x", pid=self.pid,
                            proc=self.path("proc"))


class V2(SynchronousTestCase):
    """Debian 12: controllers on the unified hierarchy; the agents' cgroups
    go to its top (not below the manager's unit, see the module docstring)."""

    def host(self, controllers="cpuset cpu io memory pids\n", enabled=""):
        host = Host(self, V2_MOUNTINFO, "0::/system.slice/pixelated-manager.service\n")
        root = host.path("sys/fs/cgroup")
        write(os.path.join(root, "cgroup.controllers"), controllers)
        write(os.path.join(root, "cgroup.subtree_control"), enabled)
        return host, root

    def test_agents_cgroups_at_the_top_with_controllers_enabled(self):
        host, root = self.host()
        cgroups = host.find()
        self.assertIsInstance(cgroups, V2Cgroups)
        base = os.path.join(root, "pixelated-agents-x")
        self.assertEqual(cgroups.bases, (base,))
        self.assertFalse(os.path.exists(base))  # made at the first start
        cgroups.create("alice")
        self.assertEqual(read(os.path.join(root, "cgroup.subtree_control")),
                         "+memory +pids +cpu")
        self.assertEqual(read(os.path.join(base, "cgroup.subtree_control")),
                         "+memory +pids +cpu")
        alice = os.path.join(base, "alice")
        self.assertEqual(read(os.path.join(alice, "memory.max")), str(64 * MiB))
        self.assertEqual(read(os.path.join(alice, "pids.max")), "100")
        self.assertEqual(read(os.path.join(alice, "cpu.weight")), str(cpu_weight(512)))
        self.assertEqual(cgroups.enter_argv("alice")[-2], os.path.join(alice, "cgroup.procs"))
        self.assertFalse(cgroups.oom_killed("alice"))
        write(os.path.join(alice, "memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
        self.assertTrue(cgroups.oom_killed("alice"))
        self.assertIn("cgroup v2", cgroups.describe())

    def test_controllers_already_enabled_are_left_alone(self):
        host, root = self.host(enabled="cpu memory pids io\n")
        host.find().create("alice")
        self.assertEqual(read(os.path.join(root, "cgroup.subtree_control")),
                         "cpu memory pids io\n")

    def test_no_memory_controller_on_v2_is_an_error(self):
        host, root = self.host(controllers="memory cpu\n")  # pids missing
        self.assertIn("pids", str(self.assertRaises(CgroupUnavailable, host.find)))


class ReadOnlyTree(SynchronousTestCase):
    """A container's view of the host's cgroups (systemd-nspawn mounts them
    read-only): the manager refuses at start, naming the cause and the fix,
    rather than failing every agent's start with "Read-only file system"."""

    def test_read_only_v1_hierarchy(self):
        host = Host(self, V1_MOUNTINFO.replace("/memory rw -", "/memory ro,nosuid -"),
                    "12:pids:/\n5:memory:/\n3:cpu,cpuacct:/\n0::/\n")
        write(host.path("sys/fs/cgroup/unified/cgroup.controllers"), "")
        message = str(self.assertRaises(CgroupUnavailable, host.find))
        self.assertIn("read-only", message)
        self.assertIn("--agent-memory 0", message)

    def test_read_only_v2_tree(self):
        host = Host(self, V2_MOUNTINFO.replace("rw,nosuid - cgroup2", "ro,nosuid - cgroup2"),
                    "0::/system.slice/pixelated-manager.service\n")
        write(host.path("sys/fs/cgroup/cgroup.controllers"), "cpu memory pids\n")
        self.assertIn("read-only", str(self.assertRaises(CgroupUnavailable, host.find)))


class V1(SynchronousTestCase):
    """A hybrid host like this project's CI: controllers on v1 hierarchies,
    cgroup2 without controllers at /sys/fs/cgroup/unified."""

    def test_one_directory_per_controller_below_the_managers_cgroups(self):
        host = Host(self, V1_MOUNTINFO, "12:pids:/\n5:memory:/box/7\n3:cpu,cpuacct:/\n0::/\n")
        write(host.path("sys/fs/cgroup/unified/cgroup.controllers"), "")
        cgroups = host.find()
        self.assertIsInstance(cgroups, V1Cgroups)
        self.assertEqual(cgroups.bases, (
            host.path("sys/fs/cgroup/memory/box/7/pixelated-agents-x"),
            host.path("sys/fs/cgroup/pids/pixelated-agents-x"),
            host.path("sys/fs/cgroup/cpu,cpuacct/pixelated-agents-x")))
        for base in cgroups.bases:
            self.assertFalse(os.path.exists(base))  # made at the first start
        cgroups._prepare()
        memory = host.path("sys/fs/cgroup/memory/box/7/pixelated-agents-x/alice")
        os.makedirs(memory)
        write(os.path.join(memory, "memory.memsw.limit_in_bytes"), "")
        # (create() replaces a leftover with rmdir, which only the kernel
        # does for a directory of files: made by hand here)
        for directory in cgroups.directories("alice")[1:]:
            os.makedirs(directory)
        cgroups._apply("alice")
        self.assertEqual(read(os.path.join(memory, "memory.limit_in_bytes")), str(64 * MiB))
        self.assertEqual(read(os.path.join(memory, "memory.memsw.limit_in_bytes")),
                         str(64 * MiB))
        self.assertEqual(read(host.path("sys/fs/cgroup/pids/pixelated-agents-x/alice/pids.max")),
                         "100")
        self.assertEqual(read(host.path(
            "sys/fs/cgroup/cpu,cpuacct/pixelated-agents-x/alice/cpu.shares")), "512")
        write(os.path.join(memory, "memory.oom_control"),
              "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
        self.assertTrue(cgroups.oom_killed("alice"))
        self.assertEqual(cgroups.users(), {"alice"})

    def test_no_memory_controller_anywhere(self):
        host = Host(self, "40 31 0:38 / {root}/sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
                    "0::/\n")
        write(host.path("sys/fs/cgroup/unified/cgroup.controllers"), "")
        self.assertIn("--agent-memory 0", str(self.assertRaises(CgroupUnavailable, host.find)))


class EnterBeforeExec(SynchronousTestCase):
    def test_the_command_runs_with_its_pid_already_written(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(subprocess.call, ["rm", "-rf", directory])
        cgroups = V1Cgroups(LIMITS, "v1", (os.path.join(directory, "a"),
                                           os.path.join(directory, "b")))
        for d in cgroups.directories("alice"):
            os.makedirs(d)
        files = [os.path.join(d, "cgroup.procs") for d in cgroups.directories("alice")]
        # The command itself reads the files: they hold its own pid already.
        script = 'echo $$; cat "$1" "$2"'
        output = subprocess.check_output(cgroups.enter_argv("alice") +
                                         ["sh", "-c", script, "x"] + files, text=True)
        pid, first, second = output.split()
        self.assertEqual(pid, first)
        self.assertEqual(pid, second)

    def test_a_cgroup_that_cannot_be_entered_stops_the_command(self):
        cgroups = V1Cgroups(LIMITS, "v1", ("/nonexistent/pxd",))
        result = subprocess.run(cgroups.enter_argv("alice") + ["echo", "ran"],
                                capture_output=True, text=True)
        self.assertEqual(result.returncode, 126)
        self.assertNotIn("ran", result.stdout)


class Options(SynchronousTestCase):
    def test_docker_names_and_zero_for_none(self):
        self.assertEqual(limits_from_config({"agent-memory": "512m", "agent-pids": "256",
                                             "agent-cpu-shares": "1024"}),
                         AgentLimits(512 * MiB, 256, 1024))
        self.assertFalse(limits_from_config({"agent-memory": "0", "agent-pids": "0",
                                             "agent-cpu-shares": "0"}).any)
        for bad in ({"agent-memory": "lots"}, {"agent-memory": "1m"},
                    {"agent-pids": "-1"}, {"agent-cpu-shares": "x"}):
            self.assertRaises(ValueError, limits_from_config, bad)

    def test_words(self):
        self.assertEqual(LIMITS.describe(), "memory 64 MiB, 100 processes, CPU shares 512")
        self.assertEqual(out_of_memory_reason(64 * MiB),
                         "was killed for running out of memory (OOM-killed at its limit of"
                         " 64 MiB)")
        self.assertEqual((cpu_weight(2), cpu_weight(1024), cpu_weight(262144)),
                         (1, 39, 10000))
        self.assertNotEqual(group_name("/var/lib/a"), group_name("/var/lib/b"))
        self.assertEqual(group_name("/var/lib/a"), group_name("/var/lib/a/"))
