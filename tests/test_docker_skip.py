"""Without a Docker engine the docker tests skip with one line; in CI they fail."""
import os
import tempfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from . import dockerd


class EngineDiscoveryTests(SynchronousTestCase):

    def setUp(self):
        saved = os.environ.get("CI")
        self.addCleanup(lambda: os.environ.__setitem__("CI", saved) if saved is not None
                        else os.environ.pop("CI", None))
        self.nowhere = ["unix://" + os.path.join(tempfile.gettempdir(), "px-no-engine.sock"),
                        "tcp://127.0.0.1:9"]

    def test_no_engine_gives_a_one_line_reason(self):
        host, reason = dockerd.probe_engines(self.nowhere, start=lambda: None)
        self.assertIsNone(host)
        self.assertEqual(reason.count("\n"), 0)
        self.assertIn("no Docker engine reachable", reason)
        self.assertIn("px-no-engine.sock", reason)
        self.assertIn("bash .ci/dockerd.sh start", reason)

    def test_outside_ci_the_tests_skip(self):
        os.environ.pop("CI", None)
        error = self.assertRaises(SkipTest, dockerd.decide, None, "no Docker engine reachable")
        self.assertEqual(str(error), "no Docker engine reachable")

    def test_in_ci_they_fail(self):
        os.environ["CI"] = "true"
        error = self.assertRaises(AssertionError, dockerd.decide, None,
                                  "no Docker engine reachable")
        self.assertIn("CI=true but no Docker engine reachable", str(error))

    def test_a_reachable_engine_is_used(self):
        self.assertEqual(dockerd.decide("unix:///run/docker.sock", None),
                         "unix:///run/docker.sock")
