"""The proxy's memory of the manager's answers: kept while pushes flow,
dropped at once on a push, after a reconnect, and never longer than a second
without a subscription; agent starts shared; activity reported in batches."""
import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from pixelated_dispatcher.protocol import AgentAddress, InvalidSession, token_digest
from pixelated_dispatcher.testing.fake_manager import FakeManager
from pixelated_dispatcher.proxy.manager_cache import (SUBSCRIBED_TTL, UNSUBSCRIBED_TTL,
                                                      ManagerCache)
from pixelated_dispatcher.proxy.open_exchanges import OpenExchanges
from pixelated_dispatcher.proxy.manager_client import (ACTIVITY_BATCH_BYTES,
                                                       activity_batches)

from .helpers import fast_retries, start_client, start_manager, temporary_directory


ALICE = AgentAddress("127.0.0.1", 41001)


class CacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.manager = FakeManager()
        self.manager.add_user("alice", "secret")
        self.manager.add_user("bob", "secret")
        self.manager.place_agent("alice", ALICE)
        self.cache = ManagerCache(self.manager, self.clock)
        self.cache.start()
        self.token = self.manager.open_session("alice")

    def resolve(self, token: str) -> Any:
        return self.successResultOf(self.cache.resolve(token))

    def test_session_answers_are_kept_while_subscribed(self) -> None:
        self.assertTrue(self.cache.is_subscribed)
        self.assertEqual(self.resolve(self.token), "alice")
        self.clock.advance(SUBSCRIBED_TTL - 1)
        self.assertEqual(self.cache.cached_user(self.token), "alice")
        self.assertEqual(self.manager.resolves, 1)
        self.clock.advance(2)
        self.assertIsNone(self.cache.cached_user(self.token))

    def test_session_end_push_drops_the_session_at_once(self) -> None:
        self.resolve(self.token)
        self.successResultOf(self.manager.end_session(self.token))
        self.assertIsNone(self.cache.cached_user(self.token))
        self.failureResultOf(self.cache.resolve(self.token), InvalidSession)

    def test_revocation_of_all_sessions_of_a_user(self) -> None:
        other = self.manager.open_session("alice")
        bobs = self.manager.open_session("bob")
        for token in (self.token, other, bobs):
            self.resolve(token)
        self.manager.revoke_sessions("alice")
        self.assertIsNone(self.cache.cached_user(self.token))
        self.assertIsNone(self.cache.cached_user(other))
        self.assertEqual(self.cache.cached_user(bobs), "bob")

    def test_without_subscription_nothing_is_kept_a_second(self) -> None:
        self.manager.disconnect()  # the connection dropped: reset
        self.assertFalse(self.cache.is_subscribed)
        self.resolve(self.token)
        self.assertEqual(self.cache.cached_user(self.token), "alice")
        self.clock.advance(UNSUBSCRIBED_TTL)
        self.assertIsNone(self.cache.cached_user(self.token))
        self.assertLessEqual(UNSUBSCRIBED_TTL, 1.0)

    def test_reset_drops_everything(self) -> None:
        self.resolve(self.token)
        self.successResultOf(self.cache.ensure("alice", self.token))
        self.manager.disconnect()
        self.assertIsNone(self.cache.cached_user(self.token))
        self.assertIsNone(self.cache.cached_address("alice"))

    def test_an_answer_overtaken_by_a_push_is_not_kept(self) -> None:
        pending = Deferred()
        self.manager.resolve_session = lambda token: pending
        d = self.cache.resolve(self.token)
        self.cache.session_ended(token_digest("some other token"))
        pending.callback("alice")
        self.assertEqual(self.successResultOf(d), "alice")
        self.assertIsNone(self.cache.cached_user(self.token))

    def test_agent_addresses_are_kept_until_the_agent_stops(self) -> None:
        self.assertEqual(self.successResultOf(self.cache.ensure("alice", self.token)), ALICE)
        self.assertEqual(self.cache.cached_address("alice"), ALICE)
        self.manager.stop_agent("alice")
        self.assertIsNone(self.cache.cached_address("alice"))

    def test_a_revocation_drops_the_address_the_next_session_asks_again(self) -> None:
        # the manager took back the proxy's grant of the agent with alice's
        # sessions: the next session's request must ask (and so be granted)
        self.assertEqual(self.successResultOf(self.cache.ensure("alice", self.token)), ALICE)
        self.manager.revoke_sessions("alice")
        self.assertIsNone(self.cache.cached_address("alice"))
        fresh = self.manager.open_session("alice")
        asked = self.manager.ensures
        self.assertEqual(self.successResultOf(self.cache.ensure("alice", fresh)), ALICE)
        self.assertEqual(self.manager.ensures, asked + 1)

    def test_concurrent_starts_share_one_call(self) -> None:
        self.manager.slow_start("alice")
        first = self.cache.ensure("alice", self.token)
        second = self.cache.ensure("alice", self.token)
        self.assertTrue(self.cache.starting("alice"))
        self.assertEqual(self.manager.ensures, 1)
        self.manager.finish_start("alice")
        self.assertEqual(self.successResultOf(first), ALICE)
        self.assertEqual(self.successResultOf(second), ALICE)
        self.assertFalse(self.cache.starting("alice"))

    def test_a_start_failure_is_kept_once_for_the_waiting_page(self) -> None:
        self.manager.fail_agent_start("alice", "broken")
        self.failureResultOf(self.cache.ensure("alice", self.token))
        self.assertIsNotNone(self.cache.start_failure(self.token))
        self.assertIsNone(self.cache.start_failure(self.token))

    def test_a_refused_session_does_not_fail_another_sessions_start(self) -> None:
        # Two browsers of alice; the first one's session was just revoked,
        # and its start fails with InvalidSession: that must not log out the
        # second browser, whose start goes on with its own token.
        other = self.manager.open_session("alice")
        pending = Deferred()
        answer = self.manager.ensure_agent
        self.manager.ensure_agent = lambda username, token: (
            pending if token == self.token else answer(username, token))
        first = self.cache.ensure("alice", self.token)
        second = self.cache.ensure("alice", other)
        self.assertEqual(self.successResultOf(second), ALICE)
        pending.errback(InvalidSession("revoked"))
        self.failureResultOf(first, InvalidSession)
        self.assertIsNone(self.cache.start_failure(other))
        self.assertIsNotNone(self.cache.start_failure(self.token))

    def test_an_address_asked_with_another_users_session_is_refused(self) -> None:
        self.failureResultOf(self.cache.ensure("bob", self.token), InvalidSession)
        self.assertIsNone(self.cache.cached_address("bob"))

    def test_activity_is_reported_every_interval(self) -> None:
        self.cache.touch("alice")
        self.cache.touch("bob")
        self.cache.touch("alice")
        self.clock.advance(30)
        self.assertEqual(self.manager.activity, [["alice", "bob"]])
        self.clock.advance(30)
        self.assertEqual(self.manager.activity, [["alice", "bob"]])  # nothing new

    def test_activity_that_could_not_be_reported_is_sent_later(self) -> None:
        self.cache.touch("alice")
        self.manager.reachable = False
        self.clock.advance(30)
        self.manager.reachable = True
        self.clock.advance(30)
        self.assertEqual(self.manager.activity, [["alice"]])

    def open(self, username: str, token: str, tunnel: bool = True) -> DummyRequest:
        request = DummyRequest([b""])
        self.cache.exchanges.opened(request, username, token, tunnel)
        return request

    def test_users_with_open_tunnels_are_reported_until_the_tunnel_closes(self) -> None:
        request = self.open("alice", self.token)
        self.open("bob", self.manager.open_session("bob"), tunnel=False)
        self.clock.advance(30)
        self.clock.advance(30)
        request.finish()
        self.clock.advance(30)
        self.assertEqual(self.manager.activity, [["alice"], ["alice"]])

    def closing(self) -> list:
        closed: list = []
        self.cache.exchanges = OpenExchanges(close=closed.append)
        return closed

    def test_revocation_closes_the_users_open_exchanges_and_ends_their_activity(self) -> None:
        closed = self.closing()
        tunnel = self.open("alice", self.token)
        poll = self.open("alice", self.manager.open_session("alice"), tunnel=False)
        bobs = self.open("bob", self.manager.open_session("bob"))
        self.manager.revoke_sessions("alice")
        self.assertEqual(closed, [tunnel, poll] if closed[0] is tunnel else [poll, tunnel])
        self.assertEqual(self.cache.exchanges.count("alice"), 0)
        self.assertEqual(self.cache.exchanges.count("bob"), 1)
        self.clock.advance(30)
        self.assertEqual(self.manager.activity, [["bob"]])  # no revoked tunnel
        self.assertNotIn(bobs, closed)

    def test_logout_closes_that_sessions_exchanges_only(self) -> None:
        closed = self.closing()
        other = self.manager.open_session("alice")
        this = self.open("alice", self.token)
        kept = self.open("alice", other)
        self.successResultOf(self.manager.end_session(self.token))
        self.assertEqual(closed, [this])
        self.assertEqual(self.cache.exchanges.count("alice"), 1)
        self.assertNotIn(kept, closed)

    def test_agent_stopped_leaves_the_exchanges_to_the_agents_end(self) -> None:
        # The agent's connections end with it; a request in flight then gets
        # the "starting" page rather than a cut connection.
        closed = self.closing()
        self.open("alice", self.token)
        self.manager.stop_agent("alice")
        self.assertEqual(closed, [])
        self.assertEqual(self.cache.exchanges.count("alice"), 1)

    def test_sessions_ended_while_disconnected_are_closed_after_reconnecting(self) -> None:
        closed = self.closing()
        gone = self.open("alice", self.token)
        live = self.open("alice", self.manager.open_session("alice"))
        self.manager.disconnect()
        del self.manager.sessions[self.token]  # the push is lost
        self.assertEqual(closed, [])
        self.successResultOf(self.manager.subscribe(self.cache))
        self.assertEqual(closed, [gone])
        self.assertNotIn(live, closed)

    def test_stop_sends_the_last_report(self) -> None:
        self.cache.touch("bob")
        self.successResultOf(self.cache.stop())
        self.assertEqual(self.manager.activity, [["bob"]])


