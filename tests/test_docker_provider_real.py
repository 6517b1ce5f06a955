"""DockerProvider against a real dockerd and the test agent image.

What is proved here is what an operator would check with ``docker inspect``
and a browser: the hardening, the loopback-only port, separate data, the
credentials line reaching the agent and nothing else, deaths noticed (kill,
OOM), failed starts explained and cleaned up, the engine going away and
coming back, a manager restart adopting its agents.

Skips with a one-line reason when no Docker engine is reachable; fails
instead when CI=true (see tests/dockerd.py).
"""
import hashlib
import json
import os
import shutil
import tempfile

import pytest
from twisted.internet import reactor, task
from twisted.internet.defer import ensureDeferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest

from pixelated_dispatcher.manager.providers.docker import ContainerEngineUnavailable
from pixelated_dispatcher.manager.providers.interface import AgentStartError

from . import dockerd
from .dockerd import coroutine_tests
from .real_docker_case import RealDockerTestCase, credentials, get

pytestmark = pytest.mark.whole_system


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


async def eventually(predicate, timeout=15.0, what="condition"):
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError("%s not met within %g s" % (what, timeout))
        await sleep(0.05)
        waited += 0.05
    return waited


@coroutine_tests


class ContainerTests(RealDockerTestCase):

    async def test_two_users_hardened_separate_and_credentials_on_stdin_only(self):
        provider = self.provider()
        await provider.recover()
        lines = {"alice": credentials("alice", "alice's secret passphrase"),
                 "bob": credentials("bob", "bob's secret passphrase")}
        dirs = {u: self.data_dir(u) for u in lines}
        agents = {}
        for username in lines:
            agents[username] = await provider.start(username, dirs[username], lines[username])

        for username, agent in agents.items():
            info = self.inspect(self.container_name(username))
            host = info["HostConfig"]
            self.assertEqual(info["Config"]["User"], "65534:65534")
            self.assertEqual(host["CapDrop"], ["ALL"])
            self.assertEqual(host["SecurityOpt"], ["no-new-privileges"])
            self.assertEqual(host["Memory"], 64 * 1024 * 1024)
            self.assertEqual(host["PidsLimit"], 64)
            self.assertEqual(host["RestartPolicy"]["Name"], "no")
            self.assertFalse(host["Privileged"])
            published = info["NetworkSettings"]["Ports"]["4567/tcp"]
            self.assertEqual(published, [{"HostIp": "127.0.0.1",
                                          "HostPort": str(agent.address.port)}])
            self.assertEqual(info["State"]["Pid"], agent.pid)
            mounts = {m["Destination"]: m["Source"] for m in info["Mounts"]}
            self.assertEqual(mounts["/mnt/user"], dirs[username])

            # the agent got its line on stdin, and runs as the unprivileged user
            code, page = await get(agent.address.port, "/")
            self.assertEqual((code, page.strip()), (200, "Mailbox of %s" % username))
            code, echo = await get(agent.address.port, "/cgi-bin/echo")
            self.assertIn("user=%s\n" % username, echo)
            self.assertIn("credentials_sha256=%s\n" % hashlib.sha256(lines[username]).hexdigest(),
                          echo)
            self.assertIn("uid=65534\n", echo)

            # ...and the password is nowhere else Docker keeps things
            password = json.loads(lines[username])["password"]
            self.assertNotIn(password, json.dumps(info))
            logs = dockerd.api(self.host, "GET", "/containers/%s/logs" % info["Id"],
                               params={"stdout": 1, "stderr": 1})
            self.assertNotIn(password.encode(), logs)
            self.assertNotIn(password, "".join(os.listdir(dirs[username])))

            # separate data: each data directory holds only its own user's file
            with open(os.path.join(dirs[username], "starts")) as f:
                self.assertEqual(f.read(), "started for %s\n" % username)
        self.assertNotEqual(agents["alice"].address.port, agents["bob"].address.port)
        usage = await provider.memory_usage()
        self.assertEqual(set(usage), {"alice", "bob"})
        for used in usage.values():
            self.assertTrue(0 < used < 64 * 1024 * 1024, usage)

    async def test_each_user_runs_under_the_uid_the_manager_gives(self):
        provider = self.provider()
        uids = {"alice": 200001, "bob": 200002}
        provider.accounts = lambda username: succeed((uids[username], uids[username]))
        for username, uid in uids.items():
            data = self.data_dir(username)
            agent = await provider.start(username, data, credentials(username, "pw"))
            code, echo = await get(agent.address.port, "/cgi-bin/echo")
            self.assertIn("uid=%d\ngid=%d\n" % (uid, uid), echo)
            self.assertEqual(os.stat(os.path.join(data, "starts")).st_uid, uid,
                             "the agent wrote its data as its own uid")

    async def test_docker_kill_is_noticed_and_the_next_start_works(self):
        provider = self.provider()
        await provider.recover()
        data = self.data_dir("alice")
        agent = await provider.start("alice", data, credentials("alice", "pw"))
        dockerd.api(self.host, "POST", "/containers/%s/kill" % self.container_name("alice"))
        waited = await eventually(lambda: self.exits, what="the death being noticed")
        self.assertLess(waited, 10)
        self.assertEqual(self.exits,
                         [("alice", "was killed by signal 9 (SIGKILL, exit code 137)")])
        self.assertEqual(provider.running(), {})
        await eventually(lambda: self.gone(self.container_name("alice")),
                         what="removal of the dead container")
        again = await provider.start("alice", data, credentials("alice", "pw"))
        code, _ = await get(again.address.port)
        self.assertEqual(code, 200)
        with open(os.path.join(data, "starts")) as f:
            self.assertEqual(f.read().count("started for alice"), 2, "data kept across starts")
        del agent

    async def test_agent_over_its_memory_limit_is_reported_oom_killed(self):
        provider = self.provider(memory=16 * 1024 * 1024)
        await provider.recover()
        agent = await provider.start("alice", self.data_dir("alice"), credentials("alice", "pw"))
        code, body = await get(agent.address.port, "/cgi-bin/hog")
        self.assertEqual((code, body.strip()), (200, "hogging"))
        await eventually(lambda: self.exits, timeout=20, what="the OOM kill being noticed")
        self.assertEqual(self.exits, [("alice", "was killed for running out of memory"
                                                " (OOM-killed at its limit of 16 MiB)")])

    async def test_stop_ends_and_removes_the_container(self):
        provider = self.provider()
        agent = await provider.start("alice", self.data_dir("alice"), credentials("alice", "pw"))
        await provider.stop("alice")
        self.assertTrue(self.gone(self.container_name("alice")))
        self.assertEqual(self.exits, [("alice", "stopped")])
        with self.assertRaises(Exception):
            await get(agent.address.port)


