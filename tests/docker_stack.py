"""The real manager (``--provider docker``) and proxy as processes in a
temporary directory, against a real dockerd (:class:`DockerStack`), and what
the tests that drive it share: the credentials line an agent gets, a browser
that waits out an agent's start (:func:`agent_page`), and waiting for a
condition with the daemons' logs in the failure (:func:`wait_until`)."""
import html
import json
import re
import shutil
import tempfile
import time
import uuid

from pixelated_dispatcher.demo import Dispatcher

from . import dockerd
from .https_browser import Browser


LEAP_PROVIDER = "example.org"


def credentials_line(username, password):
    """What the manager writes on the agent's stdin after a login."""
    return json.dumps({"leap_provider_hostname": LEAP_PROVIDER, "user": username,
                       "password": password}).encode() + b"\n"


class DockerStack:
    """Manager (docker provider) and proxy in a temporary directory."""

    def __init__(self, test, image, host, extra_manager_args=()):
        self.host = host
        self.instance = "pxit-%s" % uuid.uuid4().hex[:8]
        self.directory = tempfile.mkdtemp(prefix="pxdocker-")
        test.addCleanup(shutil.rmtree, self.directory, True)
        test.addCleanup(dockerd.remove_labelled, host,
                        "org.pixelated.dispatcher=%s" % self.instance)
        # the tests run as root; the proxy refuses that unless told it is a test
        self.dispatcher = Dispatcher(self.directory, proxy_args=["--allow-root"], manager_args=[
            "--provider", "docker", "--docker-host", host, "--docker-instance", self.instance,
            "--agent-image", image, "--agent-memory", "64m", "--agent-start-timeout", "30",
            "--agent-stop-grace", "2", "--docker-loopback-guard", "off",
            "--leap-provider", LEAP_PROVIDER] + list(extra_manager_args))
        test.addCleanup(self.dispatcher.stop)
        self.dispatcher.start()

    def logs(self):
        """The daemons' log tails, for failure messages."""
        return self.dispatcher.log_tails(3000)

    def browser(self):
        return Browser(self.dispatcher.port, self.dispatcher.tls["cert"])

    def container(self, username):
        return dockerd.api(self.host, "GET", "/containers/%s-%s/json" % (self.instance, username))

    def info(self, username):
        result = self.dispatcher.ctl("info", username)
        if result.returncode != 0:
            raise AssertionError("pixelated-ctl info failed: %s" % result.stderr)
        return dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())


_REFRESH = re.compile(r'http-equiv="refresh" content="\d+;url=([^"]+)"')


def agent_page(browser, path="/", timeout=20):
    """GET ``path`` as a browser would while the agent starts: follow the
    proxy's redirects and its "starting" page (without waiting out its
    refresh), retry a 503 that says to; the first other answer."""
    deadline = time.monotonic() + timeout
    page = browser.get(path)
    while time.monotonic() < deadline:
        if page.status == 303:
            page = browser.get(page.header("Location"))
            continue
        refresh = _REFRESH.search(page.text) if page.status == 200 else None
        if refresh or (page.status == 503 and page.header("Retry-After")):
            time.sleep(0.05)
            page = browser.get(html.unescape(refresh.group(1)) if refresh else path)
            continue
        return page
    return page


def wait_until(predicate, timeout, what, stack):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("%s did not happen within %g s\n%s" % (what, timeout, stack.logs()))
