"""SwarmProvider on a real one-node swarm (tests/swarm_cluster.py): what the
contract does not say -- the password travels only as the swarm secret (never
in the service, the secret's inspect, the container's config), the container
is hardened as the docker provider's are, a killed container is noticed and
the next request starts the agent again, a stop leaves no service and no
secret behind."""
import json
import os
import shutil
import tempfile
import uuid

import pytest
import treq
from twisted.internet import reactor, task
from twisted.trial.unittest import TestCase

from pixelated_dispatcher.manager.providers.docker import LABEL, USER_LABEL, DockerAgentSettings
from pixelated_dispatcher.manager.providers.docker_engine import DockerEngine, demultiplex
from pixelated_dispatcher.manager.providers.interface import AgentStartError
from pixelated_dispatcher.manager.providers.swarm import (
    CREDENTIALS_FILE, SwarmProvider, SwarmSettings)
from pixelated_dispatcher.manager.providers.swarm_placement import PlacementBook
from pixelated_dispatcher.testing.provider_contract import credentials_for

from . import swarm_cluster
from .dockerd import coroutine_tests
from .swarm_cluster import remove_services

pytestmark = pytest.mark.whole_system

POLL = 0.5


async def eventually(predicate, timeout, what):
    for _ in range(int(timeout / 0.1)):
        if predicate():
            return
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError("%s did not happen within %g s" % (what, timeout))