@coroutine_tests


class FailedStartTests(RealDockerTestCase):

    async def test_agent_that_never_answers_fails_with_its_log_and_is_removed(self):
        provider = self.provider(
            start_timeout=1.5,
            command="sh -c 'echo preparing mailbox for {username}; "
                    "echo cannot reach the LEAP provider >&2; exec sleep 60'")
        error = await self.assertFailure(
            provider.start("alice", self.data_dir("alice"), credentials("alice", "pw")),
            AgentStartError)
        message = str(error)
        self.assertIn("the agent of alice did not answer HTTP on 127.0.0.1:", message)
        self.assertIn("within 1.5 s", message)
        self.assertIn("preparing mailbox for alice", message)
        self.assertIn("cannot reach the LEAP provider", message)
        self.assertTrue(self.gone(self.container_name("alice")))
        self.assertEqual(provider.running(), {})

    async def test_agent_that_exits_at_start_says_how(self):
        provider = self.provider(command="sh -c 'echo bad configuration >&2; exit 3'")
        error = await self.assertFailure(
            provider.start("alice", self.data_dir("alice"), credentials("alice", "pw")),
            AgentStartError)
        self.assertIn("the agent of alice exited with code 3 before it answered HTTP", str(error))
        self.assertIn("bad configuration", str(error))
        self.assertTrue(self.gone(self.container_name("alice")))

    async def test_image_that_cannot_be_pulled(self):
        provider = self.provider(image="127.0.0.1:9/pixelated/none:1")
        error = await self.assertFailure(
            provider.start("alice", self.data_dir("alice"), credentials("alice", "pw")),
            AgentStartError)
        self.assertIn("the agent image 127.0.0.1:9/pixelated/none:1 is not on this machine and"
                      " pulling it failed: ", str(error))
        self.assertIn("127.0.0.1:9", str(error).split("failed: ", 1)[1])


