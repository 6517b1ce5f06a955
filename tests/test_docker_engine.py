"""The docker engine contract, run against the fake and against a real dockerd."""
from twisted.internet import reactor

from pixelated_dispatcher.manager.providers.docker_engine import DockerEngine
from pixelated_dispatcher.testing.fake_docker import FakeDockerEngine

from . import dockerd
from .docker_engine_contract import make_docker_engine_tests, real_socket_missing_path


class _FakeFixture:
    image = "pixelated-test-agent:fake"
    settle = 0

    def engine(self, testcase):
        return FakeDockerEngine(images=[self.image])

    def unreachable_engine(self, testcase):
        engine = FakeDockerEngine(images=[self.image])
        engine.stop_daemon()
        return engine


class _RealFixture:
    settle = 0.5
    image = None

    def engine(self, testcase):
        host = dockerd.engine_or_skip()
        if _RealFixture.image is None:
            _RealFixture.image = dockerd.ensure_agent_image(host)
        engine = DockerEngine(reactor, host)
        testcase.addCleanup(engine.close)
        return engine

    def unreachable_engine(self, testcase):
        engine = DockerEngine(reactor, real_socket_missing_path())
        testcase.addCleanup(engine.close)
        return engine


class FakeDockerEngineContractTests(make_docker_engine_tests(_FakeFixture())):
    """The fake behaves like the engine..."""


class RealDockerEngineContractTests(make_docker_engine_tests(_RealFixture())):
    """...because the same tests pass against dockerd."""
