"""The proxy's real site on a fake clock (``MemoryReactorClock``), logged in
as alice, with no sockets: the browser and the agent are
``StringTransport``\\ s and the test plays the agent byte by byte while
moving the clock (the ``--agent-timeout`` and tunnel tests)."""
from typing import Any, List, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.protocol import AgentAddress
from pixelated_dispatcher.proxy.agent_client import AgentConnection
from pixelated_dispatcher.testing.fake_manager import FakeManager
from pixelated_dispatcher.proxy.forwarding import StreamingForwarder
from pixelated_dispatcher.proxy.site import make_site


#: The timeout of the fast tests, in seconds of the fake clock.
TIMEOUT = 10.0
ALICE_AGENT = AgentAddress("127.0.0.1", 41001)


def log_lines(test: Any) -> List[str]:
    """The proxy's forwarding log lines while ``test`` runs."""
    lines: List[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace", "").startswith("pixelated_dispatcher.proxy"):
            lines.append(formatEvent(event))
    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


def header_lines(headers: dict) -> bytes:
    """``{"Name": "value"}`` as request header lines."""
    return b"".join(b"%s: %s\r\n" % (name.encode(), value.encode())
                    for name, value in headers.items())


class Agent:
    """The test's side of one connection from the proxy to the agent."""

    def __init__(self, connection: AgentConnection, transport: StringTransport) -> None:
        self.connection = connection
        self.transport = transport

    def received(self) -> bytes:
        return self.transport.value()

    def says(self, data: bytes) -> None:
        self.connection.dataReceived(data)

    def reads_a_piece(self) -> None:
        """The agent takes the next piece of a large request body."""
        self.transport.producer.resumeProducing()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting or self.transport.disconnected)


class ClockedProxy(SynchronousTestCase):
    """The proxy's site with ``--agent-timeout`` :data:`TIMEOUT` on a fake
    clock, logged in as alice; no sockets."""

    agent_timeout = TIMEOUT

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.manager = FakeManager()
        self.manager.add_user("alice", "a-secret")
        self.manager.place_agent("alice", ALICE_AGENT)
        self.token = self.manager.open_session("alice")
        self.forwarder = StreamingForwarder(self.clock, agent_timeout=self.agent_timeout)
        self.site = make_site(self.manager, self.clock, forwarder=self.forwarder)
        self.site.reactor = self.clock  # the browser connections' idle timeout too
        self.browsers = 0
        self.logged = log_lines(self)

    def browser(self, raw: bytes) -> StringTransport:
        """A new browser connection sending ``raw``; its transport collects
        the answer."""
        self.browsers += 1
        address = IPv4Address("TCP", "127.0.0.1", 50000 + self.browsers)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        if raw:
            channel.dataReceived(raw)
        self.channel = channel
        return transport

    def request(self, method: bytes = b"GET", path: bytes = b"/inbox",
                headers: Optional[dict] = None, body: bytes = b"") -> StringTransport:
        head = b"%s %s HTTP/1.1\r\nHost: mail.example.org\r\nCookie: pixelated-session=%s\r\n" % (
            method, path, self.token.encode())
        if body or method == b"POST":
            head += b"Content-Length: %d\r\n" % (len(body),)
        return self.browser(head + header_lines(headers or {}) + b"\r\n" + body)

    def agent_connects(self) -> Agent:
        """The proxy's next connection attempt to the agent succeeds."""
        self.assertTrue(self.clock.tcpClients, "the proxy did not connect to the agent")
        host, port, factory, _, _ = self.clock.tcpClients.pop(0)
        self.assertEqual((host, port), (ALICE_AGENT.host, ALICE_AGENT.port))
        connection = factory.buildProtocol(None)
        transport = StringTransport()
        connection.makeConnection(transport)
        return Agent(connection, transport)

    def agent_closes(self, agent: Agent) -> None:
        """What the reactor does after the proxy aborted an agent connection."""
        agent.connection.connectionLost(Failure(ConnectionAborted()))

    def agent_timers(self) -> List[Any]:
        """The timers the agent connections have running."""
        return [call for call in self.clock.getDelayedCalls()
                if isinstance(getattr(call.func, "__self__", None), AgentConnection)]

    def assert_answered(self, browser: StringTransport, code: bytes) -> bytes:
        answer = browser.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 " + code + b" "), answer[:300])
        return answer

    def assert_waiting(self, browser: StringTransport, agent: Agent) -> None:
        self.assertEqual(browser.value(), b"")
        self.assertFalse(agent.closed)
