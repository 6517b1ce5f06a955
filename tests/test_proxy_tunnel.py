"""Back-pressure in a switched (``101``, WebSocket) tunnel: a side that does
not read pauses the reading of the other, so a flood in either direction
waits in its sender, not in the proxy's memory; either side's end closes the
other once and unregisters both producers.

:class:`FastTunnel` plays browser and agent on ``StringTransport``s through
the proxy's real site (:class:`.clocked_proxy.ClockedProxy`);
:class:`TunnelEnds` closes real tunnels, over TCP and TLS (a TLS transport
with a producer registered would never close);
:class:`TunnelMemory` floods a real ``twistd pixelated-proxy`` process in
both directions and measures its peak RSS
(:mod:`.real_proxy`).
"""
import socket
import sys
import time
from typing import Any, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from pixelated_dispatcher.protocol import AgentAddress

from .clocked_proxy import ClockedProxy
from .forwarding_setup import ForwardingSetup, RawBrowser, UpgradingAgent
from .real_proxy import PATTERN, RealProxy, read_head, reset_peak, status_kib

UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket",
           "Sec-WebSocket-Key": "k", "Sec-WebSocket-Version": "13"}
SWITCHED = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n")


def counting(transport: Any, method: str) -> list:
    """Count the calls of ``transport.method`` (still calling it)."""
    calls: list = []
    original = getattr(transport, method)

    def counted(*args: Any) -> Any:
        calls.append(args)
        return original(*args)
    setattr(transport, method, counted)
    return calls


class FastTunnel(ClockedProxy):
    """Both producers of a tunnel, driven by hand."""

    def tunnel(self) -> Tuple[Any, Any]:
        browser = self.request(path=b"/socket", headers=UPGRADE)
        agent = self.agent_connects()
        agent.says(SWITCHED + b"hello")
        self.assert_answered(browser, b"101")
        self.assertTrue(browser.value().endswith(b"hello"))
        self.assertEqual(browser.producerState, "producing")  # reading again
        return browser, agent

    def test_an_agent_that_does_not_read_pauses_the_browser(self) -> None:
        browser, agent = self.tunnel()
        self.assertIsNotNone(agent.transport.producer, "nothing registered with the agent")
        self.assertTrue(agent.transport.streaming)
        agent.transport.producer.pauseProducing()  # its buffer is full
        self.assertEqual(browser.producerState, "paused")
        self.assertEqual(agent.transport.producerState, "producing")
        agent.transport.producer.resumeProducing()  # drained
        self.assertEqual(browser.producerState, "producing")
        self.channel.dataReceived(b"to the agent")
        self.assertTrue(agent.received().endswith(b"to the agent"))

    def test_a_browser_that_does_not_read_pauses_the_agent(self) -> None:
        browser, agent = self.tunnel()
        self.assertIsNot(browser.producer, self.channel)  # the channel made way
        self.assertTrue(browser.streaming)
        browser.producer.pauseProducing()
        self.assertEqual(agent.transport.producerState, "paused")
        self.assertEqual(browser.producerState, "producing")
        browser.producer.resumeProducing()
        self.assertEqual(agent.transport.producerState, "producing")
        agent.says(b"to the browser")
        self.assertTrue(browser.value().endswith(b"to the browser"))

    def test_the_browser_leaving_closes_the_agent_once(self) -> None:
        browser, agent = self.tunnel()
        aborts = counting(agent.transport, "abortConnection")
        browser.producer.pauseProducing()  # even while paused
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(agent.transport.disconnected)
        self.assertIsNone(agent.transport.producer)
        self.assertIsNone(browser.producer)
        self.agent_closes(agent)  # what the reactor does next
        self.assertEqual(len(aborts), 1)

    def test_the_agent_leaving_closes_the_browser_once(self) -> None:
        browser, agent = self.tunnel()
        closes = counting(browser, "loseConnection")
        agent.transport.producer.pauseProducing()  # even while paused
        agent.says(b"last words")
        agent.connection.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(browser.value().endswith(b"last words"))
        self.assertTrue(browser.disconnecting)
        self.assertIsNone(browser.producer)  # else a real transport would not close
        self.assertIsNone(agent.transport.producer)
        self.channel.connectionLost(Failure(ConnectionDone()))  # what the reactor does next
        self.assertEqual(len(closes), 1)
        self.assertFalse(agent.transport.disconnected)  # not aborted after its end

    def test_an_upgrade_the_agent_refuses_stays_plain_http(self) -> None:
        browser = self.request(path=b"/socket", headers=UPGRADE)
        agent = self.agent_connects()
        agent.says(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nno")
        self.assert_answered(browser, b"400")
        self.assertIs(browser.producer, self.channel)
        self.assertIsNone(agent.transport.producer)


class ClosingAgent(UpgradingAgent):
    """:class:`UpgradingAgent` that tells its factory when its connection ends."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.agents.append(self)

    def connectionLost(self, reason: Any) -> None:
        self.factory.lost.callback(None)


class TunnelEnds(ForwardingSetup):
    """Either end of a real tunnel closes the other, over TCP and TLS."""

    @inlineCallbacks
    def tunnel(self, tls: bool) -> Any:
        factory = Factory.forProtocol(ClosingAgent)
        factory.heads, factory.agents, factory.lost = [], [], Deferred()
        self.manager.place_agent("alice", AgentAddress("127.0.0.1", self.listen(factory)))
        if tls:
            port = yield self.listen_tls()
            browser = yield self.connect_tls(port)
        else:
            browser = RawBrowser()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port),
                                  browser)
            self.addCleanup(browser.transport.loseConnection)
        browser.transport.write(
            b"GET /socket HTTP/1.1\r\nHost: x\r\nCookie: %spixelated-session=%s\r\n"
            b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            % (b"__Host-" if tls else b"", self.token.encode()))
        yield browser.wait_for(b"HELLO")
        browser.transport.write(b"ping")
        yield browser.wait_for(b"PING")
        return browser, factory

    @inlineCallbacks
    def agent_leaves(self, tls: bool) -> Any:
        browser, factory = yield self.tunnel(tls)
        agent = factory.agents[0]
        agent.transport.write(b"bye")
        agent.transport.loseConnection()
        received = yield browser.closed.addTimeout(5, reactor)
        self.assertTrue(received.endswith(b"PINGbye"), received[-50:])

    @inlineCallbacks
    def browser_leaves(self, tls: bool) -> Any:
        browser, factory = yield self.tunnel(tls)
        browser.transport.loseConnection()
        yield factory.lost.addTimeout(5, reactor)

    def test_the_agent_leaving_closes_the_browser(self) -> Any:
        return self.agent_leaves(tls=False)

    def test_the_agent_leaving_closes_the_browser_over_tls(self) -> Any:
        return self.agent_leaves(tls=True)

    def test_the_browser_leaving_closes_the_agent(self) -> Any:
        return self.browser_leaves(tls=False)

    def test_the_browser_leaving_closes_the_agent_over_tls(self) -> Any:
        return self.browser_leaves(tls=True)


#: Bytes one flood may write at most, and for how long.
FLOOD = 256 * 2 ** 20
FLOOD_SECONDS = 60.0
#: A write that waits this long counts as blocked: the flood is pushed back.
BLOCKED = 2.0
#: Peak RSS growth allowed in a flood: the two transport buffers of a tunnel
#: (512 KiB each) and a read, with room for the allocator.
TUNNEL_LIMIT = 16 * 2 ** 20
#: What a flood may write before it blocks: the kernel's socket buffers on
#: the way (both ends of two loopback connections), far below :data:`FLOOD`.
KERNEL_BUFFERS = 64 * 2 ** 20


def flood(sock: socket.socket) -> Tuple[int, bool]:
    """Write to ``sock`` until a write blocks for :data:`BLOCKED` seconds,
    :data:`FLOOD` bytes are out or :data:`FLOOD_SECONDS` passed; return the
    bytes written and whether it blocked."""
    chunk = memoryview(PATTERN * 16)  # 1 MiB
    sock.settimeout(BLOCKED)
    sent = 0
    deadline = time.monotonic() + FLOOD_SECONDS
    try:
        while sent < FLOOD and time.monotonic() < deadline:
            sent += sock.send(chunk)
    except socket.timeout:
        return sent, True
    return sent, False


def closed(sock: socket.socket, timeout: float = 10) -> bool:
    """Whether the peer closes ``sock`` within ``timeout`` seconds (whatever
    it still sends is read and dropped)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 20):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return False


