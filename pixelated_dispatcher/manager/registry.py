"""Users and their password hashes, kept in the manager's SQLite database.

Every name is checked against the one user name rule before it reaches the
database; every password is hashed or verified in the hashing pool.
"""
import sqlite3
from typing import Any, Generator, List, Optional

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime

from ..protocol import InvalidUsername, UnknownUser, UserExists
from ..usernames import InvalidUsernameError, check_username, is_valid_username
from .database import Database
from .passwords import PasswordHasher


def _checked(username: str) -> str:
    try:
        return check_username(username)
    except InvalidUsernameError as error:
        raise InvalidUsername(str(error))


class UserRegistry:
    """Adds, removes, lists and authenticates users."""

    def __init__(self, database: Database, hasher: PasswordHasher, clock: IReactorTime) -> None:
        self._database = database
        self._hasher = hasher
        self._clock = clock

    @inlineCallbacks
    def add(self, username: str, password: str) -> Generator[Deferred, Any, None]:
        """Add a user; fails with InvalidUsername or UserExists."""
        _checked(username)
        if (yield self.exists(username)):
            raise UserExists("user %s exists already" % (username,))
        encoded = yield self._hasher.hash(password)
        yield self.add_with_hash(username, encoded)

    @inlineCallbacks
    def remove(self, username: str) -> Generator[Deferred, Any, None]:
        """Remove a user and (by cascade) their sessions; fails with UnknownUser."""
        _checked(username)
        removed = yield self._database.run(
            lambda c: c.execute("DELETE FROM users WHERE username = ?", (username,)).rowcount)
        if not removed:
            raise UnknownUser("no user named %s" % (username,))

    @inlineCallbacks
    def set_password(self, username: str, password: str) -> Generator[Deferred, Any, None]:
        _checked(username)
        encoded = yield self._hasher.hash(password)
        changed = yield self._database.run(
            lambda c: c.execute("UPDATE users SET password_hash = ? WHERE username = ?",
                                (encoded, username)).rowcount)
        if not changed:
            raise UnknownUser("no user named %s" % (username,))

    def exists(self, username: str) -> "Deferred[bool]":
        return self._database.run(
            lambda c: c.execute("SELECT 1 FROM users WHERE username = ?",
                                (username,)).fetchone() is not None)

    @inlineCallbacks
    def require(self, username: str) -> Generator[Deferred, Any, None]:
        """Fail with InvalidUsername or UnknownUser unless the user exists."""
        _checked(username)
        if not (yield self.exists(username)):
            raise UnknownUser("no user named %s" % (username,))

    def usernames(self, after: str = "", limit: int = -1) -> "Deferred[List[str]]":
        """User names in order, the first ``limit`` (all: -1) after ``after``."""
        return self._database.run(
            lambda c: [row[0] for row in c.execute(
                "SELECT username FROM users WHERE username > ? ORDER BY username LIMIT ?",
                (after, limit))])

    def count(self) -> "Deferred[int]":
        return self._database.run(lambda c: c.execute("SELECT COUNT(*) FROM users").fetchone()[0])

    def stored_hash(self, username: str) -> "Deferred[Optional[str]]":
        return self._database.run(lambda c: _hash_of(c, username))

    def add_with_hash(self, username: str, encoded: str) -> Deferred:
        """Add a user whose password hash comes from elsewhere (``import-legacy``)."""
        _checked(username)
        created = self._clock.seconds()

        def insert(connection: sqlite3.Connection) -> None:
            try:
                connection.execute(
                    "INSERT INTO users (username, password_hash, created) VALUES (?, ?, ?)",
                    (username, encoded, created))
            except sqlite3.IntegrityError:
                raise UserExists("user %s exists already" % (username,))
        return self._database.run(insert)

    @inlineCallbacks
    def verify(self, username: str, password: str) -> Generator[Deferred, Any, bool]:
        """Deferred firing True if the password is right.

        Unknown and invalid names take as long as a wrong password, so that
        timing does not tell which names exist.
        """
        encoded: Optional[str] = None
        if is_valid_username(username):
            encoded = yield self._database.run(lambda c: _hash_of(c, username))
        ok = yield self._hasher.verify(encoded, password)
        if ok and encoded is not None and self._hasher.needs_rehash(encoded):
            yield self.set_password(username, password)
        return ok


def _hash_of(connection: sqlite3.Connection, username: str) -> Optional[str]:
    row = connection.execute(
        "SELECT password_hash FROM users WHERE username = ?", (username,)).fetchone()
    return row[0] if row else None


