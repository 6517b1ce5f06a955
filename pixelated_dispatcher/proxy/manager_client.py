"""The manager as the proxy reaches it: AMP over the manager's Unix socket.

One connection is kept open by a ``ClientService``, which reconnects with a
short backoff whenever it drops (the manager restarts, say). Calls never
hang on a missing manager: a call waits at most ``connect_timeout`` seconds
for a connection (and fails sooner when the next attempt is refused), and a
call whose connection drops before the answer fails too, both with
:class:`ManagerUnavailable`, which the web side turns into a "try again"
page. Errors the manager declares (``InvalidCredentials``, ``InvalidSession``,
``AgentStartFailed``, ...) arrive as the classes of
:mod:`pixelated_dispatcher.protocol`.

Every connection starts with ``Subscribe``; the manager then pushes
``SessionEnded``, ``SessionsRevoked`` and ``AgentStopped`` on it, which
:class:`PushedInvalidations` (the connection's command locator) hands to the
subscribed listeners. When the connection drops, listeners are told to
``reset`` (a push may have been missed), and ``subscribed`` again once the
next connection has subscribed. Activity reports are split into batches well
under AMP's 64 KiB value limit.
"""
import random
from typing import Any, Callable, Dict, List, Optional, Type

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import (CancelledError, Deferred, DeferredList,
                                    TimeoutError, succeed)
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectionClosed, ConnectionLost
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted.logger import Logger

from ..fanout import tell_all
from ..protocol import (AgentAddress, AgentStopped, Authenticate, EndSession,
                        EnsureAgent, ReportActivity, ResolveSession, SessionEnded,
                        SessionsRevoked, Subscribe)
from .manager_interface import IManager, ManagerUnavailable

log = Logger()

#: Seconds a call may wait for a connection to the manager.
CONNECT_TIMEOUT = 2.5

#: Seconds the manager may take to answer, per command. Starting an agent
#: can take a while; everything else is quick or rate limited.
CALL_TIMEOUTS: Dict[Type[amp.Command], float] = {
    Authenticate: 30.0,
    ResolveSession: 15.0,
    EndSession: 60.0,
    EnsureAgent: 120.0,
    ReportActivity: 30.0,
    Subscribe: 10.0,
}

#: Bytes of user names per ``ReportActivity`` (AMP allows 65,535 per value;
#: ``ListOf`` adds two bytes per name).
ACTIVITY_BATCH_BYTES = 48 * 1024


def activity_batches(usernames: Any) -> List[List[str]]:
    """``usernames`` split into lists whose encoding stays under
    :data:`ACTIVITY_BATCH_BYTES`."""
    batches: List[List[str]] = []
    current: List[str] = []
    size = 0
    for name in sorted(set(usernames)):
        cost = len(name.encode("utf-8")) + 2
        if current and size + cost > ACTIVITY_BATCH_BYTES:
            batches.append(current)
            current, size = [], 0
        current.append(name)
        size += cost
    if current:
        batches.append(current)
    return batches


class PushedInvalidations(amp.CommandLocator):
    """Answers what the manager pushes by telling the listeners."""

    def __init__(self, listeners: List[Any]) -> None:
        self._listeners = listeners

    def _tell(self, method: str, *args: Any) -> dict:
        tell_all(self._listeners, lambda listener: getattr(listener, method)(*args),
                 method, log)
        return {}

    @SessionEnded.responder
    def session_ended(self, token_digest: str) -> dict:
        return self._tell("session_ended", token_digest)

    @SessionsRevoked.responder
    def sessions_revoked(self, username: str) -> dict:
        return self._tell("sessions_revoked", username)

    @AgentStopped.responder
    def agent_stopped(self, username: str) -> dict:
        return self._tell("agent_stopped", username)


class _ManagerConnection(amp.AMP):
    """The proxy's end of the manager socket."""

    def __init__(self, client: "AMPManagerClient") -> None:
        super().__init__(locator=PushedInvalidations(client.listeners))
        self._client = client

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._client._connection_lost(self)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, client: "AMPManagerClient") -> None:
        self._client = client

    def buildProtocol(self, addr: Any) -> amp.AMP:
        protocol = _ManagerConnection(self._client)
        protocol.factory = self
        return protocol


def default_retry_policy() -> Callable[[int], float]:
    """Reconnect quickly: the manager is a local socket, attempts are cheap,
    and every second without it is a second of 503 pages."""
    return backoffPolicy(initialDelay=0.1, maxDelay=2.0, factor=2.0,
                         jitter=lambda: random.uniform(0, 0.25))


def _type_name(failure: Failure) -> str:
    return failure.type.__name__ if failure.type is not None else "error"


def _unavailable(why: str) -> Callable[[Failure], Failure]:
    def translate(failure: Failure) -> Failure:
        return Failure(ManagerUnavailable("%s: %s" % (why, failure.getErrorMessage()
                                                      or _type_name(failure))))
    return translate


