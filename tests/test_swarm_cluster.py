"""``--provider swarm`` on a real three-node swarm on this machine.

Three private dockerd, each in a network namespace of its own on a test
bridge (tests/swarm_cluster.py, addresses from 198.19.0.0/16), joined with
real join tokens, the test image loaded into each by ``docker save | load``.
Node 1 is the swarm manager (where the manager and the proxy run, in the
host namespace); nodes 2 and 3 carry ``pixelated.agents=true``. Real twistd
manager and proxy, the real ``pixelated-ctl``, an HTTPS browser:

* alice's agent is placed on a worker and reached through the login form;
* a connection from an intruder namespace to her agent's port is refused
  (the DOCKER-USER rule of docs/cluster.rst), the proxy host's is not;
* ``kill -9`` of that worker's dockerd gets her reported stopped within the
  heartbeat period and her browser a clear page; once the worker is back
  her next login works;
* a manager restart adopts bob's agent on the other worker;
* a worker without the DOCKER-USER rule serves no agent: the manager's
  probe from another node reaches alice's agent there, stops it and says
  which node lacks the rule (``pixelated-ctl info``, the "unavailable"
  page); once the rule is back, her next login after the recheck works;
  when it goes again while her agent runs, the next recheck stops it.

The tests share one cluster (made once per class: ~4 s) and leave it as
they found it. Skips without root; fails instead under CI=true.
"""
import json
import shutil
import socket
import tempfile
import time
import uuid

import pytest
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.demo import Dispatcher

from . import dockerd, swarm_cluster
from .docker_stack import agent_page, wait_until

pytestmark = pytest.mark.whole_system

HEARTBEAT = swarm_cluster.HEARTBEAT_SECONDS
POLL = 0.5


class SwarmStack:
    """Manager (swarm provider) and proxy in a temporary directory."""

    def __init__(self, test, cluster, extra_args=()):
        self.cluster = cluster
        self.instance = "pxsc-%s" % uuid.uuid4().hex[:8]
        self.directory = tempfile.mkdtemp(prefix="pxswarm-")
        test.addCleanup(shutil.rmtree, self.directory, True)
        self.dispatcher = Dispatcher(
            self.directory, proxy_args=["--allow-root"], keep_agents=True, manager_args=[
                "--provider", "swarm", "--docker-host", cluster.manager.host,
                "--docker-instance", self.instance, "--agent-image", cluster.image,
                "--agent-memory", "64m", "--agent-cpus", "0.5",
                "--agent-start-timeout", "30", "--agent-stop-grace", "2",
                "--swarm-poll-interval", str(POLL), "--leap-provider", "example.org"]
            + list(extra_args))
        test.addCleanup(self.dispatcher.stop)
        self.dispatcher.start()

    def logs(self):
        return self.dispatcher.log_tails(4000)

    def info_text(self, username):
        result = self.dispatcher.ctl("info", username)
        if result.returncode != 0:
            raise AssertionError("pixelated-ctl info failed: %s" % result.stderr)
        return result.stdout

    def info(self, username):
        return dict(line.split(None, 1) for line in self.info_text(username).splitlines()
                    if line.strip())

    def browser(self):
        from .https_browser import Browser
        return Browser(self.dispatcher.port, self.dispatcher.tls["cert"])


def connect_from_host(address, port):
    """'answered' / 'refused' / 'timeout' for a TCP connection from here."""
    try:
        with socket.create_connection((address, port), timeout=3):
            return "answered"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "timeout"


