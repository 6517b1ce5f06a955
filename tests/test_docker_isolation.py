"""Only the proxy reaches an agent container: the docker provider with the
real (private) dockerd, the real nftables table, and attackers made by the
test: other local uids, a container on Docker's default bridge, a container
on the agents' own network, and another "host" (a network namespace) that
routes to the containers through this one.

Needs root, nft and a Docker engine; skips elsewhere, fails under CI=true.
"""
import random
import socket
import subprocess
import time
import uuid

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from pixelated_dispatcher.manager.agent_firewall import NftablesFirewall, table_name_for
from pixelated_dispatcher.manager.providers.docker import (
    LABEL, DockerAgentSettings, DockerProvider)
from pixelated_dispatcher.manager.providers.docker_engine import DockerEngine, demultiplex

from . import dockerd
from .docker_stack import DockerStack
from .dockerd import coroutine_tests
from .netns import AttackNamespace
from .firewall_probes import (PROXY_GID, STRANGER, connect_as, fetch_as, nft_tables,
                              protected_ports_of, require_nft)

pytestmark = pytest.mark.whole_system

def free_subnet(host):
    """A /24 of this suite's addresses (198.18.32.0/20; 198.18.47.0/24 is
    the namespaces') that no network of the engine has: a random one may
    be taken by another test's network that is still there."""
    taken = {config.get("Subnet") for network in dockerd.api(host, "GET", "/networks")
             for config in (network.get("IPAM") or {}).get("Config") or []}
    free = ["198.18.%d.0/24" % n for n in range(32, 47)
            if "198.18.%d.0/24" % n not in taken]
    if not free:
        raise AssertionError("every /24 of 198.18.32.0/20 is taken by a network: %s"
                             % sorted(t for t in taken if t))
    return random.choice(free)


#: what an attacker container runs: one line per target, REACHED or BLOCKED
PROBE = ('for target in "$@"; do'
         ' if nc -w 3 "${target%:*}" "${target##*:}" </dev/null >/dev/null 2>&1;'
         ' then echo "REACHED $target";'
         ' else echo "BLOCKED $target"; fi; done')


def run_attacker(host, image, instance, network, targets):
    """Run a busybox container on ``network`` that tries every target;
    returns {target: "REACHED"|"BLOCKED"}."""
    name = "%s-attacker-%s" % (instance, uuid.uuid4().hex[:6])
    created = dockerd.api(host, "POST", "/containers/create", params={"name": name}, body={
        "Image": image, "Cmd": ["/bin/sh", "-c", PROBE, "probe"] + list(targets),
        "Labels": {LABEL: instance}, "User": "65534:65534",
        "HostConfig": {"NetworkMode": network}})
    try:
        dockerd.api(host, "POST", "/containers/%s/start" % created["Id"])
        deadline = time.monotonic() + 60
        while dockerd.api(host, "GET", "/containers/%s/json" % created["Id"])["State"][
                "Running"] and time.monotonic() < deadline:
            time.sleep(0.2)
        logs = dockerd.api(host, "GET", "/containers/%s/logs" % created["Id"],
                           params={"stdout": "1", "stderr": "1"})
    finally:
        dockerd.api(host, "DELETE", "/containers/%s" % created["Id"], params={"force": "1"},
                    expect=(204, 404))
    text = demultiplex(logs)
    results = {}
    for line in text.decode("utf-8", "replace").splitlines():
        word, _, target = line.strip().partition(" ")
        if word in ("REACHED", "BLOCKED"):
            results[target] = word
    return results


class _HostListener:
    """An ordinary service on every address of the host: the control that
    shows an attacker's path works for everything but agents."""

    def __enter__(self):
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("0.0.0.0", 0))
        self.socket.listen(16)
        self.port = self.socket.getsockname()[1]
        self.running = True
        import threading
        threading.Thread(target=self._serve, daemon=True).start()
        return self.port

    def _serve(self):
        while self.running:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            try:
                connection.settimeout(3)
                connection.recv(4096)  # the request: closing unread data would reset
                connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
            except OSError:
                pass
            finally:
                connection.close()

    def __exit__(self, *exc):
        self.running = False
        self.socket.close()


