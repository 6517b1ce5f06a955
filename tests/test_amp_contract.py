"""The AMP contract: values cross the socket unchanged, errors keep their names,
and an unexpected failure in the manager never drops the connection."""
import errno
import sqlite3
import string

from hypothesis import example, given, settings, strategies as st
from twisted.internet.defer import fail, succeed
from twisted.test.iosim import connectedServerAndClient
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher import protocol as p
from pixelated_dispatcher.manager.amp_server import ManagerAMP
from pixelated_dispatcher.manager.peer_policy import ADMIN, PeerPolicy
from pixelated_dispatcher.manager.invalidations import Invalidations
from pixelated_dispatcher.manager.service import AgentDetails
from pixelated_dispatcher.manager.supervisor import AgentStatus
from pixelated_dispatcher.manager.providers.interface import RunningAgent

usernames = st.builds(lambda a, b: a + b,
                      st.sampled_from(string.ascii_lowercase + string.digits + "_"),
                      st.text(alphabet=string.ascii_lowercase + string.digits + "._-",
                              max_size=63))
passwords = st.text(max_size=1024)


class RecordingManager:
    """Answers like the manager would, synchronously, and records the calls."""

    def __init__(self):
        self.calls = []
        self.failure = None
        self.invalidations = Invalidations()

    def _answer(self, name, value, **kwargs):
        self.calls.append((name, kwargs))
        if self.failure is not None:
            return fail(self.failure)
        return succeed(value)

    def authenticate(self, username, password, client):
        return self._answer("authenticate", "tok-" + username, username=username,
                            password=password, client=client)

    def resolve_session(self, token):
        return self._answer("resolve_session", "alice", token=token)

    def end_session(self, token):
        return self._answer("end_session", "alice", token=token)

    def ensure_agent(self, username, token=None):
        return self._answer("ensure_agent", p.AgentAddress("127.0.0.1", 4242),
                            username=username, token=token)

    def locate_agent(self, username, token=None):
        return self._answer("locate_agent", p.AgentAddress("127.0.0.1", 4242),
                            username=username, token=token)

    def add_user(self, username, password):
        return self._answer("add_user", None, username=username, password=password)

    def remove_user(self, username, purge):
        return self._answer("remove_user", None, username=username, purge=purge)

    def list_users(self, after, limit):
        users = [("user%05d" % n, "stopped") for n in range(12000)]
        page = [u for u in users if u[0] > after][:limit]
        return self._answer("list_users", page, after=after, limit=limit)

    def report_activity(self, usernames):
        self.calls.append(("report_activity", {"usernames": usernames}))

    def set_password(self, username, password):
        return self._answer("set_password", None, username=username, password=password)

    def revoke_sessions(self, username):
        return self._answer("revoke_sessions", 3, username=username)

    def list_sessions(self, username):
        return self._answer("list_sessions", [(1.0, 2.0, "192.0.2.1")], username=username)

    def stats(self):
        return self._answer("stats", (10, 4, {"alice": (1000, 5.0), "bob": (2000, 6.0)}))

    def start_agent(self, username):
        return self.ensure_agent(username)

    def stop_agent(self, username):
        return self._answer("stop_agent", None, username=username)

    def agent_info(self, username):
        agent = RunningAgent(username, p.AgentAddress("127.0.0.1", 4242), 99, 1.5)
        return self._answer("agent_info", AgentDetails(AgentStatus(username, "running", agent),
                                                       123456, 7.5), username=username)


class _Everybody(PeerPolicy):
    """Every peer is an admin: the in-memory connections of these tests
    have no Unix credentials (the policy itself: tests/test_manager_rules.py)."""

    def role(self, peer):
        return ADMIN


class _DenyAdmin(PeerPolicy):
    def allows(self, peer, command):
        return command in p.PROXY_COMMANDS


