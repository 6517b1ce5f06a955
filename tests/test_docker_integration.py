"""``twistd pixelated-manager --provider docker`` end to end, as real processes.

The real manager and proxy (``pixelated_dispatcher.demo.Dispatcher``), the
real ``pixelated-ctl``, an HTTPS browser, a real dockerd and the test agent
image. Proves what the operator would try: restarting the manager adopts the
running container and the user's session keeps working without a new login;
``docker kill`` of an agent is noticed and the user's next request starts it
again, with the credentials of their login.

Skips with a one-line reason when no Docker engine is reachable; fails
instead when CI=true (see tests/dockerd.py).
"""
import hashlib
import os
import shutil
import socket
import socketserver
import tempfile
import threading
import time

import pytest
from twisted.trial.unittest import SynchronousTestCase

from . import dockerd
from .docker_stack import DockerStack, agent_page, credentials_line, wait_until

pytestmark = pytest.mark.whole_system


class DockerDispatcherTests(SynchronousTestCase):

    def setUp(self):
        self.host = dockerd.engine_or_skip()
        self.image = dockerd.ensure_agent_image(self.host)

    def test_manager_restart_adopts_the_container_and_the_session_survives(self):
        stack = DockerStack(self, self.image, self.host)
        stack.dispatcher.add_user("alice", "alice password 1")
        browser = stack.browser()
        login = browser.log_in("alice", "alice password 1")
        self.assertEqual(login.status, 303, login.text + stack.logs())
        page = agent_page(browser)
        self.assertEqual((page.status, page.text.strip()), (200, "Mailbox of alice"))
        before = stack.container("alice")
        echo = browser.get("/cgi-bin/echo").text
        self.assertIn("credentials_sha256=%s" % hashlib.sha256(
            credentials_line("alice", "alice password 1")).hexdigest(), echo,
            "the password of the login reached the agent on its stdin")

        stack.dispatcher.stop_manager()
        self.assertTrue(stack.container("alice")["State"]["Running"],
                        "stopping the manager leaves the agent running")
        stack.dispatcher.start_manager()
        wait_until(lambda: stack.info("alice").get("state") == "running", 15,
                   "adoption of alice's agent", stack)
        info = stack.info("alice")
        published = before["NetworkSettings"]["Ports"]["4567/tcp"][0]["HostPort"]
        self.assertEqual(info["address"], "127.0.0.1:%s" % published)

        page = agent_page(browser)
        self.assertEqual((page.status, page.text.strip()), (200, "Mailbox of alice"),
                         "same session, no new login\n" + stack.logs())
        after = stack.container("alice")
        self.assertEqual((after["Id"], after["State"]["StartedAt"]),
                         (before["Id"], before["State"]["StartedAt"]),
                         "the very same container, not a new one")

    def test_after_a_manager_restart_a_killed_agent_restarts_with_the_password(self):
        """docker kill of an agent after a manager restart (which used to
        lose the password): the user's next request starts it again with
        the credentials sealed under their session, without a new login."""
        stack = DockerStack(self, self.image, self.host)
        stack.dispatcher.add_user("bob", "bob password 2")
        browser = stack.browser()
        self.assertEqual(browser.log_in("bob", "bob password 2").status, 303)
        page = agent_page(browser)
        self.assertEqual(page.text.strip(), "Mailbox of bob", (page.status, page.text[:300],
                                                               stack.logs()))
        stack.dispatcher.stop_manager()
        stack.dispatcher.start_manager()
        wait_until(lambda: stack.info("bob").get("state") == "running", 15,
                   "adoption of bob's agent", stack)
        first = stack.container("bob")

        dockerd.api(self.host, "POST", "/containers/%s/kill" % first["Id"])
        started = time.monotonic()
        wait_until(lambda: stack.info("bob").get("state") == "failed", 10,
                   "the manager noticing the kill", stack)
        self.assertLess(time.monotonic() - started, 10)
        with open(stack.dispatcher.manager_log) as f:
            self.assertIn("was killed by signal 9 (SIGKILL, exit code 137)", f.read())

        page = agent_page(browser)
        self.assertEqual((page.status, page.text.strip()), (200, "Mailbox of bob"),
                         "the next request starts the agent again\n" + stack.logs())
        second = stack.container("bob")
        self.assertNotEqual(second["Id"], first["Id"])
        echo = browser.get("/cgi-bin/echo").text
        self.assertIn("credentials_sha256=%s" % hashlib.sha256(
            credentials_line("bob", "bob password 2")).hexdigest(), echo,
            "the restarted agent got the credentials of bob's login again")