class ActivityBatches(SynchronousTestCase):
    def test_batches_stay_under_one_amp_value(self) -> None:
        names = ["user-%06d" % i for i in range(20000)]
        batches = activity_batches(names)
        self.assertGreater(len(batches), 1)
        self.assertEqual(sorted(n for b in batches for n in b), sorted(names))
        for batch in batches:
            self.assertLessEqual(sum(len(n) + 2 for n in batch), ACTIVITY_BATCH_BYTES)
            self.assertLess(ACTIVITY_BATCH_BYTES, 65535)

    def test_no_names_no_batch(self) -> None:
        self.assertEqual(activity_batches([]), [])


class CacheOverAMP(TestCase):
    """Through the real client and a Unix socket: a revocation stops working
    well within a second, and a reconnect drops the cache."""

    timeout = 20

    @inlineCallbacks
    def test_revoked_session_stops_working_within_a_second(self) -> Any:
        path = os.path.join(temporary_directory(self), "manager.sock")
        fake = FakeManager()
        fake.add_user("alice", "secret")
        start_manager(self, path, fake)
        client = start_client(self, path)
        cache = ManagerCache(client, reactor)
        yield client.subscribe(cache)
        self.addCleanup(cache.stop)
        token = fake.open_session("alice")
        self.assertEqual((yield cache.resolve(token)), "alice")
        started = time.monotonic()
        fake.revoke_sessions("alice")
        while cache.cached_user(token) is not None:
            yield deferLater(reactor, 0.005, lambda: None)
        self.assertLess(time.monotonic() - started, 1.0)
        yield self.assertFailure(cache.resolve(token), InvalidSession)

    @inlineCallbacks
    def test_reconnect_drops_the_cache_and_subscribes_again(self) -> Any:
        path = os.path.join(temporary_directory(self), "manager.sock")
        fake = FakeManager()
        fake.add_user("alice", "secret")
        server = start_manager(self, path, fake)
        client = start_client(self, path, retry_policy=fast_retries)
        cache = ManagerCache(client, reactor)
        yield client.subscribe(cache)
        token = fake.open_session("alice")
        yield cache.resolve(token)
        yield server.stop()
        self.assertIsNone(cache.cached_user(token))
        self.assertFalse(cache.is_subscribed)
        server.start()
        deadline = time.monotonic() + 5
        while not cache.is_subscribed and time.monotonic() < deadline:
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(cache.is_subscribed)
        self.assertEqual((yield cache.resolve(token)), "alice")
