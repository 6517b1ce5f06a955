"""A test case around one real dispatcher (both twistd daemons in a temporary
directory), shared by the tests that drive the whole system."""
import shutil
import tempfile
import time
import unittest

from pixelated_dispatcher.demo import Dispatcher

from .https_browser import Browser


def wait_until(predicate, timeout=15.0, interval=0.05):
    """The first true value of ``predicate()`` within ``timeout`` seconds
    (else its last value)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    return predicate()


def agent_pid(dispatcher, username):
    """The agent's pid as ``pixelated-ctl info`` reports it (None when stopped)."""
    result = dispatcher.ctl("info", username)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines() if " " in line)
    value = fields.get("pid", "-").strip()
    return int(value) if value.isdigit() else None


class DispatcherCase(unittest.TestCase):
    """One dispatcher per test class; subclasses tune it through
    :meth:`dispatcher_options` and add users in :meth:`prepare`."""

    prefix = "pxd-"
    dispatcher_class = Dispatcher

    @classmethod
    def dispatcher_options(cls):
        return {}

    @classmethod
    def prepare(cls):
        """Runs once the dispatcher is up (e.g. to add users)."""

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.mkdtemp(prefix=cls.prefix)
        cls.dispatcher = cls.dispatcher_class(cls.directory, **cls.dispatcher_options())
        try:
            cls.dispatcher.start()
            cls.prepare()
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.dispatcher.stop()
        shutil.rmtree(cls.directory, ignore_errors=True)

    def browser(self):
        return Browser(self.dispatcher.port, self.dispatcher.tls["cert"])

    def logs(self, tail=4000):
        return self.dispatcher.log_tails(tail)
