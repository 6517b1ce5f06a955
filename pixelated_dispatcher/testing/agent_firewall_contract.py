"""What every IAgentFirewall must do, as one suite for the nftables firewall
and the in-memory fake (flocker's verified fakes, as in provider_contract).

``make_firewall_tests(fixture_factory)`` returns a TestCase base class; the
fixture has ``firewall``, ``same_firewall()`` (the same table seen by a
restarted manager), ``new_firewall()`` (another manager's: its own table)
and ``table_exists()`` (a Deferred), and cleans up what it made.
"""
from typing import Any, Callable

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from pixelated_dispatcher.manager.agent_firewall import FirewallError, IAgentFirewall


def make_firewall_tests(fixture_factory: Callable[[TestCase], Any]) -> type:

    class FirewallContractTests(TestCase):
        timeout = 30

        def setUp(self) -> Any:
            self.f = fixture_factory(self)
            self.firewall = self.f.firewall

        def test_provides_the_interface(self) -> Any:
            self.assertTrue(verifyObject(IAgentFirewall, self.firewall))
            self.assertTrue(self.firewall.enforcing)

        @inlineCallbacks
        def test_protected_endpoints_are_listed_until_released(self) -> Any:
            yield self.firewall.start()
            self.assertEqual((yield self.firewall.entries()), set())
            yield self.firewall.protect("127.0.0.1", 20001)
            yield self.firewall.protect("127.0.0.1", 20002)
            self.assertEqual((yield self.firewall.entries()),
                             {("127.0.0.1", 20001), ("127.0.0.1", 20002)})
            yield self.firewall.release("127.0.0.1", 20001)
            self.assertEqual((yield self.firewall.entries()), {("127.0.0.1", 20002)})

        @inlineCallbacks
        def test_releasing_twice_or_what_was_never_protected_is_no_error(self) -> Any:
            yield self.firewall.start()
            yield self.firewall.release("127.0.0.1", 20003)
            yield self.firewall.protect("127.0.0.1", 20003)
            yield self.firewall.release("127.0.0.1", 20003)
            yield self.firewall.release("127.0.0.1", 20003)
            self.assertEqual((yield self.firewall.entries()), set())

        @inlineCallbacks
        def test_calls_apply_in_the_order_they_were_made(self) -> Any:
            yield self.firewall.start()
            first = self.firewall.protect("127.0.0.1", 20004)
            second = self.firewall.release("127.0.0.1", 20004)
            third = self.firewall.protect("127.0.0.1", 20005)
            yield first
            yield second
            yield third
            self.assertEqual((yield self.firewall.entries()), {("127.0.0.1", 20005)})

        @inlineCallbacks
        def test_nothing_is_protected_before_the_table_exists(self) -> Any:
            yield self.assertFailure(self.firewall.protect("127.0.0.1", 20006), FirewallError)

        @inlineCallbacks
        def test_bad_endpoints_are_refused(self) -> Any:
            yield self.firewall.start()
            for host, port in (("localhost", 20007), ("::1", 20007), ("127.0.0.1", 0),
                               ("127.0.0.1", 70000), ("127.0.0.1; drop", 1)):
                yield self.assertFailure(self.firewall.protect(host, port), FirewallError)
            self.assertEqual((yield self.firewall.entries()), set())

        @inlineCallbacks
        def test_a_restarted_manager_repairs_the_table_and_keeps_the_agents(self) -> Any:
            yield self.firewall.start()
            yield self.firewall.protect("127.0.0.1", 20008)
            yield self.firewall.close(keep=True)
            self.assertEqual((yield self.firewall.entries()), {("127.0.0.1", 20008)})
            again = self.f.same_firewall()
            yield again.start()
            self.assertEqual((yield again.entries()), {("127.0.0.1", 20008)})

        @inlineCallbacks
        def test_after_recovery_only_the_adopted_agents_stay(self) -> Any:
            yield self.firewall.start()
            for port in (20009, 20010, 20011):
                yield self.firewall.protect("127.0.0.1", port)
            yield self.firewall.retain_only([("127.0.0.1", 20010)])
            self.assertEqual((yield self.firewall.entries()), {("127.0.0.1", 20010)})
            yield self.firewall.retain_only([])
            self.assertEqual((yield self.firewall.entries()), set())

        @inlineCallbacks
        def test_closing_without_agents_removes_everything(self) -> Any:
            yield self.firewall.start()
            yield self.firewall.protect("127.0.0.1", 20012)
            yield self.firewall.protect_network("198.18.32.0/24", "198.18.32.1")
            yield self.firewall.close(keep=False)
            self.assertEqual((yield self.f.table_exists()), False)
            yield self.firewall.close(keep=False)  # twice: no error

        @inlineCallbacks
        def test_two_managers_never_touch_each_others_entries(self) -> Any:
            other = self.f.new_firewall()
            yield self.firewall.start()
            yield other.start()
            yield self.firewall.protect("127.0.0.1", 20013)
            yield other.protect("127.0.0.1", 20014)
            yield other.retain_only([])
            self.assertEqual((yield self.firewall.entries()), {("127.0.0.1", 20013)})
            yield other.close(keep=False)
            self.assertEqual((yield self.firewall.entries()), {("127.0.0.1", 20013)})

        @inlineCallbacks
        def test_granted_endpoints_are_listed_until_revoked(self) -> Any:
            yield self.firewall.start()
            self.assertEqual((yield self.firewall.granted()), set())
            for port in (20015, 20016):
                yield self.firewall.protect("127.0.0.1", port)
                yield self.firewall.grant("127.0.0.1", port)
            self.assertEqual((yield self.firewall.granted()),
                             {("127.0.0.1", 20015), ("127.0.0.1", 20016)})
            yield self.firewall.revoke("127.0.0.1", 20015)
            yield self.firewall.revoke("127.0.0.1", 20015)  # twice: no error
            yield self.firewall.revoke("127.0.0.1", 20017)  # never granted: no error
            self.assertEqual((yield self.firewall.granted()), {("127.0.0.1", 20016)})
            self.assertEqual((yield self.firewall.entries()),
                             {("127.0.0.1", 20015), ("127.0.0.1", 20016)},
                             "a revocation leaves the agent protected")

        @inlineCallbacks
        def test_a_grant_goes_with_its_agent_and_never_passes_to_the_next(self) -> Any:
            yield self.firewall.start()
            yield self.firewall.protect("127.0.0.1", 20018)
            yield self.firewall.grant("127.0.0.1", 20018)
            yield self.firewall.release("127.0.0.1", 20018)
            self.assertEqual((yield self.firewall.granted()), set())
            # a grant made late (the agent ended while it was answered) ...
            yield self.firewall.grant("127.0.0.1", 20018)
            # ... is gone once the port is protected for the next agent
            yield self.firewall.protect("127.0.0.1", 20018)
            self.assertEqual((yield self.firewall.granted()), set())

        @inlineCallbacks
        def test_grants_are_kept_over_a_restart_and_trimmed_to_the_adopted(self) -> Any:
            yield self.firewall.start()
            for port in (20019, 20020):
                yield self.firewall.protect("127.0.0.1", port)
                yield self.firewall.grant("127.0.0.1", port)
            yield self.firewall.close(keep=True)
            again = self.f.same_firewall()
            yield again.start()
            self.assertEqual((yield again.granted()),
                             {("127.0.0.1", 20019), ("127.0.0.1", 20020)})
            yield again.retain_only([("127.0.0.1", 20020)])
            self.assertEqual((yield again.granted()), {("127.0.0.1", 20020)})

        @inlineCallbacks
        def test_bad_grants_are_refused_and_nothing_is_granted_without_a_table(self) -> Any:
            yield self.assertFailure(self.firewall.grant("127.0.0.1", 20021), FirewallError)
            yield self.firewall.start()
            for host, port in (("localhost", 20021), ("127.0.0.1", 0), ("127.0.0.1; x", 1)):
                yield self.assertFailure(self.firewall.grant(host, port), FirewallError)
                yield self.assertFailure(self.firewall.revoke(host, port), FirewallError)
            self.assertEqual((yield self.firewall.granted()), set())

        @inlineCallbacks
        def test_agents_networks_are_listed(self) -> Any:
            yield self.firewall.start()
            yield self.firewall.protect_network("198.18.33.0/24", "198.18.33.1")
            self.assertEqual((yield self.firewall.networks()), {"198.18.33.0/24"})
            yield self.assertFailure(self.firewall.protect_network("not a net", "198.18.33.1"),
                                     FirewallError)

    return FirewallContractTests
