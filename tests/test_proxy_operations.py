"""What an operator relies on: TLS on any ``--listen`` form (a socket
systemd would hand over included), the certificate reloaded on SIGHUP
without dropping connections, ``--redirect-http``, ``--banner``, and never
serving as root unless told to (checked with real twistd processes and a
real privilege drop when the tests run as root)."""
import os
import signal
import socket
import ssl as stdlib_ssl
import subprocess
import time
from typing import Any

import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from pixelated_dispatcher.demo import TWISTD
from pixelated_dispatcher.proxy import tap
from pixelated_dispatcher.proxy.redirect_http import make_redirect_site
from pixelated_dispatcher.proxy.tls import PlainListener, parse_listen

from .helpers import free_port, handshake, make_certificate, temporary_directory




def peer_certificate(port: int) -> bytes:
    context = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = stdlib_ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


class TLSOnAnyEndpoint(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_tcp_endpoint_with_a_key_serves_tls_1_2_plus_only(self) -> Any:
        key, cert = make_certificate(temporary_directory(self))
        listener = parse_listen("tcp:0:interface=127.0.0.1:privateKey=%s:certKey=%s"
                                % (key, cert))
        self.assertIsInstance(listener, PlainListener)
        self.assertIsNotNone(listener.tls)
        port = yield listener.endpoint(reactor).listen(Site(Resource()))
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        version, _ = yield deferToThread(handshake, number, stdlib_ssl.TLSVersion.TLSv1_2,
                                         stdlib_ssl.TLSVersion.TLSv1_3)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        yield self.assertFailure(
            deferToThread(handshake, number, stdlib_ssl.TLSVersion.TLSv1,
                          stdlib_ssl.TLSVersion.TLSv1_1), stdlib_ssl.SSLError)

    def test_other_descriptions_keep_their_own_fields(self) -> None:
        # systemd:domain=INET6:index=0:privateKey=... goes the same way (it
        # needs a socket handed over by systemd to be parsed at all).
        directory = temporary_directory(self)
        key, cert = make_certificate(directory)
        listener = parse_listen(r"unix:%s/p\:x.sock:mode=600:privateKey=%s:certKey=%s"
                                % (directory, key, cert))
        self.assertEqual(listener.description, r"unix:%s/p\:x.sock:mode=600" % (directory,))
        self.assertIsNotNone(listener.tls)

    def test_a_chain_without_a_key_is_a_usage_error(self) -> None:
        self.assertRaises(UsageError, parse_listen, "tcp:0:extraCertChain=/tmp/x.pem")

    @inlineCallbacks
    def test_sighup_reloads_the_certificate_and_keeps_connections(self) -> Any:
        directory = temporary_directory(self)
        key, cert = make_certificate(directory)
        options = tap.Options()
        options.parseOptions(["--manager-socket", os.path.join(directory, "none.sock"),
                              "--allow-root", "--listen",
                              "ssl:0:privateKey=%s:certKey=%s:interface=127.0.0.1" % (key, cert)])
        service = tap.makeService(options, reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        server = [s for s in service if hasattr(s, "_waitingForPort")][0]
        # Not "yield server._waitingForPort": that would take the port away
        # from the service, which then could not stop listening.
        listening = Deferred()
        server._waitingForPort.addCallback(lambda p: (listening.callback(p), p)[1])
        port = (yield listening).getHost().port
        before = yield deferToThread(peer_certificate, port)

        # An open connection made before the reload...
        context = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = stdlib_ssl.CERT_NONE
        kept = yield deferToThread(lambda: context.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=5)))
        self.addCleanup(kept.close)

        new_key, new_cert = make_certificate(temporary_directory(self))
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        after = before
        while after == before and time.monotonic() < deadline:
            after = yield deferToThread(peer_certificate, port)
        self.assertNotEqual(after, before)

        def still_works() -> bytes:
            kept.sendall(b"GET /auth/login HTTP/1.1\r\nHost: x\r\n\r\n")
            return kept.recv(100)
        answer = yield deferToThread(still_works)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)

    @inlineCallbacks
    def test_a_broken_new_certificate_keeps_the_old_one(self) -> Any:
        directory = temporary_directory(self)
        key, cert = make_certificate(directory)
        listener = parse_listen("ssl:0:privateKey=%s:certKey=%s" % (key, cert))
        with open(cert, "w") as f:
            f.write("not a certificate")
        old = listener.tls.options
        self.assertFalse((yield listener.tls.reload()))
        self.assertIs(listener.tls.options, old)


