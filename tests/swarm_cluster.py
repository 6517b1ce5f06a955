"""A real Docker Swarm on this machine for the swarm provider's tests.

Each node is a private ``dockerd`` (own data root, exec root, socket, pidfile,
bridge and containerd) in a network namespace of its own, attached by a veth
pair to a test bridge in the host namespace. The first node initialises the
swarm; the others join it with the real join token. Addresses come from
198.19.0.0/16, the sub-range the swarm tests own:

* bridge ``pxsw-br0``: 198.19.0.1/24 (the host: manager process and proxy)
* node ``i`` (1..): 198.19.0.(10+i), its docker0 198.19.(10+i).1/24, its
  networks from 198.19.(64+16 i).0/20; the swarm's overlay pool 198.19.128.0/18
* intruder namespace ``pxsw-intruder``: 198.19.0.99

Everything is synchronous (plain subprocesses and sockets) with bounded waits;
:meth:`Cluster.destroy` removes all of it and is safe to call twice or after a
half-made cluster. Needs root, ``ip``, ``nsenter``, ``dockerd`` and ``iptables``
(.ci/run installs them); only one cluster exists on the machine at a time.
"""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from typing import List, Optional

from pixelated_dispatcher.manager.providers.docker import LABEL

from . import dockerd

BRIDGE = "pxsw-br0"
HOST_ADDRESS = "198.19.0.1"
INTRUDER_NS = "pxsw-intruder"
INTRUDER_ADDRESS = "198.19.0.99"
BASE_DIR = "/var/tmp"
#: one cluster on the machine at a time (several checkouts may run the suite)
LOCK_PATH = "/var/tmp/pxd-swarm.lock"
LOCK_WAIT_SECONDS = 600
#: the label the provider places agents by (its default)
AGENT_LABEL = "pixelated.agents"
#: the swarm's heartbeat in the tests: a dead node is "down" within ~3 periods
HEARTBEAT_SECONDS = 1
#: the host's FORWARD rule for traffic between the nodes (-I ... / -D ...)
FORWARD_RULE = ("-I", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT")


def _run(*args, check=True, timeout=60, **kwargs):
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                            **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(args), result.returncode,
                                                   (result.stderr or result.stdout).strip()))
    return result


def can_run() -> Optional[str]:
    """None if a cluster can be made here, else why not."""
    if os.geteuid() != 0:
        return "the swarm tests need root (network namespaces, dockerd)"
    if not os.path.exists("/usr/sbin/dockerd"):
        return "/usr/sbin/dockerd is missing (apt-get install docker.io)"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables"),
                          ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return "%s is missing (apt-get install %s)" % (tool, package)
    return None


