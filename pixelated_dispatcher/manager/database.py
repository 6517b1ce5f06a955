"""The manager's SQLite database, used from one dedicated thread.

SQLite calls block, so they never run on the reactor thread. One thread owns
the one connection: statements are serialised (SQLite allows one writer
anyway) and the connection never crosses threads.

Jobs run in the order they were asked for, each in its own transaction, but
the hops between threads are shared: the database thread takes every job
waiting when it wakes and hands all their results back to the reactor in one
call. A hop (queue, wake-up, waker pipe, reactor wake-up) costs more than a
lookup by primary key; under load (many ``ResolveSession`` at once, see
``bench/scale``) batching them is what lets the socket answer thousands of
lookups per second.

The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS`
brings an older file up to date at start.
"""
import errno
import os
import sqlite3
import threading
from typing import Any, Callable, List, Optional, Tuple, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

#: Statements that bring schema version N to N+1, by index.
MIGRATIONS: List[str] = [
    """
    CREATE TABLE users (
        username      TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        created       REAL NOT NULL
    );
    CREATE TABLE sessions (
        token_hash BLOB PRIMARY KEY,
        username   TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
        created    REAL NOT NULL,
        last_seen  REAL NOT NULL,
        client     TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX sessions_by_user ON sessions(username);
    """,
    # 2: a Unix uid (and gid) per user for their agent; kept when a user is
    # removed without --purge, so that a re-added user finds their files.
    """
    CREATE TABLE agent_accounts (
        uid      INTEGER PRIMARY KEY,
        username TEXT NOT NULL UNIQUE
    );
    """,
    # 3: what the agent needs to start, sealed under the session's token
    # (sealed_credentials.py); NULL for sessions opened before.
    """
    ALTER TABLE sessions ADD COLUMN sealed_credentials BLOB;
    """,
]


#: what "no space left" looks like from SQLite and from the file system
_FULL_ERRNOS = frozenset([errno.ENOSPC, errno.EDQUOT])
_SQLITE_FULL = getattr(sqlite3, "SQLITE_FULL", 13)


def is_storage_full(error: BaseException) -> bool:
    """Whether ``error`` says the state directory's file system is full
    (SQLite's ``SQLITE_FULL``, or ENOSPC/EDQUOT from a file write): the
    write did not happen, and the caller should hear so rather than
    "internal error"."""
    if isinstance(error, sqlite3.OperationalError):
        code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
        return code == _SQLITE_FULL or "database or disk is full" in str(error)
    return isinstance(error, OSError) and error.errno in _FULL_ERRNOS


class Database:
    """Runs functions of a :class:`sqlite3.Connection` in the database thread."""

    def __init__(self, reactor: Any, path: str) -> None:
        self._reactor = reactor
        self._path = path
        self._pool: Optional[ThreadPool] = None
        self._connection: Optional[sqlite3.Connection] = None
        # Jobs asked for and not yet taken by the database thread; guarded
        # by the lock, like the flag saying a drain is queued or running.
        self._lock = threading.Lock()
        self._waiting: List[Tuple[Callable[[sqlite3.Connection], Any], Deferred]] = []
        self._draining = False

    def start(self) -> Deferred:
        """Open (creating or upgrading) the database; fires when ready."""
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="sqlite")
        self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, self._open)

    def stop(self) -> Deferred:
        pool = self._started_pool()

        def stopped(result: Any) -> Any:
            pool.stop()
            return result
        return deferToThreadPool(self._reactor, pool, self._close).addBoth(stopped)

    def _started_pool(self) -> ThreadPool:
        if self._pool is None:
            raise RuntimeError("the database is not started")
        return self._pool

    def run(self, function: Callable[[sqlite3.Connection], T]) -> "Deferred[T]":
        """Deferred firing with ``function(connection)``, run in one transaction.

        Call it from the reactor thread. Jobs run in the order of the calls.
        """
        d: Deferred = Deferred()
        with self._lock:
            self._waiting.append((function, d))
            if self._draining:
                return d
            self._draining = True
        self._started_pool().callInThread(self._drain)
        return d

    def _drain(self) -> None:
        """In the database thread: run every waiting job, in order; give
        back each batch of results to the reactor in one call."""
        while True:
            with self._lock:
                batch, self._waiting = self._waiting, []
                if not batch:
                    self._draining = False
                    return
            results: List[Tuple[bool, Any]] = []
            for function, _ in batch:
                try:
                    results.append((True, self._transact(function)))
                except BaseException:
                    results.append((False, Failure()))
            self._reactor.callFromThread(_deliver, batch, results)

    def _transact(self, function: Callable[[sqlite3.Connection], T]) -> T:
        connection = self._connection
        if connection is None:
            raise RuntimeError("the database is not open")
        with connection:
            return function(connection)

    def _open(self) -> None:
        new = not os.path.exists(self._path)
        connection = sqlite3.connect(self._path)
        if new:
            os.chmod(self._path, 0o600)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")
        # Deleted rows (ended sessions and their sealed credentials) are
        # overwritten with zeros, not left in free pages.
        connection.execute("PRAGMA secure_delete=ON")
        connection.execute("PRAGMA busy_timeout=5000")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        for number in range(version, len(MIGRATIONS)):
            with connection:
                connection.executescript(
                    "BEGIN;" + MIGRATIONS[number] + "PRAGMA user_version=%d;" % (number + 1))
        self._connection = connection

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _deliver(batch: List[Tuple[Callable[[sqlite3.Connection], Any], Deferred]],
             results: List[Tuple[bool, Any]]) -> None:
    """In the reactor thread: fire each job's Deferred with its result."""
    for (_, d), (ok, result) in zip(batch, results):
        if ok:
            d.callback(result)
        else:
            d.errback(result)
