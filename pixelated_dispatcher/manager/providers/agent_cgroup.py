"""Resource limits of process-provider agents: one cgroup per agent.

The Docker provider limits each agent's memory, processes and CPU share
(the container's cgroup). A process agent gets the same, from the same
options (``--agent-memory``, ``--agent-pids``, ``--agent-cpu-shares``), so
one user's runaway agent cannot starve the others or the manager: past its
memory limit the kernel kills it (and only it), past its process limit its
forks fail, and under CPU contention it gets its share.

Where the cgroups live (``<group>`` is one per manager state directory, so
that several managers on one host, e.g. tests, never share one):

* **cgroup v2** (Debian 12's default, controllers on the unified
  hierarchy): ``/sys/fs/cgroup/<group>/<user>``, at the top of the
  hierarchy as Docker's ``cgroupfs`` driver does it. Not below the
  manager's own cgroup: the kernel allows controllers below a cgroup only
  when it holds no processes, so that would mean moving the manager into a
  leaf of its unit, and systemd before 254 cannot start the unit again
  while agents it left running keep controllers enabled there (the agents
  outlive manager restarts). The manager's unit needs
  ``ProtectControlGroups=no`` to write there (the Debian unit has it).
* **cgroup v1** (hybrid hosts: ``memory``, ``pids`` and ``cpu`` mounted
  under ``/sys/fs/cgroup/<controller>``; v1 allows processes next to
  child cgroups): ``<manager's cgroup in each hierarchy>/<group>/<user>``.

An agent enters its cgroup *before* its program runs: the spawned command
starts with ``sh -c`` writing its own pid into the cgroup's
``cgroup.procs`` file(s) and then ``exec``-ing the rest (setpriv, setsid,
the agent). Writing the pid after the spawn instead would leave a window in
which the agent could fork children outside the limits. The shell runs as
the manager (root), before setpriv drops privileges; if it cannot enter,
it exits 126 and the start fails with its message.

When an agent ends, the provider asks :meth:`AgentCgroups.oom_killed`
(``memory.events``/``memory.oom_control``: the kernel's own count) to report
"out of memory" as the reason, then :meth:`AgentCgroups.remove` kills
whatever is left in the cgroup (a child that left the agent's process
group is still in it) and removes it. ``recover()`` removes the cgroups of
agents it did not adopt (:meth:`AgentCgroups.clean_stale`).

Everything here is blocking file work on ``/sys/fs/cgroup``: the provider
runs it in its thread pool, except the small ``oom_killed`` read.
"""
import errno
import hashlib
import os
import signal
import time
from typing import Dict, Iterable, List, Optional, Set, Tuple

import attr

MiB = 1024 * 1024

#: Docker's default CPU share (``--cpu-shares``), the weight of a normal process.
DEFAULT_CPU_SHARES = 1024

#: How long :meth:`AgentCgroups.remove` waits for killed processes to leave.
REMOVE_WAIT = 2.0

#: The pre-exec step: enter every cgroup given before ``--``, then exec the rest.
ENTER_SCRIPT = ('while [ "$1" != -- ]; do echo $$ > "$1" || exit 126; shift; done;'
                ' shift; exec "$@"')

V1_CONTROLLERS = ("memory", "pids", "cpu")


class CgroupUnavailable(Exception):
    """Limits cannot be applied on this host; ``str()`` says why and what to do."""


@attr.s(frozen=True, auto_attribs=True)
class AgentLimits:
    """What one agent may use; 0 means no limit (Docker's option names)."""

    memory: int = 0
    pids: int = 0
    cpu_shares: int = 0

    @property
    def any(self) -> bool:
        return bool(self.memory or self.pids or self.cpu_shares)

    def describe(self) -> str:
        """``memory 512 MiB, 256 processes, CPU shares 1024`` (for ``info``)."""
        parts = []
        if self.memory:
            parts.append("memory %s" % (mib(self.memory),))
        if self.pids:
            parts.append("%d processes" % (self.pids,))
        if self.cpu_shares:
            parts.append("CPU shares %d" % (self.cpu_shares,))
        return ", ".join(parts) or "none"


