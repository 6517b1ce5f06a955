"""The Twisted objects through which the process provider sees its agents:
the ProcessProtocol of an agent it spawned (credentials on stdin, output,
exit), the pidfd reader of an agent it adopted, and the one-request HTTP
readiness probe.

They hold no policy: they report what happens (an answer, an exit, the last
lines of output) and :class:`.process.ProcessProvider` decides what follows
(a start succeeds or fails, an agent is killed, a record goes). They are
apart from :mod:`.process` so that the provider's module reads as those
decisions.
"""
import collections
import os
import signal
from typing import Any, Deque, Dict, List, Optional

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .process_files import LAST_LINES, MAX_LINE
from .process_inspect import process_start_time

log = Logger()

#: after the process is reaped, how long to wait for the rest of its output
#: (a leftover child may hold the pipes open)
OUTPUT_DRAIN_TIME = 1.0

#: how often an adopted agent is looked for in /proc where pidfds are missing
POLL_INTERVAL = 1.0

_ADDRESS_IN_USE = ("address already in use", "address in use", "eaddrinuse")


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


class Probe(Protocol):
    """Sends one request; ``answered`` fires once the reply starts like HTTP."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._head = b""
        self.answered: Deferred = Deferred(lambda _: self._transport().abortConnection())

    def _transport(self) -> Any:
        # connected: a TCP transport (abortConnection is not in ITransport)
        return self.transport

    def connectionMade(self) -> None:
        self._transport().write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._head += data
        if len(self._head) < 5 or self.answered.called:
            return
        if self._head.startswith(b"HTTP/"):
            self.answered.callback(None)
        else:
            self.answered.errback(ValueError("the answer is not HTTP"))
        self._transport().loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.answered.called:
            self.answered.errback(reason)


class OneProtocolFactory(Factory):
    noisy = False  # one log line per probe every 100 ms would drown the log

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
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
        d: Deferred = Deferred()
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


class AgentProcess(_Ending, ProcessProtocol):
    """One agent process we spawned: feeds it its credentials, logs its output
    line by line when it comes through pipes (no ``log_path``), and says when
    it has ended."""

    def __init__(self, reactor: Any, username: str, credentials: bytes,
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
        transport: Any = self.transport
        self.pid = transport.pid
        transport.write(self._credentials)
        transport.closeStdin()
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
class AdoptedProcess(_Ending):
    """An agent a previous manager started: not our child, so its end is
    seen through a pidfd (readable once it exits), or by polling /proc."""

    exit_description = "exited"

    def __init__(self, reactor: Any, username: str, pid: int, start_time: int,
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