class TunnelMemory(RealProxy):
    """A real proxy process between a client socket and an 'agent' that is
    this test: it answers ``101`` and then reads or writes only as told."""

    @classmethod
    def start_agent(cls, env: dict) -> int:
        cls.agent_listener = socket.socket()
        cls.agent_listener.bind(("127.0.0.1", 0))
        cls.agent_listener.listen(8)
        cls.agent_listener.settimeout(20)
        return cls.agent_listener.getsockname()[1]

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        listener = getattr(cls, "agent_listener", None)
        if listener is not None:
            listener.close()

    def open_tunnel(self) -> Tuple[socket.socket, socket.socket]:
        """A switched tunnel: the client's socket and the agent's."""
        client = self.connect()
        client.sendall(b"GET /socket HTTP/1.1\r\nHost: x\r\nCookie: %s\r\n"
                       b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
                       b"Sec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\n"
                       % self.cookie.encode())
        agent, _ = self.agent_listener.accept()
        self.addCleanup(agent.close)
        agent.settimeout(20)
        head = read_head(agent)
        self.assertIn(b"upgrade: websocket", head.lower())
        agent.sendall(SWITCHED)
        head = read_head(client)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        return client, agent

    def baseline(self) -> int:
        """Warm the tunnel path up once; the proxy's RSS now, and the peak
        from now on."""
        client, agent = self.open_tunnel()
        client.sendall(b"ping")
        self.assertEqual(agent.recv(4), b"ping")
        agent.sendall(b"pong")
        self.assertEqual(client.recv(4), b"pong")
        agent.close()
        self.assertTrue(closed(client))
        before = status_kib(self.proxy.pid, "VmRSS") * 1024
        reset_peak(self.proxy.pid)
        return before

    def assert_pushed_back(self, sender: socket.socket, before: int) -> None:
        sent, blocked = flood(sender)
        sys.stderr.write("[%s: %.1f MiB written before the writes blocked] "
                         % (self.id().rsplit(".", 1)[-1], sent / 2 ** 20))
        grown = self.grown(before)
        self.assertTrue(blocked, "%d MiB written without blocking" % (sent >> 20))
        self.assertLess(sent, KERNEL_BUFFERS, "%d MiB written" % (sent >> 20))
        self.assertLess(grown, TUNNEL_LIMIT, "peak RSS grew by %d MiB" % (grown >> 20))

    def test_client_floods_an_agent_that_does_not_read(self) -> None:
        before = self.baseline()
        client, agent = self.open_tunnel()
        self.assert_pushed_back(client, before)
        agent.close()  # the agent's end ends the tunnel, even with the client paused
        self.assertTrue(closed(client), "the client's connection stayed open")

    def test_agent_floods_a_client_that_does_not_read(self) -> None:
        before = self.baseline()
        client, agent = self.open_tunnel()
        self.assert_pushed_back(agent, before)
        client.close()  # the client's end ends the tunnel, even with the agent paused
        self.assertTrue(closed(agent), "the agent's connection stayed open")
