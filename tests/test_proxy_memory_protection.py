"""The real proxy under the restriction of its systemd unit's
``MemoryDenyWriteExecute=yes``: no memory both writable and executable.

Twisted's own TLS options make Python callbacks (``ffi.callback()``
trampolines in such memory), so a proxy built on them cannot start under
that unit; ours builds its OpenSSL context without any. The filter is the
one systemd installs (``tests/memory_deny_write_execute.py``), so this runs
on CI machines where systemd is not PID 1.
"""
import os
import signal
import subprocess
import sys

from pixelated_dispatcher.demo import Dispatcher

from .dispatcher_case import DispatcherCase, wait_until

WRAPPER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "memory_deny_write_execute.py")


def under_the_filter(command):
    return [sys.executable, WRAPPER] + list(command)


class _ProxyWithoutWriteExecuteMemory(Dispatcher):
    def twistd_command(self, plugin):
        command = super().twistd_command(plugin)
        return under_the_filter(command) if plugin == "pixelated-proxy" else command


class ProxyUnderMemoryDenyWriteExecuteTests(DispatcherCase):
    prefix = "pxd-mdwe-"
    dispatcher_class = _ProxyWithoutWriteExecuteMemory

    @classmethod
    def prepare(cls):
        cls.dispatcher.add_user("alice", "alice's password")

    def test_the_filter_stops_what_twisted_tls_options_would_do(self):
        """Control: under the same filter, Twisted's ``CertificateOptions``
        cannot even make its context, so the test below can fail."""
        result = subprocess.run(under_the_filter([sys.executable, "-c", (
            "from twisted.internet import ssl\n"
            "ssl.CertificateOptions().getContext()\n")]),
            capture_output=True, text=True, timeout=60)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("write+execute memory", result.stderr)

    def test_the_proxy_runs_filtered(self):
        with open("/proc/%d/status" % self.dispatcher.proxy.pid) as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        self.assertEqual(status["Seccomp"].strip(), "2")  # a filter is installed
        self.assertEqual(status["NoNewPrivs"].strip(), "1")

    def test_a_user_logs_in_and_reaches_the_agent_over_tls(self):
        browser = self.browser()
        self.assertEqual(browser.log_in("alice", "alice's password").status, 303)
        whoami = browser.get("/whoami").json()
        self.assertEqual(whoami["username"], "alice")

    def test_a_certificate_reload_works_filtered(self):
        os.kill(self.dispatcher.proxy.pid, signal.SIGHUP)
        self.assertTrue(wait_until(lambda: "reloaded" in self.logs()), self.logs())
        self.assertNotIn("not reloaded", self.logs())
        browser = self.browser()
        self.assertEqual(browser.log_in("alice", "alice's password").status, 303)
        self.assertIsNone(self.dispatcher.proxy.poll())
