"""Users, passwords and sessions in the real SQLite database, off the reactor."""
import os
import shutil
import tempfile
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from pixelated_dispatcher.manager.database import Database
from pixelated_dispatcher.manager.passwords import FAST_FOR_TESTS, PRODUCTION, PasswordHasher
from pixelated_dispatcher.manager.registry import UserRegistry
from pixelated_dispatcher.manager.sessions import SessionStore
from pixelated_dispatcher.protocol import InvalidSession, InvalidUsername, UnknownUser, UserExists


class _DatabaseCase(TestCase):

    @inlineCallbacks
    def setUp(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "db.sqlite")
        self.database = Database(reactor, self.path)
        yield self.database.start()
        self.addCleanup(self.database.stop)
        self.hasher = PasswordHasher(reactor, FAST_FOR_TESTS, threads=1)
        self.hasher.start()
        self.addCleanup(self.hasher.stop)
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.users = UserRegistry(self.database, self.hasher, self.clock)
        self.sessions = SessionStore(self.database, self.clock, idle_timeout=600, max_age=3600)


class RegistryTests(_DatabaseCase):

    @inlineCallbacks
    def test_added_user_logs_in_with_their_password_only(self):
        yield self.users.add("alice", "correct horse")
        self.assertTrue((yield self.users.verify("alice", "correct horse")))
        self.assertFalse((yield self.users.verify("alice", "Correct horse")))
        self.assertFalse((yield self.users.verify("alice", "")))

    @inlineCallbacks
    def test_unknown_and_invalid_users_are_refused_like_a_wrong_password(self):
        yield self.users.add("alice", "pw")
        self.assertFalse((yield self.users.verify("bob", "pw")))
        self.assertFalse((yield self.users.verify("Not Valid", "pw")))

    @inlineCallbacks
    def test_password_is_stored_as_an_argon2id_hash(self):
        yield self.users.add("alice", "secret-password")
        yield self.database.stop()
        with sqlite3.connect(self.path) as connection:
            (stored,) = connection.execute("SELECT password_hash FROM users").fetchone()
        self.assertTrue(stored.startswith("$argon2id$"))
        self.assertNotIn("secret-password", stored)
        yield self.database.start()

    @inlineCallbacks
    def test_duplicate_and_invalid_names_are_refused(self):
        yield self.users.add("alice", "pw")
        yield self.assertFailure(self.users.add("alice", "other"), UserExists)
        yield self.assertFailure(self.users.add("Alice!", "pw"), InvalidUsername)
        self.assertEqual((yield self.users.usernames()), ["alice"])

    @inlineCallbacks
    def test_removed_user_can_no_longer_log_in(self):
        yield self.users.add("alice", "pw")
        yield self.users.add("bob", "pw")
        yield self.users.remove("alice")
        self.assertFalse((yield self.users.verify("alice", "pw")))
        self.assertEqual((yield self.users.usernames()), ["bob"])
        yield self.assertFailure(self.users.remove("alice"), UnknownUser)

    @inlineCallbacks
    def test_set_password_replaces_the_old_one(self):
        yield self.users.add("alice", "old")
        yield self.users.set_password("alice", "new")
        self.assertFalse((yield self.users.verify("alice", "old")))
        self.assertTrue((yield self.users.verify("alice", "new")))

    @inlineCallbacks
    def test_users_survive_reopening_the_database(self):
        yield self.users.add("alice", "pw")
        yield self.database.stop()
        yield self.database.start()
        self.assertTrue((yield self.users.verify("alice", "pw")))

    @inlineCallbacks
    def test_weaker_hash_is_upgraded_at_login(self):
        weak = UserRegistry(self.database, self.hasher, self.clock)
        yield weak.add("alice", "pw")
        strong_hasher = PasswordHasher(reactor, PRODUCTION, threads=1)
        strong_hasher.start()
        self.addCleanup(strong_hasher.stop)
        strong = UserRegistry(self.database, strong_hasher, self.clock)
        self.assertTrue((yield strong.verify("alice", "pw")))
        stored = yield self.database.run(
            lambda c: c.execute("SELECT password_hash FROM users").fetchone()[0])
        self.assertIn("m=19456,t=2,p=1", stored)
        self.assertTrue((yield strong.verify("alice", "pw")))


