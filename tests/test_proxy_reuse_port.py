"""Several proxy processes on one port (``reusePort=yes`` in ``--listen``):
the kernel spreads new browser connections over all of them, every one of
them serves logged-in requests (they share the manager, so a session made
through one is valid in all), and when one stops, the others go on serving
the port alone. Real ``twistd pixelated-proxy`` processes
(:class:`.real_proxy.RealProxy`)."""
import os
import socket
import subprocess
import sys
from typing import Dict, List
from unittest import SkipTest

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.proxy.tls import PlainListener, ReusePortEndpoint, parse_listen

from .real_proxy import RealProxy, read_head

#: Connections opened at once; all landing on one of two processes by
#: chance has a probability of 2 ** -31.
CONNECTIONS = 32


def sockets_of(pid: int) -> int:
    """How many sockets process ``pid`` holds open."""
    count = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


class SharedPort(RealProxy):

    proxy_count = 2
    listen_options = ":reusePort=yes"

    def get(self, sock: socket.socket) -> bytes:
        sock.sendall(b"GET /blob?size=16 HTTP/1.1\r\nHost: x\r\nCookie: %s\r\n\r\n"
                     % self.cookie.encode())
        data = read_head(sock)
        head, body = data.split(b"\r\n\r\n", 1)
        while len(body) < 16:
            chunk = sock.recv(65536)
            self.assertTrue(chunk, "closed before the body")
            body += chunk
        return head + b"\r\n\r\n" + body

    def test_every_process_serves_the_port(self) -> None:
        before: Dict[int, int] = {p.pid: sockets_of(p.pid) for p in self.proxies}
        held: List[socket.socket] = []
        for _ in range(CONNECTIONS):
            sock = self.connect()
            answer = self.get(sock)
            self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:200])
            held.append(sock)
        grown = {pid: sockets_of(pid) - count for pid, count in before.items()}
        self.assertTrue(all(n > 0 for n in grown.values()),
                        "a process got no connection: %r" % (grown,))
        self.assertGreaterEqual(sum(grown.values()), CONNECTIONS, grown)

    def test_the_others_serve_on_when_one_stops(self) -> None:
        last = self.proxies[-1]
        last.terminate()
        last.wait(30)
        for _ in range(CONNECTIONS // 2):
            answer = self.get(self.connect())
            self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:200])


class Descriptions(SynchronousTestCase):

    def test_tcp_with_reuse_port(self) -> None:
        listener = parse_listen("tcp:8443:interface=127.0.0.1:backlog=99:reusePort=yes")
        self.assertEqual(listener.reuse_port, (8443, "127.0.0.1", 99))
        endpoint = listener.endpoint(object())
        self.assertIsInstance(endpoint, ReusePortEndpoint)
        self.assertEqual((endpoint.port, endpoint.interface, endpoint.backlog),
                         (8443, "127.0.0.1", 99))

    def test_no_is_the_default(self) -> None:
        self.assertIsNone(parse_listen("tcp:8443:reusePort=no").reuse_port)
        self.assertEqual(parse_listen("tcp:8443:reusePort=no"), PlainListener("tcp:8443"))

    def test_other_endpoints_refuse_it(self) -> None:
        with self.assertRaises(UsageError):
            parse_listen("unix:/tmp/x.sock:reusePort=yes")
        with self.assertRaises(UsageError):
            parse_listen("tcp:8443:reusePort=maybe")

    def test_a_taken_port_is_still_refused_without_it(self) -> None:
        from twisted.internet import reactor
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        d = ReusePortEndpoint(reactor, port, "127.0.0.1").listen(object())
        failure = self.failureResultOf(d)
        self.assertIn("Address already in use", failure.getErrorMessage())


JOIN = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen(1)
except OSError as e:
    print("refused:", e.strerror)
else:
    print("joined")
"""


class OtherAccount(SynchronousTestCase):
    """Another account cannot join the proxy's port group to take a share
    of its connections, even with ``SO_REUSEPORT`` itself."""

    def test_another_uid_cannot_bind_the_shared_port(self) -> None:
        if os.geteuid() != 0:
            if os.environ.get("CI") == "true":
                raise AssertionError("CI runs as root; this test must not be skipped there")
            raise SkipTest("needs root to run a process as another uid")
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        listening = self.successResultOf(
            ReusePortEndpoint(reactor, port, "127.0.0.1").listen(Factory()))
        self.addCleanup(listening.stopListening)
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c",
             JOIN, str(port)], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.stdout.strip(), "refused: Address already in use",
                         result.stderr)
        # and the same account can (what the proxy's own processes do)
        result = subprocess.run([python, "-c", JOIN, str(port)], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.stdout.strip(), "joined", result.stderr)
