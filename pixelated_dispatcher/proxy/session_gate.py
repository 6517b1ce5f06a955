"""Every path that is not the proxy's own: the session decides whose agent
gets the request.

cookie → session (cache, else ``resolve_session``) → user name → agent
address (cache, else one shared ``ensure_agent`` with the session's token,
without which the manager neither answers nor starts) → forwarder. Without a
valid session, browsers are sent to the login form (remembering the page)
and scripts get 401. When the agent is not known to run, the gate waits a
moment (:data:`START_GRACE`) for the manager; if the agent is still starting
after that, a browser loading a page goes to the "starting your mailbox"
page, a script gets 503 with ``Retry-After``, and anything else keeps
waiting. When an agent is gone (crashed, culled) the same happens, and the
agent is started again; the session stays valid throughout.

The waiting page itself is :class:`.starting_page.StartingPage`.
"""
from typing import Any, Callable, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..protocol import (AgentAddress, AgentStartFailed, CapacityReached,
                        DispatcherError, InvalidSession, InvalidUsername,
                        UnknownUser)
from . import pages
from .browser_connection import Disconnection
from .cookie_policy import expire_session_cookie, session_token
from .forwarding import IForwarder, wants_upgrade
from .manager_cache import ManagerCache
from .manager_interface import ManagerUnavailable
from .next_path import local_path
from .twisted_internals import browser_disconnected

log = Logger()

#: Seconds a page load or a script waits for an agent that is not known to
#: run before it gets the waiting page or a 503 (a running agent is found
#: in a millisecond; a start takes longer).
START_GRACE = 1.0


def answer_failure(request: Request, failure: Failure, cache: ManagerCache,
                   token: Optional[str], next_path: bytes) -> None:
    """The page for what went wrong while finding a session or an agent."""
    if failure.check(InvalidSession, UnknownUser, InvalidUsername):
        # Expired, revoked, or its user was removed: start over.
        if token is not None:
            cache.forget_session(token)
        expire_session_cookie(request)
        pages.not_logged_in(request, next_path)
    elif failure.check(CapacityReached):
        log.warn("Agent not started, capacity reached: {error}",
                 error=failure.getErrorMessage())
        pages.capacity_reached(request)
    elif failure.check(AgentStartFailed):
        log.warn("Agent could not be started: {error}", error=failure.getErrorMessage())
        pages.agent_start_failed(request)
    elif failure.check(ManagerUnavailable):
        log.warn("Manager unavailable: {error}", error=failure.getErrorMessage())
        pages.manager_unavailable(request)
    elif failure.check(DispatcherError):
        log.failure("Manager error", failure)
        pages.manager_unavailable(request)
    else:
        log.failure("Unexpected error while forwarding", failure)
        pages.internal_error(request)


def last_resort(request: Request, gone: Disconnection) -> Callable[[Failure], None]:
    """An errback for a bug in a callback: log it, and give the browser a
    500 if nothing has been sent yet."""
    def answer(failure: Failure) -> None:
        log.failure("Failed to answer a request", failure)
        if not (gone.happened or request.finished
                or getattr(request, "startedWriting", False)):
            pages.internal_error(request)
    return answer


def _ignore(failure: Failure) -> None:
    """A start failure is kept by the cache for the waiting page."""


class SessionGate(Resource):
    """Forwards a logged-in browser's requests to its own agent, and only there."""

    isLeaf = True

    def __init__(self, cache: ManagerCache, forwarder: IForwarder, clock: Any,
                 start_grace: float = START_GRACE) -> None:
        super().__init__()
        self._cache = cache
        self._forwarder = forwarder
        self._clock = clock
        self._start_grace = start_grace

    def render(self, request: Request) -> Any:
        if not request.uri.startswith(b"/"):
            # Absolute-form or asterisk request targets are for proxies; this
            # is not one.
            pages.bad_request(request)
            return NOT_DONE_YET
        token = session_token(request)
        if token is None:
            pages.not_logged_in(request, local_path(request.uri))
            return NOT_DONE_YET
        username = self._cache.cached_user(token)
        if username is not None:
            self._for_user(request, token, username)
            return NOT_DONE_YET
        gone = Disconnection.watch(request)
        d = self._cache.resolve(token)

        def found(username: str) -> None:
            if not gone.happened:
                self._for_user(request, token, username)

        def failed(failure: Failure) -> None:
            if not gone.happened:
                answer_failure(request, failure, self._cache, token, local_path(request.uri))

        d.addCallbacks(found, failed)
        d.addErrback(last_resort(request, gone))
        return NOT_DONE_YET

    def _for_user(self, request: Request, token: str, username: str) -> None:
        self._cache.touch(username)
        address = self._cache.cached_address(username)
        if address is not None:
            self._forward(request, token, username, address)
        else:
            self._start_then_forward(request, token, username)

    def _forward(self, request: Request, token: str, username: str,
                 address: AgentAddress) -> None:
        # Open until it finishes: a revocation closes it (a WebSocket may
        # carry the user's activity for hours and counts as activity while
        # it is open).
        self._cache.exchanges.opened(request, username, token, wants_upgrade(request))
        self._forwarder.forward(request, address,
                                lambda request: self._agent_gone(request, token, username),
                                username)

    def _start_then_forward(self, request: Request, token: str, username: str) -> None:
        gone = Disconnection.watch(request)
        d = self._cache.ensure(username, token)
        answered = []
        timer = None
        if not d.called and (pages.is_script_request(request)
                             or (pages.is_navigation(request)
                                 and request.method in (b"GET", b"HEAD"))):
            def too_slow() -> None:
                answered.append(True)
                if not gone.happened:
                    pages.agent_starting(request, local_path(request.uri))
            timer = self._clock.callLater(self._start_grace, too_slow)

        def ready(address: AgentAddress) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            if not (answered or gone.happened):
                self._forward(request, token, username, address)

        def failed(failure: Failure) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            if not (answered or gone.happened):
                self._cache.start_failure(token)  # shown here, not again
                answer_failure(request, failure, self._cache, token, local_path(request.uri))

        d.addCallbacks(ready, failed)
        d.addErrback(last_resort(request, gone))

    def _agent_gone(self, request: Request, token: str, username: str) -> None:
        """The agent did not answer at its address: start it again (with
        this request's session, which opens the agent's credentials); the
        browser waits on the waiting page, scripts are told to retry."""
        self._cache.forget_address(username)
        self._cache.ensure(username, token).addErrback(_ignore)
        if request.finished or browser_disconnected(request):
            return
        pages.agent_starting(request, local_path(request.uri))