@coroutine_tests
class DockerIsolationTests(TestCase):
    """Attackers of every kind against one agent container; the proxy (its
    group) reaches it only through the published port, and only while the
    manager grants it."""

    timeout = 240

    def setUp(self):
        require_nft(self)
        self.host = dockerd.engine_or_skip()
        self.image = dockerd.ensure_agent_image(self.host)
        self.instance = "pxnet-%s" % uuid.uuid4().hex[:8]
        self.addCleanup(dockerd.remove_labelled, self.host, "%s=%s" % (LABEL, self.instance))
        self.table = table_name_for("/test/" + self.instance)
        self.addCleanup(subprocess.run, ["nft", "delete", "table", "inet", self.table],
                        capture_output=True)
        self.subnet = free_subnet(self.host)

    def provider(self, keep_on_close=False):
        settings = DockerAgentSettings(
            image=self.image, instance=self.instance, memory=64 * 1024 * 1024, pids=64,
            start_timeout=30, stop_grace=2, network_subnet=self.subnet)
        firewall = NftablesFirewall(reactor, self.table, PROXY_GID, "pixelated test")
        provider = DockerProvider(reactor, DockerEngine(reactor, self.host), settings,
                                  keep_on_close=keep_on_close, firewall=firewall)
        self.addCleanup(provider.close)
        return provider

    def network(self):
        return dockerd.api(self.host, "GET", "/networks/%s-net" % self.instance)

    async def test_nobody_but_root_and_the_proxy_reaches_an_agent_container(self):
        provider = self.provider()
        await provider.recover()
        agent = await provider.start("alice", _data_dir(self), _credentials("alice"))
        port = agent.address.port
        self.assertIn(port, range(20000, 30000))
        info = dockerd.api(self.host, "GET", "/containers/%s-alice/json" % self.instance)
        network = self.network()
        self.assertEqual(network["Options"]["com.docker.network.bridge.enable_icc"], "false")
        self.assertEqual(network["IPAM"]["Config"][0]["Subnet"], self.subnet)
        address = list(info["NetworkSettings"]["Networks"].values())[0]["IPAddress"]
        gateway = network["IPAM"]["Config"][0]["Gateway"]  # the manager gave it
        self.assertTrue(address.startswith(self.subnet.rsplit(".", 1)[0] + "."), address)

        # other local users, and the proxy before the manager granted it this
        # agent: neither the published port nor the container's address
        for target in (("127.0.0.1", port), (address, 4567)):
            for uid, gid in ((STRANGER, STRANGER), (PROXY_GID, PROXY_GID)):
                self.assertEqual(await deferToThread(_connect_as, uid, gid, *target),
                                 "ConnectionRefusedError", (uid, target))
        # granted: the proxy reads the agent through the published port, and
        # only there (the container's address stays root's)
        await provider._firewall.grant("127.0.0.1", port)
        url = "http://127.0.0.1:%d/" % port
        self.assertIn("Mailbox of alice",
                      await deferToThread(fetch_as, PROXY_GID, PROXY_GID, url))
        self.assertEqual(await deferToThread(_connect_as, PROXY_GID, PROXY_GID, address, 4567),
                         "ConnectionRefusedError")
        self.assertEqual(await deferToThread(_connect_as, STRANGER, STRANGER, "127.0.0.1",
                                             port), "ConnectionRefusedError")
        await provider._firewall.revoke("127.0.0.1", port)
        self.assertNotIn("Mailbox", await deferToThread(fetch_as, PROXY_GID, PROXY_GID, url))

        # other containers, on the agents' network and on Docker's default bridge
        with _HostListener() as control:
            for network_name in (self.instance + "-net", "bridge"):
                bridge_gateway = gateway if network_name != "bridge" else dockerd.api(
                    self.host, "GET", "/networks/bridge")["IPAM"]["Config"][0].get(
                        "Gateway", "198.18.0.1")
                targets = ["%s:4567" % address, "%s:%d" % (bridge_gateway, port),
                           "%s:%d" % (bridge_gateway, control)]
                results = await deferToThread(run_attacker, self.host, self.image,
                                              self.instance, network_name, targets)
                self.assertEqual(results, {targets[0]: "BLOCKED", targets[1]: "BLOCKED",
                                           targets[2]: "REACHED"}, network_name)

        # another host routing through this one, to the container and to 127.0.0.1
        with AttackNamespace() as other_host:
            self.assertNotEqual(other_host.connect(address, 4567), "connected")
            self.assertNotEqual(other_host.connect("127.0.0.1", port), "connected")

        # the agent still serves (as the proxy would reach it)
        response = await treq.get("http://127.0.0.1:%d/" % port, persistent=False, timeout=5)
        self.assertIn("Mailbox of alice", await response.text())

        # a stopped agent's port is no longer held; closing leaves nothing behind
        await provider.stop("alice")
        self.assertNotIn(("127.0.0.1", port), await provider._firewall.entries())
        await provider.close()
        self.assertNotIn("table inet %s" % self.table, nft_tables())
        with self.assertRaises(RuntimeError):
            self.network()

    async def test_a_port_held_by_another_program_is_skipped(self):
        provider = self.provider()
        await provider.recover()
        squatters = []
        try:
            # hold a few ports: the start must go around them
            for candidate in range(20000, 30000, 997):
                s = socket.socket()
                try:
                    s.bind(("127.0.0.1", candidate))
                    s.listen(1)
                    squatters.append(s)
                except OSError:
                    s.close()
            agent = await provider.start("alice", _data_dir(self), _credentials("alice"))
            self.assertNotIn(agent.address.port, [s.getsockname()[1] for s in squatters])
            response = await treq.get("http://127.0.0.1:%d/" % agent.address.port,
                                      persistent=False, timeout=5)
            self.assertIn("Mailbox of alice", await response.text())
        finally:
            for s in squatters:
                s.close()


