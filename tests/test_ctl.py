"""pixelated-ctl's own logic, without a manager: what each subcommand asks
and prints, how failures become one sentence and an exit status, and how the
password is read. (The whole CLI against a real manager runs in
tests/test_end_to_end.py.)"""
import argparse
import errno
import io
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectError
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher import ctl
from pixelated_dispatcher import protocol as p


class FakeManagerCalls:
    """``callRemote`` of a manager that answers from a script."""

    def __init__(self, answers: Optional[Dict[type, Any]] = None) -> None:
        self.calls: List[Tuple[type, Dict[str, Any]]] = []
        self.answers = answers or {}

    async def __call__(self, command: type, **kwargs: Any) -> Dict[str, Any]:
        self.calls.append((command, kwargs))
        answer = self.answers.get(command, {})
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(**kwargs)
        return answer


def parse(*argv: str) -> argparse.Namespace:
    return ctl._parser().parse_args(list(argv))


class Subcommands(SynchronousTestCase):
    def run_command(self, calls: FakeManagerCalls, *argv: str,
                    password: Optional[str] = None) -> str:
        out = io.StringIO()
        arguments = parse(*argv)
        invocation = ctl.Invocation(calls, arguments, password, out)
        self.successResultOf(ensureDeferred(ctl.COMMANDS[arguments.command](invocation)))
        return out.getvalue()

    def test_every_subcommand_of_the_parser_has_a_handler(self) -> None:
        parser = ctl._parser()
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        names = set(subparsers[0].choices)
        self.assertEqual(names - {"move"}, set(ctl.COMMANDS))

    def test_add_sends_the_password_it_was_given(self) -> None:
        calls = FakeManagerCalls()
        out = self.run_command(calls, "add", "alice", password="s3cret")
        self.assertEqual(calls.calls, [(p.AddUser, {"username": "alice", "password": "s3cret"})])
        self.assertEqual(out, "added user alice\n")

    def test_remove_says_whether_the_data_stays(self) -> None:
        calls = FakeManagerCalls()
        self.assertEqual(self.run_command(calls, "remove", "bob"),
                         "removed user bob (their data stays on disk)\n")
        self.assertEqual(self.run_command(calls, "remove", "bob", "--purge"),
                         "removed user bob and their data\n")
        self.assertEqual([kwargs["purge"] for _, kwargs in calls.calls], [False, True])

    def test_start_prints_the_address(self) -> None:
        calls = FakeManagerCalls({p.StartAgent: {"host": "127.0.0.1", "port": 41001}})
        self.assertEqual(self.run_command(calls, "start", "alice"),
                         "agent of alice running at 127.0.0.1:41001\n")

    def test_logout_counts_sessions_in_words(self) -> None:
        for count, expected in [(0, "ended 0 sessions of alice\n"),
                                (1, "ended 1 session of alice\n"),
                                (2, "ended 2 sessions of alice\n")]:
            calls = FakeManagerCalls({p.RevokeSessions: {"count": count}})
            self.assertEqual(self.run_command(calls, "logout", "alice"), expected)

    def test_list_follows_every_page(self) -> None:
        pages = {"": {"users": "alice\trunning\nbob\tstopped\n", "more": True},
                 "bob": {"users": "carol\trunning\n", "more": False}}
        calls = FakeManagerCalls({p.ListUsers: lambda after="": pages[after]})
        out = self.run_command(calls, "list")
        self.assertEqual(out.splitlines(), ["USER   AGENT", "alice  running",
                                            "bob    stopped", "carol  running"])
        self.assertEqual([kwargs for _, kwargs in calls.calls], [{}, {"after": "bob"}])

    def test_running_lists_only_running_agents(self) -> None:
        calls = FakeManagerCalls({p.ListUsers: {"users": "alice\trunning\nbob\tstopped\n",
                                                "more": False}})
        self.assertEqual(self.run_command(calls, "running"), "alice\n")

    def test_list_json_names_the_node_when_there_is_one(self) -> None:
        calls = FakeManagerCalls({
            p.ListUsers: {"users": "alice\trunning\nbob\tstopped\n", "more": False},
            p.Stats: {"agents": [{"username": "alice", "node": "node-1"}]}})
        self.assertEqual(self.run_command(calls, "list", "--json"),
                         '[{"username": "alice", "state": "running", "node": "node-1"},'
                         ' {"username": "bob", "state": "stopped"}]\n')

    def test_info_of_a_stopped_agent_has_no_address(self) -> None:
        calls = FakeManagerCalls({p.AgentInfo: {
            "username": "alice", "state": "failed", "reason": "exited with code 1",
            "host": "", "port": 0, "pid": 0, "started": 0.0, "memory": 0,
            "last_activity": 0.0}})
        self.assertEqual(self.run_command(calls, "info", "alice").splitlines(),
                         ["user    alice", "state   failed", "reason  exited with code 1"])

    def test_stats_json_keeps_the_agents(self) -> None:
        stats = {"users": 3, "sessions": 2, "running": 1, "memory": 1048576,
                 "agents": [{"username": "alice", "memory": 1048576, "started": 1.0}]}
        calls = FakeManagerCalls({p.Stats: stats})
        self.assertEqual(self.run_command(calls, "stats", "--json"),
                         '{"users": 3, "sessions": 2, "running": 1, "memory": 1048576,'
                         ' "agents": [{"username": "alice", "memory": 1048576,'
                         ' "started": 1.0}]}\n')

    def test_import_legacy_pages_and_counts(self) -> None:
        pages = {"": {"entries": [{"username": "a", "outcome": "imported", "detail": "ok"}],
                      "more": True},
                 "a": {"entries": [{"username": "b", "outcome": "skipped", "detail": "exists"}],
                       "more": False}}
        calls = FakeManagerCalls({p.ImportLegacy: lambda root, after="": pages[after]})
        out = self.run_command(calls, "import-legacy", "/srv/old")
        self.assertEqual(out.splitlines(), ["imported a: ok", "skipped  b: exists",
                                            "1 imported, 1 skipped"])
        self.assertEqual(calls.calls[0][1], {"root": "/srv/old"})

    def test_move_is_refused_before_the_manager_is_asked(self) -> None:
        error = self.failureResultOf(ensureDeferred(ctl.run(
            None, parse("move", "alice", "node-2"), None, io.StringIO())), ctl.CtlError)
        self.assertEqual(error.value.code, ctl.EXIT_USAGE)
        self.assertIn("cannot move alice to node-2", str(error.value))


