"""Run each user's agent as a local process of the manager.

This is the embedded default provider: it needs nothing installed beyond
util-linux and coreutils (Essential on Debian). What it guarantees, and why:

* **The manager picks the port** (bind ``127.0.0.1:0``, read it back, release
  it) and passes it on the command line; an agent that loses the race for it
  ("address already in use") is retried on another port a few times. A port
  another user's agent gave up in the last ten minutes is never handed out
  (:data:`PORT_QUARANTINE`), so a proxy's cached address of a stopped agent
  cannot lead to someone else's.
* **Credentials travel only on stdin**: one JSON line, then stdin is closed.
  Never argv (``/proc/<pid>/cmdline`` is world readable), never the
  environment, never a file.
* **Agents never run as root** when the manager gives it ``accounts``: each
  user's agent runs under its own uid and gid (``setpriv --reuid --regid
  --clear-groups``; never root's, a system account's or nobody's), with no
  capabilities at all (inheritable and bounding sets emptied) and
  ``no_new_privs``, so not even a set-uid program gives it privileges back.
  Its data directory is made the agent's (the whole tree, the first time or
  when the uid changed, never following a symlink) and mode 0700, so no other
  user's agent can read it; it enters it as itself (``env --chdir``). Without
  ``accounts`` (development: a manager that is not root) agents run as the
  manager's own user.
* **Its own process group and a minimal environment**: every agent runs
  under ``setsid``, so a stop signals everything it forked.
* **Running means answering HTTP**: an agent counts as started only once it
  answers any HTTP response on its port; if it exits first, or the start
  timeout passes, it is killed and the start fails with the last lines it
  logged, so the operator sees why.
* **Stop is polite, then firm**: SIGTERM to the group, SIGKILL after a grace
  period, and the Deferred fires only once the process has gone.
* **Agents outlive the manager** (``state_dir`` given and ``keep_on_close``):
  a restart or upgrade of the manager must not end the users' sessions, and
  the password an agent got at login is not available again. So each agent
  has a record ``<state_dir>/<user>.json`` (uid, port, argv; then pid,
  process start time, process group), written atomically before the spawn
  and completed right after it; its output goes to ``<state_dir>/<user>.log``
  (not to pipes, which would break when the manager exits), which never grows
  much over 10 MiB (rotated to ``<user>.log.1``). ``close()`` leaves running
  agents alone. The next manager's ``recover()`` adopts an agent only if its
  pid is alive with the recorded start time (a reused pid is never mistaken),
  it answers HTTP on its port, and that port's listener is the agent's uid;
  it kills the others, and every process of an agent's uid (or, for agents
  of the manager's own uid, with our marker in its environment) outside an
  adopted agent's group: an agent whose manager died between spawn and record
  is never left next to a second one. An adopted agent is not the manager's
  child: its end is seen through a pidfd (``/proc`` polled every second where
  ``pidfd_open`` is missing) and reported as "exited".
* **No orphans otherwise**: without ``state_dir``, or with ``keep_on_close``
  false, agents run under ``setpriv --pdeathsig SIGKILL``, so the kernel kills
  them if the manager dies, even by SIGKILL, and ``close()`` stops them.

What it needs of root: CAP_SETUID and CAP_SETGID (setpriv), CAP_SETPCAP (to
empty the agents' bounding set; without it setpriv quietly leaves it as it
is), CAP_CHOWN (data directories) and CAP_KILL (agents of other uids).
``tests/test_process_isolation.py`` runs a manager bounded to exactly these.
CAP_FOWNER only serves to make a data directory 0700 again after its agent
changed the mode; CAP_DAC_READ_SEARCH only to give a first-time tree whose
subdirectories are closed to root.

All file work (chown, records, logs) runs in the reactor's thread pool. Small
procfs reads (``/proc/<pid>/stat``) run on the reactor thread on purpose:
procfs never waits for a disk, and reading the start time in the same call
as the spawn is what makes it certain to be our process's.
"""
import collections
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import sys
import time
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple

import attr
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ...protocol import AgentAddress
from ...usernames import is_valid_username
from .interface import (AgentStartError, ExitCallback, IAgentProvider, RunningAgent,
                        notify_exit)

log = Logger()

#: the bundled demo agent, run by the Python that runs the manager
DEMO_AGENT_COMMAND = (
    shlex.quote(sys.executable)
    + " -m pixelated_dispatcher.demo_agent --port {port} --data-dir {data_dir}"
      " --username {username}")

#: agents listen here and nowhere else
LOOPBACK = "127.0.0.1"

#: how often a start tries another port after "address already in use"
PORT_ATTEMPTS = 3

#: Seconds during which a port an agent gave up is not handed to another
#: user's agent. The proxy caches each user's agent address until the
#: manager's AgentStopped push reaches it (milliseconds, and a proxy that
#: loses the manager forgets every address): were the port reused at once,
#: a request of the stopped agent's user could reach the new agent of
#: someone else in between.
PORT_QUARANTINE = 600.0

#: readiness probe: one try at most this long, a new try this often
PROBE_TIMEOUT = 1.0
PROBE_INTERVAL = 0.1

#: how long ``recover()`` gives a recorded agent to answer HTTP
RECOVER_PROBE_TIME = 3.0

#: how long ``recover()`` waits for a killed, unanswering agent to go
RECOVER_KILL_WAIT = 5.0

#: output lines kept per agent for error messages
LAST_LINES = 20

#: a line longer than this is logged in pieces (an agent that never writes
#: a newline must not make the manager buffer without end)
MAX_LINE = 8192

#: after the process is reaped, how long to wait for the rest of its output
#: (a leftover child may hold the pipes open)
OUTPUT_DRAIN_TIME = 1.0

#: an agent's log file is rotated (to ``<user>.log.1``) at a start when it is
#: bigger than this, and copied there and emptied when it grows bigger while
#: the agent runs (looked at every LOG_CHECK_INTERVAL seconds)
LOG_LIMIT = 10 * 1024 * 1024
LOG_CHECK_INTERVAL = 600.0

#: how much of the end of a log file is read for an error message
TAIL_BYTES = 64 * 1024

#: how often an adopted agent is looked for in /proc where pidfds are missing
POLL_INTERVAL = 1.0

#: version of the JSON records in ``state_dir``
RECORD_VERSION = 1

#: agents never run under a uid below this (system accounts) nor as nobody,
#: and ``recover()`` never kills processes of such uids
MIN_AGENT_UID = 1000
NOBODY = 65534

#: in the environment of every agent of a provider with a state dir (value:
#: the state dir), so that ``recover()`` finds agents that have no record
#: (a manager killed between a spawn and the record's write) and kills them
AGENT_MARKER = "PIXELATED_DISPATCHER_AGENTS"