class Node:
    """One dockerd in its own network namespace."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.namespace = "pxsw-n%d" % index
        self.address = "198.19.0.%d" % (10 + index)
        self.directory = os.path.join(BASE_DIR, "pxd-swarm-%d" % index)
        self.socket = os.path.join(self.directory, "docker.sock")
        self.host = "unix://" + self.socket
        self.pidfile = os.path.join(self.directory, "dockerd.pid")
        self.log = os.path.join(self.directory, "dockerd.log")
        self.veth = "pxsw-v%d" % index
        self.process: Optional[subprocess.Popen] = None
        self.node_id: Optional[str] = None

    # -- network --

    def make_namespace(self) -> None:
        _run("ip", "netns", "add", self.namespace)
        _run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
             "netns", self.namespace)
        _run("ip", "link", "set", self.veth, "master", BRIDGE, "up")
        inside = ("ip", "netns", "exec", self.namespace)
        _run(*inside, "ip", "addr", "add", self.address + "/24", "dev", "eth0")
        _run(*inside, "ip", "link", "set", "eth0", "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        # no default route: nothing in a node namespace reaches beyond the bridge

    # -- the daemon --

    def start_daemon(self, timeout: float = 60.0, no_new_privileges: bool = True) -> None:
        os.makedirs(os.path.join(self.directory, "data"), exist_ok=True)
        os.makedirs(os.path.join(self.directory, "exec"), exist_ok=True)
        for path in (self.socket, self.pidfile):
            if os.path.exists(path):
                os.unlink(path)
        log = open(self.log, "ab")
        pool = "base=198.19.%d.0/20,size=24" % (64 + 16 * self.index)
        self.process = subprocess.Popen(
            # nsenter, not "ip netns exec": only the network namespace changes;
            # a fresh /sys (what ip netns exec mounts) would hide the cgroups
            ["nsenter", "--net=/var/run/netns/" + self.namespace, "/usr/sbin/dockerd",
             "--host", self.host,
             "--data-root", os.path.join(self.directory, "data"),
             "--exec-root", os.path.join(self.directory, "exec"),
             "--pidfile", self.pidfile, "--group", "root",
             "--bip", "198.19.%d.1/24" % (10 + self.index),
             "--default-address-pool", pool]
            + (["--no-new-privileges"] if no_new_privileges else []),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("dockerd of %s exited: %s" % (self.namespace, self.log_tail()))
            try:
                if dockerd.api(self.host, "GET", "/_ping", timeout=3) == b"OK":
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise RuntimeError("dockerd of %s did not answer within %g s: %s"
                           % (self.namespace, timeout, self.log_tail()))

    def daemon_pid(self) -> Optional[int]:
        try:
            with open(self.pidfile) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def kill_daemon(self) -> None:
        """``kill -9`` of the dockerd (its containerd and containers live on)."""
        pid = self.daemon_pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)

    def stop_daemon(self, timeout: float = 30.0) -> None:
        pid = self.daemon_pid()
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                if pid:
                    os.kill(pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """containerd, shims and container processes of this node's exec root."""
        marker = os.path.join(self.directory, "")
        for _ in range(3):
            pids = []
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open("/proc/%s/cmdline" % entry, "rb") as f:
                        cmdline = f.read().decode("utf-8", "replace")
                except OSError:
                    continue
                if marker in cmdline:
                    pids.append(int(entry))
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def api(self, method, path, **kwargs):
        return dockerd.api(self.host, method, path, **kwargs)

    def in_namespace(self, *args, check=True, timeout=30):
        return _run("ip", "netns", "exec", self.namespace, *args, check=check, timeout=timeout)

    def _rule(self, source: str) -> tuple:
        # the original direction of published-port (DNAT) connections only:
        # replies and the containers' own connections pass
        return ("DOCKER-USER", "-p", "tcp", "-m", "conntrack", "--ctstate", "DNAT",
                "--ctdir", "ORIGINAL", "!", "-s", source,
                "-j", "REJECT", "--reject-with", "tcp-reset")

    def allow_only(self, source: str, remove: bool = False) -> None:
        """The node set-up step of docs/cluster.rst: only ``source`` (the proxy
        host) may open connections to the node's published container ports
        (``remove``: take that rule away again)."""
        self.in_namespace("iptables", "-D" if remove else "-I", *self._rule(source))

    def has_rule(self, source: str) -> bool:
        return self.in_namespace("iptables", "-C", *self._rule(source),
                                 check=False).returncode == 0