def _connect_as(uid, gid, host, port):
    return connect_as(uid, gid, port, host)


def _data_dir(test):
    import os
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="pxnet-data-")
    os.chmod(path, 0o700)
    test.addCleanup(shutil.rmtree, path, True)
    return path


def _credentials(username):
    import json
    return json.dumps({"leap_provider_hostname": "example.org", "user": username,
                       "password": "pw"}).encode() + b"\n"


class DockerDispatcherCleanupTests(TestCase):
    """The real daemons with ``--provider docker``: ``remove --purge`` and a
    manager stopped with ``--stop-agents-on-exit`` leave no rule behind."""

    timeout = 180

    def test_purge_and_stop_leave_no_rules_and_no_network(self):
        require_nft(self)
        host = dockerd.engine_or_skip()
        image = dockerd.ensure_agent_image(host)
        stack = DockerStack(self, image, host, extra_manager_args=[
            "--docker-network-subnet", free_subnet(host)])
        table = table_name_for(stack.dispatcher.state_dir)
        stack.dispatcher.add_user("alice", "alice's password")
        browser = stack.browser()
        self.assertEqual(browser.log_in("alice", "alice's password").status, 303)
        deadline = time.monotonic() + 60
        page = browser.get("/")
        while "Mailbox of alice" not in page.text and time.monotonic() < deadline:
            time.sleep(0.3)
            page = browser.get("/")
        self.assertIn("Mailbox of alice", page.text, stack.logs())
        port = int(stack.info("alice")["address"].rsplit(":", 1)[1])
        self.assertEqual(protected_ports_of(table), {port})
        self.assertEqual(connect_as(STRANGER, STRANGER, port), "ConnectionRefusedError")
        network = "%s-net" % stack.instance
        dockerd.api(host, "GET", "/networks/%s" % network)  # it exists
        result = stack.dispatcher.ctl("remove", "--purge", "alice")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(protected_ports_of(table), set())
        stack.dispatcher.stop()
        self.assertNotIn("table inet %s" % table, nft_tables())
        with self.assertRaises(RuntimeError):
            dockerd.api(host, "GET", "/networks/%s" % network)