class ThreeNodeSwarmTests(SynchronousTestCase):
    timeout = 300

    @classmethod
    def setUpClass(cls):
        reason = swarm_cluster.can_run()
        dockerd.decide(None if reason else "ok", reason)
        cls.cluster = swarm_cluster.Cluster(3, agent_nodes=(2, 3))
        cls.cluster.create()
        try:
            for node in cls.cluster.nodes[1:]:
                node.allow_only(swarm_cluster.HOST_ADDRESS)
        except BaseException:
            cls.cluster.destroy()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.cluster.destroy()

    def node_at(self, address):
        return [n for n in self.cluster.nodes if n.address == address][0]

    def test_agents_on_workers_isolation_node_loss_and_adoption(self):
        stack = SwarmStack(self, self.cluster)
        stack.dispatcher.add_user("alice", "alice password 1")
        stack.dispatcher.add_user("bob", "bob password 2")

        # alice logs in through the form; her agent runs on a worker
        alice = stack.browser()
        self.assertEqual(alice.log_in("alice", "alice password 1").status, 303, stack.logs())
        page = agent_page(alice, timeout=40)
        self.assertEqual((page.status, page.text.strip()), (200, "Mailbox of alice"),
                         stack.logs())
        info = stack.info("alice")
        host, port = info["address"].rsplit(":", 1)
        worker = self.node_at(host)
        self.assertIn(worker.index, (2, 3), "placed on a labelled worker, not the manager")
        self.assertTrue(info.get("node"), "pixelated-ctl info names the node")

        # only the proxy host reaches the agent's port
        self.assertEqual(connect_from_host(host, int(port)), "answered")
        probe = self.cluster.intruder(
            "python3", "-c", "import socket,sys\n"
            "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
            "except ConnectionRefusedError: print('refused')\n"
            "except OSError as e: print('error', e)\n"
            "else: print('answered')", host, port)
        self.assertEqual(probe.stdout.strip(), "refused", probe.stderr)

        # bob goes to the other worker (fewest agents)
        bob = stack.browser()
        self.assertEqual(bob.log_in("bob", "bob password 2").status, 303)
        self.assertEqual(agent_page(bob, timeout=40).text.strip(), "Mailbox of bob")
        bob_host = stack.info("bob")["address"].rsplit(":", 1)[0]
        self.assertNotEqual(bob_host, host)
        listed = json.loads(stack.dispatcher.ctl("list", "--json").stdout)
        self.assertEqual({u["username"]: bool(u.get("node")) for u in listed},
                         {"alice": True, "bob": True}, stack.logs())

        # kill -9 of alice's worker's dockerd: reported within the heartbeat
        # period (swarm: down after ~3 heartbeats; plus our poll)
        worker.kill_daemon()
        killed = time.monotonic()
        wait_until(lambda: stack.info("alice").get("state") != "running",
                   6 * HEARTBEAT + 4 * POLL + 5, "alice reported stopped", stack)
        self.assertLess(time.monotonic() - killed, 6 * HEARTBEAT + 4 * POLL + 5)
        began = time.monotonic()
        page = alice.get("/")
        self.assertLess(time.monotonic() - began, 10, "a page, not a hang\n" + stack.logs())
        self.assertEqual(page.status, 503, page.text + stack.logs())
        self.assertIn("Mailbox unavailable", page.text)
        self.assertTrue(page.header("Retry-After"), "the browser is told to try again")
        self.assertEqual(stack.info("bob").get("state"), "running", "bob is not affected")

        # the worker comes back: alice's next login works, on her node
        worker.start_daemon()
        self.cluster.wait_nodes_ready(timeout=60)
        again = stack.browser()
        self.assertEqual(again.log_in("alice", "alice password 1").status, 303)
        page = agent_page(again, timeout=40)
        self.assertEqual((page.status, page.text.strip()), (200, "Mailbox of alice"),
                         stack.logs())
        self.assertEqual(stack.info("alice")["address"].rsplit(":", 1)[0], host)

        # a manager restart adopts bob's agent on the other node
        bob_before = stack.info("bob")
        stack.dispatcher.stop_manager()
        stack.dispatcher.start_manager()
        wait_until(lambda: stack.info("bob").get("state") == "running", 20,
                   "adoption of bob's agent", stack)
        self.assertEqual(stack.info("bob")["address"], bob_before["address"])
        page = agent_page(bob)
        self.assertEqual((page.status, page.text.strip()), (200, "Mailbox of bob"),
                         "same session, no new login\n" + stack.logs())

    def test_a_worker_that_lets_other_hosts_in_serves_no_agent(self):
        cluster = self.cluster
        open_worker, other = cluster.nodes[2], cluster.nodes[1]
        # node 3 lacks the DOCKER-USER rule; node 2 takes no agents, so
        # alice's agent can only go to node 3
        open_worker.allow_only(swarm_cluster.HOST_ADDRESS, remove=True)
        self.addCleanup(lambda: open_worker.has_rule(swarm_cluster.HOST_ADDRESS)
                        or open_worker.allow_only(swarm_cluster.HOST_ADDRESS))
        cluster.label(other, {swarm_cluster.AGENT_LABEL: "false"})
        self.addCleanup(cluster.label, other, {swarm_cluster.AGENT_LABEL: "true"})
        stack = SwarmStack(self, cluster, ["--swarm-firewall-recheck", "2"])
        stack.dispatcher.add_user("alice", "alice password 1")

        alice = stack.browser()
        self.assertEqual(alice.log_in("alice", "alice password 1").status, 303, stack.logs())
        wait_until(lambda: "DOCKER-USER" in stack.info_text("alice"), 40,
                   "the start refused for the missing rule", stack)
        info = stack.info_text("alice")
        self.assertIn(open_worker.node_id[:12], info, "the node is named")
        self.assertIn("docs/cluster.rst, set-up step 4", info)
        self.assertNotIn("running", stack.info("alice")["state"])
        # nothing of alice's runs on the swarm; her browser gets a clear page
        self.assertEqual(cluster.manager.api("GET", "/services", params={"filters": json.dumps(
            {"label": ["org.pixelated.dispatcher=%s" % stack.instance]})}), [])
        page = alice.get("/")
        self.assertEqual(page.status, 503, page.text + stack.logs())
        self.assertIn("Mailbox unavailable", page.text)

        # the operator adds the rule: after the recheck period her next login works
        open_worker.allow_only(swarm_cluster.HOST_ADDRESS)
        time.sleep(2)
        again = stack.browser()
        self.assertEqual(again.log_in("alice", "alice password 1").status, 303)
        page = agent_page(again, timeout=40)
        self.assertEqual((page.status, page.text.strip()), (200, "Mailbox of alice"),
                         stack.logs())
        self.assertEqual(stack.info("alice")["address"].rsplit(":", 1)[0], open_worker.address)

        # the rule goes while her agent runs: the next recheck stops it
        open_worker.allow_only(swarm_cluster.HOST_ADDRESS, remove=True)
        wait_until(lambda: stack.info("alice").get("state") != "running", 2 + 4 * POLL + 10,
                   "alice's agent stopped by the recheck", stack)
        self.assertIn("DOCKER-USER", stack.info_text("alice"))
        self.assertEqual(alice.get("/").status, 503)