_PLACEHOLDER = re.compile(r"\{(port|data_dir|username)\}")

_ADDRESS_IN_USE = ("address already in use", "address in use", "eaddrinuse")

_RECORD_NAME = re.compile(r"([a-z0-9_][a-z0-9._-]{0,63})\.json")

#: ``accounts(username)`` fires with the ``(uid, gid)`` the user's agent runs as
Accounts = Callable[[str], Deferred]


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks it (no guessing, no fixed ranges); the agent binds it
    next. Another program may take it in between, which the provider detects
    and answers by retrying on a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def describe_exit(reason: Failure) -> str:
    """``exited with status 3`` or ``killed by signal 9 (SIGKILL)``."""
    error = reason.value
    if isinstance(error, ProcessDone):
        return "exited with status 0"
    if isinstance(error, ProcessTerminated):
        if error.signal is not None:
            try:
                name = signal.Signals(error.signal).name
            except ValueError:
                return "killed by signal %d" % (error.signal,)
            return "killed by signal %d (%s)" % (error.signal, name)
        return "exited with status %d" % (error.exitCode,)
    return "ended (%s)" % (error,)


def process_start_time(pid: int) -> Optional[int]:
    """When process ``pid`` started (field 22 of ``/proc/<pid>/stat``, clock
    ticks since boot), or None if there is no such live process (a zombie
    counts as gone). Together with the pid it names one process for ever:
    a reused pid has a later start time."""
    try:
        with open("/proc/%d/stat" % (pid,), "rb") as f:
            data = f.read()
        # the command name (field 2) is in parentheses and may hold anything
        fields = data[data.rindex(b")") + 2:].split()
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


# -- file work; these run in the thread pool -----------------------------------------


def prepare_data_dir(path: str, owner: Optional[Tuple[int, int]]) -> None:
    """Check that ``path`` is a directory; with ``owner`` = (uid, gid), make
    it (and, if it was not theirs yet, everything in it) theirs, mode 0700,
    and check that they can reach it. Raises AgentStartError.

    Only what is not the agent's yet is opened: once the directory is the
    agent's (mode 0700), the manager needs no right to read it, so it can run
    without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH.
    """
    try:
        st = os.lstat(path) if owner is not None else os.stat(path)
    except FileNotFoundError:
        raise AgentStartError("the data directory %s does not exist" % (path,))
    except OSError as error:
        raise AgentStartError("the data directory %s cannot be used: %s"
                              % (path, error.strerror))
    if not stat.S_ISDIR(st.st_mode):
        raise AgentStartError("the data directory %s is not a directory" % (path,))
    if owner is None:
        return
    uid, gid = owner
    if (st.st_uid, st.st_gid) != (uid, gid):
        _give_tree(path, uid, gid)
    elif stat.S_IMODE(st.st_mode) != 0o700:
        try:
            os.chmod(path, 0o700)  # its parent is the manager's: no symlink swap here
        except PermissionError:
            log.warn("the agent of uid {uid} made its data directory {path} mode {mode:04o};"
                     " without CAP_FOWNER the manager cannot make it 0700 again",
                     uid=uid, path=path, mode=stat.S_IMODE(st.st_mode))
    blocked = unreachable_ancestor(path, uid, gid)
    if blocked is not None:
        raise AgentStartError(
            "the agent's uid %d cannot reach its data directory %s: %s lets others"
            " neither in nor through (it needs o+x, e.g. mode 0711)" % (uid, path, blocked))


def _give_tree(path: str, uid: int, gid: int) -> None:
    """Make ``path`` and everything in it ``uid``:``gid``, ``path`` mode 0700.

    The first start under this uid (a new user, an imported legacy
    directory, a changed uid). fwalk with directory fds and lchown never
    follow a symlink, so the tree's content cannot redirect root's chown.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, 0o700)  # while it is not the agent's yet: no CAP_FOWNER needed
        problems: List[OSError] = []
        for _, dirs, files, dir_fd in os.fwalk(path, follow_symlinks=False,
                                               onerror=problems.append):
            for name in dirs + files:
                try:
                    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                except OSError as error:
                    problems.append(error)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)
    if problems:
        log.warn("{count} entries below {path} could not be given to uid {uid}, e.g. {error}",
                 count=len(problems), path=path, uid=uid, error=problems[0])


def unreachable_ancestor(path: str, uid: int, gid: int) -> Optional[str]:
    """The first directory above ``path`` that ``uid``/``gid`` (with no
    supplementary groups) may not search, described; None if all may be."""
    current = os.path.dirname(path)
    while True:
        st = os.stat(current)
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return "%s (mode %04o, owner %d:%d)" % (
                current, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def make_state_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def open_log(path: str, header: str) -> Tuple[int, int]:
    """Open the agent's log for appending (rotating it first if it is over
    LOG_LIMIT); fires with the fd and the offset where this start's output
    begins."""
    try:
        if os.lstat(path).st_size > LOG_LIMIT:
            os.replace(path, path + ".1")
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.write(fd, header.encode("utf-8"))
        return fd, os.fstat(fd).st_size
    except OSError:
        os.close(fd)
        raise


def trim_logs(paths: List[str]) -> None:
    """Copy each log over LOG_LIMIT to ``.1`` and empty it. The agent keeps
    appending (O_APPEND) at the new end; what it writes during the copy is
    lost, as with logrotate's copytruncate."""
    for path in paths:
        try:
            if os.lstat(path).st_size <= LOG_LIMIT:
                continue
            tmp = path + ".1.tmp"
            with open(path, "rb") as source, open(tmp, "wb") as copy:
                shutil.copyfileobj(source, copy)
            os.replace(tmp, path + ".1")
            os.truncate(path, 0)
        except OSError as error:
            log.warn("cannot trim the agent log {path}: {error}", path=path, error=error)


