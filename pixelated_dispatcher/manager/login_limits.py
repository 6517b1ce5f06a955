"""Brute-force protection: exponential backoff after repeated failed logins,
without handing attackers a way to lock a user out from everywhere.

Failures are counted under three keys:

* *(name, client network)*: the client's /24 (IPv4) or /64 (IPv6). After
  ``free_failures`` failures each further attempt for that name from that
  network waits ``base * 2**(failures - free_failures)`` seconds (at most
  ``maximum``) after the last failure. An attacker hammering alice's name
  from one network slows down alice's logins from that network only.
* *client address*: the same backoff, so that one address cannot try many
  names (password spraying).
* *name*, over all networks: the same backoff, but only after
  ``global_free_failures`` (much more than ``free_failures``): the ceiling on
  what a distributed attacker gets against one name. This count drains by
  one every ``global_drain`` seconds (half of ``maximum``), faster than one
  network may try once its backoff is at its maximum, so that one network,
  however long it keeps trying, never lifts alice's count to the ceiling:
  only many networks together do. The ceiling does not apply from a network
  the name has logged in from in the last ``known_for`` seconds (30 days):
  those stay limited per network only, so a distributed attack against
  alice cannot keep her out of her usual networks.

A success clears the first two keys of the client that succeeded (not the
global one: an attacker's failures elsewhere still count) and marks its
network as known for the name. A key is
forgotten once it has been quiet for ``forget_after`` seconds (a day by
default: waiting for a key to be forgotten buys an attacker nothing within
the day), and the table holds at most ``max_keys`` keys (least recently
failed dropped first), so a flood of names cannot exhaust memory.

``bench/login_guesses.py`` measures the guesses per day an attacker gets.
"""
import ipaddress
from collections import OrderedDict
from typing import Any, Optional, Tuple

import attr

#: Prefix lengths of a client "network": one household, office or cloud host.
IPV4_PREFIX = 24
IPV6_PREFIX = 64

Key = Tuple[str, ...]


@attr.s(auto_attribs=True)
class _Record:
    failures: float
    last_failure: float


def client_network(client: str) -> str:
    """The network ``client`` (an IP address as the proxy reports it) belongs
    to: its /24 or /64; an IPv4-mapped IPv6 address counts as IPv4. Anything
    that is not an address (``"unix"``) is its own network."""
    try:
        address: Any = ipaddress.ip_address(client)
    except ValueError:
        return client
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = IPV4_PREFIX if address.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network((address, prefix), strict=False))


class LoginLimiter:
    """The backoff state of failed logins (domain logic, no I/O)."""

    def __init__(self, clock: Any, free_failures: int = 5, base: float = 1.0,
                 maximum: float = 900.0, max_keys: int = 100_000,
                 global_free_failures: Optional[int] = None,
                 forget_after: float = 86400.0,
                 global_drain: Optional[float] = None,
                 known_for: float = 30 * 86400.0) -> None:
        self._clock = clock
        self.free_failures = free_failures
        #: failures of one name, from anywhere, before the global backoff
        self.global_free_failures = (global_free_failures if global_free_failures is not None
                                     else 20 * free_failures)
        self.base = base
        self.maximum = maximum
        self.forget_after = max(forget_after, maximum)
        self.global_drain = global_drain if global_drain is not None else maximum / 2
        self.known_for = known_for
        self._max_keys = max_keys
        self._records: "OrderedDict[Key, _Record]" = OrderedDict()

    def _keys(self, username: str, client: str,
              now: float) -> Tuple[Tuple[Key, int], ...]:
        """The keys an attempt counts under, with the failures each allows."""
        network = client_network(client)
        keys: Tuple[Tuple[Key, int], ...] = (
            (("name-net", username, network), self.free_failures),
            (("client", client), self.free_failures))
        if self._fresh(("known", username, network), now) is None:
            keys += ((("name", username), self.global_free_failures),)
        return keys

    def wait_for(self, username: str, client: str) -> float:
        """Seconds until an attempt of ``username`` from ``client`` is allowed (0: now)."""
        now = self._clock.seconds()
        return max(self._wait(key, free, now)
                   for key, free in self._keys(username, client, now))

    def failed(self, username: str, client: str) -> None:
        now = self._clock.seconds()
        for key, _ in self._keys(username, client, now):
            record = self._fresh(key, now)
            if record is None:
                record = _Record(0, now)
            record.failures = self._level(key, record, now) + 1
            record.last_failure = now
            self._records[key] = record
            self._records.move_to_end(key)
        self._bound()

    def succeeded(self, username: str, client: str) -> None:
        now = self._clock.seconds()
        network = client_network(client)
        self._records.pop(("name-net", username, network), None)
        self._records.pop(("client", client), None)
        known = ("known", username, network)
        self._records[known] = _Record(0, now)
        self._records.move_to_end(known)
        self._bound()

    def _bound(self) -> None:
        while len(self._records) > self._max_keys:
            self._records.popitem(last=False)

    def _level(self, key: Key, record: _Record, now: float) -> float:
        """The failures of ``key`` that still count now (the global count
        drains over time; the others stay until forgotten)."""
        if key[0] != "name" or self.global_drain <= 0:
            return record.failures
        return max(0.0, record.failures - (now - record.last_failure) / self.global_drain)

    def _fresh(self, key: Key, now: float) -> Optional[_Record]:
        record = self._records.get(key)
        if record is None:
            return None
        if key[0] == "known":
            stale = now - record.last_failure > self.known_for
        else:
            stale = (now - record.last_failure > self.forget_after
                     or self._level(key, record, now) <= 0)
        if stale:
            del self._records[key]
            return None
        return record

    def _wait(self, key: Key, free: int, now: float) -> float:
        record = self._fresh(key, now)
        if record is None or record.failures < free:
            return 0.0
        exponent = min(int(record.failures) - free, 64)
        delay = min(self.maximum, self.base * 2 ** exponent)
        return max(0.0, record.last_failure + delay - now)
