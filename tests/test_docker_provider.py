"""DockerProvider against the verified fake engine, on a fake clock.

Every scenario here is one an operator would notice: what the container is
allowed to do, where the password goes, what a failed start says, what happens
when an agent dies or the engine goes away. The same behaviour is checked
against a real dockerd in ``test_docker_provider_real.py``.
"""
import itertools
import json
import os
import tempfile

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pixelated_dispatcher.manager.providers.docker import (
    LABEL, USER_LABEL, ContainerEngineUnavailable, DockerAgentSettings, DockerProvider)
from pixelated_dispatcher.testing.fake_docker import FakeDockerEngine
from pixelated_dispatcher.manager.providers.agent_ports import PortAllocator, PortRange
from pixelated_dispatcher.manager.providers.interface import AgentStartError, IAgentProvider
from pixelated_dispatcher.manager.providers.loopback_guard import LoopbackGuardFailed

IMAGE = "pixelated/pixelated-user-agent:latest"
CREDENTIALS = (b'{"leap_provider_hostname": "example.org", "user": "alice",'
               b' "password": "correct horse"}\n')


class _Probe:
    """Which published ports 'answer HTTP'; everything, unless told otherwise."""

    def __init__(self):
        self.silent = set()
        self.asked = []

    def __call__(self, host, port):
        self.asked.append((host, port))
        return succeed(port not in self.silent)


class _Guard:
    def __init__(self, error=None):
        self.error = error
        self.ensured = 0

    async def ensure(self, engine):
        self.ensured += 1
        if self.error:
            raise LoopbackGuardFailed(self.error)


class _InOrder:
    """randint in order: the first port of the range first."""

    def __init__(self):
        self.count = itertools.count()

    def randint(self, low, high):
        return low + next(self.count) % (high - low + 1)


