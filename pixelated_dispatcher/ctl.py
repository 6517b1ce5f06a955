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
from typing import List, Optional, Sequence

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
    command("start", "start a user's agent")
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


def read_password(from_stdin: bool, stdin=sys.stdin) -> str:
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


async def run(reactor, arguments, password: Optional[str], out) -> None:
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


async def _all_users(call) -> List[dict]:
    users: List[dict] = []
    after = None
    while True:
        page = await call(p.ListUsers, **({"after": after} if after else {}))
        names = p.parse_user_page(page["users"])
        users += [{"username": name, "state": state} for name, state in names]
        if not page["more"] or not names:
            return users
        after = users[-1]["username"]


async def _command(connection, arguments, password, out) -> None:
    call = connection.callRemote
    command = arguments.command
    name = getattr(arguments, "name", None)
    say = lambda text: print(text, file=out)  # noqa: E731
    if command == "add":
        await call(p.AddUser, username=name, password=password)
        say("added user %s" % name)
    elif command == "passwd":
        await call(p.SetPassword, username=name, password=password)
        say("changed the password of %s and ended their sessions" % name)
    elif command == "remove":
        await call(p.RemoveUser, username=name, purge=arguments.purge)
        say("removed user %s%s" % (name, " and their data" if arguments.purge
                                   else " (their data stays on disk)"))
    elif command == "reset-data":
        await call(p.ResetData, username=name)
        say("deleted the data of %s" % name)
    elif command == "start":
        answer = await call(p.StartAgent, username=name)
        say("agent of %s running at %s:%d" % (name, answer["host"], answer["port"]))
    elif command == "stop":
        await call(p.StopAgent, username=name)
        say("stopped agent of %s" % name)
    elif command in ("list", "running"):
        users = await _all_users(call)
        if command == "running":
            users = [user for user in users if user["state"] == "running"]
        if arguments.json:
            nodes = {a["username"]: a["node"] for a in (await call(p.Stats))["agents"]
                     if a.get("node")}
            say(json.dumps([dict({"username": u["username"], "state": u["state"]},
                                 **({"node": nodes[u["username"]]}
                                    if u["username"] in nodes else {}))
                            for u in users]))
        elif command == "running":
            for user in users:
                say(user["username"])
        else:
            say("\n".join(columns([("USER", "AGENT")] +
                                  [(u["username"], u["state"]) for u in users])))
    elif command == "info":
        info = await call(p.AgentInfo, username=name)
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
        say("\n".join(columns(rows)))
    elif command == "sessions":
        sessions = (await call(p.ListSessions, username=name))["sessions"]
        say("\n".join(columns([("LOGIN", "LAST SEEN", "CLIENT")] + [
            (_when(s["created"]), _when(s["last_seen"]), s["client"] or "-")
            for s in sessions])))
    elif command == "logout":
        count = (await call(p.RevokeSessions, username=name))["count"]
        say("ended %d session%s of %s" % (count, "" if count == 1 else "s", name))
    elif command == "stats":
        stats = await call(p.Stats)
        if arguments.json:
            say(json.dumps({key: stats[key] for key in ("users", "sessions", "running", "memory")}
                           | {"agents": stats["agents"]}))
            return
        say("\n".join(columns([("users", str(stats["users"])),
                               ("sessions", str(stats["sessions"])),
                               ("running agents", str(stats["running"])),
                               ("agents' memory", _mib(stats["memory"]))])))
        if stats["agents"]:
            say("")
            with_nodes = any(a.get("node") for a in stats["agents"])
            say("\n".join(columns([("USER", "MEMORY", "UPTIME")
                                   + (("NODE",) if with_nodes else ())] + [
                (a["username"], _mib(a["memory"]), _duration(time.time() - a["started"]))
                + ((a.get("node") or "-",) if with_nodes else ())
                for a in stats["agents"]])))
    elif command == "import-legacy":
        root = os.path.abspath(arguments.root)
        after, counts = None, {"imported": 0, "skipped": 0}
        while True:
            page = await call(p.ImportLegacy, root=root, **({"after": after} if after else {}))
            for entry in page["entries"]:
                counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
                say("%-8s %s: %s" % (entry["outcome"], entry["username"], entry["detail"]))
            if not page["more"] or not page["entries"]:
                break
            after = page["entries"][-1]["username"]
        say("%d imported, %d skipped" % (counts["imported"], counts["skipped"]))


def main(argv: Optional[List[str]] = None) -> None:
    arguments = _parser().parse_args(argv)
    try:
        password = (read_password(arguments.password_stdin)
                    if arguments.command in ("add", "passwd") else None)
    except (CtlError, KeyboardInterrupt, EOFError) as error:
        print("pixelated-ctl: %s" % (error if isinstance(error, CtlError) else "aborted"),
              file=sys.stderr)
        sys.exit(getattr(error, "code", EXIT_USAGE))

    async def _main(reactor):
        try:
            await run(reactor, arguments, password, sys.stdout)
        except CtlError as error:
            print("pixelated-ctl: %s" % error, file=sys.stderr)
            raise SystemExit(error.code)

    task.react(lambda reactor: ensureDeferred(_main(reactor)))  # exits with the status


if __name__ == "__main__":
    main()