class _Relay(Protocol):
    def __init__(self, target):
        self.target = target
        self.peer = None
        self.pending = []

    def connectionMade(self):
        self.factory.relays.add(self)
        outbound = _Outbound(self)
        UNIXClientEndpoint(reactor, self.target).connect(
            Factory.forProtocol(lambda: outbound)).addErrback(
            lambda _: self.transport.abortConnection())

    def dataReceived(self, data):
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.transport.write(data)

    def connectionLost(self, reason):
        self.factory.relays.discard(self)
        if self.peer is not None:
            self.peer.transport.loseConnection()


class _Outbound(Protocol):
    def __init__(self, inbound):
        self.inbound = inbound

    def connectionMade(self):
        self.inbound.peer = self
        for data in self.inbound.pending:
            self.transport.write(data)
        self.inbound.pending = []

    def dataReceived(self, data):
        self.inbound.transport.write(data)

    def connectionLost(self, reason):
        self.inbound.transport.loseConnection()


class EngineSocket:
    """A socket in front of the real engine that a test can take away and bring
    back: to the manager, exactly a daemon that stops answering and returns."""

    def __init__(self, engine_host, path):
        self.target = engine_host[len("unix://"):]
        self.path = path
        self.host = "unix://" + path
        self.port = None
        self.factory = Factory.forProtocol(lambda: _Relay(self.target))
        self.factory.relays = set()

    async def up(self):
        self.port = await UNIXServerEndpoint(reactor, self.path).listen(self.factory)

    async def down(self):
        if self.port is not None:
            await self.port.stopListening()
            self.port = None
        for relay in list(self.factory.relays):
            relay.transport.abortConnection()
            if relay.peer is not None:
                relay.peer.transport.abortConnection()
        await sleep(0)


@coroutine_tests


class EngineOutageTests(RealDockerTestCase):

    async def test_engine_gone_gives_a_clear_error_and_the_provider_recovers(self):
        if not self.host.startswith("unix://"):
            self.skipTest("needs the engine on a unix socket")
        socket_dir = tempfile.mkdtemp(prefix="pxengine-")
        self.addCleanup(shutil.rmtree, socket_dir, True)
        engine_socket = EngineSocket(self.host, os.path.join(socket_dir, "docker.sock"))
        await engine_socket.up()
        self.addCleanup(lambda: ensureDeferred(engine_socket.down()))

        provider = self.provider(host=engine_socket.host)
        await provider.recover()
        alice = await provider.start("alice", self.data_dir("alice"), credentials("alice", "pw"))

        await engine_socket.down()
        await eventually(lambda: self.exits, what="the engine's loss being noticed")
        self.assertEqual(self.exits, [("alice", "container engine unavailable")])
        self.assertEqual(provider.running(), {})
        error = await self.assertFailure(
            provider.start("bob", self.data_dir("bob"), credentials("bob", "pw")),
            ContainerEngineUnavailable)
        self.assertIn("container engine unavailable: cannot reach the Docker engine at "
                      + engine_socket.host, str(error))

        await engine_socket.up()
        await eventually(provider.engine_available, what="reconnection")
        # alice's container kept running (like a live-restore daemon): adopted again
        await eventually(lambda: "alice" in provider.running(), what="re-adoption")
        self.assertEqual(provider.running()["alice"].address, alice.address)
        bob = await provider.start("bob", self.data_dir("bob"), credentials("bob", "pw"))
        code, page = await get(bob.address.port)
        self.assertEqual((code, page.strip()), (200, "Mailbox of bob"))


