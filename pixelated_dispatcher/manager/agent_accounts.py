"""A Unix uid and gid of its own for each user's agent.

Agents never run as root, and never as each other: each user gets the next
free uid of ``--agent-uid-range`` (gid = uid), recorded in the database so
that it stays the same across restarts. A uid is released only when the user
is purged, so that files left by a removed user are never readable by a new
user who happens to get the same number.
"""
import sqlite3
from typing import Tuple

import attr
from twisted.internet.defer import Deferred

from .database import Database


class UidRangeExhausted(Exception):
    """Every uid of the configured range is taken."""


@attr.s(frozen=True, auto_attribs=True)
class UidRange:
    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> "UidRange":
        """``"200000-299999"`` → UidRange(200000, 299999); refuses root and system ids."""
        try:
            first, last = (int(part) for part in text.split("-", 1))
        except ValueError:
            raise ValueError("a uid range looks like 200000-299999, not %r" % (text,))
        if not 1000 <= first <= last < 2 ** 31 - 1:
            raise ValueError("the uid range %r must lie within 1000-2147483646" % (text,))
        return cls(first, last)


class AgentAccounts:

    def __init__(self, database: Database, uids: UidRange) -> None:
        self._database = database
        self.uids = uids

    def account_for(self, username: str) -> "Deferred[Tuple[int, int]]":
        """The ``(uid, gid)`` of ``username``'s agent, allocated at first use."""
        def allocate(connection: sqlite3.Connection) -> Tuple[int, int]:
            row = connection.execute("SELECT uid FROM agent_accounts WHERE username = ?",
                                     (username,)).fetchone()
            if row is None:
                (highest,) = connection.execute(
                    "SELECT MAX(uid) FROM agent_accounts WHERE uid BETWEEN ? AND ?",
                    (self.uids.first, self.uids.last)).fetchone()
                uid = self.uids.first if highest is None else highest + 1
                if uid > self.uids.last:
                    raise UidRangeExhausted("every uid of %d-%d is taken"
                                            % (self.uids.first, self.uids.last))
                connection.execute("INSERT INTO agent_accounts (uid, username) VALUES (?, ?)",
                                   (uid, username))
                row = (uid,)
            return row[0], row[0]
        return self._database.run(allocate)

    def release(self, username: str) -> Deferred:
        """Forget the uid of a purged user."""
        return self._database.run(
            lambda c: c.execute("DELETE FROM agent_accounts WHERE username = ?", (username,)))
