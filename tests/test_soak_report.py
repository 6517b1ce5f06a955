"""The judgement of ``bench/soak`` (``bench/soak_report.py``): which answers a
fault excuses, recovery times, lost sessions, growth. Fast; no processes."""
import importlib.util
import os
import unittest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "bench", "soak_report.py")
_spec = importlib.util.spec_from_file_location("soak_report", _PATH)
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

USERS = ["alice", "bob"]


def req(user, t, kind, d=0.01, **extra):
    return dict({"e": "req", "u": user, "t": t, "d": d, "k": kind, "s": 0}, **extra)


def login(user, t, why="first", ok=True):
    return {"e": "login", "u": user, "t": t, "d": 0.1, "ok": ok, "why": why}


def fault(kind, injected, cleared=None, users=None, settle=None, held=False):
    cleared = injected if cleared is None else cleared
    return {"kind": kind, "injected": injected, "cleared": cleared, "users": users,
            "recovery_from": cleared if held else injected,
            "settle": cleared + 30 if settle is None else settle}


def judge(events, faults, hang_limit=6.0):
    return report.judge([login("alice", 0), login("bob", 0)] + events, faults, USERS,
                        hang_limit)


class JudgeTests(unittest.TestCase):

    def test_a_quiet_run_passes(self):
        verdict = judge([req("alice", 1, "ok"), req("bob", 1.5, "ok")], [])
        self.assertEqual((verdict["ok"], verdict["unexcused_errors"], verdict["lost_users"],
                          verdict["forced_logins"]), (2, 0, 0, 0))

    def test_a_retry_is_excused_only_for_the_disturbed_user_until_their_recovery(self):
        faults = [fault("agent-kill", 10, users=["alice"])]
        verdict = judge([req("alice", 10.2, "retry"), req("alice", 11, "starting"),
                         req("alice", 12, "ok"), req("alice", 13, "retry"),
                         req("bob", 10.3, "retry")], faults)
        # alice's two before her recovery are excused; her later one and
        # bob's (whose agent was not touched) are not
        self.assertEqual(verdict["excused_in_fault_windows"], 2)
        self.assertEqual(verdict["unexcused_errors"], 2)
        self.assertEqual(verdict["recovery_by_fault"]["agent-kill"],
                         {"count": 1, "median_s": 2.01, "max_s": 2.01})

    def test_a_request_in_flight_when_the_fault_came_is_in_its_window(self):
        verdict = judge([req("alice", 9.5, "retry", d=1.0), req("alice", 11, "ok"),
                         req("bob", 11, "ok")], [fault("manager-kill", 10)])
        self.assertEqual(verdict["unexcused_errors"], 0)

    def test_connection_errors_are_excused_only_while_the_proxy_is_down(self):
        verdict = judge([req("alice", 10.1, "conn_error"), req("alice", 11, "ok"),
                         req("bob", 11, "ok")], [fault("proxy-kill", 10)])
        self.assertEqual(verdict["unexcused_errors"], 0)
        verdict = judge([req("alice", 10.1, "conn_error"), req("alice", 11, "ok"),
                         req("bob", 11, "ok")], [fault("manager-kill", 10)])
        self.assertEqual(verdict["unexcused_errors"], 1)

    def test_a_504_is_excused_only_for_a_hung_agent(self):
        events = [req("alice", 10.1, "timed_out", d=3.0), req("alice", 15, "ok")]
        self.assertEqual(judge(events, [fault("agent-stop", 10, 14, ["alice"], held=True)])
                         ["unexcused_errors"], 0)
        self.assertEqual(judge(events, [fault("agent-kill", 10, users=["alice"])])
                         ["unexcused_errors"], 1)

    def test_what_no_fault_excuses(self):
        faults = [fault("proxy-kill", 10)]
        verdict = judge([req("alice", 10.1, "wrong_user"), req("alice", 10.2, "logged_out"),
                         req("bob", 10.3, "ok", cookie_changed=True),
                         req("bob", 10.4, "retry", d=7.0),
                         req("alice", 10.5, "no_retry_after"),
                         req("alice", 10.6, "unauthenticated"),
                         login("alice", 10.3, why="sent to the login form")], faults)
        never = verdict["never_excused"]
        self.assertEqual((never["wrong_user"], never["logged_out"], never["cookie_changed"],
                          never["hang"], never["no_retry_after"], never["unauthenticated"]),
                         (1, 1, 1, 1, 1, 1))
        self.assertEqual(verdict["forced_logins"], 1)
        self.assertEqual(verdict["forced_logins_by_fault"], {"proxy-kill": 1})
        self.assertEqual(verdict["lost_sessions"], 2)  # alice (login form), bob (cookie)

    def test_a_good_answer_before_the_restarted_daemon_is_back_ends_no_window(self):
        """A cache may answer a moment after a kill; the window lasts until a
        good answer to a request sent once the daemon answers again."""
        faults = [fault("manager-kill", 10, cleared=13)]
        verdict = judge([req("alice", 10.1, "ok"), req("alice", 11, "retry"),
                         req("alice", 13.5, "ok"), req("alice", 14, "retry"),
                         req("bob", 13.2, "ok")], faults)
        self.assertEqual((verdict["excused_in_fault_windows"], verdict["unexcused_errors"]),
                         (1, 1))
        # counted from the kill: alice was served again 3.51 s after it
        self.assertEqual(verdict["recovery_by_fault"]["manager-kill"]["max_s"], 3.51)

    def test_a_held_fault_recovers_from_its_clearing(self):
        faults = [fault("manager-pause", 10, cleared=14, held=True)]
        verdict = judge([req("alice", 12, "retry", d=2.0), req("alice", 14.5, "ok"),
                         req("bob", 14.2, "ok")], faults)
        self.assertEqual(verdict["unexcused_errors"], 0)
        self.assertEqual(verdict["recovery_by_fault"]["manager-pause"]["max_s"], 0.51)

    def test_a_window_ends_at_settle_for_a_user_who_never_recovers(self):
        faults = [fault("dockerd-restart", 10, settle=20)]
        verdict = judge([req("bob", 12, "ok"), req("alice", 15, "retry"),
                         req("alice", 25, "retry")], faults)
        self.assertEqual(verdict["unexcused_errors"], 1)
        self.assertEqual(verdict["unrecovered_faults"][0]["users"], ["alice"])

    def test_a_user_who_never_logged_in_is_lost(self):
        verdict = report.judge([login("alice", 0), login("bob", 0, ok=False)], [], USERS, 6)
        self.assertEqual(verdict["lost_users"], 1)


