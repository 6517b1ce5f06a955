"""``pixelated-ctl``: administer users and agents through the manager socket.

Every failure is one clear sentence on stderr and a non-zero exit status:
1 for a refused or failed command, 2 for bad usage, 3 when the manager
cannot be reached.
"""
import argparse
import datetime
import errno
import getpass
import json
import os
import sys
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, TextIO

import attr
from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.protocols import amp

from . import protocol as p

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class CtlError(Exception):
    """A failure to report as one sentence; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelated-ctl", description="Administer pixelated-dispatcher users and agents.")
    parser.add_argument("--socket", default=p.DEFAULT_SOCKET,
                        help="the manager's socket (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name: str, text: str, user: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        if user:
            sub.add_argument("name", help="user name")
        return sub

    for name, text in [("add", "add a user (asks for the password)"),
                       ("passwd", "set a user's password and end their sessions")]:
        command(name, text).add_argument(
            "--password-stdin", action="store_true",
            help="read the password as one line from standard input")
    command("remove", "remove a user; their data stays on disk unless --purge").add_argument(
        "--purge", action="store_true", help="also delete the user's data")
    command("reset-data", "stop a user's agent and delete their data")
    command("start", "show where a user's agent runs; a stopped agent starts only with its"
            " user's session (their next request), which holds its password")
    command("stop", "stop a user's agent")
    command("info", "show a user's agent: state, address, uptime, memory, last activity")
    command("move", "move a user's agent and data to another swarm node (not supported"
            " yet: refuses, see docs/cluster.rst)").add_argument("node", help="target node")
    command("sessions", "list a user's sessions")
    command("logout", "end every session of a user")
    for name, text in [("list", "list users and the state of their agents"),
                       ("running", "list running agents"),
                       ("stats", "count users, sessions and agents; agents' memory")]:
        command(name, text, user=False).add_argument(
            "--json", action="store_true", help="machine-readable output")
    command("import-legacy", "import the users of an original pixelated-dispatcher",
            user=False).add_argument("root", help="its root directory, e.g."
                                     " /var/lib/pixelated/dispatcher")
    return parser


def read_password(from_stdin: bool, stdin: TextIO = sys.stdin) -> str:
    if from_stdin:
        line = stdin.readline()
        if not line:
            raise CtlError("no password on standard input", EXIT_USAGE)
        password = line[:-1] if line.endswith("\n") else line
        if password.endswith("\r"):
            password = password[:-1]
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise CtlError("the passwords do not match", EXIT_USAGE)
    if not password:
        raise CtlError("the password must not be empty", EXIT_USAGE)
    return password


def columns(rows: Sequence[Sequence[str]]) -> List[str]:
    """Rows as left-aligned columns separated by two spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows]


def _explain(error: Exception, socket_path: str, name: Optional[str]) -> CtlError:
    if isinstance(error, ConnectError):
        code = getattr(error, "osError", None)
        text = str(error)
        if "Permission denied" in text or code == errno.EACCES:
            return CtlError("permission denied: you may not open the manager socket %s"
                            % socket_path)
        return CtlError("cannot reach the manager at %s: is pixelated-manager running?"
                        % socket_path, EXIT_UNREACHABLE)
    messages = {
        p.PermissionDenied: "permission denied: the manager refuses this command to you",
        p.UnknownUser: "there is no user named %s" % name,
        p.UserExists: "a user named %s exists already" % name,
        p.AgentNotRunning: "the agent of %s is not running" % name,
        p.InternalError: "the manager failed with an internal error; see its log",
        p.StorageFull: "the manager cannot write its state: no space left on its disk"
                       " (nothing was changed; free some space and try again)",
    }
    for kind, message in messages.items():
        if isinstance(error, kind):
            return CtlError(message)
    if isinstance(error, (p.InvalidUsername, p.BadRequest)):
        return CtlError(str(error))
    if isinstance(error, p.CapacityReached):
        return CtlError("the agent of %s could not be started: %s" % (name, error))
    if isinstance(error, p.AgentStartFailed):
        return CtlError("the agent of %s could not be started: %s" % (name, error))
    if isinstance(error, amp.UnknownRemoteError):
        return CtlError("the manager failed with an unexpected error; see its log")
    return CtlError("the connection to the manager failed: %s" % (error,), EXIT_UNREACHABLE)


