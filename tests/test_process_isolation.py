"""Agents under their own uids, with real processes: what only root can show.

These tests need root (CI runs them as root). Elsewhere they skip with one
line, except with ``CI=true``, where skipping would hide that they never ran:
there they fail.
"""
import json
import os
import stat
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from pixelated_dispatcher.manager.providers.interface import AgentStartError

from pixelated_dispatcher.testing.provider_contract import credentials_for

from .process_fixtures import (
    TEST_UIDS, IsolatedFixture, agent_url, http_get, is_alive, require_root, wait_until)

_CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def proc_status(pid: int) -> dict:
    with open("/proc/%d/status" % (pid,)) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


class ProcessIsolationTests(TestCase):
    timeout = 30

    def setUp(self):
        require_root(self)
        self.f = IsolatedFixture(self)

    def start(self, username, provider=None):
        return (provider or self.f.provider).start(
            username, self.f.data_dir(username), credentials_for(username))

    def as_agent_of(self, username, *argv):
        """Run ``argv`` with exactly the privileges of ``username``'s agent;
        fires with (stdout, stderr, exit status)."""
        uid = TEST_UIDS[username]
        command = self.f.provider.wrapper((uid, uid), "/") + list(argv)
        return getProcessOutputAndValue(command[0], command[1:], env={"PATH": "/usr/bin:/bin"},
                                        path="/", reactor=reactor)

    @inlineCallbacks
    def test_two_users_agents_run_under_two_uids_without_capabilities(self):
        alice = yield self.start("alice")
        bob = yield self.start("bob")
        for agent in (alice, bob):
            uid = str(TEST_UIDS[agent.username])
            status = proc_status(agent.pid)
            self.assertEqual(status["Uid"].split(), [uid] * 4)
            self.assertEqual(status["Gid"].split(), [uid] * 4)
            self.assertEqual(status["Groups"].strip(), "")
            for name in _CAPABILITY_SETS:
                self.assertEqual(int(status[name], 16), 0, "%s of %s" % (name, agent.username))
            self.assertEqual(status["NoNewPrivs"], "1")
            self.assertEqual(os.getpgid(agent.pid), agent.pid)
            data = os.stat(self.f.data_dir(agent.username))
            self.assertEqual((data.st_uid, data.st_gid), (int(uid), int(uid)))
            self.assertEqual(stat.S_IMODE(data.st_mode), 0o700)
            # and it can use its data: the visit counter is written there
            code, body = yield http_get(agent_url(agent))
            self.assertIn(b"Mailbox of " + agent.username.encode(), body)
            visits = os.stat(os.path.join(self.f.data_dir(agent.username), "visits"))
            self.assertEqual(visits.st_uid, int(uid))

    @inlineCallbacks
    def test_an_agent_cannot_read_another_users_data(self):
        alice = yield self.start("alice")
        bob = yield self.start("bob")
        for agent in (alice, bob):
            yield http_get(agent_url(agent))  # each writes its visits file
        bobs = self.f.data_dir("bob")
        out, err, code = yield self.as_agent_of("alice", "cat", os.path.join(bobs, "visits"))
        self.assertNotEqual(code, 0)
        self.assertIn(b"Permission denied", err)
        out, err, code = yield self.as_agent_of("alice", "ls", bobs)
        self.assertNotEqual(code, 0)
        self.assertIn(b"Permission denied", err)
        # while its own data is readable to it
        out, err, code = yield self.as_agent_of(
            "alice", "cat", os.path.join(self.f.data_dir("alice"), "visits"))
        self.assertEqual((out, code), (b"1\n", 0))

    @inlineCallbacks
    def test_the_whole_data_tree_becomes_the_agents_without_following_symlinks(self):
        data = self.f.data_dir("alice")
        os.makedirs(os.path.join(data, "mail", "inbox"))
        with open(os.path.join(data, "mail", "inbox", "1"), "w") as f:
            f.write("imported mail")
        outside = os.path.join(self.f.root, "not-the-agents")
        with open(outside, "w") as f:
            f.write("root's")
        os.symlink(outside, os.path.join(data, "mail", "trap"))
        yield self.start("alice")
        uid = TEST_UIDS["alice"]
        for path in ("mail", "mail/inbox", "mail/inbox/1", "mail/trap"):
            self.assertEqual(os.lstat(os.path.join(data, path)).st_uid, uid, path)
        self.assertEqual(os.stat(outside).st_uid, 0)

    @inlineCallbacks
    def test_a_data_dir_the_agent_cannot_reach_is_a_clear_error(self):
        data = self.f.data_dir("alice")
        os.chmod(os.path.dirname(data), 0o700)
        error = yield self.assertFailure(self.start("alice"), AgentStartError)
        self.assertIn("cannot reach its data directory", str(error))
        self.assertIn(os.path.dirname(data), str(error))
        self.assertEqual(self.f.live_agents("alice"), 0)

    @inlineCallbacks
    def test_agents_under_their_uids_are_adopted_and_stopped(self):
        first = self.f.new_provider(keep_on_close=True)
        alice = yield self.start("alice", first)
        yield first.close()
        second = self.f.new_provider(keep_on_close=False)
        adopted = yield second.recover()
        self.assertEqual(adopted, [alice])
        with open(os.path.join(self.f.state_dir, "alice.json")) as f:
            self.assertEqual(json.load(f)["uid"], TEST_UIDS["alice"])
        yield second.stop("alice")
        self.assertEqual(self.f.live_agents("alice"), 0)

    @inlineCallbacks
    def test_an_agent_whose_record_has_no_pid_yet_is_killed(self):
        # the manager was killed between writing the record and completing it
        uid = TEST_UIDS["alice"]
        os.makedirs(self.f.state_dir)
        with open(os.path.join(self.f.state_dir, "alice.json"), "w") as f:
            json.dump({"version": 1, "username": "alice", "pid": None, "start_time": None,
                       "pgid": None, "port": 1, "started": 1.0, "argv": ["agent"],
                       "uid": uid, "gid": uid}, f)
        # no marker in its environment: found by its uid
        orphan = subprocess.Popen(self.f.provider.wrapper((uid, uid), "/") + ["sleep", "60"],
                                  env={"PATH": "/usr/bin:/bin"})
        self.addCleanup(orphan.wait)
        self.addCleanup(orphan.kill)
        running = yield wait_until(lambda: proc_status(orphan.pid)["Uid"].split()[0] == str(uid))
        self.assertTrue(running)
        adopted = yield self.f.new_provider(keep_on_close=False).recover()
        self.assertEqual(adopted, [])
        self.assertFalse(is_alive(orphan.pid), "an agent without a complete record survived")
        self.assertEqual(os.listdir(self.f.state_dir), [])


