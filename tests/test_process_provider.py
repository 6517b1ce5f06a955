"""The process provider with real processes: the contract suite with the demo
agent, and what only real processes can show (ports, /proc, signals, orphans)."""
import errno
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from pixelated_dispatcher.manager.providers import process as process_module
from pixelated_dispatcher.manager.providers import process_files
from pixelated_dispatcher.manager.providers.interface import AgentStartError
from pixelated_dispatcher.manager.providers.process import (
    DEMO_AGENT_COMMAND, ProcessProvider, free_loopback_port)
from pixelated_dispatcher.manager.providers.process_inspect import AGENT_MARKER, process_start_time

from pixelated_dispatcher.testing.provider_contract import credentials_for, make_provider_tests

from .process_fixtures import ProcessFixture, agent_url, http_get, is_alive, wait_until

# --- helpers ------------------------------------------------------------------

#: a tiny agent for behaviours the demo agent does not have. It reads stdin
#: to EOF (so it only starts if the provider closes stdin), records what it
#: got in its working directory, and serves HTTP. Extra words switch on
#: misbehaviour: "ignore-term", "child" (forks a long sleep).
SCRIPT_AGENT = r'''
import http.server, json, os, signal, subprocess, sys
port, words = int(sys.argv[1]), sys.argv[2:]
stdin = sys.stdin.buffer.read()
with open("agent.json", "w") as f:
    json.dump({"argv": sys.argv[1:], "stdin": stdin.decode(), "cwd": os.getcwd()}, f)
if "ignore-term" in words:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "child" in words:
    with open("child.pid", "w") as f:
        f.write(str(subprocess.Popen(["sleep", "300"]).pid))
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"script agent\n")
    do_HEAD = do_GET
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def script_command(*words: str) -> str:
    return shlex.join([sys.executable, "-c", SCRIPT_AGENT, "{port}"] + list(words))


#: An agent that fails at once, saying why on stderr.
FAILING_AGENT = shlex.join([sys.executable, "-c",
                            "import sys; sys.stderr.write('cannot open the mailbox store\\n');"
                            " sys.exit(3)", "{port}"])


class ProcessProviderContractTests(make_provider_tests(ProcessFixture)):
    pass


class ProcessProviderTests(TestCase):
    timeout = 30

    def fixture(self, command=DEMO_AGENT_COMMAND, **options):
        return ProcessFixture(self, command, **options)

    @inlineCallbacks
    def test_agent_serves_its_user_at_the_address(self):
        f = self.fixture()
        agent = yield f.provider.start("alice", f.data_dir("alice"), credentials_for("alice"))
        code, body = yield http_get(agent_url(agent))
        self.assertEqual(code, 200)
        self.assertIn(b"Mailbox of alice", body)
        self.assertIn(b'href="/about"', body)

    @inlineCallbacks
    def test_two_users_get_two_processes_ports_and_data_dirs(self):
        f = self.fixture()
        alice = yield f.provider.start("alice", f.data_dir("alice"), credentials_for("alice"))
        bob = yield f.provider.start("bob", f.data_dir("bob"), credentials_for("bob"))
        self.assertNotEqual(alice.pid, bob.pid)
        self.assertNotEqual(alice.address.port, bob.address.port)
        for _ in range(2):
            yield http_get(agent_url(alice))
        yield http_get(agent_url(bob))
        code, body = yield http_get(agent_url(bob, "/whoami"))
        self.assertEqual(json.loads(body)["username"], "bob")
        with open(os.path.join(f.data_dir("alice"), "visits")) as visits:
            self.assertEqual(visits.read().strip(), "2")
        with open(os.path.join(f.data_dir("bob"), "visits")) as visits:
            self.assertEqual(visits.read().strip(), "1")

    @inlineCallbacks
    def test_credentials_only_on_stdin_and_a_minimal_environment(self):
        f = self.fixture(extra_env={"FEEDBACK_URL": "https://example.org/tickets"})
        data_dir = f.data_dir("alice")
        agent = yield f.provider.start("alice", data_dir,
                                       credentials_for("alice", "pa55-w0rd-in-the-clear"))
        with open("/proc/%d/cmdline" % agent.pid, "rb") as cmdline:
            argv = cmdline.read()
        with open("/proc/%d/environ" % agent.pid, "rb") as environ:
            env = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if item)
        self.assertIn(b"pixelated_dispatcher.demo_agent", argv)
        for place in (argv, b"\0".join(env.values())):
            self.assertNotIn(b"pa55-w0rd", place)
        self.assertEqual(env, {
            b"PATH": os.environ.get("PATH", os.defpath).encode(),
            b"LANG": b"C.UTF-8",
            b"HOME": data_dir.encode(),
            b"DISPATCHER_LOGOUT_URL": b"/auth/logout",
            b"FEEDBACK_URL": b"https://example.org/tickets",
            # lets a restarted manager find agents it has no record of
            AGENT_MARKER.encode(): f.state_dir.encode(),
        })
        # it leads its own session and process group, so a stop reaches its children
        self.assertEqual(os.getsid(agent.pid), agent.pid)
        self.assertEqual(os.getpgid(agent.pid), agent.pid)

    @inlineCallbacks
    def test_placeholders_are_substituted_per_argument_without_a_shell(self):
        command = script_command("--user={username}", "{data_dir}/x y", "$HOME;{port}")
        f = self.fixture(command)
        data_dir = f.data_dir("alice")
        agent = yield f.provider.start("alice", data_dir, credentials_for("alice"))
        with open(os.path.join(data_dir, "agent.json")) as record:
            seen = json.load(record)
        port = str(agent.address.port)
        self.assertEqual(seen["argv"], [port, "--user=alice", data_dir + "/x y", "$HOME;" + port])
        self.assertEqual(seen["cwd"], data_dir)
        self.assertEqual(seen["stdin"], credentials_for("alice").decode())

    @inlineCallbacks
    def test_an_agent_ignoring_sigterm_is_killed_after_the_grace_period(self):
        f = self.fixture(script_command("ignore-term"), stop_grace=0.5)
        exits = []
        f.provider.on_exit(lambda username, reason: exits.append(reason))
        agent = yield f.provider.start("alice", f.data_dir("alice"), credentials_for("alice"))
        began = time.monotonic()
        yield f.provider.stop("alice")
        took = time.monotonic() - began
        self.assertGreaterEqual(took, 0.5)
        self.assertLess(took, 3)
        self.assertFalse(is_alive(agent.pid))
        self.assertEqual(exits, ["stopped"])

    @inlineCallbacks
    def test_a_polite_agent_stops_on_sigterm_without_waiting_for_the_grace(self):
        f = self.fixture(stop_grace=20)
        agent = yield f.provider.start("alice", f.data_dir("alice"), credentials_for("alice"))
        began = time.monotonic()
        yield f.provider.stop("alice")
        self.assertLess(time.monotonic() - began, 5)
        self.assertFalse(is_alive(agent.pid))

    @inlineCallbacks
    def test_stop_also_ends_the_processes_the_agent_forked(self):
        f = self.fixture(script_command("child"))
        data_dir = f.data_dir("alice")
        yield f.provider.start("alice", data_dir, credentials_for("alice"))
        with open(os.path.join(data_dir, "child.pid")) as pid_file:
            child = int(pid_file.read())
        self.assertTrue(is_alive(child))
        yield f.provider.stop("alice")
        gone = yield wait_until(lambda: not is_alive(child))
        self.assertTrue(gone, "the agent's child outlived the stop")

    @inlineCallbacks
    def test_an_agent_that_exits_at_once_fails_with_its_output(self):
        f = self.fixture(FAILING_AGENT)
        error = yield self.assertFailure(
            f.provider.start("alice", f.data_dir("alice"), credentials_for("alice")),
            AgentStartError)
        self.assertIn("exited with status 3", str(error))
        self.assertIn("cannot open the mailbox store", str(error))
        self.assertEqual(f.provider.running(), {})

    @inlineCallbacks
    def test_an_agent_that_never_answers_http_times_out(self):
        command = shlex.join([sys.executable, "-c",
                              "import sys, time; sys.stdin.read();"
                              " print('still booting', flush=True); time.sleep(60)",
                              "{port}", "{data_dir}"])
        f = self.fixture(command, start_timeout=1.0)
        began = time.monotonic()
        error = yield self.assertFailure(
            f.provider.start("alice", f.data_dir("alice"), credentials_for("alice")),
            AgentStartError)
        self.assertLess(time.monotonic() - began, 5)
        self.assertIn("did not answer HTTP", str(error))
        self.assertIn("within 1 seconds", str(error))
        self.assertIn("still booting", str(error))
        self.assertEqual(f.live_agents("alice"), 0)

    @inlineCallbacks
    def test_a_taken_port_is_retried_on_another(self):
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            taken = squatter.getsockname()[1]
            picks = iter([taken])
            f = self.fixture(choose_port=lambda: next(picks, None) or free_loopback_port())
            agent = yield f.provider.start("alice", f.data_dir("alice"),
                                           credentials_for("alice"))
            self.assertNotEqual(agent.address.port, taken)
            code, body = yield http_get(agent_url(agent, "/health"))
            self.assertEqual((code, body), (200, b"ok\n"))

    @inlineCallbacks
    def test_simultaneous_starts_never_share_a_port(self):
        # a picker that always offers the same port, as the kernel may when
        # two logins arrive at once
        offered = free_loopback_port()
        f = self.fixture(choose_port=lambda: offered)
        alice, bob = yield gatherResults([
            f.provider.start(name, f.data_dir(name), credentials_for(name))
            for name in ("alice", "bob")])
        self.assertNotEqual(alice.address.port, bob.address.port)
        for agent in (alice, bob):
            whoami = yield f.received(agent.username)
            self.assertEqual(whoami["username"], agent.username)

    @inlineCallbacks
    def test_a_port_given_up_is_not_handed_to_another_user(self):
        """A proxy may still hold alice's old address for a moment after her
        agent stopped: bob's agent must not answer there, alice's may."""
        offered = free_loopback_port()
        f = self.fixture(choose_port=lambda: offered)
        alice = yield f.provider.start("alice", f.data_dir("alice"), credentials_for("alice"))
        self.assertEqual(alice.address.port, offered)
        yield f.provider.stop("alice")
        bob = yield f.provider.start("bob", f.data_dir("bob"), credentials_for("bob"))
        self.assertNotEqual(bob.address.port, offered)
        yield f.provider.stop("bob")
        alice = yield f.provider.start("alice", f.data_dir("alice"), credentials_for("alice"))
        self.assertEqual(alice.address.port, offered)

    @inlineCallbacks
    def test_after_the_quarantine_the_port_is_free_again(self):
        offered = free_loopback_port()
        f = self.fixture(choose_port=lambda: offered, port_quarantine=0)
        yield f.provider.start("alice", f.data_dir("alice"), credentials_for("alice"))
        yield f.provider.stop("alice")
        bob = yield f.provider.start("bob", f.data_dir("bob"), credentials_for("bob"))
        self.assertEqual(bob.address.port, offered)

    @inlineCallbacks
    def test_agents_die_with_a_killed_manager(self):
        root = tempfile.mkdtemp(prefix="pixelated-provider-test-")
        self.addCleanup(shutil.rmtree, root, True)
        pid_file = os.path.join(root, "agent.pid")
        script = (
            "import os, sys\n"
            "from twisted.internet import reactor\n"
            "from pixelated_dispatcher.manager.providers.process import"
            " ProcessProvider, DEMO_AGENT_COMMAND\n"
            "p = ProcessProvider(reactor, DEMO_AGENT_COMMAND)\n"
            "def started(agent):\n"
            "    open(sys.argv[2] + '.tmp', 'w').write(str(agent.pid))\n"
            "    os.rename(sys.argv[2] + '.tmp', sys.argv[2])\n"
            "p.start('alice', sys.argv[1], b'{\"user\": \"alice\"}\\n').addCallback(started)\n"
            "reactor.run()\n")
        manager = subprocess.Popen([sys.executable, "-c", script, root, pid_file],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(manager.wait)
        self.addCleanup(manager.kill)
        started = yield wait_until(lambda: os.path.exists(pid_file), timeout=15)
        self.assertTrue(started, "the manager did not start its agent")
        with open(pid_file) as f:
            agent_pid = int(f.read())
        self.assertTrue(is_alive(agent_pid))
        manager.kill()  # SIGKILL: no cleanup code of the manager runs
        gone = yield wait_until(lambda: not is_alive(agent_pid))
        if not gone:
            os.kill(agent_pid, signal.SIGKILL)
        self.assertTrue(gone, "the agent outlived its SIGKILLed manager")

    @inlineCallbacks
    def test_no_uid_for_the_agent_is_a_clear_error(self):
        def accounts(username):
            raise LookupError("the uid range 200000-200001 is used up")
        f = self.fixture(accounts=accounts)
        error = yield self.assertFailure(
            f.provider.start("alice", f.data_dir("alice"), credentials_for("alice")),
            AgentStartError)
        self.assertIn("no uid for the agent of alice: the uid range 200000-200001 is used up",
                      str(error))
        self.assertEqual(f.live_agents("alice"), 0)

    @inlineCallbacks
    def test_an_agent_never_runs_as_root_a_system_account_or_nobody(self):
        for ids in ((0, 0), (999, 999), (65534, 65534), (200000, 0)):
            f = self.fixture(accounts=lambda username: succeed(ids))
            error = yield self.assertFailure(
                f.provider.start("alice", f.data_dir("alice"), credentials_for("alice")),
                AgentStartError)
            self.assertIn("refusing to run the agent of alice as uid %d, gid %d" % ids,
                          str(error))

    @inlineCallbacks
    def test_an_invalid_user_name_is_refused(self):
        f = self.fixture()
        error = yield self.assertFailure(
            f.provider.start("../alice", f.data_dir("alice"), credentials_for("alice")),
            AgentStartError)
        self.assertIn("invalid user name '../alice'", str(error))

    @inlineCallbacks
    def test_a_missing_data_dir_is_a_clear_error(self):
        f = self.fixture()
        error = yield self.assertFailure(
            f.provider.start("alice", os.path.join(f.root, "nowhere"), credentials_for("alice")),
            AgentStartError)
        self.assertIn("the data directory %s does not exist" % (os.path.join(f.root, "nowhere"),),
                      str(error))

    def test_a_broken_command_line_is_refused_at_construction(self):
        for command in ("", "agent --port '{port}", "agent --no-port-here",
                        "DEBUG=1 agent --port {port}"):
            self.assertRaises(ValueError, ProcessProvider, reactor, command)


class ProcessProviderPipeTests(TestCase):
    """Without a state dir: output through pipes, agents die with the manager."""
    timeout = 30

    @inlineCallbacks
    def test_an_agent_that_exits_at_once_fails_with_its_output(self):
        f = ProcessFixture(self, FAILING_AGENT, state=False)
        error = yield self.assertFailure(
            f.provider.start("alice", f.data_dir("alice"), credentials_for("alice")),
            AgentStartError)
        self.assertIn("exited with status 3", str(error))
        self.assertIn("cannot open the mailbox store", str(error))

    def test_recover_without_a_state_dir_adopts_nothing(self):
        f = ProcessFixture(self, state=False)
        self.assertEqual(self.successResultOf(f.provider.recover()), [])

    def test_the_wrapper(self):
        f = ProcessFixture(self, state=False)
        setpriv, setsid, env = (shutil.which(name) for name in ("setpriv", "setsid", "env"))
        # nothing outlives this provider: the kernel kills agents with it
        self.assertEqual(f.provider.wrapper(None, "/data"), [
            setpriv, "--pdeathsig", "SIGKILL", "--no-new-privs",
            "--", setsid, "--", env, "--chdir=/data", "--"])
        keeping = ProcessProvider(reactor, DEMO_AGENT_COMMAND, state_dir="/nonexistent/agents")
        self.assertTrue(keeping.keeps_agents)
        self.assertEqual(keeping.wrapper((200001, 200001), "/data"), [
            setpriv, "--no-new-privs", "--reuid", "200001", "--regid", "200001",
            "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
            "--", setsid, "--", env, "--chdir=/data", "--"])

    def test_state_dir_must_be_absolute(self):
        self.assertRaises(ValueError, ProcessProvider, reactor, DEMO_AGENT_COMMAND,
                          state_dir="relative/agents")


#: a manager that starts alice's agent with a provider keeping agents, says so
#: in a file, and waits to be killed
KEEPING_MANAGER = """
import json, os, sys
from twisted.internet import reactor
from pixelated_dispatcher.manager.providers.process import ProcessProvider, DEMO_AGENT_COMMAND
state_dir, data_dir, report = sys.argv[1:]
p = ProcessProvider(reactor, DEMO_AGENT_COMMAND, state_dir=state_dir, keep_on_close=True)
def started(agent):
    def written(_):
        with open(report + '.tmp', 'w') as f:
            json.dump({'pid': agent.pid, 'port': agent.address.port}, f)
        os.rename(report + '.tmp', report)
    p._queue_disk('alice', lambda: None).addCallback(written)
credentials = json.dumps({'user': 'alice', 'password': 'pw'}).encode() + b'\\n'
p.start('alice', data_dir, credentials).addCallback(started)
reactor.run()
"""


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


class ProcessProviderRecoveryTests(TestCase):
    """Records, logs and adoption with real processes."""
    timeout = 30

    def setUp(self):
        self.f = ProcessFixture(self)
        self.exits = []

    def provider(self, keep_on_close, **options):
        provider = self.f.new_provider(keep_on_close, **options)
        provider.on_exit(lambda username, reason: self.exits.append((username, reason)))
        return provider

    def record_path(self, username):
        return os.path.join(self.f.state_dir, username + ".json")

    def read_record(self, username):
        try:
            with open(self.record_path(username)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def sleeper(self):
        """A live process in its own session that is no agent at all."""
        process = subprocess.Popen(["sleep", "60"], start_new_session=True)
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        return process

    @inlineCallbacks
    def test_a_running_agent_has_a_record_and_a_log(self):
        agent = yield self.f.provider.start("alice", self.f.data_dir("alice"),
                                            credentials_for("alice"))
        written = yield wait_until(
            lambda: (self.read_record("alice") or {}).get("started") == agent.started)
        self.assertTrue(written, "no record of the running agent")
        record = self.read_record("alice")
        self.assertEqual(record["pid"], agent.pid)
        self.assertEqual(record["pgid"], agent.pid)
        self.assertEqual(record["port"], agent.address.port)
        self.assertEqual(record["start_time"], process_start_time(agent.pid))
        self.assertEqual(record["username"], "alice")
        self.assertEqual((record["uid"], record["gid"]), (os.getuid(), os.getgid()))
        self.assertIn("pixelated_dispatcher.demo_agent", record["argv"])
        self.assertNotIn("correct horse", json.dumps(record))
        self.assertEqual(stat.S_IMODE(os.stat(self.f.state_dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.record_path("alice")).st_mode), 0o600)
        # the output goes to a file, not to pipes that would break with the manager
        log_path = os.path.join(self.f.state_dir, "alice.log")
        for fd in (1, 2):
            self.assertEqual(os.readlink("/proc/%d/fd/%d" % (agent.pid, fd)), log_path)
        logged = yield wait_until(lambda: b"serving on" in open(log_path, "rb").read())
        self.assertTrue(logged)
        yield self.f.provider.stop("alice")
        gone = yield wait_until(lambda: not os.path.exists(self.record_path("alice")))
        self.assertTrue(gone, "the record outlived its agent")

    @inlineCallbacks
    def test_an_agent_that_fails_to_start_shows_its_log(self):
        f = ProcessFixture(self, FAILING_AGENT)
        error = yield self.assertFailure(
            f.provider.start("alice", f.data_dir("alice"), credentials_for("alice")),
            AgentStartError)
        self.assertIn("exited with status 3", str(error))
        self.assertIn("cannot open the mailbox store", str(error))
        self.assertIn(os.path.join(f.state_dir, "alice.log"), str(error))
        # a second failure shows its own output only
        error = yield self.assertFailure(
            f.provider.start("alice", f.data_dir("alice"), credentials_for("alice")),
            AgentStartError)
        self.assertEqual(str(error).count("cannot open the mailbox store"), 1)
        gone = yield wait_until(lambda: os.listdir(f.state_dir) == ["alice.log"])
        self.assertTrue(gone, "records of failed starts remain: %r" % os.listdir(f.state_dir))

    @inlineCallbacks
    def test_a_big_log_is_rotated_at_a_start(self):
        self.patch(process_files, "LOG_LIMIT", 100)
        os.makedirs(self.f.state_dir)
        log_path = os.path.join(self.f.state_dir, "alice.log")
        with open(log_path, "wb") as f:
            f.write(b"old\n" * 50)
        yield self.f.provider.start("alice", self.f.data_dir("alice"), credentials_for("alice"))
        with open(log_path + ".1", "rb") as f:
            self.assertEqual(f.read(), b"old\n" * 50)
        with open(log_path, "rb") as f:
            self.assertIn(b"agent of alice starting on port", f.readline())

    @inlineCallbacks
    def test_a_log_growing_big_while_the_agent_runs_is_trimmed(self):
        self.patch(process_files, "LOG_LIMIT", 1000)
        self.patch(process_module, "LOG_CHECK_INTERVAL", 0.1)
        yield self.f.provider.start("alice", self.f.data_dir("alice"), credentials_for("alice"))
        log_path = os.path.join(self.f.state_dir, "alice.log")
        with open(log_path, "ab") as f:
            f.write(b"chatter\n" * 200)
        trimmed = yield wait_until(lambda: os.path.exists(log_path + ".1"))
        self.assertTrue(trimmed, "the log was not trimmed")
        self.assertLess(os.path.getsize(log_path), 1000)
        with open(log_path + ".1", "rb") as f:
            self.assertIn(b"chatter\n" * 200, f.read())

    @inlineCallbacks
    def test_records_of_gone_or_other_processes_are_discarded(self):
        os.makedirs(self.f.state_dir)
        finished = subprocess.Popen(["true"])
        finished.wait()
        other = self.sleeper()
        port = free_loopback_port()

        def record(username, pid, start_time):
            return {"version": 1, "username": username, "pid": pid, "pgid": pid,
                    "start_time": start_time, "port": port, "started": 1.0,
                    "argv": ["agent"], "uid": os.getuid(), "gid": os.getgid()}
        start_time = yield wait_until(lambda: process_start_time(other.pid))
        write_json(self.record_path("bob"), record("bob", finished.pid, 12345))
        # a reused pid: alive, but it started at another time
        write_json(self.record_path("carol"), record("carol", other.pid, start_time + 1))
        write_json(self.record_path("dave"), {"username": "dave"})
        write_json(os.path.join(self.f.state_dir, ".erin.json.tmp"), {})
        adopted = yield self.provider(False).recover()
        self.assertEqual(adopted, [])
        self.assertEqual(os.listdir(self.f.state_dir), [])
        self.assertTrue(is_alive(other.pid), "a process with a reused pid was killed")

    @inlineCallbacks
    def test_a_recorded_agent_that_no_longer_answers_is_killed(self):
        self.patch(process_module, "RECOVER_PROBE_TIME", 0.5)
        os.makedirs(self.f.state_dir)
        wedged = self.sleeper()
        start_time = yield wait_until(lambda: process_start_time(wedged.pid))
        write_json(self.record_path("alice"), {
            "version": 1, "username": "alice", "pid": wedged.pid, "pgid": wedged.pid,
            "start_time": start_time, "port": free_loopback_port(), "started": 1.0,
            "argv": ["sleep", "60"], "uid": os.getuid(), "gid": os.getgid()})
        provider = self.provider(False)
        adopted = yield provider.recover()
        self.assertEqual(adopted, [])
        self.assertEqual(provider.running(), {})
        self.assertFalse(is_alive(wedged.pid))
        self.assertEqual(os.listdir(self.f.state_dir), [])
        self.assertEqual(self.exits, [])

    @inlineCallbacks
    def test_agents_outlive_a_sigkilled_manager_and_are_adopted(self):
        report = os.path.join(self.f.root, "report.json")
        manager = subprocess.Popen(
            [sys.executable, "-c", KEEPING_MANAGER, self.f.state_dir,
             self.f.data_dir("alice"), report],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(manager.wait)
        self.addCleanup(manager.kill)
        started = yield wait_until(lambda: os.path.exists(report), timeout=15)
        self.assertTrue(started, "the manager did not start its agent")
        with open(report) as f:
            left = json.load(f)
        manager.kill()  # SIGKILL: no cleanup code of the manager runs
        manager.wait()
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertTrue(is_alive(left["pid"]), "the agent died with its manager")

        provider = self.provider(False)
        adopted = yield provider.recover()
        self.assertEqual([(a.username, a.pid, a.address.port) for a in adopted],
                         [("alice", left["pid"], left["port"])])
        code, body = yield http_get(agent_url(adopted[0]))
        self.assertIn(b"Mailbox of alice", body)  # its credentials are still there
        os.kill(left["pid"], signal.SIGKILL)
        noticed = yield wait_until(lambda: self.exits)
        self.assertEqual(noticed, [("alice", "exited")])
        self.assertEqual(provider.running(), {})
        gone = yield wait_until(lambda: not os.path.exists(self.record_path("alice")))
        self.assertTrue(gone)

    @inlineCallbacks
    def test_an_agent_whose_port_is_held_by_another_uid_is_not_adopted(self):
        self.patch(process_module, "RECOVER_PROBE_TIME", 0.5)
        first = self.provider(True)
        agent = yield first.start("alice", self.f.data_dir("alice"), credentials_for("alice"))
        yield first.close()
        # as if the agent had lost its port and another user's program had taken it
        record = self.read_record("alice")
        write_json(self.record_path("alice"), dict(record, uid=3990099))
        adopted = yield self.provider(False).recover()
        self.assertEqual(adopted, [])
        self.assertFalse(is_alive(agent.pid))
        self.assertEqual(os.listdir(self.f.state_dir), ["alice.log"])

    @inlineCallbacks
    def test_agents_nobody_has_a_record_of_are_killed(self):
        f = ProcessFixture(self, script_command("child"))
        first = f.new_provider(keep_on_close=True)
        agent = yield first.start("alice", f.data_dir("alice"), credentials_for("alice"))
        yield first.close()
        with open(os.path.join(f.data_dir("alice"), "child.pid")) as pid_file:
            child = int(pid_file.read())

        def marked(state_dir):
            # as an agent whose manager died before it wrote the record
            process = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True,
                env={"PATH": os.defpath, AGENT_MARKER: state_dir})
            self.addCleanup(process.wait)
            self.addCleanup(process.kill)
            return process
        orphan = marked(f.state_dir)
        elsewhere = marked(f.state_dir + "-of-another-dispatcher")
        second = f.new_provider(keep_on_close=False)
        adopted = yield second.recover()
        self.assertEqual(adopted, [agent])
        self.assertFalse(is_alive(orphan.pid), "an agent without a record survived")
        self.assertTrue(is_alive(child), "the child of an adopted agent was killed")
        self.assertTrue(is_alive(elsewhere.pid), "another dispatcher's agent was killed")

    @inlineCallbacks
    def test_a_second_recover_changes_nothing(self):
        first = self.provider(True)
        agent = yield first.start("alice", self.f.data_dir("alice"), credentials_for("alice"))
        yield first.close()
        second = self.provider(False)
        self.assertEqual((yield second.recover()), [agent])
        self.assertEqual((yield second.recover()), [])
        self.assertEqual(second.running(), {"alice": agent})
        self.assertTrue(is_alive(agent.pid))

    @inlineCallbacks
    def test_without_pidfds_an_adopted_agent_is_watched_in_proc(self):
        def no_pidfds(pid, flags=0):
            raise OSError(errno.ENOSYS, "Function not implemented")
        self.patch(os, "pidfd_open", no_pidfds)
        first = self.provider(True)
        agent = yield first.start("alice", self.f.data_dir("alice"), credentials_for("alice"))
        yield first.close()
        second = self.provider(False)
        adopted = yield second.recover()
        self.assertEqual(adopted, [agent])
        os.kill(agent.pid, signal.SIGKILL)
        began = time.monotonic()
        noticed = yield wait_until(lambda: self.exits)
        self.assertEqual(noticed, [("alice", "exited")])
        self.assertLess(time.monotonic() - began, 3)

    @inlineCallbacks
    def test_an_adopted_agent_ignoring_sigterm_is_killed_after_the_grace(self):
        f = ProcessFixture(self, script_command("ignore-term"), stop_grace=0.5)
        first = f.new_provider(keep_on_close=True)
        agent = yield first.start("alice", f.data_dir("alice"), credentials_for("alice"))
        yield first.close()
        second = f.new_provider(keep_on_close=False)
        yield second.recover()
        began = time.monotonic()
        yield second.stop("alice")
        self.assertGreaterEqual(time.monotonic() - began, 0.5)
        self.assertFalse(is_alive(agent.pid))
        self.assertEqual(second.running(), {})
