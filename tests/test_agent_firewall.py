"""The agent firewall: the contract on the fake and on real nftables (as
root, against the kernel), and what the real table does to connections
made by other uids.

Without root (or nft) the real parts skip, except under ``CI=true``, where
they fail.
"""
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pixelated_dispatcher.manager.agent_firewall import (
    COMMENT_PREFIX, NftablesFirewall, NoFirewall, make_firewall, mount_namespace,
    table_name_for)
from pixelated_dispatcher.testing.agent_firewall_contract import make_firewall_tests
from pixelated_dispatcher.testing.fake_firewall import FakeFirewall

from .firewall_probes import CONNECT, PROXY_GID, STRANGER, connect_as, nft_tables, require_nft


class _FakeFixture:
    def __init__(self, test_case):
        self.kernel = {}
        self.firewall = FakeFirewall("fake_a", self.kernel)

    def same_firewall(self):
        return FakeFirewall("fake_a", self.kernel)

    def new_firewall(self):
        return FakeFirewall("fake_b", self.kernel)

    def table_exists(self):
        return succeed("fake_a" in self.kernel)


class _RealFixture:
    def __init__(self, test_case):
        require_nft(test_case)
        self.names = [table_name_for("/test/" + uuid.uuid4().hex) for _ in range(2)]
        self.firewall = self.same_firewall()
        test_case.addCleanup(self.cleanup)

    def same_firewall(self):
        return NftablesFirewall(reactor, self.names[0], PROXY_GID, "pixelated test")

    def new_firewall(self):
        return NftablesFirewall(reactor, self.names[1], PROXY_GID, "pixelated test")

    def table_exists(self):
        return deferToThread(lambda: any(self.names[0] in line for line in nft_tables()))

    def cleanup(self):
        for name in self.names:
            subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True)


class FakeFirewallContractTests(make_firewall_tests(_FakeFixture)):
    pass


class NftablesFirewallContractTests(make_firewall_tests(_RealFixture)):
    pass


#: connect to PORT, then send each line of stdin; prints the first error
HOLD = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
try:
    for line in sys.stdin:
        s.sendall(line.encode())
        time.sleep(0.3)
        s.sendall(b"")
    s.settimeout(3)
    s.recv(1)
    print("open")
except OSError as e:
    print(type(e).__name__)
