"""The process provider's file work: its state directory, the agents' records
and logs, and the agents' data directories.

Everything here may wait for a disk (or chown a whole tree), so the provider
runs it in the reactor's thread pool, one operation at a time per user
(``ProcessProvider._queue_disk``); nothing here touches the reactor. It is
apart from :mod:`.process` so that what the provider writes where, and what
a record must hold to be believed, reads on its own, without the Twisted
side that decides when.
"""
import json
import os
import re
import shutil
import stat
from typing import List, Optional, Tuple

from twisted.logger import Logger

from ... import usernames
from .interface import AgentStartError
from .process_inspect import process_start_time

log = Logger()

#: output lines kept per agent for error messages
LAST_LINES = 20

#: a line longer than this is logged in pieces (an agent that never writes
#: a newline must not make the manager buffer without end)
MAX_LINE = 8192

#: an agent's log file is rotated (to ``<user>.log.1``) at a start when it is
#: bigger than this, and copied there and emptied when it grows bigger while
#: the agent runs (looked at every ``process.LOG_CHECK_INTERVAL`` seconds)
LOG_LIMIT = 10 * 1024 * 1024

#: how much of the end of a log file is read for an error message
TAIL_BYTES = 64 * 1024

#: version of the JSON records in ``state_dir``
RECORD_VERSION = 1

_RECORD_NAME = re.compile(r"(%s)\.json" % (usernames.PATTERN,))


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


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_record(record: Optional[dict], username: str) -> bool:
    """A record of a spawned agent (or, with ``pid`` None, of a spawn about
    to happen)."""
    if not (record is not None and record.get("version") == RECORD_VERSION
            and record.get("username") == username
            and is_int(record.get("uid")) and is_int(record.get("gid"))
            and is_int(record.get("port")) and 0 < record["port"] < 65536
            and isinstance(record.get("started"), (int, float))):
        return False
    if record.get("pid") is None:
        return True
    return (is_int(record.get("pid")) and record["pid"] > 1
            and is_int(record.get("start_time"))
            and is_int(record.get("pgid")) and record["pgid"] > 1)


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
        if record is None or not _valid_record(record, match.group(1)):
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
