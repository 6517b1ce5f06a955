"""A network namespace made by a test: "another host" next to this one.

It is joined to the host by a veth pair with addresses from 198.18.47.0/24
(this test suite's part of 198.18.0.0/15), routes everything through the
host, and can send packets for 127.0.0.1 to the host (``route_localnet`` on
both ends, loopback routed out of the veth): the trick another host on the
segment, or a container with a bridge that has ``route_localnet`` (Docker
without its userland proxy), can play to reach ports bound on the host's
loopback. Needs root.
"""
import os
import random
import subprocess
import sys

#: what runs in the namespace: connect, say "connected" or the error's name
CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected")
except OSError as e:
    print(type(e).__name__)
"""


def _ip(*args, check=True):
    return subprocess.run(["ip"] + list(args), capture_output=True, text=True, check=check)


class AttackNamespace:
    """``with AttackNamespace() as ns: ns.connect("127.0.0.1", port)``."""

    def __init__(self) -> None:
        tag = "%05d" % random.randrange(100000)
        self.name = "pxnet-" + tag
        self.host_if, self.ns_if = "pxnh" + tag, "pxnn" + tag
        block = random.randrange(1, 63) * 4  # a /30 of 198.18.47.0/24
        self.host_ip = "198.18.47.%d" % (block + 1)
        self.ns_ip = "198.18.47.%d" % (block + 2)

    def __enter__(self) -> "AttackNamespace":
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        n = self.name
        _ip("netns", "add", n)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", n)
        _ip("addr", "add", self.host_ip + "/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", n, "addr", "add", self.ns_ip + "/30", "dev", self.ns_if)
        _ip("-n", n, "link", "set", self.ns_if, "up")
        _ip("-n", n, "link", "set", "lo", "up")
        _ip("-n", n, "route", "add", "default", "via", self.host_ip)
        # 127.0.0.1 out of the veth to the host, accepted there as local
        subprocess.run(["sysctl", "-qw", "net.ipv4.conf.%s.route_localnet=1" % self.host_if],
                       check=True)
        self.run("sysctl", "-qw", "net.ipv4.conf.%s.route_localnet=1" % self.ns_if)
        _ip("-n", n, "rule", "add", "pref", "100", "lookup", "local")
        _ip("-n", n, "rule", "del", "pref", "0")
        _ip("-n", n, "rule", "add", "pref", "10", "to", "127.0.0.1", "lookup", "100")
        _ip("-n", n, "route", "add", "127.0.0.1/32", "via", self.host_ip, "dev", self.ns_if,
            "table", "100", "src", self.ns_ip)

    def run(self, *argv) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name] + list(argv),
                              capture_output=True, text=True, check=True, timeout=30,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})

    def connect(self, host: str, port: int, timeout: float = 3.0) -> str:
        """"connected", or the name of the error (a dropped SYN: "TimeoutError")."""
        return self.run(sys.executable, "-c", CONNECT, host, str(port),
                        str(timeout)).stdout.strip()

    def close(self) -> None:
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.name, check=False)