def read_tail(path: str, offset: int) -> List[str]:
    """The last LAST_LINES lines written to ``path`` after ``offset``."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(offset, size - TAIL_BYTES))
            data = f.read(TAIL_BYTES)
    except OSError:
        return []
    lines = []
    for raw in data.split(b"\n"):
        while len(raw) > MAX_LINE:
            lines.append(raw[:MAX_LINE])
            raw = raw[MAX_LINE:]
        lines.append(raw)
    if lines and lines[-1] == b"":
        lines.pop()
    return [line.rstrip(b"\r").decode("utf-8", "replace") for line in lines[-LAST_LINES:]]


def write_record(state_dir: str, record: dict) -> None:
    """Replace ``<state_dir>/<user>.json`` atomically."""
    path = os.path.join(state_dir, record["username"] + ".json")
    tmp = os.path.join(state_dir, "." + record["username"] + ".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def prepare_spawn(state_dir: str, record: dict, log_path: str,
                  header: str) -> Tuple[int, int]:
    """Write the record of a spawn about to happen, and open the log."""
    make_state_dir(state_dir)
    write_record(state_dir, record)
    return open_log(log_path, header)


def delete_record(state_dir: str, username: str, pid: Optional[int] = None) -> None:
    """Remove ``<state_dir>/<user>.json`` (only if it names ``pid`` or no
    pid yet, when ``pid`` is given)."""
    path = os.path.join(state_dir, username + ".json")
    if pid is not None:
        record = _load_record(path)
        if record is not None and record.get("pid") not in (pid, None):
            return
    _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _load_record(path: str) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read(64 * 1024).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_record(record: Optional[dict], username: str) -> bool:
    """A record of a spawned agent (or, with ``pid`` None, of a spawn about
    to happen)."""
    if not (record is not None and record.get("version") == RECORD_VERSION
            and record.get("username") == username
            and _is_int(record.get("uid")) and _is_int(record.get("gid"))
            and _is_int(record.get("port")) and 0 < record["port"] < 65536
            and isinstance(record.get("started"), (int, float))):
        return False
    if record.get("pid") is None:
        return True
    return (_is_int(record.get("pid")) and record["pid"] > 1
            and _is_int(record.get("start_time"))
            and _is_int(record.get("pgid")) and record["pgid"] > 1)


def scan_records(state_dir: str) -> Tuple[List[dict], List[int]]:
    """The records of ``state_dir`` whose process still lives with its
    recorded start time, and the uids of all the records read; the records of
    gone processes (and anything unreadable) are deleted."""
    make_state_dir(state_dir)
    alive = []
    uids = set()
    for name in sorted(os.listdir(state_dir)):
        path = os.path.join(state_dir, name)
        if name.startswith(".") and name.endswith(".json.tmp"):
            _unlink(path)  # a write the previous manager did not finish
            continue
        match = _RECORD_NAME.fullmatch(name)
        if match is None:
            continue
        record = _load_record(path)
        if not _valid_record(record, match.group(1)):
            log.warn("discarding the unreadable agent record {path}", path=path)
            _unlink(path)
            continue
        uids.add(record["uid"])
        if record["pid"] is None:
            log.warn("the previous manager was starting the agent of {username} when it"
                     " ended", username=record["username"])
            _unlink(path)
        elif process_start_time(record["pid"]) != record["start_time"]:
            log.info("agent of {username} (pid {pid}) is gone; discarding its record",
                     username=record["username"], pid=record["pid"])
            _unlink(path)
        else:
            alive.append(record)
    return alive, sorted(uids)


def _stat_fields(pid: int) -> Optional[List[bytes]]:
    """Fields 3 onwards of ``/proc/<pid>/stat`` (state first)."""
    try:
        with open("/proc/%d/stat" % (pid,), "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()
    except (OSError, ValueError):
        return None


def _real_uid(pid: int) -> Optional[int]:
    try:
        with open("/proc/%d/status" % (pid,), "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _agent_uid(uid: int) -> bool:
    """Whether ``uid`` may be an agent's own uid (not root, a system account
    or nobody)."""
    return uid >= MIN_AGENT_UID and uid != NOBODY


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        with open("/proc/%d/environ" % (pid,), "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False  # another uid's, and no CAP_SYS_PTRACE: the uid check sees it


def agent_processes(state_dir: str, uids: List[int]) -> Dict[int, Tuple[int, int]]:
    """``{pid: (process group, start time)}`` of the live processes that are
    agents of ``state_dir`` (or their children): those running as one of the
    agents' ``uids`` (unique per user; world-readable in /proc), and those
    whose environment carries the marker (readable for our own uid: the
    agents of a manager without ``accounts``)."""
    marker = ("%s=%s" % (AGENT_MARKER, state_dir)).encode("utf-8")
    private = {uid for uid in uids if _agent_uid(uid) and uid != os.getuid()}
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        fields = _stat_fields(pid)
        if fields is None or fields[0] in (b"Z", b"X"):
            continue
        if _real_uid(pid) in private or _has_marker(pid, marker):
            try:
                found[pid] = (int(fields[2]), int(fields[19]))
            except (ValueError, IndexError):
                pass
    return found


def kill_orphans(state_dir: str, uids: List[int], adopted_groups: List[int]) -> List[int]:
    """SIGKILL every agent process of ``state_dir`` (see
    :func:`agent_processes`) outside ``adopted_groups``: agents nobody has a
    record of, and what their dead leaders left. Waits up to
    RECOVER_KILL_WAIT for them to go; fires with their pids."""
    orphans = {pid: start_time
               for pid, (pgid, start_time) in agent_processes(state_dir, uids).items()
               if pgid not in adopted_groups}
    for pid, start_time in orphans.items():
        log.warn("killing agent process {pid}: no manager knows it", pid=pid)
        same, pidfd = _open_pidfd(pid, start_time)
        if not same:
            continue
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            if pidfd is not None:
                os.close(pidfd)
    deadline = time.monotonic() + RECOVER_KILL_WAIT
    while time.monotonic() < deadline and any(
            process_start_time(pid) == start_time for pid, start_time in orphans.items()):
        time.sleep(0.02)
    return sorted(orphans)


def listener_uids(port: int) -> List[int]:
    """The uids owning a TCP socket that listens on ``port`` on 127.0.0.1 (or
    on every address), from the world-readable /proc/net/tcp and tcp6."""
    uids = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] != "0A":  # LISTEN
                continue
            address, _, port_hex = fields[1].partition(":")
            if int(port_hex, 16) != port:
                continue
            if len(address) == 8 and socket.inet_ntoa(
                    struct.pack("=I", int(address, 16))) not in (LOOPBACK, "0.0.0.0"):
                continue
            uids.add(int(fields[7]))
    return sorted(uids)


# -- processes ---------------------------------------------------------------------


class _Probe(Protocol):
    """Sends one request; ``answered`` fires once the reply starts like HTTP."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._head = b""
        self.answered: Deferred = Deferred(lambda _: self.transport.abortConnection())

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._head += data
        if len(self._head) < 5 or self.answered.called:
            return
        if self._head.startswith(b"HTTP/"):
            self.answered.callback(None)
        else:
            self.answered.errback(ValueError("the answer is not HTTP"))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.answered.called:
            self.answered.errback(reason)


class _OneProtocolFactory(Factory):
    noisy = False  # one log line per probe every 100 ms would drown the log

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr) -> Protocol:
        return self._protocol