@coroutine_tests


class RestartTests(RealDockerTestCase):

    async def test_a_new_manager_adopts_running_agents_and_cleans_up(self):
        first = self.provider()
        await first.recover()
        line = credentials("alice", "pw")
        alice = await first.start("alice", self.data_dir("alice"), line)
        bob = await first.start("bob", self.data_dir("bob"), credentials("bob", "pw"))
        await first.close()
        self.assertTrue(self.inspect(self.container_name("alice"))["State"]["Running"],
                        "closing the manager leaves agents running")
        dockerd.api(self.host, "POST", "/containers/%s/kill" % self.container_name("bob"))
        await eventually(lambda: not self.inspect(self.container_name("bob"))["State"]["Running"])

        second = self.provider()
        adopted = await second.recover()
        self.assertEqual([(a.username, a.address, a.pid) for a in adopted],
                         [("alice", alice.address, alice.pid)])
        self.assertTrue(self.gone(self.container_name("bob")), "exited container removed")
        code, echo = await get(alice.address.port, "/cgi-bin/echo")
        self.assertIn("credentials_sha256=%s\n" % hashlib.sha256(line).hexdigest(), echo,
                      "the very same agent process still serves")
        # and the adopted agent is followed: its death is noticed by the new manager
        dockerd.api(self.host, "POST", "/containers/%s/kill" % self.container_name("alice"))
        killed = ("alice", "was killed by signal 9 (SIGKILL, exit code 137)")
        await eventually(lambda: self.exits[-1:] == [killed])
        del bob


@coroutine_tests
class DaemonRestartTests(RealDockerTestCase):
    """The real thing: the private dockerd of .ci/dockerd.sh stops and starts.

    It disturbs anything else using that daemon, so it runs in CI (which owns
    it) or when PIXELATED_TEST_RESTART_DOCKERD=yes.
    """
    timeout = 120

    def setUp(self):
        super().setUp()
        private = "unix://" + os.path.join(dockerd.PRIVATE_DIR, "docker.sock")
        if dockerd.in_ci():
            self.assertEqual(self.host, private, "CI must use the private dockerd")
        elif os.environ.get("PIXELATED_TEST_RESTART_DOCKERD") != "yes":
            raise SkipTest("restarts the shared dockerd: runs in CI or with"
                           " PIXELATED_TEST_RESTART_DOCKERD=yes")
        elif self.host != private:
            raise SkipTest("only the private dockerd of .ci/dockerd.sh is restarted")

    async def dockerd_sh(self, mode):
        out, err, code = await getProcessOutputAndValue(
            "/bin/bash", [dockerd.DOCKERD_SH, mode], env=dict(os.environ), reactor=reactor)
        self.assertEqual(code, 0, (out + err).decode())

    async def test_daemon_restart_is_noticed_and_survived(self):
        provider = self.provider()
        await provider.recover()
        await provider.start("alice", self.data_dir("alice"), credentials("alice", "pw"))
        self.addCleanup(lambda: ensureDeferred(self.dockerd_sh("start")))

        await self.dockerd_sh("stop")
        await eventually(lambda: self.exits, what="alice's end being noticed")
        self.assertEqual([u for u, _ in self.exits], ["alice"])
        self.assertEqual(provider.running(), {})
        error = await self.assertFailure(
            provider.start("bob", self.data_dir("bob"), credentials("bob", "pw")),
            ContainerEngineUnavailable)
        self.assertIn("container engine unavailable", str(error))

        await self.dockerd_sh("start")
        await eventually(provider.engine_available, timeout=20, what="reconnection")
        bob = await provider.start("bob", self.data_dir("bob"), credentials("bob", "pw"))
        code, page = await get(bob.address.port)
        self.assertEqual((code, page.strip()), (200, "Mailbox of bob"))
        await eventually(lambda: self.gone(self.container_name("alice")),
                         what="alice's dead container being removed")
        self.assertEqual(set(provider.running()), {"bob"})