def mib(size: int) -> str:
    return "%g MiB" % (round(size / MiB, 1),)


def out_of_memory_reason(limit: int) -> str:
    """The exit reason of an agent the kernel killed at its memory limit
    (the same words as the Docker provider's)."""
    return "was killed for running out of memory (OOM-killed at its limit of %s)" % (
        mib(limit),)


def cpu_weight(shares: int) -> int:
    """cgroup v2 ``cpu.weight`` (1-10000, 100 normal) for Docker's CPU shares
    (2-262144, 1024 normal), as runc and systemd convert them."""
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _keyed(text: str) -> Dict[str, int]:
    """``key value`` lines (``memory.events``, ``memory.oom_control``)."""
    values = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2 and words[1].isdigit():
            values[words[0]] = int(words[1])
    return values


def _pids(directory: str) -> List[int]:
    try:
        return [int(line) for line in _read(os.path.join(directory, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


def _empty_and_remove(directories: Iterable[str], wait: float = REMOVE_WAIT) -> None:
    """SIGKILL every process left in ``directories``, wait for them to
    leave, and remove the (leaf) cgroups."""
    directories = [d for d in directories if os.path.isdir(d)]
    deadline = time.monotonic() + wait
    while True:
        left = [pid for directory in directories for pid in _pids(directory)]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for directory in directories:
        for attempt in range(50):
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as error:
                if error.errno != errno.EBUSY or attempt == 49:
                    raise
                time.sleep(0.02)  # the last exits are still being accounted


@attr.s(auto_attribs=True)
class AgentCgroups:
    """The agents' cgroups of one manager: ``bases`` are the directories
    (one per hierarchy) that hold one cgroup per user."""

    limits: AgentLimits
    version: str
    bases: Tuple[str, ...]

    def directories(self, username: str) -> List[str]:
        return [os.path.join(base, username) for base in self.bases]

    def describe(self) -> str:
        """The limits and where they are applied (``pixelated-ctl info``)."""
        return "%s (cgroup %s, %s)" % (self.limits.describe(), self.version,
                                       " ".join(self.bases))

    def enter_argv(self, username: str, sh: str = "/bin/sh") -> List[str]:
        """The argv prefix that puts the command after it into the user's
        cgroup before it runs (see the module docstring)."""
        files = [os.path.join(d, "cgroup.procs") for d in self.directories(username)]
        return [sh, "-c", ENTER_SCRIPT, "pixelated-enter-cgroup"] + files + ["--"]

    def create(self, username: str) -> None:
        """Make the user's cgroup (again) with the limits; a leftover of an
        earlier agent is emptied and replaced first."""
        self._prepare()
        _empty_and_remove(self.directories(username))
        for directory in self.directories(username):
            os.mkdir(directory, 0o755)
        self._apply(username)

    def _prepare(self) -> None:
        """Make the base directories (at the first start, not when the
        manager is configured: a manager that never starts an agent, or a
        test that only builds one, leaves nothing behind)."""
        for base in self.bases:
            os.makedirs(base, 0o755, exist_ok=True)

    def _apply(self, username: str) -> None:
        raise NotImplementedError

    def oom_killed(self, username: str) -> bool:
        """Whether the kernel killed a process of the user's cgroup for
        memory (small sysfs read)."""
        raise NotImplementedError

    def remove(self, username: str) -> None:
        _empty_and_remove(self.directories(username))

    def users(self) -> Set[str]:
        """Users that have a cgroup now."""
        found: Set[str] = set()
        for base in self.bases:
            try:
                found |= {name for name in os.listdir(base)
                          if os.path.isdir(os.path.join(base, name))}
            except FileNotFoundError:
                pass
        return found

    def remove_bases(self) -> None:
        """Remove the (empty) directories of this manager's agents; one that
        still holds an agent's cgroup stays."""
        for base in self.bases:
            try:
                os.rmdir(base)
            except OSError:
                pass

    def clean_stale(self, keep: Iterable[str]) -> List[str]:
        """Remove the cgroups of users not in ``keep`` (agents a previous
        manager left that were not adopted); the users cleaned."""
        stale = sorted(self.users() - set(keep))
        for username in stale:
            self.remove(username)
        return stale


class V1Cgroups(AgentCgroups):
    """cgroup v1: one directory per controller hierarchy (memory, pids, cpu)."""

    def _dir(self, username: str, controller: str) -> str:
        return os.path.join(self.bases[V1_CONTROLLERS.index(controller)], username)

    def _apply(self, username: str) -> None:
        limits = self.limits
        if limits.memory:
            memory = self._dir(username, "memory")
            _write(os.path.join(memory, "memory.limit_in_bytes"), str(limits.memory))
            swap = os.path.join(memory, "memory.memsw.limit_in_bytes")
            if os.path.exists(swap):  # no swap beyond the limit, as Docker's MemorySwap
                _write(swap, str(limits.memory))
        if limits.pids:
            _write(os.path.join(self._dir(username, "pids"), "pids.max"), str(limits.pids))
        if limits.cpu_shares:
            _write(os.path.join(self._dir(username, "cpu"), "cpu.shares"),
                   str(limits.cpu_shares))

    def oom_killed(self, username: str) -> bool:
        try:
            text = _read(os.path.join(self._dir(username, "memory"), "memory.oom_control"))
        except OSError:
            return False
        return _keyed(text).get("oom_kill", 0) > 0


class V2Cgroups(AgentCgroups):
    """cgroup v2: one directory on the unified hierarchy."""

    def _prepare(self) -> None:
        """Enable the controllers for the base (in its parent, the
        hierarchy's root, which the kernel allows with processes in it) and
        for the agents' cgroups below it."""
        (base,) = self.bases
        root = os.path.dirname(base)
        enable = " ".join("+" + c for c in V2_CONTROLLERS)
        enabled = _read(os.path.join(root, "cgroup.subtree_control")).split()
        if any(c not in enabled for c in V2_CONTROLLERS):
            _write(os.path.join(root, "cgroup.subtree_control"), enable)
        os.makedirs(base, 0o755, exist_ok=True)
        _write(os.path.join(base, "cgroup.subtree_control"), enable)

    def _apply(self, username: str) -> None:
        (directory,) = self.directories(username)
        limits = self.limits
        if limits.memory:
            _write(os.path.join(directory, "memory.max"), str(limits.memory))
            swap = os.path.join(directory, "memory.swap.max")
            if os.path.exists(swap):
                _write(swap, "0")
        if limits.pids:
            _write(os.path.join(directory, "pids.max"), str(limits.pids))
        if limits.cpu_shares:
            _write(os.path.join(directory, "cpu.weight"), str(cpu_weight(limits.cpu_shares)))

    def oom_killed(self, username: str) -> bool:
        (directory,) = self.directories(username)
        try:
            text = _read(os.path.join(directory, "memory.events"))
        except OSError:
            return False
        return _keyed(text).get("oom_kill", 0) > 0


# --- finding (and preparing) the place ------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class _Mount:
    point: str
    root: str
    fstype: str
    options: Tuple[str, ...]
    #: mounted read-only (a container's view of the host's tree, typically)
    read_only: bool = False


def _mounts(mountinfo: str) -> List[_Mount]:
    mounts = []
    for line in mountinfo.splitlines():
        fields = line.split(" - ", 1)
        if len(fields) != 2:
            continue
        before, after = fields[0].split(), fields[1].split()
        if len(before) < 5 or len(after) < 3:
            continue
        read_only = "ro" in before[5].split(",") if len(before) > 5 else False
        mounts.append(_Mount(before[4], before[3], after[0], tuple(after[2].split(",")),
                             read_only))
    return mounts


def _own_paths(proc_cgroup: str) -> Dict[str, str]:
    """Controller (``""`` for v2) → the process's cgroup path."""
    paths = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _inside(mount: _Mount, path: str) -> str:
    """Where the cgroup ``path`` is below ``mount``'s point."""
    root = mount.root.rstrip("/")
    if root and path.startswith(root):
        path = path[len(root):]
    return os.path.join(mount.point, path.lstrip("/"))


def group_name(state_dir: str) -> str:
    """The directory of one manager's agent cgroups: named after its state
    directory, so that two managers on one host never share one and a
    restarted manager finds its predecessor's."""
    digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:10]
    return "pixelated-agents-" + digest


def limits_from_config(config: Dict[str, object]) -> AgentLimits:
    """The ``--agent-memory``, ``--agent-pids`` and ``--agent-cpu-shares``
    options (``0``: no limit), or ``ValueError`` saying which is wrong."""
    from .docker_options import parse_memory
    try:
        memory = parse_memory(str(config.get("agent-memory") or 0))
    except ValueError:
        raise ValueError("--agent-memory must be a size like 512m or 1g (0: no limit), not %r"
                         % (config.get("agent-memory"),))
    if memory and memory < 6 * MiB:
        raise ValueError("--agent-memory must be at least 6m (or 0: no limit)")
    numbers = []
    for key in ("agent-pids", "agent-cpu-shares"):
        text = str(config.get(key) or 0).strip()
        if not text.isdigit():
            raise ValueError("--%s must be a whole number (0: no limit), not %r" % (key, text))
        numbers.append(int(text))
    return AgentLimits(memory=memory, pids=numbers[0], cpu_shares=numbers[1])


def find_cgroups(limits: AgentLimits, group: str, *, pid: Optional[int] = None,
                 proc: str = "/proc") -> AgentCgroups:
    """The agents' cgroups for this manager, or :class:`CgroupUnavailable`.
    Nothing is written yet: the directories are made at the first start."""
    pid = os.getpid() if pid is None else pid
    mounts = _mounts(_read(os.path.join(proc, "self", "mountinfo")))
    own = _own_paths(_read(os.path.join(proc, str(pid), "cgroup")))
    unified = [m for m in mounts if m.fstype == "cgroup2"]
    for mount in unified:
        try:
            controllers = _read(os.path.join(mount.point, "cgroup.controllers")).split()
        except OSError:
            continue
        if "memory" in controllers:
            _need_writable(mount)
            return _prepare_v2(limits, group, mount.point)
    bases = []
    for controller in V1_CONTROLLERS:
        v1 = next((m for m in mounts if m.fstype == "cgroup" and controller in m.options),
                  None)
        if v1 is None or controller not in own:
            raise CgroupUnavailable(
                "no cgroup %s controller is mounted (neither on cgroup v2 nor v1), so agents"
                " cannot be limited; mount it, or set --agent-memory 0 --agent-pids 0"
                " --agent-cpu-shares 0" % (controller,))
        _need_writable(v1)
        bases.append(os.path.join(_inside(v1, own[controller]), group))
    return V1Cgroups(limits, "v1", tuple(bases))


def _need_writable(mount: _Mount) -> None:
    """Say at start, not at every agent's start, that limits cannot be set."""
    if mount.read_only:
        raise CgroupUnavailable(
            "the cgroup tree %s is mounted read-only (in a container?), so agents cannot be"
            " limited; give the manager a writable cgroup tree, or set --agent-memory 0"
            " --agent-pids 0 --agent-cpu-shares 0" % (mount.point,))


#: The controllers the agents' cgroups use.
V2_CONTROLLERS = ("memory", "pids", "cpu")


def _prepare_v2(limits: AgentLimits, group: str, root: str) -> AgentCgroups:
    """The agents' cgroups at ``<root>/<group>``, if ``root`` has the
    controllers."""
    available = _read(os.path.join(root, "cgroup.controllers")).split()
    missing = [c for c in V2_CONTROLLERS if c not in available]
    if missing:
        raise CgroupUnavailable("the cgroup controllers %s are not available in %s"
                                % (", ".join(missing), root))
    return V2Cgroups(limits, "v2", (os.path.join(root, group),))
