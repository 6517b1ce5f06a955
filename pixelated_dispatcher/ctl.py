"""``pixelated-ctl``: administer users and agents through the manager socket.

Every failure is one clear sentence on stderr and a non-zero exit status:
1 for a refused or failed command, 2 for bad usage, 3 when the manager
cannot be reached.
"""
import argparse
import datetime
import errno
import getpass
import sys
from typing import List, Optional, Sequence

from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.protocols import amp

from . import protocol as p

DEFAULT_SOCKET = "/run/pixelated/manager.sock"

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
    parser.add_argument("--socket", default=DEFAULT_SOCKET,
                        help="the manager's socket (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    add = commands.add_parser("add", help="add a user (asks for the password)")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password as one line from standard input")
    for name, text in [("remove", "remove a user (their data stays on disk)"),
                       ("start", "start a user's agent"),
                       ("stop", "stop a user's agent"),
                       ("info", "show a user's agent")]:
        commands.add_parser(name, help=text).add_argument("name")
    commands.add_parser("list", help="list users and the state of their agents")
    commands.add_parser("running", help="list running agents")
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
    }
    for kind, message in messages.items():
        if isinstance(error, kind):
            return CtlError(message)
    if isinstance(error, p.InvalidUsername):
        return CtlError(str(error))
    if isinstance(error, p.AgentStartFailed):
        return CtlError("the agent of %s could not be started: %s" % (name, error))
    if isinstance(error, amp.UnknownRemoteError):
        return CtlError("the manager failed with an unexpected error; see its log")
    return CtlError("the connection to the manager failed: %s" % (error,), EXIT_UNREACHABLE)


async def run(reactor, arguments, password: Optional[str], out) -> None:
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


async def _command(connection, arguments, password, out) -> None:
    call = connection.callRemote
    command = arguments.command
    if command == "add":
        await call(p.AddUser, username=arguments.name, password=password)
        print("added user %s" % arguments.name, file=out)
    elif command == "remove":
        await call(p.RemoveUser, username=arguments.name)
        print("removed user %s (their data stays on disk)" % arguments.name, file=out)
    elif command == "start":
        answer = await call(p.StartAgent, username=arguments.name)
        print("agent of %s running at %s:%d" % (arguments.name, answer["host"], answer["port"]),
              file=out)
    elif command == "stop":
        await call(p.StopAgent, username=arguments.name)
        print("stopped agent of %s" % arguments.name, file=out)
    elif command == "list":
        users = (await call(p.ListUsers))["users"]
        rows = [("USER", "AGENT")] + [(u["username"], u["state"]) for u in users]
        print("\n".join(columns(rows)), file=out)
    elif command == "running":
        users = (await call(p.ListUsers))["users"]
        for user in users:
            if user["state"] == "running":
                print(user["username"], file=out)
    elif command == "info":
        info = await call(p.AgentInfo, username=arguments.name)
        rows = [("user", info["username"]), ("state", info["state"])]
        if info["port"]:
            started = datetime.datetime.fromtimestamp(info["started"]).isoformat(" ", "seconds")
            rows += [("address", "%s:%d" % (info["host"], info["port"])),
                     ("pid", str(info["pid"]) if info["pid"] else "-"),
                     ("started", started)]
        print("\n".join(columns(rows)), file=out)


def main(argv: Optional[List[str]] = None) -> None:
    arguments = _parser().parse_args(argv)
    try:
        password = read_password(arguments.password_stdin) if arguments.command == "add" else None
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