class Failures(SynchronousTestCase):
    def test_unreachable_manager(self) -> None:
        error = ctl._explain(ConnectError(osError=errno.ENOENT), "/run/x.sock", None)
        self.assertEqual(error.code, ctl.EXIT_UNREACHABLE)
        self.assertIn("cannot reach the manager at /run/x.sock", str(error))

    def test_socket_permission(self) -> None:
        error = ctl._explain(ConnectError(osError=errno.EACCES), "/run/x.sock", None)
        self.assertEqual(error.code, ctl.EXIT_FAILED)
        self.assertIn("permission denied", str(error))

    def test_manager_errors_become_sentences(self) -> None:
        for error, sentence in [
                (p.UnknownUser("x"), "there is no user named alice"),
                (p.UserExists("x"), "a user named alice exists already"),
                (p.PermissionDenied("x"), "the manager refuses this command to you"),
                (p.AgentStartFailed("exited"), "could not be started: exited"),
                (amp.UnknownRemoteError("boom"), "unexpected error; see its log")]:
            explained = ctl._explain(error, "/s", "alice")
            self.assertIn(sentence, str(explained))
            self.assertEqual(explained.code, ctl.EXIT_FAILED)


class Passwords(SynchronousTestCase):
    def test_one_line_from_stdin_without_its_line_end(self) -> None:
        self.assertEqual(ctl.read_password(True, io.StringIO("pa ss\r\nnext\n")), "pa ss")
        self.assertEqual(ctl.read_password(True, io.StringIO("last")), "last")

    def test_nothing_or_an_empty_line_is_refused(self) -> None:
        for stdin in ("", "\n"):
            error = self.assertRaises(ctl.CtlError, ctl.read_password, True,
                                      io.StringIO(stdin))
            self.assertEqual(error.code, ctl.EXIT_USAGE)


class Columns(SynchronousTestCase):
    def test_left_aligned_without_trailing_space(self) -> None:
        self.assertEqual(ctl.columns([("a", "bb"), ("ccc", "d")]), ["a    bb", "ccc  d"])