#: a manager's life with the process provider, run under a bounded capability
#: set: first start (the data dir becomes the agent's), shutdown that keeps
#: the agent, a restart that adopts it, a stop, and a second start (the data
#: dir is the agent's already and the manager may not even read it)
BOUNDED_MANAGER = """
import json, sys
from twisted.internet import defer, task
from pixelated_dispatcher.manager.providers.process import ProcessProvider, DEMO_AGENT_COMMAND
state_dir, data_dir, uid = sys.argv[1], sys.argv[2], int(sys.argv[3])
credentials = json.dumps({'user': 'alice', 'password': 'pw'}).encode() + b'\\n'
def provider(reactor, keep):
    return ProcessProvider(reactor, DEMO_AGENT_COMMAND, state_dir=state_dir,
                           keep_on_close=keep, accounts=lambda name: (uid, uid),
                           start_timeout=15, stop_grace=5)
async def main(reactor):
    report = {}
    first = provider(reactor, True)
    agent = await first.start('alice', data_dir, credentials)
    report['first'] = agent.pid
    with open('/proc/%d/status' % agent.pid) as f:
        report['caps'] = [line.split()[1] for line in f if line.startswith('Cap')]
    await first.close()
    second = provider(reactor, False)
    adopted = await second.recover()
    report['adopted'] = [a.pid for a in adopted]
    await second.stop('alice')
    again = await second.start('alice', data_dir, credentials)
    report['again'] = again.pid
    await second.close()
    print(json.dumps(report))
task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""

#: what the process provider needs of root's privileges, and nothing more
MANAGER_CAPABILITIES = ("setuid", "setgid", "setpcap", "chown", "kill")


class BoundedManagerTests(TestCase):
    timeout = 60

    def setUp(self):
        require_root(self)
        self.f = IsolatedFixture(self)

    @inlineCallbacks
    def test_the_provider_needs_only_its_documented_capabilities(self):
        bounding = "-all," + ",".join("+" + name for name in MANAGER_CAPABILITIES)
        uid = TEST_UIDS["alice"]
        out, err, code = yield getProcessOutputAndValue(
            "setpriv", ["--bounding-set=" + bounding, "--inh-caps=-all", "--",
                        sys.executable, "-c", BOUNDED_MANAGER, self.f.state_dir,
                        self.f.data_dir("alice"), str(uid)],
            env=dict(os.environ), path="/", reactor=reactor)
        self.assertEqual(code, 0, err.decode("utf-8", "replace")[-3000:])
        report = json.loads(out.decode().strip().splitlines()[-1])
        # without CAP_SETPCAP, setpriv would quietly leave the bounding set full
        self.assertEqual(report["caps"], ["0" * 16] * 5)
        self.assertEqual(report["adopted"], [report["first"]])
        self.assertNotEqual(report["again"], report["first"])
        self.assertEqual(os.stat(self.f.data_dir("alice")).st_uid, uid)