class SessionTests(_DatabaseCase):

    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.users.add("alice", "pw")
        yield self.users.add("bob", "pw")

    @inlineCallbacks
    def test_session_resolves_to_its_user_until_ended(self):
        token = yield self.sessions.create("alice", "127.0.0.1")
        self.assertEqual((yield self.sessions.resolve(token)), "alice")
        self.assertEqual((yield self.sessions.end(token)), "alice")
        yield self.assertFailure(self.sessions.resolve(token), InvalidSession)
        yield self.assertFailure(self.sessions.end(token), InvalidSession)

    @inlineCallbacks
    def test_tokens_are_long_random_and_distinct(self):
        tokens = set()
        for _ in range(20):
            tokens.add((yield self.sessions.create("alice")))
        self.assertEqual(len(tokens), 20)
        self.assertTrue(all(len(t) >= 43 for t in tokens))  # 256 bits, urlsafe base64

    @inlineCallbacks
    def test_unknown_token_is_invalid(self):
        yield self.assertFailure(self.sessions.resolve("made-up"), InvalidSession)
        yield self.assertFailure(self.sessions.resolve(""), InvalidSession)

    @inlineCallbacks
    def test_database_holds_no_usable_token(self):
        token = yield self.sessions.create("alice")
        rows = yield self.database.run(lambda c: c.execute("SELECT * FROM sessions").fetchall())
        self.assertNotIn(token, repr(rows))
        self.assertNotIn(token.encode(), b"".join(r[0] for r in rows))

    @inlineCallbacks
    def test_idle_session_expires(self):
        token = yield self.sessions.create("alice")
        self.clock.advance(500)
        self.assertEqual((yield self.sessions.resolve(token)), "alice")  # use resets idle time
        self.clock.advance(500)
        self.assertEqual((yield self.sessions.resolve(token)), "alice")
        self.clock.advance(601)
        yield self.assertFailure(self.sessions.resolve(token), InvalidSession)
        self.assertEqual((yield self.sessions.count("alice")), 0)

    @inlineCallbacks
    def test_session_ends_at_max_age_even_when_used(self):
        token = yield self.sessions.create("alice")
        for _ in range(7):
            self.clock.advance(500)
            self.assertEqual((yield self.sessions.resolve(token)), "alice")
        self.clock.advance(500)
        yield self.assertFailure(self.sessions.resolve(token), InvalidSession)

    @inlineCallbacks
    def test_end_all_revokes_one_users_sessions_only(self):
        a1 = yield self.sessions.create("alice")
        a2 = yield self.sessions.create("alice")
        b = yield self.sessions.create("bob")
        self.assertEqual((yield self.sessions.end_all("alice")), 2)
        yield self.assertFailure(self.sessions.resolve(a1), InvalidSession)
        yield self.assertFailure(self.sessions.resolve(a2), InvalidSession)
        self.assertEqual((yield self.sessions.resolve(b)), "bob")

    @inlineCallbacks
    def test_removing_a_user_ends_their_sessions(self):
        token = yield self.sessions.create("alice")
        yield self.users.remove("alice")
        yield self.assertFailure(self.sessions.resolve(token), InvalidSession)

    @inlineCallbacks
    def test_sessions_survive_reopening_the_database(self):
        token = yield self.sessions.create("alice")
        yield self.database.stop()
        yield self.database.start()
        self.assertEqual((yield self.sessions.resolve(token)), "alice")

    @inlineCallbacks
    def test_purge_removes_only_expired_sessions(self):
        old = yield self.sessions.create("alice")
        self.clock.advance(601)
        fresh = yield self.sessions.create("bob")
        self.assertEqual((yield self.sessions.purge_expired()), 1)
        self.assertEqual((yield self.sessions.resolve(fresh)), "bob")
        yield self.assertFailure(self.sessions.resolve(old), InvalidSession)
