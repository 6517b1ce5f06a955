"""A wrong command line stops the real ``twistd`` with status 1 and one
sentence, so systemd shows the unit as failed (Twisted 22.4's twistd exits 0
on its own)."""
import subprocess
import tempfile
import unittest

from pixelated_dispatcher.demo import TWISTD


def twistd(*arguments):
    with tempfile.TemporaryDirectory() as directory:
        return subprocess.run(TWISTD + ["-n", "--pidfile=", "--logfile=-"] + list(arguments),
                              capture_output=True, text=True, timeout=60, cwd=directory)


class UsageErrorTests(unittest.TestCase):

    def assert_fails_with(self, result, sentence, plugin):
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("twistd %s: %s" % (plugin, sentence), result.stderr)
        self.assertNotIn("Usage:", result.stdout + result.stderr)  # no page of help text

    def test_an_unknown_proxy_option(self):
        self.assert_fails_with(twistd("pixelated-proxy", "--listne", "tcp:8080"),
                               "option --listne not recognized", "pixelated-proxy")

    def test_a_missing_tls_key(self):
        self.assert_fails_with(
            twistd("pixelated-proxy", "--listen", "ssl:8443:privateKey=/nonexistent/key.pem"),
            "cannot read the TLS private key file /nonexistent/key.pem", "pixelated-proxy")

    def test_an_unknown_manager_provider(self):
        self.assert_fails_with(twistd("pixelated-manager", "--provider", "vmware"),
                               "--provider must be one of: process, docker",
                               "pixelated-manager")

    def test_help_still_exits_0(self):
        result = twistd("pixelated-manager", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--state-dir", result.stdout)
