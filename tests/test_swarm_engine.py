"""The swarm engine contract, run against the fake and against a real one-node swarm."""
from twisted.internet import reactor

from pixelated_dispatcher.manager.providers.docker_engine import DockerEngine
from pixelated_dispatcher.testing.fake_swarm import FakeSwarmEngine

from . import dockerd, swarm_cluster
from .docker_engine_contract import real_socket_missing_path
from .swarm_engine_contract import make_swarm_engine_tests


class _FakeFixture:
    image = "pixelated-test-agent:fake"

    def engine(self, testcase):
        return FakeSwarmEngine(images=[self.image])

    def not_a_manager(self, testcase):
        return FakeSwarmEngine(images=[self.image], swarm=False)

    def unreachable_engine(self, testcase):
        engine = FakeSwarmEngine(images=[self.image])
        engine.stop_daemon()
        return engine


class _RealFixture:
    image = None

    def _engine(self, testcase, host):
        engine = DockerEngine(reactor, host)
        testcase.addCleanup(engine.close)
        return engine

    def engine(self, testcase):
        cluster = swarm_cluster.one_node_swarm()
        _RealFixture.image = cluster.image
        return self._engine(testcase, cluster.manager.host)

    def not_a_manager(self, testcase):
        # the shared private dockerd is never in a swarm (read-only calls here)
        return self._engine(testcase, dockerd.engine_or_skip())

    def unreachable_engine(self, testcase):
        return self._engine(testcase, real_socket_missing_path())


class FakeSwarmEngineContractTests(make_swarm_engine_tests(_FakeFixture())):
    """The fake swarm behaves like a swarm..."""


class RealSwarmEngineContractTests(make_swarm_engine_tests(_RealFixture())):
    """...because the same tests pass against a real one."""