class ContractTests(SynchronousTestCase):

    def connect(self, policy=None):
        self.manager = RecordingManager()
        client, server, pump = connectedServerAndClient(
            lambda: ManagerAMP(self.manager, policy or _Everybody()), amp.AMP)
        self.client, self.pump = client, pump

    def call(self, command, **kwargs):
        """Call and pump; the outcome is taken before AMP sees it, as a
        real caller's errback would (an unhandled error drops the connection)."""
        outcome = []
        self.client.callRemote(command, **kwargs).addBoth(outcome.append)
        self.pump.flush()
        (result,) = outcome
        return fail(result) if isinstance(result, Failure) else succeed(result)

    @settings(max_examples=60)
    @given(usernames, passwords, st.text(max_size=64))
    def test_authenticate_carries_any_username_and_password(self, username, password, client):
        self.connect()
        answer = self.successResultOf(
            self.call(p.Authenticate, username=username, password=password, client=client))
        self.assertEqual(answer, {"token": "tok-" + username})
        self.assertEqual(self.manager.calls,
                         [("authenticate", {"username": username, "password": password,
                                            "client": client})])

    @settings(max_examples=30)
    @given(usernames, passwords)
    def test_add_user_carries_any_username_and_password(self, username, password):
        self.connect()
        self.successResultOf(self.call(p.AddUser, username=username, password=password))
        self.assertEqual(self.manager.calls,
                         [("add_user", {"username": username, "password": password})])

    def test_agent_address_and_info_round_trip(self):
        self.connect()
        self.assertEqual(self.successResultOf(self.call(p.EnsureAgent, username="alice")),
                         {"host": "127.0.0.1", "port": 4242})
        info = self.successResultOf(self.call(p.AgentInfo, username="alice"))
        self.assertEqual((info["state"], info["pid"], info["port"], info["memory"],
                          info["last_activity"]), ("running", 99, 4242, 123456, 7.5))
        stats = self.successResultOf(self.call(p.Stats))
        self.assertEqual((stats["users"], stats["sessions"], stats["running"], stats["memory"]),
                         (10, 4, 2, 3000))

    def test_list_users_comes_in_pages_under_the_amp_value_limit(self):
        self.connect()
        names, after, pages = [], None, 0
        while True:
            kwargs = {"after": after} if after else {}
            page = self.successResultOf(self.call(p.ListUsers, **kwargs))
            self.assertLess(len(page["users"].encode()), 65535)
            names += [name for name, state in p.parse_user_page(page["users"])]
            pages += 1
            if not page["more"]:
                break
            after = names[-1]
        self.assertEqual(names, ["user%05d" % n for n in range(12000)])
        self.assertEqual(pages, 4)  # 18 bytes a line, 60,000 bytes a page

    @given(st.lists(st.tuples(usernames, st.sampled_from(["running", "stopped", "failed"])),
                    max_size=3000))
    def test_user_pages_round_trip_and_stay_under_the_limit(self, users):
        text, taken = p.format_user_page(users)
        self.assertLessEqual(len(text.encode()), p.LIST_PAGE_BYTES)
        self.assertEqual(p.parse_user_page(text), [tuple(u) for u in users[:taken]])
        if taken < len(users):
            self.assertGreater(len(text) + 2 + len("%s\t%s" % users[taken]), p.LIST_PAGE_BYTES)

    def test_subscribed_connection_receives_invalidations_others_do_not(self):
        self.connect()
        heard = []

        class Listener(amp.CommandLocator):
            @p.SessionEnded.responder
            def ended(self, token_digest):
                heard.append(("ended", token_digest))
                return {}

            @p.SessionsRevoked.responder
            def revoked(self, username):
                heard.append(("revoked", username))
                return {}

            @p.AgentStopped.responder
            def stopped(self, username):
                heard.append(("stopped", username))
                return {}
        self.client.locator = Listener()
        self.manager.invalidations.session_ended(p.token_digest("tok"))
        self.pump.flush()
        self.assertEqual(heard, [])
        self.successResultOf(self.call(p.Subscribe))
        self.manager.invalidations.session_ended(p.token_digest("tok"))
        self.manager.invalidations.sessions_revoked("alice")
        self.manager.invalidations.agent_stopped("bob")
        self.pump.flush()
        self.assertEqual(heard, [("ended", p.token_digest("tok")), ("revoked", "alice"),
                                 ("stopped", "bob")])

    def test_activity_reports_reach_the_manager(self):
        self.connect()
        names = ["user%d" % n for n in range(1000)]
        self.successResultOf(self.call(p.ReportActivity, usernames=names))
        self.assertEqual(self.manager.calls, [("report_activity", {"usernames": names})])

    def test_declared_errors_arrive_by_name_with_their_message(self):
        self.connect()
        for error, command, kwargs in [
                (p.InvalidCredentials("invalid username or password"), p.Authenticate,
                 dict(username="a", password="b", client="c")),
                (p.InvalidSession("no such session"), p.ResolveSession, dict(token="t")),
                (p.UnknownUser("no user named bob"), p.RemoveUser, dict(username="bob")),
                (p.UserExists("user alice exists already"), p.AddUser,
                 dict(username="alice", password="x")),
                (p.AgentStartFailed("exited with status 3"), p.EnsureAgent,
                 dict(username="alice"))]:
            self.manager.failure = error
            failure = self.failureResultOf(self.call(command, **kwargs), type(error))
            self.assertEqual(str(failure.value), str(error))

    @settings(max_examples=60)
    @given(st.integers(min_value=-10, max_value=10 ** 12))
    def test_a_rate_limit_carries_its_wait_across_the_wire(self, seconds):
        """RATE_LIMITED has no typed field (docs/architecture.rst): the wait
        the manager writes into the message is the one the proxy reads back
        from the error AMP delivers, from one second up to the longest."""
        self.connect()
        self.manager.failure = p.rate_limited(seconds)
        failure = self.failureResultOf(
            self.call(p.Authenticate, username="alice", password="x", client="192.0.2.7"),
            p.RateLimited)
        self.assertEqual(p.retry_after(failure.value, default=-1),
                         min(max(1, seconds), p.MAX_RETRY_AFTER))

    @given(st.text(max_size=300), st.integers(min_value=0, max_value=p.MAX_RETRY_AFTER))
    def test_the_wait_is_read_from_the_end_of_any_message(self, text, seconds):
        error = p.RateLimited("%s retry after %d seconds" % (text, seconds))
        self.assertEqual(p.retry_after(error, default=-1), seconds)

    @example("too many failed logins; retry after \u00b2 seconds")
    @example("too many failed logins; retry after %s seconds" % ("9" * 5000))
    @given(st.text(max_size=300))
    def test_any_message_gives_a_wait_without_failing(self, text):
        """Whatever text a RATE_LIMITED error brings (AMP decodes any bytes
        with "replace"), the proxy gets a wait to show: the number, in ASCII
        digits, that the message ends with, or the default."""
        wait = p.retry_after(p.RateLimited(text), default=-1)
        if wait != -1:
            self.assertTrue(text.endswith(" seconds"), text)
            number = text[:-len(" seconds")].rsplit(" ", 1)[-1]
            self.assertTrue(number.isascii() and number.isdigit(), text)
            self.assertEqual(int(number), wait)

    def test_a_wait_in_other_digits_or_too_long_is_the_default(self):
        # int() reads "\u0663" (Arabic-Indic three) and fails on "\u00b2"
        # and on 5000 digits, which str.isdigit() all let through
        for number in ["\u00b2", "\u0663", "9" * 5000, "1" * 10, "", "-5", "5.5"]:
            error = p.RateLimited("too many failed logins; retry after %s seconds" % number)
            self.assertEqual(p.retry_after(error, default=60), 60, number[:12])

    def test_unexpected_error_becomes_internal_error_and_connection_survives(self):
        self.connect()
        self.manager.failure = ZeroDivisionError("boom")
        failure = self.failureResultOf(self.call(p.ResolveSession, token="t"), p.InternalError)
        self.assertNotIn("boom", str(failure.value))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.manager.failure = None
        self.assertEqual(self.successResultOf(self.call(p.ResolveSession, token="t")),
                         {"username": "alice"})

    def test_a_full_disk_is_storage_full_not_internal_error(self):
        """What SQLite or a file write says when the state directory's file
        system is full reaches the caller as StorageFull (so pixelated-ctl
        and the proxy can say so), logged without a traceback; the
        connection survives."""
        self.connect()
        for error in (sqlite3.OperationalError("database or disk is full"),
                      OSError(errno.ENOSPC, "No space left on device"),
                      OSError(errno.EDQUOT, "Disk quota exceeded")):
            self.manager.failure = error
            failure = self.failureResultOf(
                self.call(p.AddUser, username="alice", password="x"), p.StorageFull)
            self.assertIn("no space left", str(failure.value))
            self.assertEqual(self.flushLoggedErrors(), [])
        # other SQLite and OS errors stay internal errors
        for error in (sqlite3.OperationalError("database is locked"),
                      OSError(errno.EIO, "Input/output error")):
            self.manager.failure = error
            self.failureResultOf(self.call(p.AddUser, username="alice", password="x"),
                                 p.InternalError)
            self.assertEqual(len(self.flushLoggedErrors(type(error))), 1)
        self.manager.failure = None
        self.successResultOf(self.call(p.ResolveSession, token="t"))

    def test_policy_refusal_is_permission_denied_and_reaches_no_domain_code(self):
        self.connect(policy=_DenyAdmin())
        self.failureResultOf(self.call(p.AddUser, username="eve", password="x"),
                             p.PermissionDenied)
        self.assertEqual(self.manager.calls, [])
        self.successResultOf(self.call(p.ResolveSession, token="t"))

    def test_a_proxy_must_show_a_session_to_reach_an_agent(self):
        self.connect(policy=_DenyAdmin())
        for command in (p.EnsureAgent, p.LocateAgent):
            for kwargs in ({}, {"token": ""}):
                failure = self.failureResultOf(self.call(command, username="bob", **kwargs),
                                               p.InvalidSession)
                self.assertEqual(str(failure.value), "no such session, or it has expired")
        self.assertEqual(self.manager.calls, [], "refused before any domain code")
        self.successResultOf(self.call(p.EnsureAgent, username="alice", token="tok"))
        self.assertEqual(self.manager.calls,
                         [("ensure_agent", {"username": "alice", "token": "tok"})])

    def test_an_admin_may_ask_without_a_session(self):
        self.connect()
        self.successResultOf(self.call(p.LocateAgent, username="alice"))
        self.assertEqual(self.manager.calls,
                         [("locate_agent", {"username": "alice", "token": None})])

    def test_no_command_but_authenticate_and_the_admin_ones_carries_a_password(self):
        # The sealed-credentials promise: what the agent needs crosses the
        # socket only in Authenticate (and AddUser/SetPassword, admin only).
        carrying = {command.__name__ for command in p.PROXY_COMMANDS + p.ADMIN_COMMANDS
                    + p.PUSHED_COMMANDS
                    if any(b"password" in name for name, _ in command.arguments
                           + command.response)}
        self.assertEqual(carrying, {"Authenticate", "AddUser", "SetPassword"})

    def test_every_command_declares_the_common_errors(self):
        for command in p.PROXY_COMMANDS + p.ADMIN_COMMANDS:
            for error in (p.InternalError, p.PermissionDenied, p.StorageFull):
                self.assertIn(error, command.errors, command.__name__)

    def test_oversized_value_is_refused_before_sending(self):
        self.connect()
        self.assertRaises(amp.TooLong, self.client.callRemote, p.Authenticate,
                          username="a", password="x" * 70000, client="c")
