"""``--provider docker`` options: what the operator types becomes the provider."""
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.manager.providers.docker import DockerProvider
from pixelated_dispatcher.manager.providers.docker_options import (
    DOCKER_OPT_PARAMETERS, make_docker_provider, parse_memory)


class _Options(usage.Options):
    """The manager tap's own options that the docker provider reads, plus ours."""
    optParameters = [
        ["agent-command", None, None, ""],
        ["agent-stop-grace", None, 10.0, "", float],
    ] + DOCKER_OPT_PARAMETERS


def parsed(*argv):
    options = _Options()
    options.parseOptions(list(argv))
    return options


class DockerOptionsTests(SynchronousTestCase):

    def make(self, *argv, environ=None):
        return make_docker_provider(MemoryReactorClock(), parsed(*argv), environ=environ or {})

    def test_defaults(self):
        provider = self.make()
        self.assertIsInstance(provider, DockerProvider)
        settings = provider.settings
        self.assertEqual(settings.image, "pixelated/pixelated-user-agent")
        self.assertEqual(settings.memory, 512 * 1024 * 1024)
        self.assertEqual(settings.pids, 256)
        self.assertEqual(settings.port, 4567)
        self.assertEqual(settings.data_mount, "/mnt/user")
        self.assertEqual(settings.start_timeout, 60)
        self.assertIsNone(settings.command, "the image's own command")
        self.assertEqual(settings.container_name("alice"), "pixelated-agent-alice")
        self.assertNotEqual(settings.user.split(":")[0], "0")
        self.assertEqual(provider._engine.host, "unix:///var/run/docker.sock")

    def test_everything_given(self):
        provider = self.make(
            "--docker-host", "unix:///run/docker-test.sock", "--agent-image", "example/agent:7",
            "--agent-memory", "1g", "--agent-pids", "100", "--agent-user", "2000:3000",
            "--agent-port", "8080", "--agent-data-mount", "/data/", "--agent-start-timeout", "90",
            "--agent-command", "run-agent --port {port}", "--agent-stop-grace", "3",
            "--docker-instance", "pixelated-test")
        s = provider.settings
        self.assertEqual((s.image, s.memory, s.pids, s.user, s.port, s.data_mount,
                          s.start_timeout, s.command, s.stop_grace),
                         ("example/agent:7", 1024 ** 3, 100, "2000:3000", 8080, "/data", 90.0,
                          "run-agent --port {port}", 3.0))
        self.assertEqual(provider._engine.host, "unix:///run/docker-test.sock")
        self.assertEqual(s.container_name("alice"), "pixelated-test-alice")

    def test_docker_host_from_the_environment_unless_given(self):
        env = {"DOCKER_HOST": "tcp://127.0.0.1:2375"}
        self.assertEqual(self.make(environ=env)._engine.host, "tcp://127.0.0.1:2375")
        self.assertEqual(self.make("--docker-host", "unix:///x.sock", environ=env)._engine.host,
                         "unix:///x.sock")

    def test_memory_notation(self):
        self.assertEqual(parse_memory("512m"), 512 * 1024 ** 2)
        self.assertEqual(parse_memory("512M"), 512 * 1024 ** 2)
        self.assertEqual(parse_memory("2g"), 2 * 1024 ** 3)
        self.assertEqual(parse_memory("300mb"), 300 * 1024 ** 2)
        self.assertEqual(parse_memory("10000000"), 10000000)

    def test_bad_values_are_refused_with_a_clear_message(self):
        cases = [
            (["--agent-memory", "lots"], "--agent-memory must be a size like 512m"),
            (["--agent-memory", "1m"], "--agent-memory must be at least 6m"),
            (["--agent-user", "nobody"], "--agent-user must be numeric UID:GID"),
            (["--agent-user", "0:0"], "--agent-user must not be root"),
            (["--agent-pids", "x"], "--agent-pids must be a number"),
            (["--agent-pids", "0"], "--agent-pids must be at least 1"),
            (["--agent-port", "70000"], "--agent-port must be a TCP port"),
            (["--agent-data-mount", "relative"], "--agent-data-mount must be an absolute path"),
            (["--agent-start-timeout", "soon"], "--agent-start-timeout must be a number"),
            (["--agent-image", ""], "--agent-image must name an image"),
            (["--docker-host", "http://docker"], "unsupported Docker host 'http://docker'"),
            (["--docker-loopback-guard", "maybe"], "--docker-loopback-guard must be one of"),
            (["--docker-instance", "a/b"], "--docker-instance must be letters"),
            (["--agent-command", "agent {nope}"], "--agent-command is not a valid command line"),
        ]
        for argv, message in cases:
            error = self.assertRaises(usage.UsageError, self.make, *argv)
            self.assertIn(message, str(error), argv)

    def test_the_manager_tap_builds_the_docker_provider(self):
        from pixelated_dispatcher.manager import tap
        options = tap.Options()
        options.parseOptions(["--provider", "docker", "--agent-image", "example/agent:1",
                              "--agent-memory", "256m", "--docker-host", "unix:///d.sock"])
        provider = tap.make_provider(MemoryReactorClock(), options)
        self.assertIsInstance(provider, DockerProvider)
        self.assertEqual(provider.settings.image, "example/agent:1")
        self.assertEqual(provider.settings.memory, 256 * 1024 ** 2)
        self.assertIsNone(provider.settings.command)