def result_with(resources=None, **users):
    verdict = judge([req("alice", 1, "ok")], [])
    verdict.update(users)
    return {"users": verdict,
            "agents": {"orphans": 0, "duplicate_agents": 0, "samples": [], "checks": 1},
            "resources": resources or {}, "full_disk": None, "harness_errors": []}


class FailuresTests(unittest.TestCase):

    def test_nothing_broken(self):
        self.assertEqual(report.failures(result_with()), [])

    def test_each_broken_invariant_is_a_line(self):
        result = result_with(forced_logins=2, unexcused_errors=3)
        result["agents"]["orphans"] = 1
        result["full_disk"] = {"checks": [{"what": "add fails clearly", "passed": False,
                                           "saw": "internal error"}]}
        lines = report.failures(result)
        self.assertEqual(len(lines), 4, lines)

    def test_growth_is_judged_within_each_long_enough_life(self):
        life = {"pid": 1, "seconds": 60, "rss_start": 100, "rss_end": 109, "fds_start": 20,
                "fds_end": 22}
        self.assertEqual(report.failures(result_with({"proxy": {"incarnations": [life]}})), [])
        grown = dict(life, fds_end=23)
        self.assertEqual(len(report.failures(result_with({"proxy": {"incarnations": [grown]}}))),
                         1)
        short = dict(grown, seconds=5)  # restarted soon after: too short to judge
        self.assertEqual(report.failures(result_with({"proxy": {"incarnations": [short]}})), [])


if __name__ == "__main__":
    unittest.main()
