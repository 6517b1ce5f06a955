"""The manager's domain: logins, sessions and the one-agent-per-user rule,
on real SQLite and the verified FakeProvider."""
import json
import os
import shutil
import tempfile
import threading

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.trial.unittest import TestCase

from pixelated_dispatcher import protocol as p
from pixelated_dispatcher.manager.passwords import FAST_FOR_TESTS
from pixelated_dispatcher.testing.fake_provider import FakeProvider
from pixelated_dispatcher.manager.providers.interface import RunningAgent
from pixelated_dispatcher.manager.service import Manager, ManagerSettings

from pixelated_dispatcher.testing.manager_contract import RecordingListener


class ManagerTests(TestCase):

    @inlineCallbacks
    def setUp(self):
        self.state_dir = tempfile.mkdtemp(prefix="pxd-")
        self.addCleanup(shutil.rmtree, self.state_dir, True)
        self.clock = Clock()
        self.provider = FakeProvider(self.clock, start_delay=1.0, stop_delay=0.5)
        self.manager = yield self.start_manager(self.provider)
        yield self.manager.add_user("alice", "alice's password")
        yield self.manager.add_user("bob", "bob's password")

    @inlineCallbacks
    def start_manager(self, provider, **settings):
        manager = Manager(reactor, self.state_dir, provider,
                          ManagerSettings(leap_provider="example.org",
                                          hash_parameters=FAST_FOR_TESTS, **settings))
        manager.startService()
        self.addCleanup(lambda: manager.running and self.finish_starts(manager.stopService()))
        yield manager.ready()
        return manager

    def finish_starts(self, d):
        """Let the fake provider's starts and stops complete (its clock moves
        while ``d`` waits), then wait for ``d``."""
        loop = LoopingCall(self.clock.advance, 0.5)
        loop.start(0.01)

        def done(result):
            loop.stop()
            return result
        return d.addBoth(done)

    def log_in(self, username, manager=None, client="192.0.2.1"):
        """A session of ``username`` (password: "NAME's password"): its token."""
        return (manager or self.manager).authenticate(username, username + "'s password",
                                                      client)

    def sealed_records(self, manager=None, username=None):
        """How many sessions (of ``username``) hold sealed credentials, in the database."""
        query = "SELECT COUNT(*) FROM sessions WHERE sealed_credentials IS NOT NULL"
        args = ()
        if username is not None:
            query, args = query + " AND username = ?", (username,)
        return (manager or self.manager)._database.run(
            lambda c: c.execute(query, args).fetchone()[0])

    def password_received(self, username):
        return json.loads(self.provider.credentials[username])["password"]

    @inlineCallbacks
    def test_concurrent_requests_start_one_agent(self):
        token = yield self.log_in("alice")
        d = gatherResults([self.manager.ensure_agent("alice", token) for _ in range(5)])
        addresses = yield self.finish_starts(d)
        self.assertEqual(len(set(addresses)), 1)
        self.assertEqual(self.provider.launches, ["alice"])
        again = yield self.manager.ensure_agent("alice", token)
        self.assertEqual(again, addresses[0])
        self.assertEqual(self.provider.launches, ["alice"])

    @inlineCallbacks
    def test_agent_gets_the_password_of_the_login_on_stdin_line(self):
        token = yield self.log_in("alice")
        yield self.finish_starts(self.manager.ensure_agent("alice", token))
        line = self.provider.credentials["alice"]
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(json.loads(line), {"leap_provider_hostname": "example.org",
                                            "user": "alice", "password": "alice's password"})

    @inlineCallbacks
    def test_operator_start_of_a_stopped_agent_is_refused_a_running_one_answered(self):
        failure = yield self.assertFailure(self.manager.start_agent("bob"), p.AgentStartFailed)
        self.assertIn("starts only with the credentials sealed under bob's session",
                      str(failure))
        self.assertEqual(self.provider.launches, [], "never an agent without its password")
        self.assertEqual(self.manager.supervisor.state("bob"), "stopped")
        token = yield self.log_in("bob")
        address = yield self.finish_starts(self.manager.ensure_agent("bob", token))
        self.assertEqual((yield self.manager.start_agent("bob")), address)
        self.assertEqual(self.password_received("bob"), "bob's password")

    @inlineCallbacks
    def test_wrong_password_unknown_and_invalid_users_are_refused_alike(self):
        for name, password in [("alice", "bob's password"), ("mallory", "x"), ("Bad Name", "x")]:
            failure = yield self.assertFailure(
                self.manager.authenticate(name, password, "192.0.2.1"), p.InvalidCredentials)
            self.assertEqual(str(failure), "invalid username or password")

    @inlineCallbacks
    def test_no_agent_for_a_session_of_another_user_and_one_answer_for_all(self):
        alice = yield self.log_in("alice")
        answers = set()
        for name, token in [("bob", alice), ("nobody", alice), ("../etc", alice),
                            ("alice", "not-a-session")]:
            for ask in (self.manager.ensure_agent, self.manager.locate_agent):
                failure = yield self.assertFailure(ask(name, token), p.InvalidSession)
                answers.add(str(failure))
        self.assertEqual(answers, {"no such session, or it has expired"})
        self.assertEqual(self.provider.launches, [])

    @inlineCallbacks
    def test_logout_of_the_last_session_stops_the_agent_and_deletes_its_credentials(self):
        first = yield self.log_in("alice")
        second = yield self.log_in("alice", client="192.0.2.2")
        self.assertEqual((yield self.sealed_records(username="alice")), 2)
        yield self.finish_starts(self.manager.ensure_agent("alice", first))
        yield self.finish_starts(self.manager.end_session(first))
        self.assertEqual((yield self.sealed_records(username="alice")), 1)
        self.assertTrue(self.provider.alive("alice"), "another session still uses it")
        yield self.finish_starts(self.manager.end_session(second))
        self.assertEqual((yield self.sealed_records(username="alice")), 0)
        self.assertFalse(self.provider.alive("alice"))
        self.assertEqual(self.manager.supervisor.state("alice"), "stopped")
        yield self.assertFailure(self.manager.ensure_agent("alice", second), p.InvalidSession)
        yield self.assertFailure(self.manager.resolve_session(second), p.InvalidSession)
        self.assertEqual(self.provider.launches, ["alice"])

    @inlineCallbacks
    def test_passwd_logout_name_and_remove_delete_the_sealed_credentials(self):
        yield self.log_in("alice")
        yield self.log_in("bob")
        yield self.log_in("bob")
        self.assertEqual((yield self.sealed_records()), 3)
        yield self.manager.set_password("alice", "a new one")
        self.assertEqual((yield self.sealed_records(username="alice")), 0)
        yield self.manager.revoke_sessions("bob")
        self.assertEqual((yield self.sealed_records()), 0)
        yield self.log_in("bob")
        yield self.finish_starts(self.manager.remove_user("bob"))
        self.assertEqual((yield self.sealed_records()), 0)

    @inlineCallbacks
    def test_removed_user_loses_agent_sessions_and_login(self):
        token = yield self.log_in("bob")
        yield self.finish_starts(self.manager.ensure_agent("bob", token))
        yield self.finish_starts(self.manager.remove_user("bob"))
        self.assertFalse(self.provider.alive("bob"))
        yield self.assertFailure(self.manager.resolve_session(token), p.InvalidSession)
        yield self.assertFailure(self.manager.authenticate("bob", "bob's password", "x"),
                                 p.InvalidCredentials)
        yield self.assertFailure(self.manager.ensure_agent("bob", token), p.InvalidSession)
        yield self.assertFailure(self.manager.start_agent("bob"), p.UnknownUser)
        self.assertEqual((yield self.manager.list_users()), [("alice", "stopped")])

    @inlineCallbacks
    def test_crashed_agent_has_failed_and_the_next_request_starts_it_again(self):
        token = yield self.log_in("alice")
        yield self.finish_starts(self.manager.ensure_agent("alice", token))
        self.provider.crash("alice", "was killed for running out of memory")
        status = self.manager.supervisor.status("alice")
        self.assertEqual((status.state, status.reason),
                         ("failed", "was killed for running out of memory"))
        yield self.assertFailure(self.manager.locate_agent("alice", token), p.AgentNotRunning)
        yield self.finish_starts(self.manager.ensure_agent("alice", token))
        self.assertEqual(self.provider.launches, ["alice", "alice"])
        self.assertEqual(self.password_received("alice"), "alice's password")

    @inlineCallbacks
    def test_stop_during_a_start_ends_stopped(self):
        token = yield self.log_in("alice")
        starting = self.manager.ensure_agent("alice", token)
        yield deferLater(reactor, 0.05, lambda: None)  # the credentials open in a thread
        self.assertEqual(self.manager.supervisor.state("alice"), "starting")
        stopping = self.manager.stop_agent("alice")
        yield self.finish_starts(starting)
        yield self.finish_starts(stopping)
        self.assertEqual(self.manager.supervisor.state("alice"), "stopped")
        self.assertFalse(self.provider.alive("alice"))

    @inlineCallbacks
    def test_start_during_a_stop_waits_and_starts_again(self):
        token = yield self.log_in("alice")
        yield self.finish_starts(self.manager.ensure_agent("alice", token))
        stopping = self.manager.supervisor.stop("alice")
        self.assertEqual(self.manager.supervisor.state("alice"), "stopping")
        again = self.manager.ensure_agent("alice", token)
        yield deferLater(reactor, 0, lambda: None)
        self.assertEqual(self.manager.supervisor.state("alice"), "stopping")
        yield self.finish_starts(stopping)
        yield self.finish_starts(again)
        self.assertEqual(self.manager.supervisor.state("alice"), "running")
        self.assertEqual(self.provider.launches, ["alice", "alice"])
        self.assertEqual(self.password_received("alice"), "alice's password")

    @inlineCallbacks
    def test_failed_start_is_a_named_error_and_can_be_retried(self):
        token = yield self.log_in("alice")
        self.provider.fail_next_start("alice", "exited with status 3: no such mailbox")
        failure = yield self.assertFailure(
            self.finish_starts(self.manager.ensure_agent("alice", token)), p.AgentStartFailed)
        self.assertIn("no such mailbox", str(failure))
        status = (yield self.manager.agent_info("alice")).status
        self.assertEqual((status.state, status.reason),
                         ("failed", "exited with status 3: no such mailbox"))
        yield self.finish_starts(self.manager.ensure_agent("alice", token))
        self.assertEqual(self.manager.supervisor.state("alice"), "running")

    @inlineCallbacks
    def test_unknown_and_invalid_names_get_named_errors_for_admins(self):
        yield self.assertFailure(self.manager.ensure_agent("nobody"), p.UnknownUser)
        yield self.assertFailure(self.manager.ensure_agent("../etc"), p.InvalidUsername)
        yield self.assertFailure(self.manager.add_user("alice", "x"), p.UserExists)
        yield self.assertFailure(self.manager.agent_info("nobody"), p.UnknownUser)

    @inlineCallbacks
    def test_data_directory_is_private_and_per_user(self):
        token = yield self.log_in("alice")
        yield self.finish_starts(self.manager.ensure_agent("alice", token))
        path = os.path.join(self.state_dir, "users", "alice", "data")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o700)
        self.assertEqual(self.manager.supervisor.data_dir("bob"),
                         os.path.join(self.state_dir, "users", "bob", "data"))

    @inlineCallbacks
    def test_users_and_sessions_survive_a_manager_restart(self):
        token = yield self.log_in("alice")
        yield self.finish_starts(self.manager.stopService())
        manager = yield self.start_manager(FakeProvider(Clock()))
        self.assertEqual((yield manager.resolve_session(token)), "alice")
        self.assertEqual([u for u, _ in (yield manager.list_users())], ["alice", "bob"])
        self.assertEqual(os.stat(os.path.join(self.state_dir, "dispatcher.sqlite")).st_mode
                         & 0o777, 0o600)

    @inlineCallbacks
    def restarted_without_agents(self):
        """Alice logged in, then the manager restarted and her agent did not
        survive (a reboot, a dockerd restart)."""
        token = yield self.log_in("alice")
        yield self.finish_starts(self.manager.ensure_agent("alice", token))
        yield self.finish_starts(self.manager.stopService())
        self.provider = FakeProvider(self.clock, start_delay=1.0)
        manager = yield self.start_manager(self.provider)
        return token, manager

    @inlineCallbacks
    def test_after_a_restart_the_next_request_starts_the_agent_with_the_password(self):
        token, manager = yield self.restarted_without_agents()
        yield self.finish_starts(manager.ensure_agent("alice", token))
        self.assertEqual(self.provider.launches, ["alice"])
        self.assertEqual(self.password_received("alice"), "alice's password")
        self.assertEqual((yield manager.resolve_session(token)), "alice", "no new login")

    @inlineCallbacks
    def test_after_a_restart_an_operator_start_is_refused_and_the_session_kept(self):
        token, manager = yield self.restarted_without_agents()
        yield self.assertFailure(manager.start_agent("alice"), p.AgentStartFailed)
        self.assertEqual(self.provider.launches, [])
        self.assertEqual((yield manager.resolve_session(token)), "alice")

    @inlineCallbacks
    def test_a_session_whose_record_does_not_open_ends_and_starts_nothing(self):
        # A session from before sealed credentials (NULL), or a record
        # altered on disk: no agent without its password; the session ends
        # (the browser logs in again, which seals a fresh record).
        old = yield self.log_in("alice")
        altered = yield self.log_in("bob")
        digest = p.token_digest

        def damage(connection):
            connection.execute("UPDATE sessions SET sealed_credentials = NULL"
                               " WHERE token_hash = ?", (bytes.fromhex(digest(old)),))
            (record,) = connection.execute(
                "SELECT sealed_credentials FROM sessions WHERE token_hash = ?",
                (bytes.fromhex(digest(altered)),)).fetchone()
            flipped = bytes(record[:-1]) + bytes([record[-1] ^ 1])
            connection.execute("UPDATE sessions SET sealed_credentials = ?"
                               " WHERE token_hash = ?", (flipped, bytes.fromhex(digest(altered))))
        yield self.manager._database.run(damage)
        listener = RecordingListener()
        self.manager.invalidations.subscribe(listener)
        for name, token in (("alice", old), ("bob", altered)):
            yield self.assertFailure(self.finish_starts(self.manager.ensure_agent(name, token)),
                                     p.InvalidSession)
            yield self.assertFailure(self.manager.resolve_session(token), p.InvalidSession)
            self.assertIn(("session_ended", digest(token)), listener.events)
        self.assertEqual(self.provider.launches, [])
        fresh = yield self.log_in("alice")
        yield self.finish_starts(self.manager.ensure_agent("alice", fresh))
        self.assertEqual(self.password_received("alice"), "alice's password")

    @inlineCallbacks
    def test_a_session_ended_during_the_check_starts_nothing(self):
        token = yield self.log_in("alice")
        yield self.manager.sessions.end(token)
        yield self.assertFailure(self.manager._open_credentials("alice", token),
                                 p.InvalidSession)
        self.assertEqual(self.provider.launches, [])

    @inlineCallbacks
    def test_an_adopted_agent_serves_without_opening_the_credentials(self):
        token = yield self.log_in("alice")
        yield self.finish_starts(self.manager.stopService())
        left_running = RunningAgent("alice", p.AgentAddress("127.0.0.1", 20123), pid=0,
                                    started=reactor.seconds())
        self.provider = FakeProvider(self.clock, recoverable=[left_running])
        manager = yield self.start_manager(self.provider)
        self.assertEqual((yield manager.ensure_agent("alice", token)), left_running.address)
        self.assertEqual((yield manager.start_agent("alice")), left_running.address)
        self.assertEqual((yield manager.resolve_session(token)), "alice")
        self.assertEqual(self.provider.launches, [])

    @inlineCallbacks
    def test_expired_sessions_are_swept_with_their_sealed_credentials(self):
        yield self.finish_starts(self.manager.stopService())
        self.provider = FakeProvider(self.clock)
        manager = yield self.start_manager(self.provider, session_idle_timeout=0.2)
        alices = yield self.log_in("alice", manager)
        bobs = yield self.log_in("bob", manager, "192.0.2.2")
        yield deferLater(reactor, 0.3, lambda: None)
        bobs_new = yield self.log_in("bob", manager, "192.0.2.2")  # bob stays
        yield manager._sweep_sessions()
        self.assertEqual((yield manager.sessions.count("alice")), 0)
        self.assertEqual((yield self.sealed_records(manager, "alice")), 0)
        self.assertEqual((yield self.sealed_records(manager, "bob")), 1)
        yield self.assertFailure(manager.resolve_session(bobs), p.InvalidSession)
        yield self.assertFailure(manager.ensure_agent("alice", alices), p.InvalidSession)
        yield self.finish_starts(manager.ensure_agent("bob", bobs_new))
        self.assertEqual(self.password_received("bob"), "bob's password")
        self.assertEqual(self.provider.launches, ["bob"])

    @inlineCallbacks
    def test_an_ended_sessions_record_is_overwritten_not_left_in_free_pages(self):
        token = yield self.log_in("alice")
        digest = bytes.fromhex(p.token_digest(token))
        record = yield self.manager._database.run(lambda c: bytes(c.execute(
            "SELECT sealed_credentials FROM sessions WHERE token_hash = ?",
            (digest,)).fetchone()[0]))

        def checkpoint(connection):
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        yield self.manager._database.run(checkpoint)
        files = [os.path.join(self.state_dir, name) for name in os.listdir(self.state_dir)
                 if name.startswith("dispatcher.sqlite")]
        self.assertTrue(any(record in open(path, "rb").read() for path in files))
        yield self.finish_starts(self.manager.end_session(token))
        yield self.manager._database.run(checkpoint)
        self.assertEqual([path for path in files if record in open(path, "rb").read()], [])

    @inlineCallbacks
    def test_sealing_and_opening_run_off_the_reactor_thread(self):
        from pixelated_dispatcher.manager import service
        threads = []

        def recorded(function):
            def run(*args):
                threads.append((function.__name__, threading.current_thread()))
                return function(*args)
            return run
        self.patch(service, "seal", recorded(service.seal))
        self.patch(service, "unseal", recorded(service.unseal))
        token = yield self.log_in("alice")
        yield self.finish_starts(self.manager.ensure_agent("alice", token))
        self.assertEqual([name for name, _ in threads], ["seal", "unseal"])
        self.assertNotIn(threading.main_thread(), [thread for _, thread in threads])

    @inlineCallbacks
    def test_the_state_directory_holds_no_password(self):
        password = "correct horse battery staple 42"
        yield self.manager.add_user("carol", password)
        token = yield self.manager.authenticate("carol", password, "192.0.2.1")
        yield self.finish_starts(self.manager.ensure_agent("carol", token))
        self.assertEqual(self.password_received("carol"), password)
        found = _files_containing(self.state_dir, [password.encode(), token.encode()])
        self.assertEqual(found, [], "the password or the token is on disk")
        self.assertTrue(os.path.exists(os.path.join(self.state_dir, "dispatcher.sqlite-wal")))

    @inlineCallbacks
    def test_stopping_the_manager_closes_the_provider(self):
        token = yield self.log_in("alice")
        yield self.finish_starts(self.manager.ensure_agent("alice", token))
        d = self.manager.stopService()
        yield self.finish_starts(d)
        self.assertEqual(self.provider.running(), {})

    @inlineCallbacks
    def test_metrics_count_logins_starts_failures_and_states(self):
        from prometheus_client import generate_latest
        yield self.assertFailure(self.manager.authenticate("alice", "wrong", "192.0.2.9"),
                                 p.InvalidCredentials)
        token = yield self.manager.authenticate("alice", "alice's password", "192.0.2.9")
        yield self.finish_starts(self.manager.ensure_agent("alice", token))
        bobs = yield self.log_in("bob")
        self.provider.fail_next_start("bob", "the agent did not answer HTTP within 60 s")
        yield self.assertFailure(self.finish_starts(self.manager.ensure_agent("bob", bobs)),
                                 p.AgentStartFailed)
        text = generate_latest(self.manager.metrics.registry).decode()
        for line in ['pixelated_logins_total{outcome="failed"} 1.0',
                     'pixelated_logins_total{outcome="ok"} 2.0',
                     'pixelated_agent_starts_total 1.0',
                     'pixelated_agent_start_failures_total{kind="timeout"} 1.0',
                     'pixelated_agents{state="running"} 1.0',
                     'pixelated_agents{state="failed"} 1.0',
                     'pixelated_agent_start_seconds_count 1.0']:
            self.assertIn(line, text)
        self.assertNotIn("alice", text)

    @inlineCallbacks
    def test_repeated_failures_are_rate_limited_even_with_the_right_password(self):
        for _ in range(5):
            yield self.assertFailure(self.manager.authenticate("alice", "bad", "192.0.2.7"),
                                     p.InvalidCredentials)
        failure = yield self.assertFailure(
            self.manager.authenticate("alice", "alice's password", "192.0.2.7"), p.RateLimited)
        self.assertGreaterEqual(p.retry_after(failure), 1)

    @inlineCallbacks
    def test_pushes_tell_subscribers_about_logouts_revocations_and_stopped_agents(self):
        heard = []

        class Listener:
            def session_ended(self, digest):
                heard.append(("ended", digest))

            def sessions_revoked(self, username):
                heard.append(("revoked", username))

            def agent_stopped(self, username):
                heard.append(("stopped", username))
        self.manager.invalidations.subscribe(Listener())
        token = yield self.manager.authenticate("alice", "alice's password", "192.0.2.1")
        yield self.finish_starts(self.manager.ensure_agent("alice", token))
        yield self.finish_starts(self.manager.end_session(token))
        yield self.manager.revoke_sessions("bob")
        self.assertEqual(heard, [("ended", p.token_digest(token)), ("stopped", "alice"),
                                 ("revoked", "bob")])


def _files_containing(directory, needles):
    """Every file under ``directory`` in which one of ``needles`` occurs."""
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                content = f.read()
            found += [(path, needle) for needle in needles if needle in content]
    return found