class RedirectHTTP(SynchronousTestCase):
    def request(self, raw: bytes, https_port: int = 443) -> bytes:
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport
        site = make_redirect_site(https_port)
        site.reactor = Clock()
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        return transport.value()

    def test_everything_goes_to_https(self) -> None:
        answer = self.request(b"GET /inbox?x=1 HTTP/1.1\r\nHost: mail.example.org\r\n"
                              b"Cookie: pixelated-session=t\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 301 "), answer)
        self.assertIn(b"Location: https://mail.example.org/inbox?x=1\r\n", answer)
        self.assertIn(b"X-Content-Type-Options: nosniff", answer)
        self.assertNotIn(b"Set-Cookie", answer)

    def test_posts_keep_their_method_and_the_port_is_kept(self) -> None:
        answer = self.request(b"POST /auth/login HTTP/1.1\r\nHost: mail.example.org:80\r\n"
                              b"Content-Length: 0\r\n\r\n", https_port=8443)
        self.assertTrue(answer.startswith(b"HTTP/1.1 308 "), answer)
        self.assertIn(b"Location: https://mail.example.org:8443/auth/login\r\n", answer)

    def test_bad_host_is_a_400(self) -> None:
        answer = self.request(b"GET / HTTP/1.1\r\nHost: evil.example/x\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)

    def test_options(self) -> None:
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0", "--redirect-http", "tcp:0"])
        service = tap.makeService(options, reactor)
        self.assertIsNotNone(service.getServiceNamed("redirect-http"))
        self.assertRaises(UsageError, tap.Options().parseOptions,
                          ["--listen", "tcp:0", "--redirect-http",
                           "tcp:0:privateKey=/nonexistent"])


class Banner(SynchronousTestCase):
    def test_banner_file_is_read(self) -> None:
        path = os.path.join(temporary_directory(self), "banner.txt")
        with open(path, "w") as f:
            f.write("Hello operators")
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0", "--banner", path])
        self.assertEqual(options["banner-text"], "Hello operators")

    def test_bad_banner_files_are_usage_errors(self) -> None:
        directory = temporary_directory(self)
        binary = os.path.join(directory, "binary")
        with open(binary, "wb") as f:
            f.write(b"\xff\xfe")
        huge = os.path.join(directory, "huge")
        with open(huge, "w") as f:
            f.write("x" * (tap.MAX_BANNER_BYTES + 1))
        for path in (binary, huge, os.path.join(directory, "missing")):
            self.assertRaises(UsageError, tap.Options().parseOptions,
                              ["--listen", "tcp:0", "--banner", path])


class NotAsRoot(SynchronousTestCase):
    def service(self, *args: str) -> Any:
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"] + list(args))
        return tap.makeService(options, reactor)

    def test_refuses_to_serve_as_root(self) -> None:
        self.patch(tap.os, "getuid", lambda: 0)
        self.assertRaises(tap.RunningAsRoot, self.service().startService)

    def test_refuses_with_root_as_effective_uid(self) -> None:
        self.patch(tap.os, "getuid", lambda: 1000)
        self.patch(tap.os, "geteuid", lambda: 0)
        self.assertRaises(tap.RunningAsRoot, self.service().startService)

    def test_allow_root_for_development(self) -> None:
        self.patch(tap.os, "getuid", lambda: 0)
        service = self.service("--allow-root")
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(service.running)


class RealPrivilegeDrop(TestCase):
    """twistd binds as root, drops to nobody, and only then serves."""

    timeout = 40

    def setUp(self) -> None:
        if os.getuid() != 0:
            if os.environ.get("CI") == "true":
                self.fail("CI runs as root; these tests need root")
            raise self.skipTest("needs root to drop privileges")

    def run_proxy(self, *args: str) -> Any:
        directory = temporary_directory(self)
        os.chmod(directory, 0o755)
        port = free_port()
        log = os.path.join(directory, "proxy.log")
        process = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "--logfile=" + log] + list(args) + [
                "pixelated-proxy", "--manager-socket", os.path.join(directory, "m.sock"),
                "--listen", "tcp:%d:interface=127.0.0.1" % (port,)],
            cwd=directory)
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))
        return process, port, log

    def test_binds_as_root_then_serves_as_nobody(self) -> None:
        process, port, log = self.run_proxy("-u", "65534", "-g", "65534")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        deadline = time.monotonic() + 10
        answer = b""
        while time.monotonic() < deadline and not answer:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /auth/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = s.recv(100)
            time.sleep(0.1)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
        uids = psutil.Process(process.pid).uids()
        self.assertEqual((uids.real, uids.effective, uids.saved), (65534, 65534, 65534))

    def test_refuses_to_serve_as_root(self) -> None:
        process, port, log = self.run_proxy()
        self.assertNotEqual(process.wait(30), 0)
        with open(log) as f:
            text = f.read()
        self.assertIn("refuses to serve as root", text)
