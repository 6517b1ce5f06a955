"""The loopback guard: ports published on 127.0.0.1 stay on this machine.

A neighbour on the same network segment is simulated with a network
namespace joined to the host by a veth pair; it routes 127.0.0.1 to the host,
as an attacker on the LAN would. Against Docker < 28 it reaches the agent
(that is the hole, proved first so this test cannot pass vacuously); with
the guard installed it does not, while local access still works.
"""
import os
import shutil
import subprocess
import sys
import uuid

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from pixelated_dispatcher.manager.providers.docker_engine import DockerEngine
from pixelated_dispatcher.manager.providers.loopback_guard import (
    RULE, LoopbackGuard, LoopbackGuardFailed, engine_needs_guard)

from . import dockerd
from .dockerd import coroutine_tests
from .real_docker_case import RealDockerTestCase, credentials, get

_CLIENT = ("import socket, sys\n"
           "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2)\n"
           "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
           "data = b''\n"
           "while True:\n"
           "    chunk = s.recv(4096)\n"
           "    if not chunk: break\n"
           "    data += chunk\n"
           "print(data.decode('latin-1'))\n")


def run(*args, check=True):
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=20)


class VersionRuleTests(SynchronousTestCase):

    def test_engines_before_28_need_the_guard(self):
        self.assertTrue(engine_needs_guard("20.10.24+dfsg1"))
        self.assertTrue(engine_needs_guard("27.5.1"))
        self.assertTrue(engine_needs_guard("17.03.2-ce"))
        self.assertTrue(engine_needs_guard(""), "unknown: guard, to be safe")
        self.assertFalse(engine_needs_guard("28.0.0"))
        self.assertFalse(engine_needs_guard("29.1.2"))

    def test_unknown_mode_is_refused(self):
        self.assertRaises(ValueError, LoopbackGuard, reactor, "sometimes")


@coroutine_tests


class MissingIptablesTests(TestCase):

    async def test_guard_that_cannot_be_installed_says_what_to_do(self):
        guard = LoopbackGuard(reactor, "on", iptables="/nonexistent/iptables")
        error = await self.assertFailure(guard.ensure(None), LoopbackGuardFailed)
        self.assertIn("refusing to start agents", str(error))
        self.assertIn("--docker-loopback-guard off", str(error))


@coroutine_tests


class NeighbourTests(RealDockerTestCase):
    timeout = 120

    def setUp(self):
        super().setUp()
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables"):
            reason = "the loopback guard test needs root, ip and iptables"
            if dockerd.in_ci():
                raise AssertionError("CI=true but " + reason)
            raise SkipTest(reason)
        suffix = uuid.uuid4().hex[:6]
        self.netns = "pxg" + suffix
        self.host_if, self.ns_if = "pxgh" + suffix, "pxgn" + suffix
        octet = int(suffix[:2], 16)
        self.host_ip, self.ns_ip = "10.201.%d.1" % octet, "10.201.%d.2" % octet
        self.guard = LoopbackGuard(reactor, "auto")
        self.addCleanup(self._teardown_network)
        run("ip", "netns", "add", self.netns)
        run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        run("ip", "link", "set", self.ns_if, "netns", self.netns)
        run("ip", "addr", "add", self.host_ip + "/30", "dev", self.host_if)
        run("ip", "link", "set", self.host_if, "up")
        inside = ["ip", "netns", "exec", self.netns]
        run(*inside, "ip", "addr", "add", self.ns_ip + "/30", "dev", self.ns_if)
        run(*inside, "ip", "link", "set", self.ns_if, "up")
        # (no sysctl binary needed: /proc/sys/net is the namespace's own)
        run(*inside, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet;"
            " echo 1 > /proc/sys/net/ipv4/conf/%s/route_localnet" % self.ns_if)
        # the neighbour sends 127.0.0.1 to us, as a host on our LAN could
        run(*inside, "ip", "route", "add", "127.0.0.1/32", "via", self.host_ip,
            "dev", self.ns_if)

    def _teardown_network(self):
        run("ip", "netns", "del", self.netns, check=False)
        run("ip", "link", "del", self.host_if, check=False)
        while run("iptables", "-w", "5", "-t", "raw", "-C", *RULE, check=False).returncode == 0:
            run("iptables", "-w", "5", "-t", "raw", "-D", *RULE, check=False)

    def from_neighbour(self, port):
        result = run("ip", "netns", "exec", self.netns, sys.executable, "-c", _CLIENT, str(port),
                     check=False)
        return result.stdout + result.stderr[-300:]

    async def test_neighbour_reaches_published_port_until_the_guard_is_installed(self):
        engine = DockerEngine(reactor, self.host)
        self.addCleanup(engine.close)
        info = await engine.version()
        if not engine_needs_guard(info["Version"]):
            raise SkipTest("Docker %s guards published loopback ports itself" % info["Version"])
        await self.guard.remove()
        provider = self.provider()
        agent = await provider.start("alice", self.data_dir("alice"), credentials("alice", "pw"))

        answer = self.from_neighbour(agent.address.port)
        self.assertIn("Mailbox of alice", answer,
                      "without the guard a neighbour reaches the agent (moby#45610): %r" % answer)

        await self.guard.ensure(engine)
        self.assertTrue(self.guard.installed)
        self.assertTrue(await self.guard.is_installed())
        answer = self.from_neighbour(agent.address.port)
        self.assertNotIn("HTTP/", answer, "with the guard the neighbour gets nothing")
        self.assertIn("timed out", answer)
        code, page = await get(agent.address.port)
        self.assertEqual((code, page.strip()), (200, "Mailbox of alice"),
                         "local access still works")
        # installing twice keeps one rule
        await LoopbackGuard(reactor, "on").ensure(engine)
        listing = run("iptables", "-w", "5", "-t", "raw", "-S", "PREROUTING").stdout
        self.assertEqual(listing.count("pixelated-dispatcher loopback guard"), 1, listing)