@implementer(IManager)
class AMPManagerClient:
    """:class:`IManager` over AMP. Add :attr:`service` to the application so
    that it connects when the application starts and disconnects at stop."""

    def __init__(self, endpoint: IStreamClientEndpoint, clock: IReactorTime, *,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 call_timeouts: Optional[Dict[Type[amp.Command], float]] = None,
                 retry_policy: Optional[Callable[[int], float]] = None,
                 protocol_factory: Optional[Factory] = None) -> None:
        self._clock = clock
        self._connect_timeout = connect_timeout
        self._call_timeouts = dict(CALL_TIMEOUTS)
        self._call_timeouts.update(call_timeouts or {})
        self.listeners: List[Any] = []
        self.subscribed = False
        self._subscription_waiters: List[Deferred] = []
        factory = protocol_factory or _ConnectionFactory(self)
        factory.noisy = False  # ClientService logs each attempt already
        self.service = ClientService(
            endpoint, factory,
            retryPolicy=retry_policy or default_retry_policy(), clock=clock,
            prepareConnection=self._prepare)

    # --- subscription -----------------------------------------------------------

    def _prepare(self, protocol: Any) -> Deferred:
        """Subscribe each new connection before calls use it; a manager that
        does not know ``Subscribe`` leaves the proxy unsubscribed (its caches
        then keep entries for less than a second), not unusable."""
        d = protocol.callRemote(Subscribe)
        d.addTimeout(self._call_timeouts[Subscribe], self._clock)

        def subscribed(_: Any) -> None:
            if getattr(protocol, "_lost", False):
                return
            self.subscribed = True
            for listener in list(self.listeners):
                listener.subscribed()
            waiters, self._subscription_waiters = self._subscription_waiters, []
            for waiter in waiters:
                # Not from inside ClientService's state machine (see _connection).
                self._clock.callLater(0, waiter.callback, None)

        def refused(failure: Failure) -> None:
            log.warn("The manager refused Subscribe ({error}); caching briefly only",
                     error=failure.getErrorMessage())
            waiters, self._subscription_waiters = self._subscription_waiters, []
            for waiter in waiters:
                self._clock.callLater(0, waiter.errback, ManagerUnavailable(
                    "the manager refused Subscribe: %s" % (failure.getErrorMessage(),)))
        return d.addCallbacks(subscribed, refused)

    def _connection_lost(self, protocol: amp.AMP) -> None:
        protocol._lost = True  # type: ignore[attr-defined]
        was = self.subscribed
        self.subscribed = False
        tell_all(self.listeners, lambda listener: listener.reset(), "reset", log)
        if was:
            log.info("Connection to the manager lost; caches dropped")

    @classmethod
    def for_socket(cls, reactor: Any, path: str, **kwargs: Any) -> "AMPManagerClient":
        """A client for the manager listening on the Unix socket at ``path``."""
        return cls(UNIXClientEndpoint(reactor, path, timeout=2),
                   reactor, **kwargs)

    def _connection(self) -> Deferred:
        waiting = self.service.whenConnected(failAfterFailures=1)
        if waiting.called:
            d = waiting
        else:
            # ClientService fires waiters from inside its state machine, which
            # refuses to be re-entered; a caller reacting to the outcome with
            # another call would do just that. Relay on the next turn instead.
            d = Deferred()

            def relay(result: Any) -> None:
                self._clock.callLater(0, d.callback, result)
            waiting.addBoth(relay)
        d.addTimeout(self._connect_timeout, self._clock)
        d.addErrback(_unavailable("cannot connect to the manager"))
        return d

    def _call(self, command: Type[amp.Command], **arguments: Any) -> Deferred:
        def call(protocol: amp.AMP) -> Deferred:
            answer = protocol.callRemote(command, **arguments)
            answer.addTimeout(self._call_timeouts.get(command, 30.0), self._clock)
            answer.addErrback(self._translate_call_failure)
            return answer
        return self._connection().addCallback(call)

    @staticmethod
    def _translate_call_failure(failure: Failure) -> Failure:
        if failure.check(ConnectionClosed, ConnectionLost, amp.UnknownRemoteError):
            # The connection dropped before the answer (or the manager failed
            # so badly that AMP closed it): the call may or may not have run.
            return _unavailable("connection to the manager lost")(failure)
        if failure.check(TimeoutError, CancelledError):
            return _unavailable("the manager did not answer in time")(failure)
        return failure

    # --- IManager ------------------------------------------------------------

    def authenticate(self, username: str, password: str, client: str) -> Deferred:
        return self._call(Authenticate, username=username, password=password,
                          client=client).addCallback(lambda r: r["token"])

    def resolve_session(self, token: str) -> Deferred:
        return self._call(ResolveSession, token=token).addCallback(
            lambda r: r["username"])

    def end_session(self, token: str) -> Deferred:
        return self._call(EndSession, token=token).addCallback(lambda r: r["username"])

    def ensure_agent(self, username: str, token: str) -> Deferred:
        return self._call(EnsureAgent, username=username, token=token).addCallback(
            lambda r: AgentAddress(host=r["host"], port=r["port"]))

    def report_activity(self, usernames: Any) -> Deferred:
        batches = activity_batches(usernames)
        if not batches:
            return succeed(None)
        calls = [self._call(ReportActivity, usernames=batch) for batch in batches]
        d = DeferredList(calls, fireOnOneErrback=True, consumeErrors=True)

        def first_error(failure: Failure) -> Failure:
            error: Any = failure.value  # FirstError: which call failed, and how
            return error.subFailure
        return d.addCallbacks(lambda _: None, first_error)

    def subscribe(self, listener: Any) -> Deferred:
        if listener not in self.listeners:
            self.listeners.append(listener)
        if self.subscribed:
            listener.subscribed()
            return succeed(None)
        waiter: Deferred = Deferred()
        self._subscription_waiters.append(waiter)

        def not_connected(failure: Failure) -> None:
            if waiter.called:
                return
            if waiter in self._subscription_waiters:
                self._subscription_waiters.remove(waiter)
            waiter.errback(failure)
        # Make sure a connection is being attempted, and report its failure.
        self._connection().addErrback(not_connected)
        return waiter
