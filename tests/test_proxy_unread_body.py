"""No body is read for a request without a live session, measured on the
real proxy (twistd process) from the client's side of the socket.

A 200 MiB ``POST`` behind a bogus session cookie is answered before 1 MiB
of its body left the client, and the proxy opens no spool file for it. The
same measurement with a live session shows the proxy does read (and spool)
such a body, so the measurement can tell the two apart.

What the proxy consumed is at most what the client sent minus what is still
in the client's send queue (``SIOCOUTQ``). The kernel may hold a little more
on the proxy's side (its receive buffer starts at ``tcp_rmem[1]``, 128 KiB,
and only grows when the proxy reads), so the bound is conservative.
"""
import fcntl
import os
import select
import socket
import ssl
import struct
import time

from pixelated_dispatcher.demo import free_port

from .dispatcher_case import DispatcherCase

MiB = 2 ** 20
SIOCOUTQ = 0x5411  # TIOCOUTQ: bytes not yet acknowledged by the peer


def spool_files(pid):
    """Regular files the process has open that are temporary (unlinked or in
    the temporary directory): where ``twisted.web`` spools bodies."""
    found = set()
    directory = "/proc/%d/fd" % pid
    for name in os.listdir(directory):
        try:
            target = os.readlink(os.path.join(directory, name))
        except OSError:
            continue
        if target.endswith("(deleted)"):
            found.add(target)
    return found


def post_until_answered(port, cookie, length, pid, stop_after=None, seconds=20.0):
    """Send a ``POST`` of ``length`` bytes as fast as the proxy takes it,
    stop at the first byte of an answer (or after ``stop_after`` bytes);
    return (answer head, bytes the proxy consumed at most, spool files seen)."""
    already = spool_files(pid)  # e.g. ctypes' executable memory
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    spooled = set()
    try:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nCookie: %s\r\n"
                     b"Content-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % (cookie, length))
        sock.setblocking(False)
        block = b"x" * (64 * 1024)
        sent = 0
        answer = b""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and sent < length:
            if stop_after is not None and sent >= stop_after:
                time.sleep(0.3)  # let the proxy take what was sent
                spooled |= spool_files(pid)
                break
            readable, writable, _ = select.select([sock], [sock], [], 0.05)
            spooled |= spool_files(pid)
            if readable:
                try:
                    answer = sock.recv(4096)
                except ConnectionResetError:
                    answer = b"(reset)"
                break
            if writable:
                try:
                    sent += sock.send(block[:length - sent])
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    break
        queued = struct.unpack("i", fcntl.ioctl(sock, SIOCOUTQ, b"\0" * 4))[0]
        return answer, sent - queued, spooled - already
    finally:
        sock.close()


class BodyWithoutSession(DispatcherCase):
    prefix = "pxd-unread-body-"
    plain_port = free_port()

    @classmethod
    def dispatcher_options(cls):
        # A plain-HTTP listener next to the TLS one, so that the client counts
        # body bytes rather than TLS records.
        return {"proxy_args": ["--listen", "tcp:%d:interface=127.0.0.1" % cls.plain_port]}

    @classmethod
    def prepare(cls):
        cls.dispatcher.add_user("alice", "alice's password")

    def test_bogus_session_200_mib_post_is_answered_before_1_mib_is_read(self):
        answer, consumed, spooled = post_until_answered(
            self.plain_port, b"pixelated-session=" + b"A" * 43, 200 * MiB,
            self.dispatcher.proxy.pid)
        self.assertTrue(answer.startswith(b"HTTP/1.1 303 "), answer)
        self.assertIn(b"/auth/login", answer)
        self.assertLess(consumed, MiB, "the proxy took %d bytes of the body" % consumed)
        self.assertEqual(spooled, set())

    def test_xhr_without_session_gets_401_without_its_body_read(self):
        sock = socket.create_connection(("127.0.0.1", self.plain_port))
        with sock:
            sock.sendall(b"PUT /upload HTTP/1.1\r\nHost: localhost\r\n"
                         b"X-Requested-With: XMLHttpRequest\r\n"
                         b"Cookie: pixelated-session=%s\r\nContent-Length: %d\r\n\r\n"
                         % (b"B" * 43, 200 * MiB))
            sock.settimeout(10)
            self.assertTrue(sock.recv(4096).startswith(b"HTTP/1.1 401 "))

    def test_control_a_live_session_body_is_read_and_spooled(self):
        # The same measurement with alice's session: the proxy reads (and
        # spools to a temporary file) far more than 1 MiB.
        browser = self.browser()
        self.assertEqual(browser.log_in("alice", "alice's password").status, 303)
        self.assertEqual(browser.get("/").status, 200, self.logs())
        token = [v for k, v in browser.cookies.items() if "session" in k][0]
        answer, consumed, spooled = post_until_answered(
            self.plain_port, b"pixelated-session=" + token.encode(), 200 * MiB,
            self.dispatcher.proxy.pid, stop_after=8 * MiB)
        self.assertEqual(answer, b"")
        self.assertGreater(consumed, 4 * MiB)
        self.assertTrue(spooled, "no spool file seen")

    def tls_exchange(self, cookie, body_length, sent_body):
        """Head plus ``sent_body`` over TLS; the answer's first bytes."""
        context = ssl.create_default_context(cafile=self.dispatcher.tls["cert"])
        raw = socket.create_connection(("127.0.0.1", self.dispatcher.port), timeout=20)
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nCookie: %s\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                         % (cookie, body_length) + sent_body)
            answer = b""
            while True:
                try:
                    chunk = sock.recv(65536)
                except (ConnectionError, ssl.SSLError):
                    break
                if not chunk:
                    break
                answer += chunk
            return answer

    def test_over_tls_bogus_refused_and_live_session_body_passes(self):
        answer = self.tls_exchange(b"__Host-pixelated-session=" + b"C" * 43, 200 * MiB,
                                   b"z" * 65536)
        self.assertTrue(answer.startswith(b"HTTP/1.1 303 "), answer[:200])
        # A fresh login's token is not in the proxy's cache: the body waits
        # (reading paused on the TLS connection) until it resolved.
        fresh = self.browser()
        self.assertEqual(fresh.log_in("alice", "alice's password").status, 303)
        name, token = fresh.session_cookie()
        body = b"q" * 300000
        answer = self.tls_exchange(("%s=%s" % (name, token)).encode(), len(body), body)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:300])
        self.assertIn(b'"bytes": 300000', answer)
