"""The invariants of ``bench/soak``, computed from what the users saw.

No I/O and no processes here, so ``tests/test_soak_report.py`` can check the
judgement quickly. The harness hands over:

* *events*: one per answer (``soak_users.py``): ``u`` user, ``t`` when sent
  (epoch seconds), ``d`` seconds until answered, ``k`` kind (see
  ``soak_users.classify``), and logins (``e == "login"``);
* *faults*: one per injected fault: ``kind``, ``injected`` and ``cleared``
  (epoch: when the harness undid it, or when what it killed was back),
  ``recovery_from`` (the kill for what is killed, the clearing for what is
  held), the ``users`` it may disturb (None: everyone), and ``settle`` (the
  last moment an answer may still be excused by it);
* *checks*: the harness's own observations (agents per user, orphans,
  resources, the full-disk operations).

An answer that is not ``ok`` is *excused* only if it is of a kind the fault
may cause, to a user it may disturb, while it lasts: from its injection to
that user's first good answer after it was cleared (at the latest
``settle``). Everything else breaks an invariant.
"""
import statistics
from typing import Dict, Iterable, List, Optional, Sequence

#: Answers a fault may cause (always excused inside its window, for its users).
TRANSIENT = frozenset(["retry", "starting"])

#: More answers some faults may cause: the proxy gone means no connection;
#: a hung agent means the proxy's 504 after --agent-timeout.
EXTRA_EXCUSES = {
    "proxy-kill": frozenset(["conn_error"]),
    "proxy-term": frozenset(["conn_error"]),
    "agent-stop": frozenset(["timed_out"]),
}

#: Answers never excused, whatever happens: each is a number in the report.
NEVER = ("wrong_user", "unauthenticated", "logged_out", "cookie_changed", "hang",
         "no_retry_after")