class EngineRelay:
    """A socket in front of the real engine, in a thread of the test process.

    ``down()`` closes it and every connection through it, ``up()`` opens it
    again: to the manager, a Docker daemon that goes away and comes back
    (without disturbing anyone else who uses the same engine).
    """

    def __init__(self, engine_host, path):
        self.target = engine_host[len("unix://"):]
        self.path = path
        self.host = "unix://" + path
        self.server = None
        self.sockets = set()
        self.lock = threading.Lock()

    def up(self):
        relay = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                inbound = self.request
                outbound = socket.socket(socket.AF_UNIX)
                try:
                    outbound.connect(relay.target)
                except OSError:
                    return
                with relay.lock:
                    relay.sockets.update((inbound, outbound))
                pump = threading.Thread(target=_pipe, args=(outbound, inbound), daemon=True)
                pump.start()
                _pipe(inbound, outbound)
                pump.join()

        if os.path.exists(self.path):
            os.unlink(self.path)
        self.server = socketserver.ThreadingUnixStreamServer(self.path, Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self):
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self.server = None
        with self.lock:
            sockets, self.sockets = self.sockets, set()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def _pipe(source, sink):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class EngineOutageTests(SynchronousTestCase):

    def setUp(self):
        self.host = dockerd.engine_or_skip()
        self.image = dockerd.ensure_agent_image(self.host)
        if not self.host.startswith("unix://"):
            self.skipTest("needs the engine on a unix socket")

    def test_manager_stays_up_says_why_and_recovers_when_the_engine_returns(self):
        relay_dir = tempfile.mkdtemp(prefix="pxrelay-")
        self.addCleanup(shutil.rmtree, relay_dir, True)
        relay = EngineRelay(self.host, os.path.join(relay_dir, "docker.sock"))
        relay.up()
        self.addCleanup(relay.down)
        stack = DockerStack(self, self.image, self.host,
                            extra_manager_args=["--docker-host", relay.host])
        stack.dispatcher.add_user("carol", "carol password 3")
        browser = stack.browser()
        self.assertEqual(browser.log_in("carol", "carol password 3").status, 303)
        self.assertEqual(agent_page(browser).text.strip(), "Mailbox of carol")

        relay.down()
        wait_until(lambda: stack.info("carol").get("state") == "failed", 10,
                   "the manager noticing the engine's loss", stack)
        page = browser.get("/")  # carol's session asks for a start
        self.assertNotIn("Mailbox of carol", page.text, "no agent while the engine is away")
        wait_until(lambda: "container engine unavailable" in stack.info("carol").get(
            "reason", ""), 15, "the failed start's reason", stack)
        self.assertIsNone(stack.dispatcher.manager.poll(), "the manager stays up")

        relay.up()
        # the manager reconnects by itself; the container kept running (the
        # real engine never went away), so it is adopted again
        wait_until(lambda: stack.info("carol").get("state") == "running", 15,
                   "recovery once the engine is back", stack)
        page = agent_page(browser)
        self.assertEqual((page.status, page.text.strip()), (200, "Mailbox of carol"),
                         stack.logs())

    def test_manager_started_while_the_engine_is_away_serves_and_recovers(self):
        relay_dir = tempfile.mkdtemp(prefix="pxrelay-")
        self.addCleanup(shutil.rmtree, relay_dir, True)
        relay = EngineRelay(self.host, os.path.join(relay_dir, "docker.sock"))
        self.addCleanup(relay.down)
        stack = DockerStack(self, self.image, self.host,
                            extra_manager_args=["--docker-host", relay.host])
        stack.dispatcher.add_user("dave", "dave password 4")   # the manager serves
        browser = stack.browser()
        self.assertEqual(browser.log_in("dave", "dave password 4").status, 303)
        self.assertNotIn("Mailbox of dave", browser.get("/").text)
        wait_until(lambda: "container engine unavailable" in stack.info("dave").get(
            "reason", ""), 15, "the failed start's reason", stack)

        relay.up()
        wait_until(lambda: "Mailbox of dave" in agent_page(browser, timeout=3).text, 20,
                   "a start once the engine is there", stack)
        self.assertEqual(stack.info("dave").get("state"), "running")