#: why ``pixelated-ctl move`` refuses (one home for the sentence)
MOVE_UNSUPPORTED = ("moving a user's agent to another node is not supported: their data lives"
                    " on the node their agent first ran on, and moving it needs an offline"
                    " copy that the swarm provider does not do yet (docs/cluster.rst)")


async def run(reactor: Any, arguments: argparse.Namespace, password: Optional[str],
              out: TextIO) -> None:
    if arguments.command == "move":
        # refused before anything is asked of the manager: nothing can be half-done
        raise CtlError("cannot move %s to %s: %s" % (arguments.name, arguments.node,
                                                       MOVE_UNSUPPORTED), EXIT_USAGE)
    endpoint = UNIXClientEndpoint(reactor, arguments.socket, timeout=10)
    name = getattr(arguments, "name", None)
    try:
        connection = await connectProtocol(endpoint, amp.AMP())
    except Exception as error:
        raise _explain(error, arguments.socket, name)
    try:
        await _command(connection, arguments, password, out)
    except CtlError:
        raise
    except Exception as error:
        raise _explain(error, arguments.socket, name)
    finally:
        connection.transport.loseConnection()


def _when(timestamp: float) -> str:
    if not timestamp:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).isoformat(" ", "seconds")


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    text = "%d:%02d:%02d" % (rest // 3600, rest % 3600 // 60, rest % 60)
    return ("%dd " % days if days else "") + text


def _mib(count: int) -> str:
    return "%.1f MiB" % (count / 1048576.0)


async def _all_users(call: Callable[..., Awaitable[Dict[str, Any]]]) -> List[dict]:
    users: List[dict] = []
    after = None
    while True:
        page = await call(p.ListUsers, **({"after": after} if after else {}))
        names = p.parse_user_page(page["users"])
        users += [{"username": name, "state": state} for name, state in names]
        if not page["more"] or not names:
            return users
        after = users[-1]["username"]


@attr.s(auto_attribs=True, frozen=True)
class Invocation:
    """One subcommand being run: how to ask the manager, what was asked for,
    and where the answer goes."""
    call: Callable[..., Awaitable[Dict[str, Any]]]
    arguments: argparse.Namespace
    password: Optional[str]
    out: TextIO

    @property
    def name(self) -> str:
        """The user name the subcommand is about."""
        return str(self.arguments.name)

    def say(self, text: str) -> None:
        print(text, file=self.out)


async def _add(c: Invocation) -> None:
    await c.call(p.AddUser, username=c.name, password=c.password)
    c.say("added user %s" % c.name)


async def _passwd(c: Invocation) -> None:
    await c.call(p.SetPassword, username=c.name, password=c.password)
    c.say("changed the password of %s and ended their sessions" % c.name)


async def _remove(c: Invocation) -> None:
    await c.call(p.RemoveUser, username=c.name, purge=c.arguments.purge)
    c.say("removed user %s%s" % (c.name, " and their data" if c.arguments.purge
                                 else " (their data stays on disk)"))


async def _reset_data(c: Invocation) -> None:
    await c.call(p.ResetData, username=c.name)
    c.say("deleted the data of %s" % c.name)


async def _start(c: Invocation) -> None:
    answer = await c.call(p.StartAgent, username=c.name)
    c.say("agent of %s running at %s:%d" % (c.name, answer["host"], answer["port"]))


async def _stop(c: Invocation) -> None:
    await c.call(p.StopAgent, username=c.name)
    c.say("stopped agent of %s" % c.name)


async def _list(c: Invocation) -> None:
    """``list`` and ``running``."""
    users = await _all_users(c.call)
    running_only = c.arguments.command == "running"
    if running_only:
        users = [user for user in users if user["state"] == "running"]
    if c.arguments.json:
        nodes = {a["username"]: a["node"] for a in (await c.call(p.Stats))["agents"]
                 if a.get("node")}
        c.say(json.dumps([dict({"username": u["username"], "state": u["state"]},
                               **({"node": nodes[u["username"]]}
                                  if u["username"] in nodes else {}))
                          for u in users]))
    elif running_only:
        for user in users:
            c.say(user["username"])
    else:
        c.say("\n".join(columns([("USER", "AGENT")] +
                                [(u["username"], u["state"]) for u in users])))


async def _info(c: Invocation) -> None:
    info = await c.call(p.AgentInfo, username=c.name)
    rows = [("user", info["username"]), ("state", info["state"])]
    if info["reason"]:
        rows.append(("reason", info["reason"]))
    if info["port"]:
        if info.get("node"):
            rows.append(("node", info["node"]))
        rows += [("address", "%s:%d" % (info["host"], info["port"])),
                 ("pid", str(info["pid"]) if info["pid"] else "-"),
                 ("started", _when(info["started"])),
                 ("uptime", _duration(time.time() - info["started"])),
                 ("memory", _mib(info["memory"])),
                 ("last activity", _when(info["last_activity"]))]
    if info.get("last_failure"):
        rows.append(("last failure", info["last_failure"]))
    if info.get("limits"):
        rows.append(("limits", info["limits"]))
    c.say("\n".join(columns(rows)))


async def _sessions(c: Invocation) -> None:
    sessions = (await c.call(p.ListSessions, username=c.name))["sessions"]
    c.say("\n".join(columns([("LOGIN", "LAST SEEN", "CLIENT")] + [
        (_when(s["created"]), _when(s["last_seen"]), s["client"] or "-")
        for s in sessions])))


async def _logout(c: Invocation) -> None:
    count = (await c.call(p.RevokeSessions, username=c.name))["count"]
    c.say("ended %d session%s of %s" % (count, "" if count == 1 else "s", c.name))


async def _stats(c: Invocation) -> None:
    stats = await c.call(p.Stats)
    if c.arguments.json:
        c.say(json.dumps({key: stats[key] for key in ("users", "sessions", "running", "memory")}
                         | {"agents": stats["agents"]}))
        return
    c.say("\n".join(columns([("users", str(stats["users"])),
                             ("sessions", str(stats["sessions"])),
                             ("running agents", str(stats["running"])),
                             ("agents' memory", _mib(stats["memory"]))])))
    if stats["agents"]:
        c.say("")
        with_nodes = any(a.get("node") for a in stats["agents"])
        c.say("\n".join(columns([("USER", "MEMORY", "UPTIME")
                                 + (("NODE",) if with_nodes else ())] + [
            (a["username"], _mib(a["memory"]), _duration(time.time() - a["started"]))
            + ((a.get("node") or "-",) if with_nodes else ())
            for a in stats["agents"]])))


async def _import_legacy(c: Invocation) -> None:
    root = os.path.abspath(c.arguments.root)
    after, counts = None, {"imported": 0, "skipped": 0}
    while True:
        page = await c.call(p.ImportLegacy, root=root, **({"after": after} if after else {}))
        for entry in page["entries"]:
            counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
            c.say("%-8s %s: %s" % (entry["outcome"], entry["username"], entry["detail"]))
        if not page["more"] or not page["entries"]:
            break
        after = page["entries"][-1]["username"]
    c.say("%d imported, %d skipped" % (counts["imported"], counts["skipped"]))


#: What each subcommand of the parser runs (``move`` is refused by :func:`run`
#: before the manager is asked anything).
COMMANDS: Dict[str, Callable[[Invocation], Awaitable[None]]] = {
    "add": _add,
    "passwd": _passwd,
    "remove": _remove,
    "reset-data": _reset_data,
    "start": _start,
    "stop": _stop,
    "list": _list,
    "running": _list,
    "info": _info,
    "sessions": _sessions,
    "logout": _logout,
    "stats": _stats,
    "import-legacy": _import_legacy,
}


async def _command(connection: amp.AMP, arguments: argparse.Namespace,
                   password: Optional[str], out: TextIO) -> None:
    await COMMANDS[arguments.command](Invocation(connection.callRemote, arguments,
                                                 password, out))


def main(argv: Optional[List[str]] = None) -> None:
    arguments = _parser().parse_args(argv)
    try:
        password = (read_password(arguments.password_stdin)
                    if arguments.command in ("add", "passwd") else None)
    except (CtlError, KeyboardInterrupt, EOFError) as error:
        print("pixelated-ctl: %s" % (error if isinstance(error, CtlError) else "aborted"),
              file=sys.stderr)
        sys.exit(getattr(error, "code", EXIT_USAGE))

    async def _main(reactor: Any) -> None:
        try:
            await run(reactor, arguments, password, sys.stdout)
        except CtlError as error:
            print("pixelated-ctl: %s" % error, file=sys.stderr)
            raise SystemExit(error.code)

    task.react(lambda reactor: ensureDeferred(_main(reactor)))  # exits with the status


if __name__ == "__main__":
    main()
