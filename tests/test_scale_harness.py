"""The arithmetic and the layout of ``bench/scale`` (``bench/scale_report.py``):
percentiles, the least-squares fits and the table. Fast; no processes."""
import importlib.util
import os
import unittest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "bench", "scale_report.py")
_spec = importlib.util.spec_from_file_location("scale_report", _PATH)
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

MIB = 1024 * 1024


def point(name, users, sessions, agents, manager, proxy, ctl=0.5, resolve=6000.0):
    return {"point": name, "users": users, "sessions": sessions, "agents": agents,
            "manager_rss": manager, "proxy_rss": proxy, "ctl_list_s": ctl,
            "resolve_per_s": resolve, "resolve_tokens": 3}


class PercentileTests(unittest.TestCase):

    def test_nearest_rank(self):
        values = list(range(1, 101))  # 1..100
        self.assertEqual(report.percentile(values, 0.5), 50)
        self.assertEqual(report.percentile(values, 0.99), 99)
        self.assertEqual(report.percentile(values, 1.0), 100)
        self.assertEqual(report.percentile([7], 0.99), 7)
        self.assertIsNone(report.percentile([], 0.5))

    def test_order_does_not_matter(self):
        self.assertEqual(report.percentile([3, 1, 2], 0.5), 2)

    def test_latency_summary_in_milliseconds(self):
        summary = report.latency_summary([0.001, 0.002, 0.003, 0.1])
        self.assertEqual(summary, {"count": 4, "p50_ms": 2.0, "p99_ms": 100.0,
                                   "max_ms": 100.0})
        self.assertEqual(report.latency_summary([])["p50_ms"], None)


class LinearFitTests(unittest.TestCase):

    def test_exact_line(self):
        fit = report.linear_fit([0, 1000, 10000], [5e7, 5e7 + 2e6, 5e7 + 2e7])
        self.assertAlmostEqual(fit["slope"], 2000.0)
        self.assertAlmostEqual(fit["intercept"], 5e7)
        self.assertAlmostEqual(fit["r2"], 1.0)
        self.assertEqual(fit["points"], 3)

    def test_least_squares_of_noisy_points(self):
        # y = 2x + 1 with residuals +1, -1, -1, +1: the fit is the line itself.
        fit = report.linear_fit([0, 1, 2, 3], [2, 2, 4, 8])
        self.assertAlmostEqual(fit["slope"], 2.0)
        self.assertAlmostEqual(fit["intercept"], 1.0)
        self.assertAlmostEqual(fit["r2"], 1 - 4 / 24)

    def test_not_enough_points(self):
        self.assertIsNone(report.linear_fit([1], [2])["slope"])
        self.assertIsNone(report.linear_fit([3, 3], [1, 2])["slope"])
        with self.assertRaises(ValueError):
            report.linear_fit([1, 2], [1])

    def test_flat_line_has_r2_one(self):
        fit = report.linear_fit([0, 1, 2], [5, 5, 5])
        self.assertEqual(fit["slope"], 0)
        self.assertEqual(fit["r2"], 1.0)


class FitsTests(unittest.TestCase):
    """Which points each growth figure is fitted over."""

    points = [
        point("users=0", 0, 0, 0, 60 * MIB, 50 * MIB),
        point("users=1000", 1000, 0, 0, 60 * MIB + 1000 * 100, 50 * MIB),
        point("users=10000", 10000, 0, 0, 60 * MIB + 10000 * 100, 50 * MIB),
        point("agents=50", 10000, 50, 50, 61 * MIB + 50 * 20000, 50 * MIB + 50 * 30000),
        point("agents=100", 10000, 100, 100, 61 * MIB + 100 * 20000, 50 * MIB + 100 * 30000),
        point("agents=200", 10000, 200, 200, 61 * MIB + 200 * 20000, 50 * MIB + 200 * 30000),
        point("sessions=600", 10000, 600, 200, 61 * MIB + 200 * 20000 + 400 * 1000,
              50 * MIB + 200 * 30000 + 400 * 5000),
        point("sessions=1000", 10000, 1000, 200, 61 * MIB + 200 * 20000 + 800 * 1000,
              50 * MIB + 200 * 30000 + 800 * 5000),
    ]

    def test_per_user_over_the_points_without_agents(self):
        fitted = report.fits(self.points)
        self.assertAlmostEqual(fitted["manager_bytes_per_user"]["slope"], 100.0)
        self.assertEqual(fitted["manager_bytes_per_user"]["points"], 3)

    def test_per_session_at_the_full_number_of_agents(self):
        fitted = report.fits(self.points)
        self.assertAlmostEqual(fitted["manager_bytes_per_session"]["slope"], 1000.0)
        self.assertAlmostEqual(fitted["proxy_bytes_per_session"]["slope"], 5000.0)
        self.assertEqual(fitted["proxy_bytes_per_session"]["points"], 3)

    def test_per_agent_over_the_agent_points(self):
        fitted = report.fits(self.points[3:6])
        self.assertAlmostEqual(fitted["manager_bytes_per_agent"]["slope"], 20000.0)
        self.assertAlmostEqual(fitted["proxy_bytes_per_agent"]["slope"], 30000.0)


class TableTests(unittest.TestCase):

    def test_simple_table_is_aligned_rst(self):
        lines = report.table(("name", "value"), [("a", 1.5), ("longer", None)])
        self.assertEqual(lines, [
            "======  =====",
            "name    value",
            "======  =====",
            "a       1.5",
            "longer  -",
            "======  =====",
        ])

    def test_numbers_are_rounded_by_size(self):
        lines = report.table(("x",), [(1234.567,), (12.345,), (0.012345,), (7,)])
        self.assertEqual([line.strip() for line in lines[3:7]], ["1235", "12.3", "0.0123", "7"])

    def test_render_has_every_part(self):
        result = {"command": "bench/scale --users 10", "machine": "2 cores",
                  "points": FitsTests.points, "fits": report.fits(FitsTests.points),
                  "phases": [("registration", "10 users in 1.0 s")],
                  "targets": [{"target": "ctl list < 1 s", "measured": 0.5,
                               "met": report.check(0.5, 1.0)}],
                  "notes": ["shared CPUs"]}
        text = report.render(result)
        self.assertIn("command: bench/scale --users 10", text)
        self.assertIn("sessions=1000", text)
        self.assertIn("manager_bytes_per_user", text)
        self.assertIn("10 users in 1.0 s", text)
        self.assertIn("note: shared CPUs", text)
        row = [line for line in text.splitlines() if line.startswith("users=1000")][0]
        self.assertEqual(row.split()[:4], ["users=1000", "1000", "0", "0"])
        self.assertEqual(row.split()[4], "60.1")  # MiB

    def test_check(self):
        self.assertEqual(report.check(0.5, 1.0), "yes")
        self.assertEqual(report.check(1.5, 1.0), "NO")
        self.assertEqual(report.check(6000, 5000, below=False), "yes")
        self.assertEqual(report.check(None, 1.0), "not measured")