class Cluster:
    """``size`` nodes; node 1 is the manager. ``agent_nodes``: indexes labelled
    ``pixelated.agents=true``."""

    def __init__(self, size: int, agent_nodes=None) -> None:
        self.nodes: List[Node] = [Node(i) for i in range(1, size + 1)]
        self.agent_nodes = list(agent_nodes if agent_nodes is not None
                                else range(1, size + 1))
        self.image: Optional[str] = None

    @property
    def manager(self) -> Node:
        return self.nodes[0]

    def create(self) -> "Cluster":
        self._lock()
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise
        return self

    def _lock(self) -> None:
        """Wait (bounded) until no other test process has a cluster: the
        names and addresses are fixed, so two at once would collide."""
        self._lock_file = open(LOCK_PATH, "a")
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RuntimeError("another test process kept the swarm test cluster"
                                       " (%s) for %d s" % (LOCK_PATH, LOCK_WAIT_SECONDS))
                time.sleep(0.5)

    def _create(self) -> None:
        self._teardown()        # leftovers of an interrupted run
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", HOST_ADDRESS + "/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        # bridged packets pass the host's iptables (br_netfilter, FORWARD
        # policy DROP under Docker): let the nodes talk to each other
        _run("iptables", *FORWARD_RULE[0:1], "FORWARD", *FORWARD_RULE[1:])
        _run("ip", "netns", "add", INTRUDER_NS)
        _run("ip", "link", "add", "pxsw-vi", "type", "veth", "peer", "name", "eth0",
             "netns", INTRUDER_NS)
        _run("ip", "link", "set", "pxsw-vi", "master", BRIDGE, "up")
        _run("ip", "netns", "exec", INTRUDER_NS, "ip", "addr", "add",
             INTRUDER_ADDRESS + "/24", "dev", "eth0")
        _run("ip", "netns", "exec", INTRUDER_NS, "ip", "link", "set", "eth0", "up")
        for node in self.nodes:
            node.make_namespace()
        for node in self.nodes:
            node.start_daemon()
        manager = self.manager
        manager.api("POST", "/swarm/init", body={
            "ListenAddr": manager.address + ":2377", "AdvertiseAddr": manager.address,
            "DefaultAddrPool": ["198.19.128.0/18"], "SubnetSize": 24,
            "Spec": {"Dispatcher": {"HeartbeatPeriod": HEARTBEAT_SECONDS * 10 ** 9},
                     "Orchestration": {"TaskHistoryRetentionLimit": 2}}})
        swarm = manager.api("GET", "/swarm")
        for node in self.nodes[1:]:
            node.api("POST", "/swarm/join", body={
                "ListenAddr": node.address + ":2377", "AdvertiseAddr": node.address,
                "RemoteAddrs": [manager.address + ":2377"],
                "JoinToken": swarm["JoinTokens"]["Worker"]}, timeout=60)
        for node in self.nodes:
            node.node_id = node.api("GET", "/info")["Swarm"]["NodeID"]
        self.wait_nodes_ready()
        for node in self.nodes:
            if node.index in self.agent_nodes:
                self.label(node, {AGENT_LABEL: "true"})
        # the image every node needs, as an operator without a registry would
        # provide it: the same image (same id) loaded into each node
        self.image = dockerd.ensure_agent_image(manager.host)
        saved = manager.api("GET", "/images/%s/get" % self.image, timeout=120)
        for node in self.nodes[1:]:
            node.api("POST", "/images/load", body=saved,
                     headers={"Content-Type": "application/x-tar"}, timeout=120)

    def label(self, node: Node, labels: dict) -> None:
        info = self.manager.api("GET", "/nodes/%s" % node.node_id)
        spec = dict(info["Spec"])
        spec["Labels"] = dict(spec.get("Labels") or {}, **labels)
        self.manager.api("POST", "/nodes/%s/update" % node.node_id,
                         params={"version": info["Version"]["Index"]}, body=spec)

    def node_states(self) -> dict:
        return {n["ID"]: (n["Status"]["State"], n["Spec"].get("Availability"))
                for n in self.manager.api("GET", "/nodes")}

    def wait_nodes_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.node_states()
            if len(states) == len(self.nodes) and all(
                    state == "ready" for state, _ in states.values()):
                return
            time.sleep(0.2)
        raise RuntimeError("swarm nodes not ready within %g s: %r" % (timeout, states))

    def intruder(self, *args, check=False, timeout=30):
        return _run("ip", "netns", "exec", INTRUDER_NS, *args, check=check, timeout=timeout)

    def destroy(self) -> None:
        """Tear everything down and let the next test process have a cluster."""
        try:
            self._teardown()
        finally:
            lock, self._lock_file = getattr(self, "_lock_file", None), None
            if lock is not None:
                lock.close()        # releases the flock

    def _teardown(self) -> None:
        for node in self.nodes:
            if node.process is not None or node.daemon_pid():
                try:
                    node.stop_daemon()
                except Exception:
                    node._kill_leftovers()
            else:
                node._kill_leftovers()
        for node in self.nodes:
            _run("ip", "netns", "del", node.namespace, check=False)
            _run("ip", "link", "del", node.veth, check=False)
        _run("ip", "netns", "del", INTRUDER_NS, check=False)
        _run("ip", "link", "del", "pxsw-vi", check=False)
        while _run("iptables", "-D", "FORWARD", *FORWARD_RULE[1:], check=False).returncode == 0:
            pass
        _run("ip", "link", "del", BRIDGE, check=False)
        for node in self.nodes:
            _unmount_under(node.directory)
            shutil.rmtree(node.directory, ignore_errors=True)


def remove_services(node, instance):
    """Test clean-up: our services and secrets on the swarm."""
    label = json.dumps({"label": ["%s=%s" % (LABEL, instance)]})
    for service in node.api("GET", "/services", params={"filters": label}):
        node.api("DELETE", "/services/%s" % service["ID"], expect=(200, 404))
    for secret in node.api("GET", "/secrets", params={"filters": label}):
        node.api("DELETE", "/secrets/%s" % secret["ID"], expect=(200, 204, 400, 404))


def _unmount_under(directory: str) -> None:
    """Mounts a killed dockerd left (overlay, shm, secrets tmpfs), deepest first."""
    try:
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
    except OSError:
        return
    prefix = directory.rstrip("/") + "/"
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        _run("umount", "-l", point, check=False)


_one_node = None        # (Cluster or None, reason)


def one_node_swarm() -> Cluster:
    """A one-node swarm for this test process (made once, destroyed at exit);
    skips without root -- or, with CI=true, fails."""
    global _one_node
    if _one_node is None:
        reason = can_run()
        cluster = None
        if reason is None:
            import atexit
            cluster = Cluster(1)
            try:
                cluster.create()
            except Exception as error:
                cluster, reason = None, "cannot make a one-node swarm: %s" % error
            else:
                atexit.register(cluster.destroy)
        _one_node = (cluster, reason)
    cluster, reason = _one_node
    dockerd.decide(cluster and cluster.manager.host, reason)
    return cluster
