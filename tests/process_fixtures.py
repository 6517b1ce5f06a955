"""Fixtures of the process provider's tests: real agent processes in a
temporary directory (:class:`ProcessFixture`, and :class:`IsolatedFixture`
with agents under their own uids, which needs root: :func:`require_root`),
and small helpers to reach and watch them (an HTTP GET of an agent, whether
a pid lives, polling without blocking the reactor)."""
import json
import os
import shutil
import signal
import tempfile
import time

import psutil
import treq
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest
from twisted.web.client import HTTPConnectionPool

from pixelated_dispatcher.manager.providers.process import DEMO_AGENT_COMMAND, ProcessProvider


def http_get(url: str):
    """Fires with (status code, body); one connection, closed afterwards."""
    d = treq.get(url, pool=HTTPConnectionPool(reactor, persistent=False))
    d.addCallback(lambda response: treq.content(response).addCallback(
        lambda body: (response.code, body)))
    return d


def agent_url(agent, path="/"):
    return "http://%s:%d%s" % (agent.address.host, agent.address.port, path)


def is_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_mentioning(text: str):
    """Live processes whose command line mentions ``text`` (a unique temp path)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(text in arg for arg in process.info["cmdline"] or ()):
                found.append(process)
        except psutil.Error:
            pass
    return found


def wait_until(predicate, timeout=5.0):
    """Poll ``predicate`` without blocking the reactor; fires with its last value."""
    deadline = time.monotonic() + timeout

    @inlineCallbacks
    def poll():
        while True:
            value = predicate()
            if value or time.monotonic() > deadline:
                return value
            yield deferLater(reactor, 0.05, lambda: None)
    return poll()


class ProcessFixture:
    """Real processes in a temp dir; cleanup fails the test if any agent
    process outlives the ``close()`` of every provider it made.

    With ``state`` (the default) providers keep records and logs in
    ``<root>/agents``, as in production; without, agents' output comes
    through pipes and nothing outlives a provider."""

    adopted_exit_reason = "exited"

    def __init__(self, test_case, command=DEMO_AGENT_COMMAND, state=True, **options):
        self.root = tempfile.mkdtemp(prefix="pixelated-provider-test-")
        self.state_dir = os.path.join(self.root, "agents") if state else None
        options.setdefault("start_timeout", 15.0)
        options.setdefault("stop_grace", 5.0)
        self._command, self._options = command, options
        self.providers = []
        self.provider = self.new_provider(keep_on_close=False)
        test_case.addCleanup(self.cleanup)

    def new_provider(self, keep_on_close, **options):
        provider = ProcessProvider(reactor, self._command, state_dir=self.state_dir,
                                   keep_on_close=keep_on_close,
                                   **dict(self._options, **options))
        self.providers.append(provider)
        return provider

    def data_dir(self, username: str) -> str:
        path = os.path.join(self.root, "users", username, "data")
        os.makedirs(path, exist_ok=True)
        return path

    def settle(self, d):
        return d

    def received(self, username: str, provider=None):
        agent = (provider or self.provider).running()[username]
        return http_get(agent_url(agent, "/whoami")).addCallback(
            lambda result: json.loads(result[1]))

    def kill_from_outside(self, username: str, provider=None) -> None:
        os.kill((provider or self.provider).running()[username].pid, signal.SIGKILL)

    def break_next_start(self, username: str) -> None:
        # the demo agent refuses to start when it cannot read its visit counter
        os.makedirs(os.path.join(self.data_dir(username), "visits"))

    def live_agents(self, username: str) -> int:
        return len(processes_mentioning(self.data_dir(username)))

    def cleanup(self):
        def check(_):
            leftovers = processes_mentioning(self.root)
            for process in leftovers:
                process.kill()
            shutil.rmtree(self.root, ignore_errors=True)
            if leftovers:
                raise AssertionError("agent processes outlived close(): %r" % (leftovers,))
        closing = gatherResults([provider.close() for provider in self.providers])
        return closing.addCallback(check)


#: agent uids of the tests: far above any system or login account, no
#: /etc/passwd entry (as the manager's allocation from --agent-uid-range)
TEST_UIDS = {"alice": 3990001, "bob": 3990002}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def require_root(test_case) -> None:
    if os.geteuid() == 0:
        return
    reason = "needs root: agents run under their own uids"
    if _in_ci():
        test_case.fail(reason + " (CI=true, so this is a failure, not a skip)")
    raise SkipTest(reason)


def accounts(username):
    return succeed((TEST_UIDS[username], TEST_UIDS[username]))


class IsolatedFixture(ProcessFixture):
    """Data dirs as the supervisor makes them: ``<root>/users/<name>/data``,
    mode 0700, owned by root, below directories others may pass through."""

    def __init__(self, test_case, **options):
        options.setdefault("accounts", accounts)
        super().__init__(test_case, **options)
        os.chmod(self.root, 0o711)

    def data_dir(self, username: str) -> str:
        path = os.path.join(self.root, "users", username, "data")
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o711)
            os.chmod(path, 0o700)
            os.chmod(os.path.dirname(path), 0o711)
            os.chmod(os.path.dirname(os.path.dirname(path)), 0o711)
        return path