"""


class NftablesFilteringTests(TestCase):
    """The real table, the real kernel, real processes of other uids."""

    timeout = 60

    def setUp(self):
        require_nft(self)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.addCleanup(self.listener.close)
        self.port = self.listener.getsockname()[1]
        self.name = table_name_for("/test/" + uuid.uuid4().hex)
        self.firewall = NftablesFirewall(reactor, self.name, PROXY_GID, "pixelated test")
        self.addCleanup(subprocess.run, ["nft", "delete", "table", "inet", self.name],
                        capture_output=True)

    def reach(self, uid, gid):
        return deferToThread(connect_as, uid, gid, self.port)

    @inlineCallbacks
    def test_only_root_and_the_proxy_group_while_granted_reach_a_protected_port(self):
        yield self.firewall.start()
        self.assertEqual((yield self.reach(STRANGER, STRANGER)), "connected")  # not yet
        yield self.firewall.protect("127.0.0.1", self.port)
        self.assertEqual((yield self.reach(STRANGER, STRANGER)), "ConnectionRefusedError")
        self.assertEqual((yield self.reach(None, None)), "connected")  # root
        # the proxy, before the manager granted it this agent
        self.assertEqual((yield self.reach(PROXY_GID, PROXY_GID)), "ConnectionRefusedError")
        yield self.firewall.grant("127.0.0.1", self.port)
        self.assertEqual((yield self.reach(PROXY_GID, PROXY_GID)), "connected")
        self.assertEqual((yield self.reach(STRANGER, PROXY_GID)), "connected")
        self.assertEqual((yield self.reach(STRANGER, STRANGER)), "ConnectionRefusedError",
                         "a grant is the proxy group's, nobody else's")
        # a supplementary membership is not enough: the socket's group counts
        self.assertEqual((yield deferToThread(lambda: subprocess.run(
            ["setpriv", "--reuid", str(STRANGER), "--regid", str(STRANGER), "--groups",
             str(PROXY_GID), "--", sys.executable, "-c", CONNECT, str(self.port)],
            capture_output=True, text=True, timeout=20).stdout.strip())),
            "ConnectionRefusedError")
        yield self.firewall.revoke("127.0.0.1", self.port)
        self.assertEqual((yield self.reach(PROXY_GID, PROXY_GID)), "ConnectionRefusedError")
        self.assertEqual((yield self.reach(None, None)), "connected")
        yield self.firewall.release("127.0.0.1", self.port)
        self.assertEqual((yield self.reach(STRANGER, STRANGER)), "connected")

    @inlineCallbacks
    def test_a_table_removed_by_something_else_comes_back_whole_at_the_next_change(self):
        """``nft flush ruleset`` (or any tool) removes the table: every agent
        is open until the manager's next change, which puts back the table
        with every agent, grant and network it had, then does the change."""
        yield self.firewall.start()
        yield self.firewall.protect("127.0.0.1", self.port)
        yield self.firewall.protect("127.0.0.1", 29001)
        yield self.firewall.grant("127.0.0.1", 29001)
        yield self.firewall.protect("127.0.0.1", 29002)
        yield self.firewall.release("127.0.0.1", 29002)
        yield self.firewall.protect_network("198.18.49.0/24", "198.18.49.1")
        subprocess.run(["nft", "delete", "table", "inet", self.name], check=True)
        self.assertEqual((yield self.reach(STRANGER, STRANGER)), "connected")  # open now
        yield self.firewall.protect("127.0.0.1", 29003)
        self.assertEqual((yield self.reach(STRANGER, STRANGER)), "ConnectionRefusedError")
        self.assertEqual((yield self.firewall.entries()),
                         {("127.0.0.1", self.port), ("127.0.0.1", 29001), ("127.0.0.1", 29003)})
        self.assertEqual((yield self.firewall.granted()), {("127.0.0.1", 29001)})
        self.assertEqual((yield self.firewall.networks()), {"198.18.49.0/24"})
        # a read repairs too
        subprocess.run(["nft", "delete", "table", "inet", self.name], check=True)
        self.assertEqual((yield self.firewall.granted()), {("127.0.0.1", 29001)})
        self.assertEqual((yield self.reach(STRANGER, STRANGER)), "ConnectionRefusedError")

    @inlineCallbacks
    def test_a_connection_opened_while_granted_dies_with_the_grant(self):
        """A compromised proxy cannot keep an agent by holding a connection
        open: the rules apply to every packet, not to new connections only."""
        yield self.firewall.start()
        yield self.firewall.protect("127.0.0.1", self.port)
        yield self.firewall.grant("127.0.0.1", self.port)
        holder = subprocess.Popen(
            ["setpriv", "--reuid", str(PROXY_GID), "--regid", str(PROXY_GID),
             "--clear-groups", "--", sys.executable, "-c", HOLD, str(self.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addCleanup(holder.kill)
        self.listener.settimeout(10)
        server, _ = yield deferToThread(self.listener.accept)
        self.addCleanup(server.close)
        holder.stdin.write("before\n")
        holder.stdin.flush()
        server.settimeout(10)
        self.assertEqual((yield deferToThread(server.recv, 100)), b"before\n")
        yield self.firewall.revoke("127.0.0.1", self.port)
        holder.stdin.write("after\n")
        out = yield deferToThread(holder.communicate, timeout=20)
        self.assertIn("ConnectionResetError", out[0])
        server.settimeout(1)
        try:
            received = server.recv(100)
        except OSError:
            received = b""
        self.assertNotIn(b"after", received)

    @inlineCallbacks
    def test_the_table_is_gone_after_close_and_stays_with_agents(self):
        yield self.firewall.start()
        self.assertIn("table inet %s" % self.name, nft_tables())
        yield self.firewall.protect("127.0.0.1", self.port)
        yield self.firewall.close(keep=True)
        self.assertEqual((yield self.reach(STRANGER, STRANGER)), "ConnectionRefusedError")
        again = NftablesFirewall(reactor, self.name, PROXY_GID, "pixelated test")
        yield again.start()
        self.assertEqual((yield again.entries()), {("127.0.0.1", self.port)})
        self.assertEqual((yield self.reach(STRANGER, STRANGER)), "ConnectionRefusedError")
        yield again.close(keep=False)
        self.assertNotIn("table inet %s" % self.name, nft_tables())
        self.assertEqual((yield self.reach(STRANGER, STRANGER)), "connected")


class OrphanTableTests(TestCase):
    """A manager killed with its state directory deleted leaves a table no
    manager can recover: the next manager to start removes it, and never a
    table whose state directory exists."""

    timeout = 60

    @inlineCallbacks
    def test_tables_of_vanished_state_directories_are_removed(self):
        require_nft(self)
        gone = "/tmp/pxnet-gone-" + uuid.uuid4().hex
        alive = tempfile.mkdtemp(prefix="pxnet-alive-")
        self.addCleanup(os.rmdir, alive)
        tables = [table_name_for(path) for path in (gone, alive, "/test/" + uuid.uuid4().hex)]
        for name in tables:
            self.addCleanup(subprocess.run, ["nft", "delete", "table", "inet", name],
                            capture_output=True)
        for directory in (gone, alive):
            yield make_firewall(reactor, "nftables", directory, PROXY_GID, True).start()
        yield NftablesFirewall(reactor, tables[2], PROXY_GID, "pixelated test").start()
        listed = nft_tables()
        self.assertNotIn("table inet %s" % tables[0], listed)
        self.assertIn("table inet %s" % tables[1], listed)
        self.assertIn("table inet %s" % tables[2], listed)  # no state dir named: kept

    @inlineCallbacks
    def test_tables_of_other_mount_namespaces_are_kept(self):
        """A manager in a container on the host's network, or a sandboxed
        service (its own /var/lib/pixelated, invisible here), keeps its
        table when another manager starts, whether or not a process still
        lives in its namespace: removing it would open that manager's
        agents."""
        require_nft(self)
        container = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                      "sleep", "60"])
        self.addCleanup(container.wait)
        self.addCleanup(container.kill)
        living = None
        for _ in range(100):
            living = "mnt:%d" % os.stat("/proc/%d/ns/mnt" % container.pid).st_ino
            if living != mount_namespace():
                break
            time.sleep(0.05)    # unshare has not switched yet
        self.assertNotEqual(living, mount_namespace())
        elsewhere = "/var/lib/pxnet-container-" + uuid.uuid4().hex   # not on this host
        tables = {namespace: "pixelated_" + uuid.uuid4().hex[:16]
                  for namespace in (living, "mnt:1")}
        ours = table_name_for("/test/" + uuid.uuid4().hex)
        for name in list(tables.values()) + [ours]:
            self.addCleanup(subprocess.run, ["nft", "delete", "table", "inet", name],
                            capture_output=True)
        for namespace, name in tables.items():
            yield NftablesFirewall(reactor, name, PROXY_GID,
                                   COMMENT_PREFIX + elsewhere + " in " + namespace).start()
        yield NftablesFirewall(reactor, ours, PROXY_GID, "pixelated test").start()
        listed = nft_tables()
        for name in tables.values():
            self.assertIn("table inet %s" % name, listed)

    def test_a_restarted_manager_finds_its_table_in_a_new_mount_namespace(self):
        """systemd gives a sandboxed service a new mount namespace at every
        start: the name of the table must not depend on it."""
        self.assertEqual(table_name_for("/var/lib/pixelated"),
                         table_name_for("/var/lib/pixelated"))
        self.assertNotIn(mount_namespace()[4:], table_name_for("/var/lib/pixelated"))
        self.assertEqual(make_firewall(reactor, "auto", "/var/lib/pixelated", 7, True).table,
                         "pixelated_" + hashlib.sha256(b"/var/lib/pixelated").hexdigest()[:16])


class MakeFirewallTests(SynchronousTestCase):
    def test_none_and_non_root_managers_do_not_filter(self):
        self.assertIsInstance(make_firewall(reactor, "none", "/s", 1, True), NoFirewall)
        self.assertIsInstance(make_firewall(reactor, "auto", "/s", 1, False), NoFirewall)
        self.assertFalse(make_firewall(reactor, "auto", "/s", 1, False).enforcing)

    def test_root_managers_filter_with_a_table_named_after_their_state(self):
        firewall = make_firewall(reactor, "auto", "/var/lib/pixelated", 7, True)
        self.assertIsInstance(firewall, NftablesFirewall)
        self.assertEqual(firewall.table, table_name_for("/var/lib/pixelated"))
        self.assertNotEqual(firewall.table, table_name_for("/var/lib/pixelated2"))
        self.assertIn("meta skgid 7 ip daddr . tcp dport @granted accept", firewall.ruleset())
        self.assertNotIn("skgid", make_firewall(reactor, "auto", "/s", None, True).ruleset())

    def test_nftables_asked_for_without_root_is_an_error(self):
        self.assertRaises(ValueError, make_firewall, reactor, "nftables", "/s", 1, False)
        self.assertRaises(ValueError, make_firewall, reactor, "iptables", "/s", 1, True)
