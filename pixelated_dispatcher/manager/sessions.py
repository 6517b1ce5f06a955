"""Login sessions, kept in SQLite so that restarting either daemon logs nobody out.

The browser holds an opaque random token (256 bits); the database holds only
its SHA-256, so a copy of the database does not give away live sessions.
Next to it, each row keeps what the user's agent needs to start, sealed under
that token (``sealed_credentials``): deleting the row, however a session
ends, destroys the record with it.
A session ends on logout, when revoked, after ``idle_timeout`` seconds
without use, or ``max_age`` seconds after login, whichever comes first.
"""
import hashlib
import secrets
import sqlite3
from typing import List, Optional, Set, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from ..protocol import InvalidSession
from .database import Database

#: Do not rewrite ``last_seen`` more often than this (keeps lookups read-only).
_TOUCH_INTERVAL = 60.0


def new_token() -> str:
    """A fresh session token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


#: Seconds a session may go unused before it ends (``--session-idle-timeout``).
SESSION_IDLE_TIMEOUT = 24 * 3600.0
#: Seconds after login a session ends however much it is used (``--session-max-age``).
SESSION_MAX_AGE = 7 * 24 * 3600.0


class SessionStore:

    def __init__(self, database: Database, clock: IReactorTime,
                 idle_timeout: float = SESSION_IDLE_TIMEOUT,
                 max_age: float = SESSION_MAX_AGE) -> None:
        self._database = database
        self._clock = clock
        self.idle_timeout = idle_timeout
        self.max_age = max_age

    def create(self, username: str, client: str = "", token: Optional[str] = None,
               sealed_credentials: Optional[bytes] = None) -> "Deferred[str]":
        """A new session for ``username``; fires with its token (``token``
        if given: one from :func:`new_token` that the credentials were
        sealed under)."""
        token = token or new_token()
        now = self._clock.seconds()

        def insert(connection: sqlite3.Connection) -> str:
            connection.execute(
                "INSERT INTO sessions (token_hash, username, created, last_seen, client,"
                " sealed_credentials) VALUES (?, ?, ?, ?, ?, ?)",
                (_digest(token), username, now, now, client[:200], sealed_credentials))
            return token
        return self._database.run(insert)

    def sealed_credentials(self, token: str) -> "Deferred[Optional[bytes]]":
        """The sealed record of a session (None: a session opened before
        records were sealed); fails with InvalidSession when the session is
        gone (ended since the caller resolved it)."""
        digest = _digest(token)

        def lookup(connection: sqlite3.Connection) -> Tuple[bool, Optional[bytes]]:
            row = connection.execute(
                "SELECT sealed_credentials FROM sessions WHERE token_hash = ?",
                (digest,)).fetchone()
            if row is None:
                return False, None
            return True, (bytes(row[0]) if row[0] is not None else None)

        def check(found: Tuple[bool, Optional[bytes]]) -> Optional[bytes]:
            if not found[0]:
                raise InvalidSession("no such session, or it has expired")
            return found[1]
        return self._database.run(lookup).addCallback(check)

    def resolve(self, token: str) -> "Deferred[str]":
        """The user name of a live session, or fail with InvalidSession."""
        now = self._clock.seconds()
        digest = _digest(token)

        def lookup(connection: sqlite3.Connection) -> Optional[str]:
            # Answers None rather than raising: raising would roll back the
            # deletion of an expired session.
            row = connection.execute(
                "SELECT username, created, last_seen FROM sessions WHERE token_hash = ?",
                (digest,)).fetchone()
            if row is None:
                return None
            username, created, last_seen = row
            if now - created > self.max_age or now - last_seen > self.idle_timeout:
                connection.execute("DELETE FROM sessions WHERE token_hash = ?", (digest,))
                return None
            if now - last_seen > _TOUCH_INTERVAL:
                connection.execute("UPDATE sessions SET last_seen = ? WHERE token_hash = ?",
                                   (now, digest))
            return username

        def check(username: Optional[str]) -> str:
            if username is None:
                raise InvalidSession("no such session, or it has expired")
            return username
        return self._database.run(lookup).addCallback(check)

    def end(self, token: str) -> "Deferred[str]":
        """End one session; fires with its user name, or fails with InvalidSession."""
        digest = _digest(token)

        def delete(connection: sqlite3.Connection) -> Optional[str]:
            row = connection.execute("SELECT username FROM sessions WHERE token_hash = ?",
                                     (digest,)).fetchone()
            connection.execute("DELETE FROM sessions WHERE token_hash = ?", (digest,))
            return row[0] if row else None

        def check(username: Optional[str]) -> str:
            if username is None:
                raise InvalidSession("no such session")
            return username
        return self._database.run(delete).addCallback(check)

    def end_all(self, username: str) -> "Deferred[int]":
        """End every session of ``username``; fires with how many there were."""
        return self._database.run(
            lambda c: c.execute("DELETE FROM sessions WHERE username = ?", (username,)).rowcount)

    def count(self, username: Optional[str] = None) -> "Deferred[int]":
        """Live (not yet purged) sessions of one user, or of everybody."""
        if username is None:
            return self._database.run(
                lambda c: c.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])
        return self._database.run(
            lambda c: c.execute("SELECT COUNT(*) FROM sessions WHERE username = ?",
                                (username,)).fetchone()[0])

    def of_user(self, username: str) -> "Deferred[List[Tuple[float, float, str]]]":
        """``(created, last_seen, client)`` of the user's live sessions, oldest first."""
        now = self._clock.seconds()
        return self._database.run(lambda c: c.execute(
            "SELECT created, last_seen, client FROM sessions WHERE username = ?"
            " AND created >= ? AND last_seen >= ? ORDER BY created",
            (username, now - self.max_age, now - self.idle_timeout)).fetchall())

    def has_live(self, username: str) -> "Deferred[bool]":
        """Whether ``username`` has a session that has not expired."""
        now = self._clock.seconds()
        return self._database.run(lambda c: c.execute(
            "SELECT 1 FROM sessions WHERE username = ? AND created >= ? AND last_seen >= ?"
            " LIMIT 1", (username, now - self.max_age, now - self.idle_timeout)
        ).fetchone() is not None)

    def live_users(self) -> "Deferred[Set[str]]":
        """The users who have a session that has not expired."""
        now = self._clock.seconds()
        return self._database.run(lambda c: {row[0] for row in c.execute(
            "SELECT DISTINCT username FROM sessions WHERE created >= ? AND last_seen >= ?",
            (now - self.max_age, now - self.idle_timeout))})

    def users(self) -> "Deferred[Set[str]]":
        """The users who have a session (not yet purged)."""
        return self._database.run(lambda c: {row[0] for row in c.execute(
            "SELECT DISTINCT username FROM sessions")})

    def purge_expired(self) -> "Deferred[int]":
        """Delete expired sessions; fires with how many."""
        now = self._clock.seconds()
        return self._database.run(
            lambda c: c.execute(
                "DELETE FROM sessions WHERE created < ? OR last_seen < ?",
                (now - self.max_age, now - self.idle_timeout)).rowcount)