@coroutine_tests
class SwarmProviderRealTests(TestCase):
    timeout = 120

    def setUp(self):
        self.cluster = swarm_cluster.one_node_swarm()
        self.node = self.cluster.manager
        self.instance = "pxswr-%s" % uuid.uuid4().hex[:8]
        self.addCleanup(remove_services, self.node, self.instance)
        self.directory = tempfile.mkdtemp(prefix="pxswr-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.exits = []

    def provider(self):
        provider = SwarmProvider(
            reactor, DockerEngine(reactor, self.node.host),
            DockerAgentSettings(image=self.cluster.image, instance=self.instance,
                                memory=64 * 1024 * 1024, pids=64, start_timeout=30,
                                stop_grace=2),
            # one node: no other node to probe its firewall from (see the
            # three-node tests/test_swarm_cluster.py for the check)
            SwarmSettings(poll_interval=POLL, cpus=0.5, firewall_check=False),
            placements=PlacementBook(os.path.join(self.directory, "placement.json")),
            keep_on_close=False)
        provider.on_exit(lambda username, reason: self.exits.append((username, reason)))
        self.addCleanup(provider.close)
        return provider

    def data_dir(self, username):
        path = os.path.join(self.directory, "data", username)
        os.makedirs(path, exist_ok=True)
        return path

    def ours(self, kind):
        return self.node.api("GET", "/" + kind, params={
            "filters": json.dumps({"label": ["%s=%s" % (LABEL, self.instance)]})})

    def container(self, username):
        found = self.node.api("GET", "/containers/json", params={
            "filters": json.dumps({"label": ["%s=%s" % (LABEL, self.instance),
                                             "%s=%s" % (USER_LABEL, username)]})})
        self.assertEqual(len(found), 1, found)
        return self.node.api("GET", "/containers/%s/json" % found[0]["Id"])

    def run_in(self, container_id, *command):
        """What ``docker exec`` prints (as the container's user)."""
        created = self.node.api("POST", "/containers/%s/exec" % container_id, body={
            "Cmd": list(command), "AttachStdout": True, "AttachStderr": True})
        output = self.node.api("POST", "/exec/%s/start" % created["Id"],
                               body={"Detach": False, "Tty": False})
        return demultiplex(output).decode("utf-8", "replace")

    async def echo(self, agent):
        response = await treq.get("http://%s:%d/cgi-bin/echo" % (agent.address.host,
                                                                 agent.address.port),
                                  persistent=False)
        text = await response.text()
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    async def test_the_password_travels_only_as_the_secret_and_the_agent_is_hardened(self):
        password = "pw-%s" % uuid.uuid4().hex
        provider = self.provider()
        await provider.recover()
        agent = await provider.start("alice", self.data_dir("alice"),
                                     credentials_for("alice", password))
        self.assertEqual(agent.address.host, self.node.address)
        fields = await self.echo(agent)
        self.assertEqual((fields["user"], fields["password_received"]), ("alice", "yes"))
        self.assertEqual(fields["uid"], "65534")
        # the API shows no password: not in the service, the task, the
        # secret, the container's config or its environment
        (service,) = self.ours("services")
        (secret,) = self.ours("secrets")
        tasks = self.node.api("GET", "/tasks", params={
            "filters": json.dumps({"service": [service["ID"]]})})
        info = self.container("alice")
        for shown in (service, secret, tasks, info,
                      self.node.api("GET", "/secrets/%s" % secret["ID"])):
            self.assertNotIn(password, json.dumps(shown))
        self.assertNotIn("Data", secret["Spec"])
        # in the container: a 0400 file of the agent's uid on a tmpfs
        listing = self.run_in(info["Id"], "stat", "-c", "%a %u %g", CREDENTIALS_FILE)
        self.assertEqual(listing.split(), ["400", "65534", "65534"])
        mounts = self.run_in(info["Id"], "cat", "/proc/mounts")
        self.assertRegex(mounts, r"tmpfs /run/secrets/pixelated-credentials|"
                                 r"tmpfs /run/secrets ")
        # hardened like the docker provider's containers
        host = info["HostConfig"]
        self.assertTrue(host["ReadonlyRootfs"])
        self.assertEqual(host["CapDrop"], ["ALL"])
        self.assertEqual(host["Memory"], 64 * 1024 * 1024)
        self.assertEqual(host["PidsLimit"], 64)
        self.assertEqual(host["NanoCpus"], 5 * 10 ** 8)
        self.assertEqual(info["Config"]["User"], "65534:65534")
        with open("/proc/%d/status" % info["State"]["Pid"]) as f:
            self.assertIn("NoNewPrivs:\t1", f.read())
        self.assertIn("Read-only file system",
                      self.run_in(info["Id"], "touch", "/pxswr-written"))
        # a stop leaves no service and no secret
        await provider.stop("alice")
        self.assertEqual(self.ours("services"), [])
        await eventually(lambda: self.ours("secrets") == [], 10, "removal of the secret")
        self.assertEqual(self.exits, [("alice", "stopped")])

    async def test_a_node_whose_dockerd_lacks_no_new_privileges_gets_no_agent(self):
        """Engine API 1.41 (Debian 12's docker.io): the service cannot ask for
        no-new-privileges, so the node's dockerd must; a real dockerd without
        the flag is refused, with nothing left behind."""
        self.node.stop_daemon()
        self.node.start_daemon(no_new_privileges=False)
        try:
            self.cluster.wait_nodes_ready()
            provider = self.provider()
            await provider.recover()
            error = await self.assertFailure(
                provider.start("alice", self.data_dir("alice"), credentials_for("alice")),
                AgentStartError)
            self.assertIn("does not run with --no-new-privileges", str(error))
            self.assertEqual(self.ours("services"), [])
            self.assertEqual(self.ours("secrets"), [])
            self.assertEqual(provider.running(), {})
        finally:
            self.node.stop_daemon()
            self.node.start_daemon()
            self.cluster.wait_nodes_ready()

    async def test_a_killed_container_is_noticed_and_the_next_request_starts_it(self):
        provider = self.provider()
        await provider.recover()
        data = self.data_dir("alice")
        await provider.start("alice", data, credentials_for("alice"))
        info = self.container("alice")
        self.node.api("POST", "/containers/%s/kill" % info["Id"])
        await eventually(lambda: self.exits, 10 * POLL + 5, "the kill being noticed")
        self.assertEqual(self.exits,
                         [("alice", "was killed by signal 9 (SIGKILL, exit code 137)")])
        self.assertEqual(provider.running(), {})
        self.assertEqual(self.ours("services"), [])     # swarm does not restart it
        again = await provider.start("alice", data, credentials_for("alice"))
        fields = await self.echo(again)
        self.assertEqual(fields["user"], "alice")
        with open(os.path.join(data, "starts")) as f:
            self.assertEqual(f.read().count("started for alice"), 2, "data kept across starts")
        self.assertEqual(len(self.ours("services")), 1)
