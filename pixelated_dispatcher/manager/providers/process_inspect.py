"""What the process provider reads from ``/proc`` about processes and
sockets, and the killing of the orphans it finds there.

A pid alone names no process for ever (it is reused), so a process is named
here by its pid and its start time (:func:`process_start_time`), and a pidfd
is only trusted once that start time was checked (:func:`open_pidfd`). The
provider calls those two on the reactor thread on purpose (procfs never
waits for a disk; see :mod:`.process`); the scans of all of ``/proc``
(:func:`kill_orphans`) and of the socket tables (:func:`listener_uids`) run
in the thread pool. It is apart from :mod:`.process` because it is Linux
knowledge (who runs as which uid, which socket listens where), not the
provider's decisions.
"""
import os
import signal
import socket
import struct
import time
from typing import Dict, List, Optional, Tuple

from twisted.logger import Logger

log = Logger()

#: agents listen here and nowhere else
LOOPBACK = "127.0.0.1"

#: how long ``recover()`` waits for a killed, unanswering agent to go
RECOVER_KILL_WAIT = 5.0

#: agents never run under a uid below this (system accounts) nor as nobody,
#: and ``recover()`` never kills processes of such uids
MIN_AGENT_UID = 1000
NOBODY = 65534

#: in the environment of every agent of a provider with a state dir (value:
#: the state dir), so that ``recover()`` finds agents that have no record
#: (a manager killed between a spawn and the record's write) and kills them
AGENT_MARKER = "PIXELATED_DISPATCHER_AGENTS"


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


def open_pidfd(pid: int, start_time: int) -> Tuple[bool, Optional[int]]:
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


def is_agent_uid(uid: int) -> bool:
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
    private = {uid for uid in uids if is_agent_uid(uid) and uid != os.getuid()}
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
        same, pidfd = open_pidfd(pid, start_time)
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