def median_max(values: Sequence[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {"count": 0, "median_s": None, "max_s": None}
    return {"count": len(values), "median_s": round(statistics.median(values), 2),
            "max_s": round(max(values), 2)}


def disturbs(fault: dict, user: str) -> bool:
    return fault["users"] is None or user in fault["users"]


def recovery_times(fault: dict, requests: Sequence[dict],
                   all_users: Iterable[str]) -> Dict[str, Optional[float]]:
    """For each user the fault disturbs: seconds from ``recovery_from`` to
    that user's first good answer to a request sent after the fault was
    cleared (None: never)."""
    users = list(all_users) if fault["users"] is None else list(fault["users"])
    first: Dict[str, Optional[float]] = {u: None for u in users}
    for event in requests:  # in the order sent
        user = event["u"]
        if (user in first and first[user] is None and event["k"] == "ok"
                and event["t"] >= fault["cleared"]):
            first[user] = max(0.0, event["t"] + event["d"] - fault["recovery_from"])
    return first


def excused_by(event: dict, faults: Sequence[dict],
               recovered: Sequence[Dict[str, Optional[float]]]) -> Optional[dict]:
    """The fault that excuses this non-ok answer, if any."""
    answered = event["t"] + event["d"]
    for fault, first in zip(faults, recovered):
        if not disturbs(fault, event["u"]):
            continue
        allowed = TRANSIENT | EXTRA_EXCUSES.get(fault["kind"], frozenset())
        if event["k"] not in allowed:
            continue
        good = first.get(event["u"])
        until = fault["settle"] if good is None else min(fault["settle"],
                                                          fault["recovery_from"] + good)
        if answered >= fault["injected"] and event["t"] <= until:
            return fault
    return None


def during(event: dict, faults: Sequence[dict]) -> Optional[str]:
    """The kind of the fault most recently injected before this answer."""
    latest = None
    for fault in faults:
        if fault["injected"] <= event["t"] + event["d"]:
            latest = fault
    return latest["kind"] if latest else None


def judge(events: Sequence[dict], faults: Sequence[dict], users: Sequence[str],
          hang_limit: float) -> dict:
    """The invariants that the users' answers decide, as numbers."""
    requests = sorted((e for e in events if e.get("e") == "req"), key=lambda e: e["t"])
    logins = [e for e in events if e.get("e") == "login"]
    recovered = [recovery_times(f, requests, users) for f in faults]
    counts = {name: 0 for name in NEVER}
    counts.update(unexcused=0, excused=0, ok=0)
    kinds: Dict[str, int] = {}
    samples: List[dict] = []
    for event in requests:
        kind = event["k"]
        kinds[kind] = kinds.get(kind, 0) + 1
        broken = []
        if event.get("cookie_changed"):
            broken.append("cookie_changed")
        if event["d"] > hang_limit or kind == "hang":
            broken.append("hang")
        if kind in NEVER:
            broken.append(kind)
        if kind == "ok":
            counts["ok"] += 1
        elif not broken:
            if excused_by(event, faults, recovered) is not None:
                counts["excused"] += 1
            else:
                broken.append("unexcused")
        for name in dict.fromkeys(broken):
            counts[name] += 1
        if broken and len(samples) < 20:
            samples.append(dict(event, broke=broken, during=during(event, faults)))
    first_logins = [e for e in logins if e["why"] == "first"]
    forced = [e for e in logins if e["why"] != "first"]
    logged_in = {e["u"] for e in first_logins if e["ok"]}
    recovery: Dict[str, List[float]] = {}
    unrecovered: List[dict] = []
    for fault, first in zip(faults, recovered):
        times = list(first.values())
        if any(t is None for t in times):
            unrecovered.append({"kind": fault["kind"], "injected": fault["injected"],
                                "users": sorted(u for u, t in first.items() if t is None)[:10]})
        else:
            recovery.setdefault(fault["kind"], []).append(max(times, default=0.0))
    forced_by_fault: Dict[str, int] = {}
    for event in forced:
        kind = during(event, faults) or "none"
        forced_by_fault[kind] = forced_by_fault.get(kind, 0) + 1
    return {
        "requests": len(requests), "answers": kinds, "ok": counts["ok"],
        "excused_in_fault_windows": counts["excused"],
        "never_excused": {name: counts[name] for name in NEVER},
        "unexcused_errors": counts["unexcused"],
        "users": len(users), "users_logged_in_at_start": len(logged_in),
        "lost_users": len(set(users) - logged_in),
        "forced_logins": len(forced), "forced_logins_by_fault": forced_by_fault,
        "lost_sessions": len({e["u"] for e in forced} | {
            e["u"] for e in requests if e.get("cookie_changed") or e["k"] == "logged_out"}),
        "recovery_by_fault": {kind: median_max(values)
                              for kind, values in sorted(recovery.items())},
        "unrecovered_faults": unrecovered,
        "samples": samples,
    }


def growth(start: Optional[float], end: Optional[float]) -> Optional[float]:
    """Relative growth from start to end (0.1 is 10 %); None if unknown."""
    if not start or end is None:
        return None
    return (end - start) / start


def failures(result: dict, max_growth: float = 0.10, min_life: float = 20.0) -> List[str]:
    """Every broken invariant as one line (empty: the soak passed)."""
    broken: List[str] = []
    verdict = result["users"]
    for name, count in verdict["never_excused"].items():
        if count:
            broken.append("%d answers %s" % (count, name))
    if verdict["unexcused_errors"]:
        broken.append("%d errors outside a fault window" % verdict["unexcused_errors"])
    for name in ("lost_users", "forced_logins", "lost_sessions"):
        if verdict[name]:
            broken.append("%s: %d" % (name.replace("_", " "), verdict[name]))
    if verdict["unrecovered_faults"]:
        broken.append("%d faults without recovery" % len(verdict["unrecovered_faults"]))
    agents = result["agents"]
    for name in ("orphans", "duplicate_agents"):
        if agents[name]:
            broken.append("%s: %d (%s)" % (name, agents[name], agents["samples"][:3]))
    for daemon, figures in result["resources"].items():
        # A restarted daemon is a new process (a manager that adopted its
        # agents holds a pidfd for each): growth is judged within each life.
        for life in figures["incarnations"]:
            if life.get("seconds", 0) < min_life:
                continue
            for what in ("rss", "fds"):
                change = growth(life.get(what + "_start"), life.get(what + "_end"))
                if change is not None and change > max_growth:
                    broken.append("%s (pid %s, %s s) %s grew %.0f%% (%s -> %s)" % (
                        daemon, life["pid"], life["seconds"], what, change * 100,
                        life[what + "_start"], life[what + "_end"]))
    disk = result.get("full_disk") or {}
    for check in disk.get("checks", []):
        if not check["passed"]:
            broken.append("full disk: %s: %s" % (check["what"], check["saw"]))
    if result.get("harness_errors"):
        broken.extend("harness: %s" % e for e in result["harness_errors"])
    return broken


def render(result: dict) -> str:
    """The human summary."""
    v = result["users"]
    lines = ["bench/soak: %s" % result["command"],
             "%s; %s; seed %s; %d faults in %.0f s" % (
                 result["machine"], result["provider"], result["seed"], len(result["faults"]),
                 result["seconds"]),
             "",
             "users %d (logged in %d, lost %d); requests %d: ok %d, excused in fault windows %d,"
             " unexcused %d" % (v["users"], v["users_logged_in_at_start"], v["lost_users"],
                                v["requests"], v["ok"], v["excused_in_fault_windows"],
                                v["unexcused_errors"]),
             "forced logins %d %s; lost sessions %d" % (
                 v["forced_logins"], v["forced_logins_by_fault"] or "", v["lost_sessions"]),
             "never excused: " + ", ".join("%s %d" % kv for kv in v["never_excused"].items()),
             "answers: " + ", ".join("%s %d" % kv for kv in sorted(v["answers"].items())),
             "agents: orphans %d, two for one user %d, checks %d" % (
                 result["agents"]["orphans"], result["agents"]["duplicate_agents"],
                 result["agents"]["checks"]),
             "", "recovery (first good answer after the fault, every disturbed user):"]
    for kind, figures in v["recovery_by_fault"].items():
        lines.append("  %-16s %3d  median %6.2f s  max %6.2f s" % (
            kind, figures["count"], figures["median_s"], figures["max_s"]))
    for fault in v["unrecovered_faults"]:
        lines.append("  %-16s NOT recovered (users %s)" % (fault["kind"], fault["users"]))
    lines.append("")
    for daemon, figures in result["resources"].items():
        lives = figures["incarnations"]
        first, last = (lives[0], lives[-1]) if lives else ({}, {})
        lines.append("%-8s RSS %s -> %s MiB, fds %s -> %s (first start -> last end);"
                     " restarts %d" % (daemon, _mib(first.get("rss_start")),
                                       _mib(last.get("rss_end")), first.get("fds_start"),
                                       last.get("fds_end"), figures.get("restarts", 0)))
        for life in lives:
            lines.append("         pid %s, %s s: RSS %s -> %s MiB, fds %s -> %s" % (
                life["pid"], life.get("seconds", "?"), _mib(life.get("rss_start")),
                _mib(life.get("rss_end")), life.get("fds_start"), life.get("fds_end")))
    disk = result.get("full_disk")
    if disk:
        lines.append("")
        lines.append("full disk (%d times):" % disk["times"])
        for check in disk["checks"][:8]:
            lines.append("  %s %s: %s" % ("ok  " if check["passed"] else "FAIL",
                                          check["what"], check["saw"]))
    broken = result["broken"]
    lines.append("")
    lines.append("PASSED: every invariant held" if not broken else
                 "FAILED: %d broken invariants" % len(broken))
    lines.extend("  - " + line for line in broken)
    for sample in v["samples"][:8]:
        lines.append("  sample: %s" % sample)
    for note in result.get("notes", []):
        lines.append("note: " + note)
    return "\n".join(lines)


def _mib(value: Optional[float]) -> str:
    return "?" if value is None else "%.1f" % (value / 1048576.0)
