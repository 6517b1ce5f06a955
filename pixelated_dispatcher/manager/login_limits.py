"""Brute-force protection: exponential backoff after repeated failed logins.

Failures are counted per user name and per client address separately, so
that one address cannot try many names and many addresses cannot hammer one
name. After ``free_failures`` failures of a key, each further attempt must
wait ``base * 2**(failures - free_failures)`` seconds (at most ``maximum``)
after the last failure. A success clears both keys. Counters are forgotten
once a key has been quiet for ``maximum`` seconds, and the table is bounded,
so a flood of random names cannot exhaust memory.
"""
from collections import OrderedDict
from typing import Optional, Tuple

import attr


@attr.s(auto_attribs=True)
class _Record:
    failures: int
    last_failure: float


class LoginLimiter:

    def __init__(self, clock, free_failures: int = 5, base: float = 1.0,
                 maximum: float = 900.0, max_keys: int = 100_000) -> None:
        self._clock = clock
        self.free_failures = free_failures
        self.base = base
        self.maximum = maximum
        self._max_keys = max_keys
        self._records: "OrderedDict[Tuple[str, str], _Record]" = OrderedDict()

    def wait_for(self, username: str, client: str) -> float:
        """Seconds until an attempt of ``username`` from ``client`` is allowed (0: now)."""
        now = self._clock.seconds()
        return max(self._wait(("user", username), now), self._wait(("client", client), now))

    def failed(self, username: str, client: str) -> None:
        now = self._clock.seconds()
        for key in (("user", username), ("client", client)):
            record = self._fresh(key, now)
            if record is None:
                record = _Record(0, now)
            record.failures += 1
            record.last_failure = now
            self._records[key] = record
            self._records.move_to_end(key)
        while len(self._records) > self._max_keys:
            self._records.popitem(last=False)

    def succeeded(self, username: str, client: str) -> None:
        self._records.pop(("user", username), None)
        self._records.pop(("client", client), None)

    def _fresh(self, key, now) -> Optional[_Record]:
        record = self._records.get(key)
        if record is not None and now - record.last_failure > self.maximum:
            del self._records[key]
            return None
        return record

    def _wait(self, key, now) -> float:
        record = self._fresh(key, now)
        if record is None or record.failures < self.free_failures:
            return 0.0
        delay = min(self.maximum, self.base * 2 ** (record.failures - self.free_failures))
        return max(0.0, record.last_failure + delay - now)