class _Ending:
    """``when_ended()`` waiters of a process, fired once."""

    def __init__(self) -> None:
        self._ended = False
        self._ended_waiters: List[Deferred] = []

    @property
    def ended(self) -> bool:
        return self._ended

    def when_ended(self) -> Deferred:
        """Fires (with None) once the process has gone."""
        d = Deferred()
        if self._ended:
            d.callback(None)
        else:
            self._ended_waiters.append(d)
        return d

    def _fire_ended(self) -> None:
        self._ended = True
        waiters, self._ended_waiters = self._ended_waiters, []
        for waiter in waiters:
            waiter.callback(None)


class _AgentProcess(_Ending, ProcessProtocol):
    """One agent process we spawned: feeds it its credentials, logs its output
    line by line when it comes through pipes (no ``log_path``), and says when
    it has ended."""

    def __init__(self, reactor, username: str, credentials: bytes,
                 log_path: Optional[str] = None, log_offset: int = 0) -> None:
        _Ending.__init__(self)
        self._reactor = reactor
        self.username = username
        self._credentials = credentials
        self.pid: Optional[int] = None
        #: the log file the output goes to (None: pipes to us)
        self.log_path = log_path
        self.log_offset = log_offset
        self.last_lines: Deque[str] = collections.deque(maxlen=LAST_LINES)
        self._partial: Dict[int, bytes] = {1: b"", 2: b""}
        self.exit_reason: Optional[Failure] = None
        self._drain: Optional[IDelayedCall] = None
        self._finished = False
        #: left running for the next manager: its end is no longer ours to handle
        self.handed_over = False
        #: what ``state_dir`` says about this process (None: nothing)
        self.record: Optional[dict] = None

    # -- life cycle ------------------------------------------------------

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.write(self._credentials)
        self.transport.closeStdin()
        self._credentials = b""

    def processExited(self, reason: Failure) -> None:
        self.exit_reason = reason
        if not self.handed_over:
            self._sweep_group()
        # processEnded follows once the pipes close; don't wait for ever if a
        # leftover grandchild keeps them open.
        self._drain = self._reactor.callLater(OUTPUT_DRAIN_TIME, self._finish)

    def processEnded(self, reason: Failure) -> None:
        if self.exit_reason is None:
            self.exit_reason = reason
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._drain is not None and self._drain.active():
            self._drain.cancel()
        for fd, rest in self._partial.items():
            if rest:
                self._log_line(fd, rest)
        self._partial = {1: b"", 2: b""}
        self._fire_ended()

    def _sweep_group(self) -> None:
        """Kill whatever the agent left behind in its process group.

        Runs right after the agent itself was reaped, in the same call, so the
        group id cannot have been reused yet.
        """
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    @property
    def exit_description(self) -> str:
        return describe_exit(self.exit_reason) if self.exit_reason else "still running"

    def hand_over(self) -> None:
        self.handed_over = True

    # -- signals -----------------------------------------------------------

    def signal_group(self, signum: int) -> None:
        """Signal the agent's process group (the agent and its children).

        Right after the spawn, before ``setsid`` has run, there is no group
        yet; then the process itself gets the signal.
        """
        if self.pid is None or self.transport is None or self.transport.pid is None:
            return  # reaped already
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            try:
                self.transport.signalProcess(signum)
            except (ProcessExitedAlready, OSError):
                pass
        except PermissionError as error:
            log.warn("cannot signal the agent of {username} (pid {pid}): {error}",
                     username=self.username, pid=self.pid, error=error)

    # -- output --------------------------------------------------------------

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._partial.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        for line in lines:
            self._log_line(childFD, line)
        while len(rest) > MAX_LINE:
            self._log_line(childFD, rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self._partial[childFD] = rest

    def _log_line(self, fd: int, raw: bytes) -> None:
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        self.last_lines.append(line)
        log.info("agent {username}: {line}", username=self.username, line=line,
                 stream="stdout" if fd == 1 else "stderr", pid=self.pid)

    def says_address_in_use(self) -> bool:
        return any(marker in line.lower()
                   for line in self.last_lines for marker in _ADDRESS_IN_USE)

    def output_for_error(self) -> str:
        where = " (log: %s)" % (self.log_path,) if self.log_path else ""
        if not self.last_lines:
            return " It wrote no output%s." % (where,)
        return (" Its last output%s:\n" % (where,)
                + "\n".join("  " + line for line in self.last_lines))


@implementer(IReadDescriptor)
class _AdoptedProcess(_Ending):
    """An agent a previous manager started: not our child, so its end is
    seen through a pidfd (readable once it exits), or by polling /proc."""

    exit_description = "exited"

    def __init__(self, reactor, username: str, pid: int, start_time: int,
                 pidfd: Optional[int]) -> None:
        _Ending.__init__(self)
        self._reactor = reactor
        self.username = username
        self.pid = pid
        self._start_time = start_time
        self._pidfd = pidfd
        self._poller: Optional[LoopingCall] = None

    def watch(self) -> None:
        if self._pidfd is not None:
            self._reactor.addReader(self)
        else:
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self._reactor
            self._poller.start(POLL_INTERVAL, now=False)

    def _poll(self) -> None:
        if process_start_time(self.pid) != self._start_time:
            self._gone()

    # IReadDescriptor
    def fileno(self) -> int:
        return self._pidfd if self._pidfd is not None else -1

    def doRead(self) -> None:
        self._gone()

    def connectionLost(self, reason: Failure) -> None:
        # the reactor shuts down with us still watching: not an exit
        self._unwatch()

    def logPrefix(self) -> str:
        return "adopted agent of %s" % (self.username,)

    def _gone(self) -> None:
        if self.ended:
            return
        self._unwatch()
        self._fire_ended()

    def hand_over(self) -> None:
        self._unwatch()

    def _unwatch(self) -> None:
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._poller = None
        if self._pidfd is not None:
            self._reactor.removeReader(self)
            os.close(self._pidfd)
            self._pidfd = None

    def signal_group(self, signum: int) -> None:
        if self.ended:
            return
        # the group leader lives (we would have seen its end), so its pid is
        # not free and the group id still names its group
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError as error:
            log.warn("cannot signal the agent of {username} (pid {pid}): {error}",
                     username=self.username, pid=self.pid, error=error)


def _open_pidfd(pid: int, start_time: int) -> Tuple[bool, Optional[int]]:
    """(whether ``pid`` still is the process that started at ``start_time``,
    a pidfd for it or None where pidfds are not available)."""
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False, None
        except OSError:
            pidfd = None  # ENOSYS: a kernel older than 5.3
    # checked after opening: if the pid had been reused before, the start
    # time differs; if the process ends after, the pidfd still names it
    if process_start_time(pid) != start_time:
        if pidfd is not None:
            os.close(pidfd)
        return False, None
    return True, pidfd


@attr.s(auto_attribs=True, eq=False)
class _Agent:
    """The provider's record of one user's agent, from start to its end."""
    username: str
    data_dir: str
    credentials: bytes
    running: Optional[RunningAgent] = None
    stopping: bool = False
    #: the port of the current (or last) attempt; 0 before the first
    port: int = 0
    process: Optional[object] = None  # _AgentProcess or _AdoptedProcess
    kill_timer: Optional[IDelayedCall] = None
    start_waiters: List[Deferred] = attr.Factory(list)
    stop_waiters: List[Deferred] = attr.Factory(list)
    #: left running at close() for the next manager
    handed_over: bool = False


def _fire_all(waiters: List[Deferred], result) -> None:
    """Deliver one result to every waiter still waiting (some may have been
    cancelled by their callers)."""
    for waiter in waiters:
        if waiter.called:
            continue
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)


