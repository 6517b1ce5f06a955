"""An in-memory agent firewall for fast provider and manager tests.

It keeps the books an nftables table keeps (entries, networks, whether the
table exists) in a ``kernel`` dict that outlives one FakeFirewall as the
kernel's tables outlive a manager, and records every call so a test can
check their order (an agent's port protected before it is spawned). It
passes :mod:`.agent_firewall_contract` like the real
``NftablesFirewall``.
"""
from typing import Iterable, List, Set, Tuple

import attr
from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from ..manager.agent_firewall import (Endpoint, FirewallError, IAgentFirewall,
                                      check_endpoint, check_network)


@attr.s(auto_attribs=True, eq=False)
class _FakeTable:
    entries: Set[Endpoint] = attr.ib(factory=set)
    granted: Set[Endpoint] = attr.ib(factory=set)
    networks: Set[str] = attr.ib(factory=set)
    gateways: Set[str] = attr.ib(factory=set)


@implementer(IAgentFirewall)
@attr.s(auto_attribs=True, eq=False)
class FakeFirewall:
    """The in-memory firewall of unit tests; passes the contract suite
    (:mod:`.agent_firewall_contract`) like :class:`NftablesFirewall`.
    ``kernel`` (table name -> table) outlives a FakeFirewall as the
    kernel's tables outlive a manager."""

    table: str = "fake"
    kernel: dict = attr.ib(factory=dict)
    #: every call, for tests that check the order (protect before spawn)
    calls: List[Tuple] = attr.ib(factory=list)
    enforcing = True

    @property
    def _table(self) -> _FakeTable:
        if self.table not in self.kernel:
            raise FirewallError("the table %s does not exist" % (self.table,))
        return self.kernel[self.table]

    def start(self) -> Deferred:
        self.calls.append(("start",))
        self.kernel.setdefault(self.table, _FakeTable())
        return defer.succeed(None)

    def protect(self, host: str, port: int) -> Deferred:
        self.calls.append(("protect", host, port))

        def protect() -> None:
            endpoint = check_endpoint(host, port)
            self._table.entries.add(endpoint)
            self._table.granted.discard(endpoint)  # a new agent's port: nobody's grant
        return defer.maybeDeferred(protect)

    def release(self, host: str, port: int) -> Deferred:
        self.calls.append(("release", host, port))

        def release() -> None:
            endpoint = check_endpoint(host, port)
            if self.table in self.kernel:
                self._table.entries.discard(endpoint)
                self._table.granted.discard(endpoint)
        return defer.maybeDeferred(release)

    def grant(self, host: str, port: int) -> Deferred:
        self.calls.append(("grant", host, port))
        return defer.maybeDeferred(lambda: self._table.granted.add(check_endpoint(host, port)))

    def revoke(self, host: str, port: int) -> Deferred:
        self.calls.append(("revoke", host, port))
        return defer.maybeDeferred(
            lambda: self._table.granted.discard(check_endpoint(host, port)))

    def granted(self) -> Deferred:
        return defer.maybeDeferred(lambda: set(self._table.granted))

    def protect_network(self, subnet: str, gateway: str) -> Deferred:
        self.calls.append(("protect_network", subnet, gateway))

        def protect() -> None:
            network, gateway_address = check_network(subnet, gateway)
            self._table.networks.add(network)
            self._table.gateways.add(gateway_address)
        return defer.maybeDeferred(protect)

    def retain_only(self, endpoints: Iterable[Endpoint]) -> Deferred:
        def retain() -> None:
            keep = {check_endpoint(host, port) for host, port in endpoints}
            self.calls.append(("retain_only", keep))
            self._table.entries &= keep
            self._table.granted &= keep
        return defer.maybeDeferred(retain)

    def entries(self) -> Deferred:
        return defer.maybeDeferred(lambda: set(self._table.entries))

    def networks(self) -> Deferred:
        return defer.maybeDeferred(lambda: set(self._table.networks))

    def close(self, keep: bool) -> Deferred:
        self.calls.append(("close", keep))
        if not keep:
            self.kernel.pop(self.table, None)
        return defer.succeed(None)
