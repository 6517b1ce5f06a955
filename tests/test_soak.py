"""The chaos soak, CI-sized: ``bench/soak`` for 75 s with 8 users, seed 16,
process provider (the real daemons, the real proxy, random faults among all
kinds), and, where a Docker engine can be started, 50 s of the Docker
provider on the soak's own dockerd, which it restarts among other faults. Fails
on any broken invariant, with the harness's summary as the message.

Needs root (a tmpfs for the state, agents under their own uids, dockerd):
skips without it, fails under CI=true. About 2.5 minutes.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import pytest

from . import dockerd

pytestmark = pytest.mark.whole_system

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOAK = os.path.join(ROOT, "bench", "soak")


def need_root():
    if os.geteuid() != 0:
        if dockerd.in_ci():
            raise AssertionError("CI runs as root; the soak must not be skipped there")
        raise unittest.SkipTest("the soak needs root (tmpfs, agent uids)")


class SoakTests(unittest.TestCase):

    def soak(self, *args, budget):
        directory = tempfile.mkdtemp(prefix="pxd-soak-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "report.json")
        process = subprocess.Popen([sys.executable, SOAK, "--json", path] + list(args),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, cwd=ROOT)
        try:
            output, _ = process.communicate(timeout=budget)
        except subprocess.TimeoutExpired:
            process.terminate()  # the harness tears everything down on SIGTERM
            output, _ = process.communicate(timeout=120)
            self.fail("bench/soak took longer than %d s:\n%s" % (budget, output[-6000:]))
        self.assertTrue(os.path.exists(path), output[-6000:])
        with open(path) as f:
            report = json.load(f)
        self.assertEqual((process.returncode, report["broken"]), (0, []), output[-6000:])
        return report

    def test_process_provider(self):
        need_root()
        report = self.soak("--provider", "process", "--duration", "75", "--users", "8",
                           "--seed", "16", budget=240)
        # the run did what it claims: faults of several kinds, users served
        self.assertGreaterEqual(len({f["kind"] for f in report["faults"]}), 5,
                                report["faults"])
        self.assertGreater(report["users"]["ok"], 8 * 40)
        self.assertGreater(report["agents"]["checks"], 5)

    def test_docker_provider(self):
        need_root()
        dockerd.engine_or_skip()  # dockerd installed (the soak starts its own)
        # the faults that touch containers (the others are the process run's)
        report = self.soak("--provider", "docker", "--duration", "50", "--users", "4",
                           "--seed", "16", "--faults",
                           "dockerd-restart,agent-kill,agent-stop,manager-kill",
                           budget=240)
        kinds = [f["kind"] for f in report["faults"]]
        self.assertIn("dockerd-restart", kinds)
        self.assertGreaterEqual(len(set(kinds)), 3, kinds)
