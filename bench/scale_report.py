"""Pure figures for ``bench/scale``: percentiles, least-squares fits, the table.

No I/O and no Twisted here, so ``tests/test_scale_harness.py`` can check the
arithmetic and the layout quickly.
"""
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

MIB = 1024.0 * 1024.0


def percentile(values: Sequence[float], fraction: float) -> Optional[float]:
    """The nearest-rank percentile (``fraction`` in 0..1); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(math.ceil(fraction * len(ordered))))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(seconds: Sequence[float]) -> Dict[str, Optional[float]]:
    """count, p50 and p99 in milliseconds (None when there is nothing)."""
    def ms(value):
        return None if value is None else round(value * 1000.0, 2)
    return {"count": len(seconds), "p50_ms": ms(percentile(seconds, 0.50)),
            "p99_ms": ms(percentile(seconds, 0.99)),
            "max_ms": ms(max(seconds) if seconds else None)}


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Dict[str, Optional[float]]:
    """Ordinary least squares ``y = slope * x + intercept`` and its R².

    Needs at least two distinct x; otherwise slope and intercept are None.
    """
    n = len(xs)
    if n != len(ys):
        raise ValueError("xs and ys differ in length")
    result: Dict[str, Optional[float]] = {"points": n, "slope": None, "intercept": None,
                                          "r2": None}
    if n < 2:
        return result
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return result
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    syy = sum((y - mean_y) ** 2 for y in ys)
    residual = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    result.update(slope=slope, intercept=intercept,
                  r2=1.0 if syy == 0 else 1.0 - residual / syy)
    return result


def fit_points(points: Iterable[dict], x_key: str, y_key: str,
               where: Optional[dict] = None) -> Dict[str, Optional[float]]:
    """Fit ``y_key`` against ``x_key`` over the points matching ``where``."""
    chosen = [p for p in points
              if p.get(y_key) is not None and p.get(x_key) is not None
              and all(p.get(k) == v for k, v in (where or {}).items())]
    return linear_fit([float(p[x_key]) for p in chosen], [float(p[y_key]) for p in chosen])


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return "%.0f" % value
        if value >= 10:
            return "%.1f" % value
        return "%.3g" % value
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    """A reStructuredText simple table (also readable as plain text)."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.append(rule)
    return lines


POINT_HEADERS = ("point", "users", "sessions", "agents", "manager MiB", "proxy MiB",
                 "ctl list s", "of it start", "Resolve/s")


def point_rows(points: Sequence[dict]) -> List[Tuple]:
    return [(p["point"], p["users"], p["sessions"], p["agents"],
             None if p.get("manager_rss") is None else p["manager_rss"] / MIB,
             None if p.get("proxy_rss") is None else p["proxy_rss"] / MIB,
             p.get("ctl_list_s"), p.get("ctl_start_s"), p.get("resolve_per_s"))
            for p in points]


def fits(points: Sequence[dict]) -> Dict[str, dict]:
    """The growth figures the issue asks for, in bytes per unit.

    * per user: manager RSS over the points without agents or browser sessions;
    * per running agent: manager and proxy RSS over the cold-login points
      (one session per agent there, so the proxy figure includes it);
    * per session: manager and proxy RSS over the points with the full
      number of agents, where only the number of sessions changes.
    """
    no_agents = [p for p in points if p["agents"] == 0 and p["point"].startswith("users")]
    agent_points = [p for p in points if p["point"].startswith(("users=", "agents="))
                    and p["users"] == max((q["users"] for q in points), default=0)]
    most_agents = max((p["agents"] for p in points), default=0)
    session_points = [p for p in points if p["point"].startswith(("agents=", "sessions="))
                      and p["agents"] == most_agents and most_agents > 0]
    return {
        "manager_bytes_per_user": fit_points(no_agents, "users", "manager_rss"),
        "proxy_bytes_per_user": fit_points(no_agents, "users", "proxy_rss"),
        "manager_bytes_per_agent": fit_points(agent_points, "agents", "manager_rss"),
        "proxy_bytes_per_agent": fit_points(agent_points, "agents", "proxy_rss"),
        "manager_bytes_per_session": fit_points(session_points, "sessions", "manager_rss"),
        "proxy_bytes_per_session": fit_points(session_points, "sessions", "proxy_rss"),
    }


def fit_rows(fitted: Dict[str, dict]) -> List[Tuple]:
    rows = []
    for name, fit in fitted.items():
        rows.append((name, None if fit["slope"] is None else round(fit["slope"]),
                     None if fit["r2"] is None else round(fit["r2"], 3), fit["points"]))
    return rows


def render(result: dict) -> str:
    """The one table (three parts: points, growth, phases and targets)."""
    lines = ["pixelated-dispatcher scale benchmark",
             "command: %s" % result.get("command", ""),
             "machine: %s" % result.get("machine", ""), ""]
    lines += table(POINT_HEADERS, point_rows(result["points"]))
    lines.append("")
    lines += table(("growth (least squares)", "bytes/unit", "R²", "points"),
                   fit_rows(result["fits"]))
    lines.append("")
    lines += table(("phase", "figure"), [(k, v) for k, v in result["phases"]])
    lines.append("")
    lines += table(("target", "measured", "met"),
                   [(t["target"], t["measured"], t["met"]) for t in result["targets"]])
    for note in result.get("notes", []):
        lines.append("note: " + note)
    return "\n".join(lines)


def check(measured: Optional[float], limit: float, below: bool = True) -> str:
    """'yes', 'NO', or 'not measured'."""
    if measured is None:
        return "not measured"
    ok = measured < limit if below else measured >= limit
    return "yes" if ok else "NO"
