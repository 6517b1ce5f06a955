"""The shared IAgentProvider contract run against SwarmProvider: on the
verified fake swarm (fast, on a fake clock) and on a real one-node swarm
(tests/swarm_cluster.py) with the test agent image."""
import json
import os
import shutil
import tempfile
import uuid

import attr
import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.task import Clock

from pixelated_dispatcher.manager.providers.docker import LABEL, USER_LABEL, DockerAgentSettings
from pixelated_dispatcher.manager.providers.docker_engine import DockerEngine
from pixelated_dispatcher.manager.providers.swarm import (
    CREDENTIALS_FILE, SwarmProvider, SwarmSettings)
from pixelated_dispatcher.manager.providers.swarm_placement import PlacementBook
from pixelated_dispatcher.testing.fake_swarm import FakeSwarmEngine
from pixelated_dispatcher.testing.provider_contract import make_provider_tests

from . import swarm_cluster
from .swarm_cluster import remove_services

KILLED = "was killed by signal 9 (SIGKILL, exit code 137)"
IMAGE = "pixelated-test-agent:fake"


class _BootingProbe:
    """The fake's agents answer HTTP 0.3 s (fake clock) after their first probe,
    and only while their task runs."""

    def __init__(self, clock, engine):
        self.clock = clock
        self.engine = engine
        self.first = {}

    def __call__(self, host, port):
        running = [t for t in self.engine.tasks.values() if t.state == "running"
                   and t.port == port and self.engine.nodes[t.node_id].address == host]
        if not running:
            return succeed(False)
        first = self.first.setdefault((host, port, running[0].id), self.clock.seconds())
        return succeed(self.clock.seconds() - first >= 0.3)


class FakeSwarmFixture:
    adopted_exit_reason = KILLED

    def __init__(self, test):
        self.clock = Clock()
        self.engine = FakeSwarmEngine(images=[IMAGE])
        self.engine.self_node.labels["pixelated.agents"] = "true"
        # an unlabelled node: the firewall check's probes run there
        self.engine.add_node("prober-1", "198.19.0.13", images=[IMAGE])
        self.probe = _BootingProbe(self.clock, self.engine)
        self.book = PlacementBook(None)
        self.settings = DockerAgentSettings(image=IMAGE, start_timeout=10)
        self.swarm = SwarmSettings(poll_interval=0.5)
        self.directory = tempfile.mkdtemp(prefix="pxswf-")
        test.addCleanup(shutil.rmtree, self.directory, True)
        self.provider = self.new_provider(keep_on_close=False)
        self.provider.recover()

    def new_provider(self, keep_on_close):
        return SwarmProvider(self.clock, self.engine, self.settings, self.swarm,
                             placements=self.book, probe=self.probe,
                             keep_on_close=keep_on_close)

    def data_dir(self, username):
        path = os.path.join(self.directory, username)
        os.makedirs(path, exist_ok=True)
        return path

    def settle(self, d):
        fired = []
        d.addBoth(lambda result: (fired.append(True), result)[1])
        for _ in range(1000):
            if fired:
                break
            self.clock.advance(0.1)
        return d

    def _task(self, username, provider=None):
        entry = (provider or self.provider)._agents[username]
        return self.engine.tasks[entry.task_id]

    def received(self, username, provider=None):
        data = self._task(username, provider).files[CREDENTIALS_FILE]["data"]
        line = json.loads(data)
        return succeed({"credentials_user": line["user"],
                        "leap_provider_hostname": line["leap_provider_hostname"],
                        "password_received": bool(line["password"]),
                        "authenticated": line["user"] == username})

    def kill_from_outside(self, username, provider=None):
        self.engine.end_task(self._task(username, provider).id, 137)

    def break_next_start(self, username):
        self.engine.fail_next_tasks = 1

    def live_agents(self, username):
        return sum(1 for s in self.engine.services.values()
                   if s["Spec"]["Labels"].get(USER_LABEL) == username)


class FakeSwarmProviderContractTests(make_provider_tests(FakeSwarmFixture, runs_on_nodes=True)):
    pass


class RealSwarmFixture:
    adopted_exit_reason = KILLED

    def __init__(self, test):
        self.test = test
        self.cluster = swarm_cluster.one_node_swarm()
        self.node = self.cluster.manager
        self.agent_host = self.node.address
        self.instance = "pxswc-%s" % uuid.uuid4().hex[:8]
        test.addCleanup(remove_services, self.node, self.instance)
        self.settings = DockerAgentSettings(image=self.cluster.image, instance=self.instance,
                                            memory=64 * 1024 * 1024, pids=64,
                                            start_timeout=30, stop_grace=2)
        # one node: no other node to probe its firewall from (the three-node
        # test, tests/test_swarm_cluster.py, covers the check on a real swarm)
        self.swarm = SwarmSettings(poll_interval=0.5, cpus=0.5, firewall_check=False)
        self.directory = tempfile.mkdtemp(prefix="pxswc-")
        test.addCleanup(shutil.rmtree, self.directory, True)
        self.book = PlacementBook(os.path.join(self.directory, "placement.json"))
        self.provider = self.new_provider(keep_on_close=False)
        self.provider.recover()

    def new_provider(self, keep_on_close):
        provider = SwarmProvider(reactor, DockerEngine(reactor, self.node.host), self.settings,
                                 self.swarm, placements=self.book,
                                 keep_on_close=keep_on_close)
        self.test.addCleanup(provider.close)
        return provider

    def data_dir(self, username):
        path = os.path.join(self.directory, "data", username)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def settle(self, d):
        return d

    @inlineCallbacks
    def received(self, username, provider=None):
        address = (provider or self.provider).running()[username].address
        response = yield treq.get("http://%s:%d/cgi-bin/echo" % (address.host, address.port),
                                  persistent=False)
        text = yield response.text()
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        return {"credentials_user": fields.get("user"),
                "leap_provider_hostname": fields.get("leap_provider_hostname"),
                "password_received": fields.get("password_received") == "yes",
                "authenticated": fields.get("user") == username}

    def kill_from_outside(self, username, provider=None):
        for container in self.containers(username):
            self.node.api("POST", "/containers/%s/kill" % container["Id"])

    def containers(self, username):
        return self.node.api("GET", "/containers/json", params={
            "filters": json.dumps({"label": ["%s=%s" % (LABEL, self.instance),
                                             "%s=%s" % (USER_LABEL, username)]})})

    def break_next_start(self, username):
        provider, healthy = self.provider, self.provider.settings
        provider.settings = attr.evolve(healthy, command="sh -c 'echo broken >&2; exit 3'")
        original = provider.start

        def start_once(*args, **kwargs):
            provider.start = original
            d = original(*args, **kwargs)

            def restore(result):
                provider.settings = healthy
                return result
            return d.addBoth(restore)
        provider.start = start_once

    def live_agents(self, username):
        services = self.node.api("GET", "/services", params={
            "filters": json.dumps({"label": ["%s=%s" % (LABEL, self.instance),
                                             "%s=%s" % (USER_LABEL, username)]})})
        return len(services)


@pytest.mark.whole_system
class RealSwarmProviderContractTests(make_provider_tests(RealSwarmFixture, runs_on_nodes=True)):
    timeout = 120