class DockerProviderTests(SynchronousTestCase):

    def setUp(self):
        self.clock = Clock()
        self.engine = FakeDockerEngine(images=[IMAGE])
        self.probe = _Probe()
        self.exits = []
        self.data = {}

    def provider(self, **settings):
        settings.setdefault("start_timeout", 5)
        # host ports handed out in order from 32768, as the fake engine did
        ports = PortAllocator(self.clock, PortRange(32768, 33767), is_free=lambda port: True,
                              random=_InOrder())
        provider = DockerProvider(self.clock, self.engine, DockerAgentSettings(**settings),
                                  probe=self.probe, ports=ports)
        provider.on_exit(lambda username, reason: self.exits.append((username, reason)))
        return provider

    def data_dir(self, username):
        if username not in self.data:
            self.data[username] = tempfile.mkdtemp(prefix="pxdata-")
            self.addCleanup(os.rmdir, self.data[username])
        return self.data[username]

    def start(self, provider, username="alice", credentials=CREDENTIALS):
        return provider.start(username, self.data_dir(username), credentials)

    def started(self, provider, username="alice"):
        return self.successResultOf(self.start(provider, username))

    def container(self, username="alice", instance="pixelated-agent"):
        return self.engine.by_name("%s-%s" % (instance, username))

    # -- the container --

    def test_provides_the_interface(self):
        provider = self.provider()
        self.assertTrue(verifyObject(IAgentProvider, provider))
        self.assertEqual(provider.name, "docker")

    def test_one_hardened_container_per_user(self):
        provider = self.provider(memory=300 * 1024 * 1024, pids=64, user="1234:1234")
        agent = self.started(provider)
        container = self.container()
        self.assertIsNotNone(container, "container pixelated-agent-alice")
        config = container.config
        self.assertEqual(config["Labels"], {LABEL: "pixelated-agent", USER_LABEL: "alice"})
        self.assertEqual(config["User"], "1234:1234")
        host = config["HostConfig"]
        self.assertEqual(host["Memory"], 300 * 1024 * 1024)
        self.assertEqual(host["MemorySwap"], 300 * 1024 * 1024)
        self.assertEqual(host["PidsLimit"], 64)
        self.assertEqual(host["CapDrop"], ["ALL"])
        self.assertEqual(host["SecurityOpt"], ["no-new-privileges"])
        self.assertEqual(host["RestartPolicy"], {"Name": "no"})
        self.assertEqual(host["Mounts"], [{"Type": "bind", "Source": self.data_dir("alice"),
                                           "Target": "/mnt/user", "ReadOnly": False}])
        # a host port the manager chose from --agent-port-range, on the agents' network
        self.assertEqual(host["PortBindings"], {"4567/tcp": [{"HostIp": "127.0.0.1",
                                                              "HostPort": "32768"}]})
        network = self.engine.networks["pixelated-agent-net"]
        self.assertEqual(host["NetworkMode"], network["Id"])
        self.assertEqual(network["Options"], {"com.docker.network.bridge.enable_icc": "false"})
        self.assertNotIn("Cmd", config, "the image's own command runs")
        self.assertEqual(config["Env"], ["DISPATCHER_LOGOUT_URL=/auth/logout"])
        # the address is the one the engine picked, read back with inspect
        published = int(container.ports["4567/tcp"][0]["HostPort"])
        self.assertEqual((agent.address.host, agent.address.port), ("127.0.0.1", published))
        self.assertEqual(self.probe.asked[-1], ("127.0.0.1", published))
        self.assertEqual(provider.running(), {"alice": agent})
        self.assertGreater(agent.pid, 0)

    def test_per_user_uids_from_the_manager(self):
        provider = self.provider()
        uids = {"alice": 200001, "bob": 200002}
        provider.accounts = lambda username: succeed((uids[username], uids[username]))
        self.started(provider, "alice")
        self.started(provider, "bob")
        for username, uid in uids.items():
            self.assertEqual(self.container(username).config["User"], "%d:%d" % (uid, uid))
            if os.geteuid() == 0:
                status = os.stat(self.data_dir(username))
                self.assertEqual((status.st_uid, status.st_gid), (uid, uid))

    def test_missing_data_directory_is_a_clear_start_error(self):
        if os.geteuid() != 0:
            self.skipTest("the data directory is only prepared when running as root")
        provider = self.provider()
        error = self.failureResultOf(
            provider.start("alice", "/nonexistent/pixelated/alice", CREDENTIALS),
            AgentStartError).value
        self.assertIn("cannot give the data directory /nonexistent/pixelated/alice to the"
                      " agent (65534:65534)", str(error))
        self.assertEqual(self.engine.containers, {})

    def test_two_users_two_containers_two_data_dirs(self):
        provider = self.provider()
        alice = self.started(provider, "alice")
        bob = self.started(provider, "bob")
        self.assertNotEqual(alice.address.port, bob.address.port)
        sources = {u: self.container(u).config["HostConfig"]["Mounts"][0]["Source"]
                   for u in ("alice", "bob")}
        self.assertEqual(sources, {"alice": self.data_dir("alice"), "bob": self.data_dir("bob")})

    def test_credentials_go_to_stdin_and_nowhere_else(self):
        provider = self.provider(command="agent --port {port} --home {data_dir} --user {username}")
        self.started(provider)
        container = self.container()
        self.assertEqual(container.stdin, CREDENTIALS)
        self.assertTrue(container.config["OpenStdin"] and container.config["StdinOnce"])
        everything_else = json.dumps(self.successResultOf(
            self.engine.inspect_container(container.id)))
        self.assertNotIn("correct horse", everything_else)

    def test_agent_command_replaces_the_images_command(self):
        provider = self.provider(
            command="/usr/bin/agent --port {port} --home '{data_dir}' -u {username}")
        self.started(provider)
        self.assertEqual(self.container().config["Cmd"],
                         ["/usr/bin/agent", "--port", "4567", "--home", "/mnt/user", "-u", "alice"])

    def test_stale_container_of_the_same_name_is_replaced(self):
        provider = self.provider()
        old = self.successResultOf(self.engine.create_container(
            "pixelated-agent-alice", {"Image": IMAGE, "Labels": {LABEL: "pixelated-agent",
                                                                  USER_LABEL: "alice"}}))
        self.started(provider)
        self.assertNotIn(old, self.engine.containers)
        self.assertEqual(self.container().stdin, CREDENTIALS)

    def test_stale_container_that_docker_cannot_remove_is_renamed_aside(self):
        """dockerd 20.10, stopped while a container started, may leave its root
        file system mounted and fail every removal: the user still gets an
        agent (bench/soak, dockerd-restart)."""
        provider = self.provider()
        old = self.successResultOf(self.engine.create_container(
            "pixelated-agent-alice", {"Image": IMAGE, "Labels": {LABEL: "pixelated-agent",
                                                                  USER_LABEL: "alice"}}))
        self.engine.unremovable.add(old)
        self.started(provider)
        self.assertEqual(self.container().stdin, CREDENTIALS)
        self.assertNotEqual(self.container().id, old)
        self.assertTrue(self.engine.containers[old].name.startswith(
            "pixelated-agent-alice-defunct-"))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_stale_container_and_missing_image_together(self):
        self.engine = FakeDockerEngine(images=[IMAGE], registry=[IMAGE])
        old = self.successResultOf(self.engine.create_container(
            "pixelated-agent-alice", {"Image": IMAGE}))
        del self.engine.images[IMAGE]            # e.g. removed by an image prune
        provider = self.provider()
        self.started(provider)
        self.assertNotIn(old, self.engine.containers)
        self.assertIn(IMAGE, self.engine.images)
        self.assertEqual(self.engine.calls.count("pull_image"), 1)

    def test_concurrent_starts_share_one_container(self):
        provider = self.provider()
        self.probe.silent.add(32768)
        first, second = self.start(provider), self.start(provider)
        self.probe.silent.clear()
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual(len(self.engine.containers), 1)

    # -- failed starts --

    def test_agent_that_never_answers_fails_with_its_log_and_is_removed(self):
        provider = self.provider(start_timeout=5)
        self.probe.silent.add(32768)
        d = self.start(provider)
        container = self.container()
        self.engine.write_log(container.id, "loading mailbox")
        self.engine.write_log(container.id, "waiting for the LEAP provider...")
        self.clock.pump([0.5] * 9)
        self.assertNoResult(d)
        self.clock.pump([0.5] * 3)
        error = self.failureResultOf(d, AgentStartError).value
        self.assertIn("the agent of alice did not answer HTTP on 127.0.0.1:32768 within 5 s",
                      str(error))
        self.assertIn("waiting for the LEAP provider...", str(error))
        self.assertIsNone(self.container(), "the container is removed")
        self.assertEqual(provider.running(), {})

    def test_agent_that_dies_while_starting_says_how(self):
        provider = self.provider()
        self.probe.silent.add(32768)
        d = self.start(provider)
        container = self.container()
        self.engine.write_log(container.id, "error: no such option --organization-mode")
        self.engine.crash(container.id, exit_code=2)
        self.clock.advance(1)
        error = self.failureResultOf(d, AgentStartError).value
        self.assertIn("the agent of alice exited with code 2 before it answered HTTP", str(error))
        self.assertIn("no such option --organization-mode", str(error))
        self.assertIsNone(self.container())
        self.assertEqual(self.exits, [], "an agent that never ran does not 'exit'")

    def test_stop_during_start_ends_the_start(self):
        provider = self.provider()
        self.probe.silent.add(32768)
        starting = self.start(provider)
        stopping = provider.stop("alice")
        self.clock.advance(0.1)
        error = self.failureResultOf(starting, AgentStartError).value
        self.assertEqual(str(error), "the agent of alice was stopped while it was starting")
        self.successResultOf(stopping)
        self.assertEqual(self.engine.containers, {})
        self.assertEqual(provider.running(), {})

    def test_start_during_stop_waits_for_the_stop(self):
        provider = self.provider()
        self.started(provider)
        old = self.container().id
        original_stop = self.engine.stop_container
        held = []

        def slow_stop(container_id, timeout):
            held.append(container_id)
            d = Deferred()
            self.clock.callLater(2, lambda: original_stop(container_id, timeout)
                                 .chainDeferred(d))
            return d
        self.engine.stop_container = slow_stop
        stopping = provider.stop("alice")
        starting = self.start(provider)
        self.assertNoResult(starting)
        self.assertIn(old, self.engine.containers, "the stop is still under way")
        self.clock.advance(2)
        self.successResultOf(stopping)
        second = self.successResultOf(starting)
        self.assertEqual(held, [old])
        self.assertNotIn(old, self.engine.containers)
        self.assertEqual(provider.running(), {"alice": second})
        self.assertEqual(self.exits, [("alice", "stopped")])

    def test_missing_image_is_pulled(self):
        self.engine = FakeDockerEngine(images=[], registry=[IMAGE])
        provider = self.provider(image="pixelated/pixelated-user-agent")
        self.started(provider)
        self.assertIn("pull_image", self.engine.calls)
        self.assertIn(IMAGE, self.engine.images)

    def test_failed_pull_fails_the_start_with_dockers_message(self):
        self.engine = FakeDockerEngine(images=[])
        provider = self.provider(image="registry.example.org/pixelated/agent:2")
        error = self.failureResultOf(self.start(provider), AgentStartError).value
        self.assertIn("the agent image registry.example.org/pixelated/agent:2 is not on this"
                      " machine and pulling it failed", str(error))
        self.assertIn("registry.example.org", str(error).split("failed:")[1])
        self.assertEqual(self.engine.containers, {})

    def test_loopback_guard_failure_refuses_agents(self):
        provider = DockerProvider(self.clock, self.engine, DockerAgentSettings(),
                                  probe=self.probe,
                                  loopback_guard=_Guard("refusing to start agents: no iptables"))
        error = self.failureResultOf(self.start(provider), AgentStartError).value
        self.assertIn("refusing to start agents: no iptables", str(error))
        self.assertEqual(self.engine.containers, {})

    # -- agents that end --

    def test_stop_removes_the_container_and_says_so(self):
        provider = self.provider(stop_grace=7.5)
        self.started(provider)
        self.successResultOf(provider.stop("alice"))
        self.assertEqual(provider.running(), {})
        self.assertEqual(self.engine.containers, {})
        self.assertEqual(self.exits, [("alice", "stopped")])
        self.successResultOf(provider.stop("alice"))
        self.assertEqual(self.exits, [("alice", "stopped")])

    def test_killed_agent_is_noticed(self):
        provider = self.recovered()
        self.started(provider)
        self.successResultOf(self.engine.kill_container("pixelated-agent-alice"))
        self.assertEqual(provider.running(), {})
        self.assertEqual(self.exits, [("alice", "was killed by signal 9 (SIGKILL, exit code 137)")])
        self.assertEqual(self.engine.containers, {}, "the dead container is removed")
        # and the next start makes a new one
        self.started(provider)
        self.assertIn("alice", provider.running())

    def test_oom_killed_agent_is_reported_as_such(self):
        provider = self.recovered(memory=256 * 1024 * 1024)
        self.started(provider)
        self.engine.crash(self.container().id, oom=True)
        self.assertEqual(self.exits, [(
            "alice", "was killed for running out of memory (OOM-killed at its limit of 256 MiB)")])

    def test_crashed_agent_reports_its_exit_code(self):
        provider = self.recovered()
        self.started(provider)
        self.engine.crash(self.container().id, exit_code=1)
        self.assertEqual(self.exits, [("alice", "exited with code 1")])

    # -- manager restarts --

    def recovered(self, **settings):
        provider = self.provider(**settings)
        self.successResultOf(provider.recover())
        return provider

    def test_recover_adopts_running_agents_and_removes_the_rest(self):
        first = self.recovered()
        alice = self.started(first, "alice")
        self.started(first, "bob")
        self.started(first, "carol")
        self.successResultOf(first.close())
        self.assertEqual(len(self.engine.containers), 3, "close leaves agents running")
        self.engine.crash(self.container("bob").id, exit_code=1)     # died meanwhile
        self.probe.silent.add(int(self.container("carol").ports["4567/tcp"][0]["HostPort"]))
        foreign = self.successResultOf(self.engine.create_container(
            "someone-else", {"Image": IMAGE, "Labels": {LABEL: "another-dispatcher"}}))

        second = self.provider()
        adopted = self.successResultOf(second.recover())
        self.assertEqual([(a.username, a.address) for a in adopted],
                         [("alice", alice.address)])
        self.assertEqual(set(second.running()), {"alice"})
        self.assertIsNone(self.container("bob"), "exited container removed")
        self.assertIsNone(self.container("carol"), "container that does not answer removed")
        self.assertIn(foreign, self.engine.containers, "other containers are left alone")
        # the adopted agent is followed like one we started
        self.engine.crash(self.container("alice").id, exit_code=1)
        self.assertEqual(self.exits, [("alice", "exited with code 1")])

    # -- the engine goes away --

    def test_engine_down_then_back(self):
        provider = self.recovered()
        self.started(provider)
        self.engine.stop_daemon()
        self.assertEqual(provider.running(), {})
        self.assertEqual(self.exits, [("alice", "container engine unavailable")])
        error = self.failureResultOf(self.start(provider, "bob"), ContainerEngineUnavailable).value
        self.assertTrue(str(error).startswith("container engine unavailable: cannot reach"),
                        str(error))
        self.assertIsInstance(error, AgentStartError)
        self.clock.pump([0.5, 1, 2, 4, 5, 5])
        self.assertFalse(provider.engine_available())
        self.engine.start_daemon()
        self.clock.pump([5])
        self.assertTrue(provider.engine_available())
        self.assertEqual(self.engine.containers, {}, "dead containers cleaned up on return")
        self.started(provider, "bob")
        self.engine.crash(self.container("bob").id, exit_code=3)
        self.assertEqual(self.exits[-1], ("bob", "exited with code 3"),
                         "events followed again")

    def test_engine_down_at_manager_start(self):
        survivor = self.successResultOf(self.engine.create_container(
            "pixelated-agent-alice", {"Image": IMAGE, "Labels": {LABEL: "pixelated-agent",
                                                                  USER_LABEL: "alice"},
                                      "HostConfig": {"PortBindings": {"4567/tcp": [
                                          {"HostIp": "127.0.0.1", "HostPort": ""}]}}}))
        self.successResultOf(self.engine.start_container(survivor))
        self.engine.reachable = False           # e.g. dockerd restarting with live-restore
        provider = self.provider()
        self.assertEqual(self.successResultOf(provider.recover()), [])
        self.assertIsInstance(self.failureResultOf(self.start(provider)).value,
                              ContainerEngineUnavailable)
        self.engine.reachable = True
        self.clock.pump([1, 1])
        self.assertEqual(set(provider.running()), {"alice"}, "adopted once the engine is back")

    def test_close_stops_following_and_leaves_agents(self):
        provider = self.recovered()
        self.started(provider)
        self.successResultOf(provider.close())
        self.assertEqual(len(self.engine.containers), 1)
        self.assertEqual(provider.running(), {}, "they are the next manager's now")
        self.engine.crash(self.container().id, exit_code=1)
        self.assertEqual(self.exits, [])
        self.clock.pump([5] * 5)
        self.assertEqual(self.engine.calls.count("follow_events"), 1)

    def test_close_can_stop_the_agents_instead(self):
        provider = DockerProvider(self.clock, self.engine, DockerAgentSettings(),
                                  probe=self.probe, keep_on_close=False)
        provider.on_exit(lambda username, reason: self.exits.append((username, reason)))
        self.successResultOf(provider.recover())
        self.started(provider, "alice")
        self.successResultOf(provider.close())
        self.assertEqual(self.engine.containers, {})
        self.assertEqual(self.exits, [("alice", "stopped")])

    def test_close_ends_starts_in_flight(self):
        provider = self.recovered()
        self.probe.silent.add(32768)
        starting = self.start(provider)
        closing = provider.close()
        self.clock.advance(0.1)
        error = self.failureResultOf(starting, AgentStartError).value
        self.assertEqual(str(error), "the manager is shutting down")
        self.successResultOf(closing)
        self.assertEqual(self.engine.containers, {}, "its container is removed")
        self.assertEqual(provider.running(), {})
        self.assertIsInstance(self.failureResultOf(self.start(provider, "bob")).value,
                              AgentStartError)

    def test_memory_usage_per_agent(self):
        provider = self.recovered()
        self.started(provider, "alice")
        self.started(provider, "bob")
        self.container("bob").memory_usage = 42 * 1024 * 1024
        usage = self.successResultOf(provider.memory_usage())
        self.assertEqual(usage, {"alice": 8 * 1024 * 1024, "bob": 42 * 1024 * 1024})
