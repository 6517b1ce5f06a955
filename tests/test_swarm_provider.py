"""SwarmProvider against the verified fake swarm, on a fake clock: what an
operator of a cluster would notice (where agents go, what a dead or drained
node does to them, what a failed start says, where the password goes)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

from prometheus_client import generate_latest
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pixelated_dispatcher.manager.providers.docker import LABEL, USER_LABEL, DockerAgentSettings
from pixelated_dispatcher.manager.passwords import FAST_FOR_TESTS
from pixelated_dispatcher.manager.providers.interface import AgentStartError
from pixelated_dispatcher.manager.service import Manager, ManagerSettings
from pixelated_dispatcher.manager.providers.swarm import (
    CREDENTIALS_FILE, SwarmProvider, SwarmSettings)
from pixelated_dispatcher.manager.providers.swarm_options import swarm_settings_from_config
from pixelated_dispatcher.manager.providers.swarm_placement import PlacementBook
from pixelated_dispatcher.testing.fake_swarm import FakeSwarmEngine
from pixelated_dispatcher.testing.provider_contract import credentials_for

IMAGE = "pixelated-test-agent:fake"
POLL = 1.0
#: the proxy's (and manager process's) host, not a node -- as in tests/swarm_cluster.py
PROXY_HOST = "198.19.0.1"


def is_proxy_host(address):
    return address == PROXY_HOST


class SwarmCase(SynchronousTestCase):
    """Two labelled workers and the (unlabelled) manager node on a fake clock."""

    def setUp(self):
        self.clock = Clock()
        self.engine = FakeSwarmEngine(images=[IMAGE], address="198.19.0.11")
        self.manager_node = self.engine.self_node
        self.workers = [self.engine.add_node("worker-%d" % i, "198.19.0.%d" % (11 + i),
                                             labels={"pixelated.agents": "true"},
                                             images=[IMAGE]) for i in (1, 2)]
        self.directory = tempfile.mkdtemp(prefix="pxswu-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.book_path = os.path.join(self.directory, "placement.json")
        self.exits = []

    def provider(self, swarm=SwarmSettings(poll_interval=POLL), **settings):
        settings.setdefault("start_timeout", 5)
        provider = SwarmProvider(self.clock, self.engine,
                                 DockerAgentSettings(image=IMAGE, **settings), swarm,
                                 placements=PlacementBook(self.book_path),
                                 probe=lambda host, port: succeed(True),
                                 is_local=is_proxy_host)
        provider.on_exit(lambda username, reason: self.exits.append((username, reason)))
        self.successResultOf(provider.recover())
        return provider

    def data_dir(self, username):
        path = os.path.join(self.directory, "data", username)
        os.makedirs(path, exist_ok=True)
        return path

    def start(self, provider, username="alice", password="s3cret"):
        return provider.start(username, self.data_dir(username),
                              credentials_for(username, password))

    def started(self, provider, username="alice"):
        return self.successResultOf(self.start(provider, username))

    def service(self, username="alice"):
        return self.engine._service("pixelated-agent-%s" % username)

    def node_of(self, provider, username="alice"):
        return provider._agents[username].node


class SwarmProviderTests(SwarmCase):

    def test_agents_go_to_the_labelled_node_with_fewest_agents_and_stay_there(self):
        provider = self.provider()
        nodes = [self.node_of(provider, u).id for u in ("alice", "bob", "carol")
                 if self.started(provider, u)]
        self.assertEqual(sorted(nodes[:2]), sorted(w.id for w in self.workers))
        self.assertNotIn(self.manager_node.id, nodes)     # not labelled
        agent = provider.running()["alice"]
        self.assertEqual(agent.address.host, self.node_of(provider).address)
        self.assertEqual(provider.node_of("alice"), self.node_of(provider).hostname)
        # the choice is recorded: after a stop (and for a new manager) alice
        # goes back to her node even where another has fewer agents now
        first = self.node_of(provider).id
        self.successResultOf(provider.stop("alice"))
        self.successResultOf(provider.stop("bob"))
        self.successResultOf(provider.stop("carol"))
        with open(self.book_path) as f:
            self.assertEqual(json.load(f)["alice"], first)
        again = self.provider()
        self.started(again, "alice")
        self.assertEqual(self.node_of(again).id, first)

    def test_service_is_hardened_and_pinned_and_holds_no_credentials(self):
        provider = self.provider()
        self.started(provider)
        spec = self.service()["Spec"]
        self.assertEqual(spec["Labels"], {LABEL: "pixelated-agent", USER_LABEL: "alice"})
        self.assertEqual(spec["Mode"], {"Replicated": {"Replicas": 1}})
        template = spec["TaskTemplate"]
        container = template["ContainerSpec"]
        self.assertEqual(container["CapabilityDrop"], ["ALL"])
        self.assertTrue(container["ReadOnly"])
        self.assertEqual(container["User"], "65534:65534")
        self.assertTrue(container["Image"].startswith("sha256:"))
        self.assertEqual({m["Type"] for m in container["Mounts"]}, {"bind", "tmpfs"})
        self.assertEqual(template["Resources"]["Limits"]["Pids"], 256)
        self.assertEqual(template["Resources"]["Limits"]["NanoCPUs"], 10 ** 9)
        self.assertEqual(template["RestartPolicy"]["Condition"], "on-failure")
        self.assertLessEqual(template["RestartPolicy"]["MaxAttempts"], 3)
        self.assertEqual(template["Placement"]["Constraints"],
                         ["node.id==%s" % self.node_of(provider).id])
        self.assertEqual(spec["EndpointSpec"]["Ports"][0]["PublishMode"], "host")
        self.assertEqual(spec["EndpointSpec"]["Ports"][0]["PublishedPort"], 0)
        self.assertNotIn("s3cret", json.dumps(spec))
        # the password reaches the agent only as a 0400 file of its uid
        (secret_ref,) = container["Secrets"]
        self.assertEqual(secret_ref["File"], {"Name": "pixelated-credentials",
                                              "UID": "65534", "GID": "65534", "Mode": 0o400})
        task_id = provider._agents["alice"].task_id
        received = self.engine.task_files(task_id)[CREDENTIALS_FILE]["data"]
        self.assertEqual(json.loads(received)["password"], "s3cret")
        self.assertIn("PIXELATED_CREDENTIALS_FILE=" + CREDENTIALS_FILE, container["Env"])
        self.assertNotIn("s3cret", json.dumps(
            self.successResultOf(self.engine.inspect_secret(secret_ref["SecretID"]))))

    def test_stop_removes_service_and_secret(self):
        provider = self.provider()
        self.started(provider)
        self.successResultOf(provider.stop("alice"))
        self.assertEqual(self.engine.services, {})
        self.assertEqual(self.engine.secrets, {})
        self.assertEqual(self.exits, [("alice", "stopped")])

    def test_a_node_that_dies_gets_its_agents_reported_within_the_poll_period(self):
        provider = self.provider()
        self.started(provider)
        node = self.node_of(provider)
        self.engine.node_down(node.id)          # its tasks still say "running"
        self.clock.advance(POLL)
        self.assertEqual(self.exits, [("alice", "is unreachable: its node %s is down"
                                       % node.describe())])
        self.assertEqual(provider.running(), {})
        self.assertEqual(self.engine.services, {})
        self.assertEqual(self.engine.secrets, {})
        # while it is down, alice's start says why (her data is there)
        error = self.failureResultOf(self.start(provider), AgentStartError).value
        self.assertIn("holds the data of alice is down", str(error))
        # back: her next login works, on the same node
        self.engine.node_up(node.id)
        self.started(provider)
        self.assertEqual(self.node_of(provider).id, node.id)

    def test_a_drained_node_stops_its_agents_and_takes_no_new_ones(self):
        provider = self.provider()
        self.started(provider)
        node = self.node_of(provider)
        self.engine.drain(node.id)
        self.clock.advance(POLL)
        self.assertEqual(self.exits, [("alice", "was stopped: its node %s is drain"
                                       % node.describe())])
        error = self.failureResultOf(self.start(provider), AgentStartError).value
        self.assertIn("is drain", str(error))
        self.started(provider, "bob")
        self.assertNotEqual(self.node_of(provider, "bob").id, node.id)

    def test_killed_task_is_reported_with_its_signal_and_removed(self):
        provider = self.provider()
        self.started(provider)
        self.engine.end_task(provider._agents["alice"].task_id, 137)
        self.clock.advance(POLL)
        self.assertEqual(self.exits,
                         [("alice", "was killed by signal 9 (SIGKILL, exit code 137)")])
        self.assertEqual(self.engine.services, {})
        # the next request starts it again
        self.started(provider)
        self.assertEqual(list(provider.running()), ["alice"])

    def test_a_poll_costs_two_calls_however_many_agents_run(self):
        provider = self.provider()
        for username in ("alice", "bob", "carol", "dave", "erin"):
            self.started(provider, username)
        del self.engine.calls[:]
        self.clock.advance(POLL)
        self.assertEqual(sorted(self.engine.calls), ["list_nodes", "list_running_tasks"])
        self.assertEqual(len(provider.running()), 5)

    def test_manager_engine_outage_reports_agents_and_adopts_them_when_back(self):
        provider = self.provider()
        alice = self.started(provider)
        self.engine.reachable = False
        self.clock.advance(POLL)
        self.assertEqual(self.exits, [("alice", "container engine unavailable")])
        self.assertEqual(provider.running(), {})
        error = self.failureResultOf(self.start(provider), AgentStartError).value
        self.assertIn("container engine unavailable", str(error))
        self.engine.reachable = True
        self.clock.advance(POLL)
        # the agent ran on through the outage: adopted, not started again
        self.assertEqual(provider.running(), {"alice": alice})
        self.assertEqual(len(self.engine.services), 1)

    def test_a_manager_started_while_the_swarm_is_away_adopts_once_it_is_back(self):
        first = self.provider()
        alice = self.started(first)
        self.successResultOf(first.close())
        self.engine.reachable = False
        second = SwarmProvider(self.clock, self.engine, DockerAgentSettings(image=IMAGE),
                               SwarmSettings(poll_interval=POLL),
                               placements=PlacementBook(self.book_path),
                               probe=lambda host, port: succeed(True), is_local=is_proxy_host)
        self.assertEqual(self.successResultOf(second.recover()), [])
        self.engine.reachable = True
        self.clock.advance(POLL)
        self.assertEqual(second.running(), {"alice": alice})

    def test_a_node_without_the_image_gives_a_clear_error_at_once(self):
        self.workers[0].images.clear()
        self.workers[1].images.clear()
        provider = self.provider()
        error = self.failureResultOf(self.start(provider), AgentStartError).value
        self.assertIn("No such image", str(error))
        self.assertIn("worker-", str(error))
        self.assertEqual(self.engine.services, {})
        self.assertEqual(self.engine.secrets, {})

    def test_image_missing_on_the_manager_says_how_to_provide_it(self):
        self.engine.images.clear()
        provider = self.provider()
        error = self.failureResultOf(self.start(provider), AgentStartError).value
        self.assertIn("docker save | docker load", str(error))
        self.assertEqual(self.engine.secrets, {})

    def test_no_labelled_node_says_which_label(self):
        for worker in self.workers:
            worker.labels.clear()
        provider = self.provider()
        error = self.failureResultOf(self.start(provider), AgentStartError).value
        self.assertIn("pixelated.agents=true", str(error))

    def test_old_engine_refuses_a_node_whose_dockerd_lacks_no_new_privileges(self):
        for worker in self.workers:
            worker.no_new_privileges = False
        provider = self.provider()
        error = self.failureResultOf(self.start(provider), AgentStartError).value
        self.assertIn("--no-new-privileges", str(error))
        self.assertIn("1.41", str(error))
        self.assertEqual(self.engine.services, {})
        self.assertEqual(self.engine.secrets, {})

    def test_new_engine_asks_for_no_new_privileges_in_the_spec(self):
        self.engine.server_api_version = "1.44"
        for worker in self.workers:
            worker.no_new_privileges = False        # not needed: the spec says it
        provider = self.provider()
        self.started(provider)
        container = self.service()["Spec"]["TaskTemplate"]["ContainerSpec"]
        self.assertEqual(container["Privileges"], {"NoNewPrivileges": True})

    def test_a_new_manager_adopts_running_services_and_removes_stale_ones(self):
        first = self.provider()
        alice = self.started(first, "alice")
        self.started(first, "bob")
        self.engine.add_node("worker-3", "198.19.0.14", labels={"pixelated.agents": "true"},
                             images=[IMAGE])
        carol = self.started(first, "carol")         # alone on worker-3
        self.successResultOf(first.close())
        # while no manager watches: bob's agent crashes and the swarm restarts
        # it; carol's node dies; a secret of an older start is left behind
        self.engine.end_task([t for t in self.engine.tasks.values()
                              if t.service_id == self.service("bob")["ID"]][0].id, 1)
        carol_node = [n for n in self.engine.nodes.values()
                      if n.address == carol.address.host][0]
        self.engine.node_down(carol_node.id)
        stale = self.successResultOf(self.engine.create_secret(
            "pixelated-agent-zed-0", b"x", {LABEL: "pixelated-agent", USER_LABEL: "zed"}))
        second = self.provider()
        self.assertEqual(second.running()["alice"], alice)
        self.assertEqual(sorted(second.running()), ["alice", "bob"])
        self.assertNotIn(stale, self.engine.secrets)
        self.assertEqual(sorted(s["Spec"]["Name"] for s in self.engine.services.values()),
                         ["pixelated-agent-alice", "pixelated-agent-bob"])
        # every secret left is one a running service uses
        used = {ref["SecretID"] for s in self.engine.services.values()
                for ref in s["Spec"]["TaskTemplate"]["ContainerSpec"]["Secrets"]}
        self.assertEqual(set(self.engine.secrets), used)
        self.assertEqual(self.exits, [])


class ManagerWithSwarmTests(TestCase):
    """What ``pixelated-ctl info``/``stats`` and the metrics show of the node."""

    @inlineCallbacks
    def test_info_stats_and_metrics_name_the_node(self):
        state_dir = tempfile.mkdtemp(prefix="pxswm-")
        self.addCleanup(shutil.rmtree, state_dir, True)
        engine = FakeSwarmEngine(images=[IMAGE])
        engine.add_node("worker-1", "198.19.0.12", labels={"pixelated.agents": "true"},
                        images=[IMAGE])
        provider = SwarmProvider(reactor, engine, DockerAgentSettings(image=IMAGE),
                                 SwarmSettings(poll_interval=60),
                                 probe=lambda host, port: succeed(True), keep_on_close=False,
                                 is_local=is_proxy_host)
        manager = Manager(reactor, state_dir, provider,
                          ManagerSettings(leap_provider="example.org",
                                          hash_parameters=FAST_FOR_TESTS))
        manager.startService()
        self.addCleanup(lambda: manager.running and manager.stopService())
        yield manager.ready()
        yield manager.add_user("alice", "alice's password")
        token = yield manager.authenticate("alice", "alice's password", "192.0.2.1")
        address = yield manager.ensure_agent("alice", token)
        self.assertEqual(address.host, "198.19.0.12")
        details = yield manager.agent_info("alice")
        self.assertEqual(details.node, "worker-1")
        self.assertEqual(manager.node_of("alice"), "worker-1")
        exposition = generate_latest(manager.metrics.registry).decode()
        self.assertIn('pixelated_agents_per_node{node="worker-1"} 1.0', exposition)


class MoveTests(SynchronousTestCase):

    def test_ctl_move_refuses_clearly_and_touches_nothing(self):
        result = subprocess.run(
            [sys.executable, "-m", "pixelated_dispatcher.ctl", "--socket",
             "/nonexistent/manager.sock", "move", "alice", "worker-2"],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 2)
        self.assertIn("cannot move alice to worker-2", result.stderr)
        self.assertIn("not supported", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


class ReconcileDuringCheckTests(SynchronousTestCase):

    def test_the_first_reconcile_leaves_a_check_in_flight_alone(self):
        """recover() and the first start run together: the reconcile must not
        take the no-new-privileges check of that start for a stale service."""
        clock = Clock()
        engine = FakeSwarmEngine(images=[IMAGE])
        engine.self_node.labels["pixelated.agents"] = "true"
        # one node: nothing to probe its firewall from
        provider = SwarmProvider(clock, engine, DockerAgentSettings(image=IMAGE),
                                 SwarmSettings(poll_interval=POLL, firewall_check=False),
                                 probe=lambda host, port: succeed(True))
        directory = tempfile.mkdtemp(prefix="pxswu-")
        self.addCleanup(shutil.rmtree, directory, True)
        # the check's task has not finished when the reconcile looks
        engine.hold_checks = True
        starting = provider.start("alice", directory, credentials_for("alice"))
        self.assertEqual(len(engine.services), 1)       # the check
        self.successResultOf(provider.recover())
        self.assertEqual(len(engine.services), 1, "the reconcile removed the check")
        engine.hold_checks = False
        engine.finish_checks()
        clock.advance(1)
        self.assertEqual(self.successResultOf(starting).username, "alice")


class FirewallCheckTests(SwarmCase):
    """Only the proxy host may reach agent ports (docs/cluster.rst step 4): a
    node whose firewall lets a probe from another node through never serves
    an agent, and the operator is told which node and what to do."""

    RECHECK = 60.0

    def checked(self, **swarm):
        """A provider whose engine records every service spec it is given."""
        self.specs = []
        create = self.engine.create_service

        def recording(spec):
            self.specs.append(json.loads(json.dumps(spec)))
            return create(spec)
        self.engine.create_service = recording
        swarm.setdefault("firewall_recheck", self.RECHECK)
        return self.provider(swarm=SwarmSettings(poll_interval=POLL, **swarm))

    def probes(self):
        return [s for s in self.specs if "nc -w" in " ".join(
            s["TaskTemplate"]["ContainerSpec"].get("Command") or [])]

    def test_a_node_that_lets_other_hosts_in_gets_no_agent_and_nothing_more(self):
        open_node, safe_node = self.workers
        open_node.firewall = False              # its DOCKER-USER rule is missing
        provider = self.checked()
        # alice is placed on worker-1 (fewest agents, then by name): the probe
        # from another node reaches her agent there, so the start fails
        error = self.failureResultOf(self.start(provider, "alice"), AgentStartError).value
        message = str(error)
        self.assertIn("worker-1", message)
        self.assertIn("docs/cluster.rst, set-up step 4", message)
        self.assertIn("DOCKER-USER", message)
        self.assertIn("%s:" % open_node.address, message)
        self.assertEqual(provider.running(), {})
        self.assertEqual(self.engine.services, {}, "her agent was stopped, the probe removed")
        self.assertEqual(self.engine.secrets, {})
        # the probe ran on another node, not the proxy host, hardened as agents are
        (probe,) = self.probes()
        (constraint,) = probe["TaskTemplate"]["Placement"]["Constraints"]
        self.assertNotIn(open_node.id, constraint)
        container = probe["TaskTemplate"]["ContainerSpec"]
        self.assertEqual(container["CapabilityDrop"], ["ALL"])
        self.assertTrue(container["ReadOnly"])
        self.assertEqual(container["User"], "65534:65534")
        self.assertNotIn("Networks", probe["TaskTemplate"])     # a normal bridge network
        # nothing more goes to that node while it is unsafe: alice (whose
        # placement never held data) and the others go to worker-2
        for username in ("alice", "bob", "carol"):
            self.started(provider, username)
            self.assertEqual(self.node_of(provider, username).id, safe_node.id)
        self.assertEqual(len(self.probes()), 2, "worker-2 checked once, worker-1 not again")
        # the operator adds the rule; after the recheck period a start there works
        open_node.firewall = True
        self.clock.advance(self.RECHECK)
        self.started(provider, "dave")
        self.assertEqual(self.node_of(provider, "dave").id, open_node.id)

    def test_a_node_that_loses_its_rule_is_found_at_the_recheck_and_its_agents_stop(self):
        provider = self.checked()
        for username in ("alice", "bob", "carol"):      # worker-1, worker-2, worker-1
            self.started(provider, username)
        self.assertEqual(self.node_of(provider, "carol").id, self.workers[0].id)
        self.successResultOf(provider.stop("carol"))
        self.workers[0].firewall = False                 # e.g. a reboot without the rule
        self.clock.advance(self.RECHECK - POLL)
        self.assertEqual(sorted(provider.running()), ["alice", "bob"], "not yet due")
        # the poll after the recheck period probes the nodes that run agents:
        # alice, on worker-1, is stopped and told why; bob runs on
        self.clock.advance(POLL)
        self.assertEqual(sorted(provider.running()), ["bob"])
        ((who, reason),) = [e for e in self.exits if e[0] != "carol"]
        self.assertEqual(who, "alice")
        self.assertIn("worker-1", reason)
        self.assertIn("docs/cluster.rst, set-up step 4", reason)
        self.assertEqual([s["Spec"]["Labels"][USER_LABEL] for s in self.engine.services.values()],
                         ["bob"])
        # carol's data is on worker-1: her start is refused at once, without
        # a service (the verdict is kept until the next recheck)
        services = len(self.specs)
        error = self.failureResultOf(self.start(provider, "carol"), AgentStartError).value
        self.assertIn("worker-1", str(error))
        self.assertIn("DOCKER-USER", str(error))
        self.assertEqual(len(self.specs), services)
        self.assertEqual(self.node_of(provider, "bob").id, self.workers[1].id)

    def test_a_node_found_safe_is_probed_again_only_after_the_recheck_period(self):
        provider = self.checked()
        for username in ("alice", "bob", "carol", "dave"):
            self.started(provider, username)
        self.assertEqual(len(self.probes()), 2)          # one per worker
        self.successResultOf(provider.stop("dave"))
        self.started(provider, "dave")
        self.clock.advance(self.RECHECK - POLL)
        self.assertEqual(len(self.probes()), 2)
        self.clock.advance(POLL)                          # both run agents: rechecked
        self.assertEqual(len(self.probes()), 4)
        self.successResultOf(provider.stop("dave"))
        self.started(provider, "dave")
        self.assertEqual(len(self.probes()), 4)
        # a node that went down may come back without its rule: checked again
        self.engine.node_down(self.workers[0].id)
        self.clock.advance(POLL)
        self.engine.node_up(self.workers[0].id)
        self.clock.advance(POLL)
        self.started(provider, "alice")
        self.assertEqual(len(self.probes()), 5)

    def test_running_agents_that_cannot_be_checked_are_logged_and_retried_later(self):
        provider = self.checked()
        self.started(provider, "alice")
        real_probe = self.engine._probe

        def no_nc(task, node, host, port):
            real_probe(task, node, host, port)
            task.exit_code, task.err = 13, "task: non-zero exit (13)"
        self.engine._probe = no_nc
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.clock.advance(self.RECHECK)
        self.assertEqual(len(self.probes()), 2)
        self.assertEqual(sorted(provider.running()), ["alice"])
        (error,) = [formatEvent(e) for e in logged if e.get("log_level") == LogLevel.error]
        self.assertIn("run unchecked", error)
        self.assertIn("needs sh and nc", error)
        for _ in range(5):
            self.clock.advance(POLL)                       # not at every poll
        self.assertEqual(len(self.probes()), 2)
        self.clock.advance(self.RECHECK)
        self.assertEqual(len(self.probes()), 3)

    def test_without_a_node_to_probe_from_the_start_fails_loudly(self):
        # the proxy host is the swarm manager's node (the usual set-up) and
        # there is one agent node: nothing else can try to connect
        self.engine.self_node.address = PROXY_HOST
        self.engine.drain(self.workers[1].id)
        provider = self.checked()
        error = self.failureResultOf(self.start(provider), AgentStartError).value
        self.assertIn("cannot check that only the proxy host reaches agent ports",
                      str(error))
        self.assertIn("--swarm-skip-firewall-check", str(error))
        self.assertEqual(self.engine.services, {})
        # the operator who filters elsewhere turns the check off
        provider = self.checked(firewall_check=False)
        self.started(provider)
        self.assertEqual(self.probes(), [])

    def test_an_image_without_nc_says_what_the_check_needs(self):
        provider = self.checked()
        real_probe = self.engine._probe

        def no_nc(task, node, host, port):
            real_probe(task, node, host, port)
            task.exit_code, task.err = 13, "task: non-zero exit (13)"
        self.engine._probe = no_nc
        error = self.failureResultOf(self.start(provider), AgentStartError).value
        self.assertIn("needs sh and nc", str(error))
        self.assertEqual(self.engine.services, {})

    def test_options_turn_the_check_off_and_set_the_recheck(self):
        from pixelated_dispatcher.manager.tap import Options
        options = Options()
        options.parseOptions(["--provider", "swarm", "--swarm-skip-firewall-check",
                              "--swarm-firewall-recheck", "30"])
        swarm = swarm_settings_from_config(options)
        self.assertEqual((swarm.firewall_check, swarm.firewall_recheck), (False, 30.0))
        options = Options()
        options.parseOptions(["--provider", "swarm"])
        self.assertTrue(swarm_settings_from_config(options).firewall_check)
        options["swarm-firewall-recheck"] = "soon"
        with self.assertRaises(UsageError):
            swarm_settings_from_config(options)

    def test_a_new_manager_checks_the_nodes_of_the_agents_it_adopts(self):
        first = self.checked()
        self.started(first, "alice")                    # worker-1
        self.started(first, "bob")                      # worker-2
        self.successResultOf(first.close())
        self.workers[0].firewall = False                # lost while no manager watched
        second = self.checked()                         # adopts both, then checks
        self.assertEqual(sorted(second.running()), ["bob"])
        ((who, reason),) = self.exits
        self.assertEqual(who, "alice")
        self.assertIn("worker-1", reason)
        self.assertIn("docs/cluster.rst, set-up step 4", reason)
        self.assertEqual([s["Spec"]["Labels"][USER_LABEL] for s in self.engine.services.values()],
                         ["bob"])

    def test_a_probe_the_swarm_rejects_on_one_node_is_tried_on_the_next(self):
        # worker-2 (labelled: preferred for the probe of alice's worker-1)
        # lacks the image: the swarm rejects the probe there
        provider = self.checked()
        self.workers[1].images.clear()
        self.started(provider)
        self.assertEqual(self.node_of(provider).id, self.workers[0].id)
        tried = [p["TaskTemplate"]["Placement"]["Constraints"][0] for p in self.probes()]
        self.assertEqual(tried, ["node.id==%s" % self.workers[1].id,
                                 "node.id==%s" % self.manager_node.id])
        self.assertEqual(list(self.engine.services), [self.service()["ID"]])