_READY, _EXITED, _TIMED_OUT = "ready", "exited", "timed out"


def _check_state_dir(instance, attribute, value) -> None:
    if value is not None and not os.path.isabs(value):
        raise ValueError("state_dir must be an absolute path, not %r" % (value,))


@implementer(IAgentProvider)
@attr.s(auto_attribs=True, eq=False)
class ProcessProvider:
    """Agents as local processes; see the module docstring for the guarantees.

    :param reactor: provides ``IReactorProcess``, ``IReactorTime``,
        ``IReactorFDSet``, ``IReactorThreads`` and TCP.
    :param agent_command: a command line with ``{port}``, ``{data_dir}`` and
        ``{username}`` placeholders. It is split with :func:`shlex.split` and the
        placeholders are substituted inside each argument; no shell ever sees it.
    :param extra_env: added to the agent's minimal environment (and may
        override it).
    :param start_timeout: seconds an agent has to answer HTTP.
    :param stop_grace: seconds between SIGTERM and SIGKILL.
    :param choose_port: picks the port for a start (tests replace it to force
        a collision).
    :param accounts: ``accounts(username)`` → Deferred ``(uid, gid)`` the
        user's agent runs as (the manager allocates them); None: agents run
        as the manager's own user (development; a root manager must not).
    :param state_dir: an absolute path of a directory the provider owns
        (created mode 0700): agent records and logs. None: no records, output
        through pipes into the manager's log, agents die with the manager.
    :param keep_on_close: with a ``state_dir``, ``close()`` leaves running
        agents for the next manager's ``recover()``; without one (or when
        false) ``close()`` stops them.
    """
    reactor: object
    agent_command: str
    extra_env: Optional[Dict[str, str]] = None
    start_timeout: float = 60.0
    stop_grace: float = 10.0
    choose_port: Callable[[], int] = free_loopback_port
    accounts: Optional[Accounts] = None
    state_dir: Optional[str] = attr.ib(default=None, validator=_check_state_dir)
    keep_on_close: bool = True
    port_quarantine: float = PORT_QUARANTINE

    name = "process"

    _argv: List[str] = attr.ib(init=False)
    _agents: Dict[str, _Agent] = attr.ib(init=False, factory=dict)
    #: port -> (user, when) of the ports agents gave up (PORT_QUARANTINE)
    _released: Dict[int, Tuple[str, float]] = attr.ib(init=False, factory=dict)
    _callbacks: List[ExitCallback] = attr.ib(init=False, factory=list)
    _closing: bool = attr.ib(init=False, default=False)
    #: per user, the last file operation queued (they run one after another)
    _disk: Dict[str, Deferred] = attr.ib(init=False, factory=dict)
    _log_trimmer: Optional[LoopingCall] = attr.ib(init=False, default=None)
    _setpriv: str = attr.ib(init=False)
    _setsid: str = attr.ib(init=False)
    _env: str = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        try:
            self._argv = shlex.split(self.agent_command)
        except ValueError as error:
            raise ValueError("agent command %r is not a valid command line: %s"
                             % (self.agent_command, error))
        if not self._argv:
            raise ValueError("the agent command is empty")
        if not any("{port}" in word for word in self._argv):
            raise ValueError("the agent command %r has no {port} placeholder, so the agent"
                             " cannot know where to listen" % (self.agent_command,))
        if "=" in self._argv[0]:
            raise ValueError("the agent command %r must start with the program, not with an"
                             " assignment" % (self.agent_command,))
        setpriv, setsid, env = (shutil.which(name) for name in ("setpriv", "setsid", "env"))
        if setpriv is None or setsid is None or env is None:
            raise RuntimeError("the process provider needs setpriv and setsid (util-linux)"
                               " and env (coreutils) on PATH")
        self._setpriv, self._setsid, self._env = setpriv, setsid, env

    @property
    def keeps_agents(self) -> bool:
        """Whether agents outlive this provider (and are recovered by the next)."""
        return self.keep_on_close and self.state_dir is not None

    def wrapper(self, owner: Optional[Tuple[int, int]], cwd: str) -> List[str]:
        """What runs before the agent command: setpriv, setsid, and ``env``
        to enter ``cwd`` as the agent (root entering an agent's 0700 data
        directory would need CAP_DAC_READ_SEARCH)."""
        words = [self._setpriv]
        if not self.keeps_agents:
            words += ["--pdeathsig", "SIGKILL"]
        words += ["--no-new-privs"]
        if owner is not None:
            uid, gid = owner
            words += ["--reuid", str(uid), "--regid", str(gid), "--clear-groups",
                      "--inh-caps=-all", "--bounding-set=-all"]
        return words + ["--", self._setsid, "--", self._env, "--chdir=" + cwd, "--"]

    # -- IAgentProvider ------------------------------------------------------

    def recover(self) -> Deferred:
        """Adopt the agents a previous manager left running (see the module
        docstring); fires with the adopted RunningAgents."""
        if self.state_dir is None:
            return defer.succeed([])
        return defer.ensureDeferred(self._recover())

    def running(self) -> Dict[str, RunningAgent]:
        return {name: agent.running for name, agent in self._agents.items()
                if agent.running is not None and not agent.stopping}

    def on_exit(self, callback: ExitCallback) -> None:
        self._callbacks.append(callback)

    def start(self, username: str, data_dir: str, credentials: bytes) -> Deferred:
        if not is_valid_username(username):
            # it names files in state_dir: never let it name another place
            return defer.fail(AgentStartError("not starting an agent for the invalid user"
                                              " name %r" % (username,)))
        if self._closing:
            return defer.fail(AgentStartError(
                "not starting the agent of %s: the manager is shutting down" % (username,)))
        agent = self._agents.get(username)
        if agent is not None and agent.stopping:
            # a start during a stop: let the old one go, then start afresh
            d = self._wait(agent.stop_waiters)
            d.addCallback(lambda _: self.start(username, data_dir, credentials))
            return d
        if agent is not None and agent.running is not None:
            return defer.succeed(agent.running)
        if agent is not None:
            return self._wait(agent.start_waiters)  # one start in flight serves all
        # the agent runs in its data dir: a relative path would point elsewhere
        agent = _Agent(username, os.path.abspath(data_dir), credentials)
        self._agents[username] = agent
        d = self._wait(agent.start_waiters)
        defer.ensureDeferred(self._start(agent))
        return d

    def stop(self, username: str) -> Deferred:
        agent = self._agents.get(username)
        if agent is None:
            return defer.succeed(None)
        d = self._wait(agent.stop_waiters)
        if not agent.stopping:
            agent.stopping = True
            self._terminate(agent)
        return d

    def close(self) -> Deferred:
        """Stop the agents, or with ``keeps_agents`` leave the running ones
        (records in place) for the next manager; starts in flight are stopped
        either way. Fires once that is done and every record is on disk."""
        self._closing = True
        if self._log_trimmer is not None and self._log_trimmer.running:
            self._log_trimmer.stop()
        stops = []
        for username, agent in list(self._agents.items()):
            if (self.keeps_agents and agent.running is not None and not agent.stopping
                    and agent.process is not None and not agent.process.ended):
                self._hand_over(agent)
            else:
                stops.append(self.stop(username))
        d = defer.gatherResults(stops, consumeErrors=True)
        d.addCallback(lambda _: defer.gatherResults(
            [self._queue_disk(name, lambda: None) for name in list(self._disk)],
            consumeErrors=True))
        return d.addCallback(lambda _: None)

    def _hand_over(self, agent: _Agent) -> None:
        log.info("leaving the agent of {username} (pid {pid}) running for the next manager",
                 username=agent.username, pid=agent.running.pid)
        agent.handed_over = True
        agent.process.hand_over()
        self._forget(agent)

    # -- file work, one operation at a time per user ----------------------------

    def _in_thread(self, function, *args) -> Deferred:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), function, *args)

    def _queue_disk(self, username: str, function, *args, quiet: bool = True) -> Deferred:
        """Run ``function(*args)`` in a thread after the user's earlier file
        operations (a record must never be deleted before it was written);
        fires with its result. With ``quiet``, errors are logged, not raised:
        a missing record costs an adoption, not the agent."""
        previous = self._disk.get(username)
        mine: Deferred = Deferred()
        self._disk[username] = mine
        result: Deferred = Deferred()

        def finish(outcome) -> None:
            if self._disk.get(username) is mine:
                del self._disk[username]
            mine.callback(None)  # lets the next operation run
            if isinstance(outcome, Failure) and quiet:
                log.failure("file work for the agent of {username} failed", outcome,
                            username=username)
                outcome = None
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        def run(_) -> None:
            self._in_thread(function, *args).addBoth(finish)

        if previous is None:
            run(None)
        else:
            previous.addCallback(run)
        return result

    # -- starting -------------------------------------------------------------

    async def _start(self, agent: _Agent) -> None:
        try:
            running = await self._launch(agent)
        except Exception as error:
            agent.credentials = b""
            if not isinstance(error, AgentStartError):
                log.failure("unexpected error starting the agent of {username}",
                            username=agent.username)
                error = AgentStartError("the agent of %s could not be started: %s"
                                        % (agent.username, error))
            self._forget(agent)
            _fire_all(agent.start_waiters, Failure(error))
            _fire_all(agent.stop_waiters, None)
            return
        agent.credentials = b""  # delivered; keep the password no longer than needed
        self._now_running(agent, running)
        if agent.process.record is not None:
            # the next manager adopts it as this very RunningAgent
            record = dict(agent.process.record, started=running.started)
            self._queue_disk(agent.username, write_record, self.state_dir, record)
        log.info("agent of {username} running at {host}:{port} (pid {pid})",
                 username=agent.username, host=running.address.host,
                 port=running.address.port, pid=running.pid)
        _fire_all(agent.start_waiters, running)

    def _now_running(self, agent: _Agent, running: RunningAgent) -> None:
        agent.running = running
        agent.process.when_ended().addCallback(lambda _: self._running_agent_ended(agent))

    async def _owner(self, agent: _Agent) -> Optional[Tuple[int, int]]:
        """The (uid, gid) the agent runs as, its data dir made theirs."""
        owner = None
        if self.accounts is not None:
            try:
                uid, gid = await defer.maybeDeferred(self.accounts, agent.username)
            except Exception as error:
                raise AgentStartError("no uid for the agent of %s: %s"
                                      % (agent.username, error))
            if not (_is_int(uid) and _is_int(gid) and _agent_uid(uid) and _agent_uid(gid)):
                raise AgentStartError(
                    "refusing to run the agent of %s as uid %r, gid %r: an agent's ids are"
                    " its own, from %d up, never root's, a system account's or nobody's"
                    % (agent.username, uid, gid, MIN_AGENT_UID))
            owner = (uid, gid)
        try:
            await self._in_thread(prepare_data_dir, agent.data_dir, owner)
        except AgentStartError as error:
            raise AgentStartError("cannot start the agent of %s: %s" % (agent.username, error))
        return owner

    async def _launch(self, agent: _Agent) -> RunningAgent:
        """Spawn the agent until it answers HTTP, trying another port if it
        lost its port to somebody else; raise AgentStartError otherwise."""
        deadline = self.reactor.seconds() + self.start_timeout
        owner = await self._owner(agent)
        if agent.stopping:
            raise AgentStartError("the agent of %s was stopped while it was starting"
                                  % (agent.username,))
        for attempt in range(1, PORT_ATTEMPTS + 1):
            # Never hand out a port another of our agents holds or is about to
            # bind: two agents on one port would let one user's readiness probe
            # be answered by the other user's agent.
            # Nor one another user's agent gave up lately (PORT_QUARANTINE).
            taken = {a.port for a in self._agents.values() if a is not agent}
            taken |= self._quarantined_ports(agent.username)
            port = self.choose_port()
            while port in taken:
                port = free_loopback_port()
            agent.port = port  # ours from now on, before any wait
            process = await self._spawn(agent, port, owner)
            outcome = await self._until_ready(process, port, deadline)
            where = "%s:%d" % (LOOPBACK, port)
            if outcome == _READY and not agent.stopping:
                return RunningAgent(agent.username, AgentAddress(LOOPBACK, port),
                                    # the real reactor's clock is time.time()
                                    process.pid, self.reactor.seconds())
            if outcome == _TIMED_OUT:
                process.signal_group(signal.SIGKILL)
                await process.when_ended()
                await self._collect_output(process)
                raise AgentStartError(
                    "the agent of %s did not answer HTTP on %s within %g seconds, so it"
                    " was killed.%s" % (agent.username, where, self.start_timeout,
                                        process.output_for_error()))
            await process.when_ended()
            if agent.stopping:
                raise AgentStartError("the agent of %s was stopped while it was starting"
                                      % (agent.username,))
            await self._collect_output(process)
            if process.says_address_in_use() and attempt < PORT_ATTEMPTS:
                log.info("agent of {username} found port {port} taken; trying another",
                         username=agent.username, port=port)
                continue
            raise AgentStartError(
                "the agent of %s %s before it answered HTTP on %s.%s"
                % (agent.username, process.exit_description, where,
                   process.output_for_error()))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _collect_output(self, process: _AgentProcess) -> None:
        if process.log_path is not None:
            lines = await self._in_thread(read_tail, process.log_path, process.log_offset)
            process.last_lines.clear()
            process.last_lines.extend(lines)

    async def _spawn(self, agent: _Agent, port: int,
                     owner: Optional[Tuple[int, int]]) -> _AgentProcess:
        values = {"port": str(port), "data_dir": agent.data_dir, "username": agent.username}
        argv = [_PLACEHOLDER.sub(lambda m: values[m.group(1)], word) for word in self._argv]
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "LANG": "C.UTF-8",
            "HOME": agent.data_dir,
            "DISPATCHER_LOGOUT_URL": "/auth/logout",
        }
        env.update(self.extra_env or {})
        if self.state_dir is not None:
            env[AGENT_MARKER] = self.state_dir
        command = self.wrapper(owner, agent.data_dir) + argv
        record = {
            "version": RECORD_VERSION, "username": agent.username, "pid": None,
            "start_time": None, "pgid": None, "port": port, "started": time.time(),
            "argv": argv, "data_dir": agent.data_dir,
            "uid": owner[0] if owner else os.getuid(),
            "gid": owner[1] if owner else os.getgid(),
        }
        log_path = log_fd = None
        log_offset = 0
        if self.state_dir is not None:
            log_path = os.path.join(self.state_dir, agent.username + ".log")
            header = "--- %s agent of %s starting on port %d%s\n" % (
                time.strftime("%Y-%m-%dT%H:%M:%S%z"), agent.username, port,
                " as uid %d" % (owner[0],) if owner else "")
            try:
                # the record is on disk before the agent exists: a manager
                # killed right after the spawn leaves no agent nobody knows of
                log_fd, log_offset = await self._queue_disk(
                    agent.username, prepare_spawn, self.state_dir, record, log_path, header,
                    quiet=False)
            except OSError as error:
                raise AgentStartError("cannot write the record or the log of the agent of %s"
                                      " in %s: %s" % (agent.username, self.state_dir, error))
        process = _AgentProcess(self.reactor, agent.username, agent.credentials,
                                log_path, log_offset)
        child_fds = {0: "w", 1: "r", 2: "r"} if log_fd is None else {0: "w", 1: log_fd,
                                                                    2: log_fd}
        try:
            if agent.stopping:
                raise AgentStartError("the agent of %s was stopped while it was starting"
                                      % (agent.username,))
            log.info("starting agent of {username} on port {port}: {argv}",
                     username=agent.username, port=port,
                     argv=" ".join(map(shlex.quote, argv)))
            try:
                self.reactor.spawnProcess(process, command[0], command, env=env,
                                          path="/", childFDs=child_fds)
            except OSError as error:
                raise AgentStartError("the agent of %s could not be spawned: %s"
                                      % (agent.username, error))
        except AgentStartError:
            if self.state_dir is not None:
                self._queue_disk(agent.username, delete_record, self.state_dir, agent.username)
            raise
        finally:
            if log_fd is not None:
                os.close(log_fd)  # the agent has its own copy
        agent.process = process
        agent.port = port
        if self.state_dir is not None:
            self._record(agent, process, record)
            self._trim_logs_from_now_on()
        return process

    def _trim_logs_from_now_on(self) -> None:
        if self._log_trimmer is None:
            self._log_trimmer = LoopingCall(self._trim_logs)
            self._log_trimmer.clock = self.reactor
            self._log_trimmer.start(LOG_CHECK_INTERVAL, now=False)

    def _trim_logs(self) -> Deferred:
        paths = [os.path.join(self.state_dir, username + ".log") for username in self._agents]
        return self._in_thread(trim_logs, paths).addErrback(
            lambda f: log.failure("trimming agent logs failed", f))

    def _record(self, agent: _Agent, process: _AgentProcess, intent: dict) -> None:
        """Complete the record with the pid, and delete it when the process ends."""
        pid = process.pid
        process.when_ended().addCallback(
            lambda _: None if process.handed_over else
            self._queue_disk(agent.username, delete_record, self.state_dir,
                             agent.username, pid))
        # read now, in the spawn's reactor turn: our child cannot have been
        # reaped yet, so this start time is surely our agent's
        start_time = process_start_time(pid)
        if start_time is None:
            return  # gone already; the start fails on its own, the record goes
        process.record = dict(intent, pid=pid, start_time=start_time, pgid=pid)
        self._queue_disk(agent.username, write_record, self.state_dir, process.record)

    async def _until_ready(self, process: _AgentProcess, port: int, deadline: float) -> str:
        """Whichever comes first: the agent answers HTTP, exits, or the deadline."""
        outcome: Deferred = Deferred()

        def settle(result: str) -> None:
            if not outcome.called:
                outcome.callback(result)

        process.when_ended().addCallback(lambda _: settle(_EXITED))
        timer = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()),
                                       settle, _TIMED_OUT)
        probing = defer.ensureDeferred(
            self._probe_until_answered(port, lambda: not outcome.called))
        probing.addCallbacks(lambda _: settle(_READY),
                             lambda failure: failure.trap(CancelledError) and None)
        try:
            return await outcome
        finally:
            if timer.active():
                timer.cancel()
            probing.cancel()

    async def _probe_until_answered(self, port: int, wanted: Callable[[], bool]) -> None:
        """Ask ``HEAD /`` until any HTTP response comes back.

        HEAD, because a probe should not count as a visit; any status will do,
        because an agent that says 404 or 403 is up. ``wanted()`` turns false
        once the outcome is known: cancelling a connection attempt fails it
        with ConnectingCancelledError, not CancelledError, so the loop asks
        rather than trusting the exception type.
        """
        endpoint = TCP4ClientEndpoint(self.reactor, LOOPBACK, port, timeout=PROBE_TIMEOUT)
        request = (b"HEAD / HTTP/1.0\r\nHost: %s:%d\r\n"
                   b"User-Agent: pixelated-dispatcher readiness probe\r\n\r\n"
                   % (LOOPBACK.encode("ascii"), port))
        while True:
            probe = _Probe(request)
            answered = endpoint.connect(_OneProtocolFactory(probe))
            answered.addCallback(lambda _: probe.answered)
            answered.addTimeout(PROBE_TIMEOUT, self.reactor)
            try:
                await answered
                return
            except Exception:
                if not wanted():
                    raise CancelledError()
            await deferLater(self.reactor, PROBE_INTERVAL, lambda: None)

    async def _answers_within(self, port: int, seconds: float) -> bool:
        """Whether something answers HTTP on ``port`` within ``seconds``."""
        outcome: Deferred = Deferred()

        def settle(result: bool) -> None:
            if not outcome.called:
                outcome.callback(result)
        timer = self.reactor.callLater(seconds, settle, False)
        probing = defer.ensureDeferred(
            self._probe_until_answered(port, lambda: not outcome.called))
        probing.addCallbacks(lambda _: settle(True),
                             lambda failure: failure.trap(CancelledError) and None)
        try:
            return await outcome
        finally:
            if timer.active():
                timer.cancel()
            probing.cancel()

    # -- recovering ---------------------------------------------------------------

    async def _recover(self) -> List[RunningAgent]:
        records, uids = await self._in_thread(scan_records, self.state_dir)
        results = await defer.gatherResults(
            [defer.ensureDeferred(self._adopt(record)) for record in records],
            consumeErrors=True)
        adopted = [running for running in results if running is not None]
        if adopted and not self._closing:
            self._trim_logs_from_now_on()
        # then whatever runs without a record: never two agents for one user
        known = [agent.process.pid for agent in self._agents.values()
                 if agent.process is not None and agent.process.pid is not None]
        await self._in_thread(kill_orphans, self.state_dir, uids, known)
        return adopted

    async def _adopt(self, record: dict) -> Optional[RunningAgent]:
        username, pid, port = record["username"], record["pid"], record["port"]
        if username in self._agents:
            return None  # recover() runs before any start; never two agents anyway
        same, pidfd = _open_pidfd(pid, record["start_time"])
        if not same:
            log.info("agent of {username} (pid {pid}) is gone; discarding its record",
                     username=username, pid=pid)
            await self._queue_disk(username, delete_record, self.state_dir, username, pid)
            return None
        process = _AdoptedProcess(self.reactor, username, pid, record["start_time"], pidfd)
        process.watch()
        agent = _Agent(username, record.get("data_dir", ""), b"", process=process, port=port)
        self._agents[username] = agent  # holds the port and the user while we probe
        answers = await self._answers_within(port, RECOVER_PROBE_TIME)
        # and it is the agent that answers, not a stranger on its old port
        owners = await self._in_thread(listener_uids, port) if answers else []
        if answers and record["uid"] not in owners:
            log.warn("port {port} of the agent of {username} is held by uid {owners}, not by"
                     " the agent's uid {uid}", port=port, username=username, owners=owners,
                     uid=record["uid"])
        if answers and record["uid"] in owners and not process.ended:
            running = RunningAgent(username, AgentAddress(LOOPBACK, port), pid,
                                   float(record["started"]))
            self._now_running(agent, running)
            process.when_ended().addCallback(
                lambda _: self._queue_disk(username, delete_record, self.state_dir,
                                           username, pid))
            log.info("adopted the agent of {username} (pid {pid}) at {host}:{port}",
                     username=username, pid=pid, host=LOOPBACK, port=port)
            _fire_all(agent.start_waiters, running)
            return running
        log.warn("agent of {username} (pid {pid}) no longer answers HTTP on port {port};"
                 " killing it", username=username, pid=pid, port=port)
        process.signal_group(signal.SIGKILL)
        timer = self.reactor.callLater(RECOVER_KILL_WAIT, process._gone)
        await process.when_ended()
        if timer.active():
            timer.cancel()
        self._forget(agent)
        _fire_all(agent.start_waiters, Failure(AgentStartError(
            "the agent of %s that the previous manager left did not answer HTTP, so it was"
            " killed; try again" % (username,))))
        _fire_all(agent.stop_waiters, None)
        await self._queue_disk(username, delete_record, self.state_dir, username, pid)
        return None

    # -- stopping -------------------------------------------------------------

    def _terminate(self, agent: _Agent) -> None:
        process = agent.process
        if process is None or process.ended:
            return
        log.info("stopping agent of {username} (pid {pid})",
                 username=agent.username, pid=process.pid)
        process.signal_group(signal.SIGTERM)
        agent.kill_timer = self.reactor.callLater(self.stop_grace, self._kill, agent, process)

    def _kill(self, agent: _Agent, process) -> None:
        agent.kill_timer = None
        if process.ended:
            return
        log.warn("agent of {username} (pid {pid}) ignored SIGTERM for {grace} seconds;"
                 " sending SIGKILL", username=agent.username, pid=process.pid,
                 grace=self.stop_grace)
        process.signal_group(signal.SIGKILL)

    def _running_agent_ended(self, agent: _Agent) -> None:
        if agent.handed_over:
            return  # the next manager's business
        reason = "stopped" if agent.stopping else agent.process.exit_description
        log.info("agent of {username} ended: {reason}", username=agent.username, reason=reason)
        self._forget(agent)
        notify_exit(self._callbacks, agent.username, reason)
        _fire_all(agent.stop_waiters, None)

    def _forget(self, agent: _Agent) -> None:
        if self._agents.get(agent.username) is agent:
            del self._agents[agent.username]
        if agent.port:
            self._released[agent.port] = (agent.username, self.reactor.seconds())
        if agent.kill_timer is not None and agent.kill_timer.active():
            agent.kill_timer.cancel()
        agent.kill_timer = None

    def _quarantined_ports(self, username: str) -> Set[int]:
        """Ports that agents of users other than ``username`` gave up less
        than ``port_quarantine`` seconds ago (older entries are dropped)."""
        since = self.reactor.seconds() - self.port_quarantine
        for port, (_, when) in list(self._released.items()):
            if when <= since:
                del self._released[port]
        return {port for port, (user, _) in self._released.items() if user != username}

    @staticmethod
    def _wait(waiters: List[Deferred]) -> Deferred:
        d = Deferred()
        waiters.append(d)
        return d
