"""Sealed credentials: what opens is exactly what was sealed, for exactly that
session and user; anything else is SealBroken, never a wrong plaintext. And a
database of the previous schema opens, keeping its users and sessions."""
import os
import shutil
import sqlite3
import tempfile

from hypothesis import given, settings, strategies as st
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pixelated_dispatcher import protocol as p
from pixelated_dispatcher.manager.credentials import credentials_line, secrets_at_login
from pixelated_dispatcher.manager.database import MIGRATIONS
from pixelated_dispatcher.manager.passwords import FAST_FOR_TESTS, PasswordHasher
from pixelated_dispatcher.testing.fake_provider import FakeProvider
from pixelated_dispatcher.manager.sealed_credentials import SealBroken, seal, unseal
from pixelated_dispatcher.manager.service import Manager, ManagerSettings
from pixelated_dispatcher.manager.sessions import new_token

tokens = st.one_of(st.just(new_token()), st.text(min_size=1, max_size=64))
usernames = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1,
                    max_size=64)
passwords = st.text(max_size=300)


class SealingTests(SynchronousTestCase):

    @settings(max_examples=200)
    @given(tokens, usernames, passwords)
    def test_round_trip(self, token, username, password):
        record = seal(token, username, secrets_at_login(password))
        if len(password) >= 8:  # (a shorter one may occur by chance)
            self.assertNotIn(password.encode("utf-8", "surrogatepass"), record)
        self.assertEqual(unseal(token, username, record), {"password": password})

    @settings(max_examples=300)
    @given(tokens, usernames, passwords, st.data())
    def test_any_flipped_bit_is_refused(self, token, username, password, data):
        record = bytearray(seal(token, username, secrets_at_login(password)))
        bit = data.draw(st.integers(0, len(record) * 8 - 1))
        record[bit // 8] ^= 1 << (bit % 8)
        self.assertRaises(SealBroken, unseal, token, username, bytes(record))

    @settings(max_examples=200)
    @given(tokens, tokens, usernames, passwords)
    def test_another_token_is_refused(self, token, other, username, password):
        record = seal(token, username, secrets_at_login(password))
        if other != token:
            self.assertRaises(SealBroken, unseal, other, username, record)

    @settings(max_examples=200)
    @given(tokens, usernames, usernames, passwords)
    def test_another_user_is_refused(self, token, username, other, password):
        record = seal(token, username, secrets_at_login(password))
        if other != username:
            self.assertRaises(SealBroken, unseal, token, other, record)

    @given(st.binary(max_size=200), tokens, usernames)
    def test_garbage_and_truncations_are_refused(self, garbage, token, username):
        self.assertRaises(SealBroken, unseal, token, username, garbage)
        record = seal(token, username, {"password": "x"})
        for length in range(len(record)):
            self.assertRaises(SealBroken, unseal, token, username, record[:length])

    def test_two_seals_of_the_same_secret_differ(self):
        token = new_token()
        first, second = (seal(token, "alice", {"password": "pw"}) for _ in range(2))
        self.assertNotEqual(first, second, "a fresh salt and nonce each time")
        self.assertEqual(unseal(token, "alice", first), unseal(token, "alice", second))

    def test_the_credentials_line_keeps_its_format(self):
        line = credentials_line("example.org", "alice", secrets_at_login("pâss\"word"))
        self.assertEqual(line, b'{"leap_provider_hostname": "example.org", "user": "alice",'
                               b' "password": "p\\u00e2ss\\"word"}\n')


class PreviousSchemaTests(TestCase):
    """A database written by the previous version (schema 2: sessions
    without sealed credentials) opens and keeps everything."""

    @inlineCallbacks
    def test_a_schema_2_database_opens_and_its_sessions_log_in_again_to_start(self):
        state = tempfile.mkdtemp(prefix="pxd-migrate-")
        self.addCleanup(shutil.rmtree, state, True)
        hasher = PasswordHasher(reactor, FAST_FOR_TESTS, 1)
        hasher.start()
        self.addCleanup(hasher.stop)
        encoded = yield hasher.hash("alice's password")
        token = new_token()
        path = os.path.join(state, "dispatcher.sqlite")
        with sqlite3.connect(path) as db:
            for number, script in enumerate(MIGRATIONS[:2]):
                db.executescript("BEGIN;" + script + "PRAGMA user_version=%d; COMMIT;"
                                 % (number + 1))
            db.execute("INSERT INTO users VALUES ('alice', ?, 1.0)", (encoded,))
            now = reactor.seconds()
            db.execute("INSERT INTO sessions VALUES (?, 'alice', ?, ?, '192.0.2.1')",
                       (bytes.fromhex(p.token_digest(token)), now, now))
        db.close()

        provider = FakeProvider(reactor)
        manager = Manager(reactor, state, provider,
                          ManagerSettings(hash_parameters=FAST_FOR_TESTS))
        manager.startService()
        self.addCleanup(manager.stopService)
        yield manager.ready()
        with sqlite3.connect(path) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], len(MIGRATIONS))
        db.close()
        self.assertEqual((yield manager.resolve_session(token)), "alice", "the session kept")
        # Its agent must start, and the session has no sealed record: it ends,
        # nothing starts without the password, and a new login does it right.
        yield self.assertFailure(manager.ensure_agent("alice", token), p.InvalidSession)
        self.assertEqual(provider.launches, [])
        fresh = yield manager.authenticate("alice", "alice's password", "192.0.2.1")
        yield manager.ensure_agent("alice", fresh)
        self.assertTrue(provider.received("alice")["password_received"])
