"""``twistd pixelated-proxy``: its options, and the service it builds, run for
real (manager stand-in on a Unix socket, agent stand-in on loopback)."""
import os
import re
from typing import Any, List

import treq
from twisted.application.internet import ClientService, StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from pixelated_dispatcher.protocol import AgentAddress
from pixelated_dispatcher.proxy import tap
from pixelated_dispatcher.testing.fake_manager import FakeManager

from .forwarding_setup import AgentStandIn
from .helpers import free_port, make_certificate, start_manager, temporary_directory


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        seen: List[str] = []
        self.patch(tap, "parse_listen", lambda d: seen.append(d) or d)
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["manager-socket"], "/run/pixelated/manager.sock")
        self.assertEqual(seen, [tap.DEFAULT_LISTEN])
        self.assertTrue(tap.DEFAULT_LISTEN.startswith("ssl:443:"))
        self.assertIn("privateKey=/etc/ssl/private/ssl-cert-snakeoil.key",
                      tap.DEFAULT_LISTEN)

    def test_listen_may_be_repeated(self) -> None:
        options = tap.Options()
        options.parseOptions(["--manager-socket", "/tmp/m.sock",
                              "--listen", "tcp:8080:interface=127.0.0.1",
                              "--listen", "unix:/tmp/proxy.sock"])
        self.assertEqual(options["manager-socket"], "/tmp/m.sock")
        self.assertEqual(options["listen"], ["tcp:8080:interface=127.0.0.1",
                                             "unix:/tmp/proxy.sock"])

    def test_bad_tls_file_is_a_usage_error(self) -> None:
        options = tap.Options()
        error = self.assertRaises(UsageError, options.parseOptions, [
            "--listen", "ssl:8443:privateKey=/nonexistent/key.pem:certKey=/nonexistent/c.pem"])
        self.assertIn("/nonexistent/key.pem", str(error))

    def test_bad_endpoint_is_a_usage_error(self) -> None:
        self.assertRaises(UsageError, tap.Options().parseOptions, ["--listen", "tcp:eighty"])

    def test_service_has_the_manager_connection_and_every_listener(self) -> None:
        directory = temporary_directory(self)
        key, cert = make_certificate(directory)
        options = tap.Options()
        options.parseOptions([
            "--listen", "ssl:0:privateKey=%s:certKey=%s:interface=127.0.0.1" % (key, cert),
            "--listen", "tcp:0:interface=127.0.0.1"])
        service = tap.makeService(options, reactor)
        children = list(service)
        self.assertEqual([type(c) for c in children],
                         [ClientService, StreamServerEndpointService,
                          StreamServerEndpointService])
        for server in children[1:]:
            self.assertTrue(server._raiseSynchronously)


class RunningProxyTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.messages: List[str] = []
        observer = lambda event: self.messages.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    @inlineCallbacks
    def test_login_and_reach_the_agent(self) -> Any:
        socket_path = os.path.join(temporary_directory(self), "manager.sock")
        manager = FakeManager()
        manager.add_user("alice", "secret")
        start_manager(self, socket_path, manager)
        agent = reactor.listenTCP(0, Site(AgentStandIn()), interface="127.0.0.1")
        self.addCleanup(agent.stopListening)
        manager.place_agent("alice", AgentAddress("127.0.0.1", agent.getHost().port))

        port = free_port()
        options = tap.Options()
        options.parseOptions(["--manager-socket", socket_path, "--allow-root",
                              "--listen", "tcp:%d:interface=127.0.0.1" % (port,)])
        service = tap.makeService(options, reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(any("Site starting on %d" % (port,) in m for m in self.messages),
                        self.messages)

        pool = HTTPConnectionPool(reactor, persistent=False)
        base = "http://127.0.0.1:%d" % (port,)
        form = yield treq.get(base + "/auth/login", pool=pool)
        body = yield form.content()
        csrf = re.search(rb'name="csrf_token" value="([^"]+)"', body).group(1).decode()
        jar = form.cookies()
        login = yield treq.post(base + "/auth/login", pool=pool, cookies=jar,
                                allow_redirects=False,
                                data={"username": "alice", "password": "secret",
                                      "csrf_token": csrf})
        yield login.content()
        self.assertEqual(login.code, 303)
        for cookie in login.cookies():
            jar.set_cookie(cookie)
        echo = yield treq.get(base + "/echo", pool=pool, cookies=jar)
        seen = yield echo.json()
        self.assertEqual(echo.code, 200)
        self.assertEqual(seen["uri"], "/echo")
        self.assertNotIn("cookie", seen["headers"])  # ours never reach the agent
        self.assertEqual(manager.running, {"alice"})

    def test_port_in_use_aborts_startup(self) -> None:
        taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        options = tap.Options()
        options.parseOptions(["--manager-socket", "/nonexistent/manager.sock",
                              "--listen", "tcp:%d:interface=127.0.0.1" % (taken.getHost().port,)])
        service = tap.makeService(options, reactor)
        self.assertRaises(CannotListenError, service.privilegedStartService)
