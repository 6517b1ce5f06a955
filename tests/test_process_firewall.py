"""The process provider and the agent firewall, and readiness that counts
only the agent itself (not a squatter on its port)."""
import socket
import threading

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from pixelated_dispatcher.manager.providers.agent_ports import PortRange
from pixelated_dispatcher.manager.providers.interface import AgentStartError
from pixelated_dispatcher.testing.fake_firewall import FakeFirewall
from pixelated_dispatcher.testing.provider_contract import credentials_for

from .process_fixtures import IsolatedFixture, ProcessFixture, agent_url, http_get, require_root


class FirewalledFixture(ProcessFixture):
    """Providers that share one fake kernel table, as managers on one host."""

    def __init__(self, test_case, **options):
        self.kernel = {}
        self.firewalls = []
        super().__init__(test_case, **options)

    def new_provider(self, keep_on_close, **options):
        firewall = FakeFirewall("t", self.kernel)
        self.firewalls.append(firewall)
        return super().new_provider(keep_on_close, firewall=firewall, **options)

    def entries(self):
        table = self.kernel.get("t")
        return None if table is None else set(table.entries)


class ProcessProviderFirewallTests(TestCase):
    timeout = 30

    def start(self, provider, username="alice"):
        return provider.start(username, self.f.data_dir(username), credentials_for(username))

    @inlineCallbacks
    def test_a_port_is_protected_before_the_agent_exists_and_released_after_it_ended(self):
        self.f = FirewalledFixture(self, agent_ports=PortRange(21000, 21999))
        provider = self.f.provider
        yield provider.recover()
        agent = yield self.start(provider)
        port = agent.address.port
        self.assertIn(port, range(21000, 22000))
        firewall = self.f.firewalls[0]
        self.assertEqual(firewall.calls[:3], [("start",), ("retain_only", set()),
                                              ("protect", "127.0.0.1", port)])
        self.assertEqual(self.f.entries(), {("127.0.0.1", port)})
        yield provider.stop("alice")
        self.assertEqual(self.f.entries(), set())
        yield provider.close()
        self.assertIsNone(self.f.entries())  # no agents kept: the table is gone

    @inlineCallbacks
    def test_handed_over_agents_keep_their_entries_and_are_the_only_ones_after_recovery(self):
        self.f = FirewalledFixture(self)
        first = self.f.new_provider(keep_on_close=True)
        yield first.recover()
        agent = yield self.start(first)
        yield first.firewall.protect("127.0.0.1", 29999)  # a stale entry of a crash
        yield first.close()
        self.assertEqual(first.firewall.calls[-1], ("close", True))
        endpoint = ("127.0.0.1", agent.address.port)
        self.assertEqual(self.f.entries(), {endpoint, ("127.0.0.1", 29999)})
        second = self.f.new_provider(keep_on_close=False)
        self.assertEqual((yield second.recover()), [agent])
        self.assertEqual(self.f.entries(), {endpoint})
        yield second.close()
        self.assertIsNone(self.f.entries())

    @inlineCallbacks
    def test_a_port_the_firewall_cannot_protect_starts_no_agent(self):
        self.f = FirewalledFixture(self)
        # recover() never ran: the table does not exist
        error = yield self.assertFailure(self.start(self.f.provider), AgentStartError)
        self.assertIn("could not be closed to other local users", str(error))
        self.assertEqual(self.f.live_agents("alice"), 0)


class _Squatter:
    """Listens on a port as the test's uid (root) and answers HTTP."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = self.socket.getsockname()[1]
        self.served = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.served += 1
            connection.sendall(b"HTTP/1.0 200 OK\r\n\r\nSQUATTED")
            connection.close()

    def close(self):
        self.socket.close()


class SquatterTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_an_answer_from_another_uid_is_not_the_agent(self):
        require_root(self)
        squatter = _Squatter()
        self.addCleanup(squatter.close)
        offered = iter([squatter.port])
        self.f = IsolatedFixture(self, choose_port=lambda: next(offered, None))
        yield self.f.provider.recover()
        agent = yield self.f.provider.start("alice", self.f.data_dir("alice"),
                                            credentials_for("alice"))
        self.assertGreater(squatter.served, 0, "the squatter was never asked: no proof")
        self.assertNotEqual(agent.address.port, squatter.port)
        code, body = yield http_get(agent_url(agent))
        self.assertIn(b"Mailbox of alice", body)
