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
"""
import random
from typing import Any, Callable, Dict, Optional, Type

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectionClosed, ConnectionLost
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from ..protocol import (AgentAddress, Authenticate, EndSession, EnsureAgent,
                        ResolveSession)
from .manager_interface import IManager, ManagerUnavailable

DEFAULT_SOCKET = "/run/pixelated/manager.sock"

#: Seconds a call may wait for a connection to the manager.
CONNECT_TIMEOUT = 2.5

#: Seconds the manager may take to answer, per command. Starting an agent
#: can take a while; everything else is quick or rate limited.
CALL_TIMEOUTS: Dict[Type[amp.Command], float] = {
    Authenticate: 30.0,
    ResolveSession: 15.0,
    EndSession: 60.0,
    EnsureAgent: 120.0,
}


def default_retry_policy() -> Callable[[int], float]:
    """Reconnect quickly: the manager is a local socket, attempts are cheap,
    and every second without it is a second of 503 pages."""
    return backoffPolicy(initialDelay=0.1, maxDelay=2.0, factor=2.0,
                         jitter=lambda: random.uniform(0, 0.25))


def _unavailable(why: str) -> Callable[[Failure], Failure]:
    def translate(failure: Failure) -> Failure:
        return Failure(ManagerUnavailable("%s: %s" % (why, failure.getErrorMessage()
                                                      or failure.type.__name__)))
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
        factory = protocol_factory or Factory.forProtocol(amp.AMP)
        factory.noisy = False  # ClientService logs each attempt already
        self.service = ClientService(
            endpoint, factory,
            retryPolicy=retry_policy or default_retry_policy(), clock=clock)

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

    def ensure_agent(self, username: str) -> Deferred:
        return self._call(EnsureAgent, username=username).addCallback(
            lambda r: AgentAddress(host=r["host"], port=r["port"]))
