"""Every path that is not the proxy's own: the session decides whose agent
gets the request.

cookie → ``resolve_session`` → user name → ``ensure_agent`` → address →
forwarder. Without a valid session, browsers are sent to the login form and
scripts get 401; when the manager or the agent cannot help, the user gets a
page saying so instead of a hanging request.
"""
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ..protocol import (AgentAddress, AgentStartFailed, DispatcherError,
                        InvalidSession, InvalidUsername, UnknownUser)
from . import pages
from .browser_connection import Disconnection
from .cookie_policy import expire_session_cookie, session_token
from .forwarding import IForwarder
from .manager_interface import IManager, ManagerUnavailable

log = Logger()


class SessionGate(Resource):
    """Forwards a logged-in browser's requests to its own agent, and only there."""

    isLeaf = True

    def __init__(self, manager: IManager, forwarder: IForwarder) -> None:
        super().__init__()
        self._manager = manager
        self._forwarder = forwarder

    def render(self, request: IRequest) -> Any:
        if not request.uri.startswith(b"/"):
            # Absolute-form or asterisk request targets are for proxies; this
            # is not one.
            pages.bad_request(request)
            return NOT_DONE_YET
        token = session_token(request)
        if token is None:
            pages.not_logged_in(request)
            return NOT_DONE_YET
        gone = Disconnection.watch(request)
        d = maybeDeferred(self._manager.resolve_session, token)
        d.addCallback(self._manager.ensure_agent)

        def forward(address: AgentAddress) -> None:
            if not gone.happened:
                self._forwarder.forward(request, address)

        def failed(failure: Failure) -> None:
            if gone.happened:
                return
            if failure.check(InvalidSession, UnknownUser, InvalidUsername):
                # Expired, revoked, or its user was removed: start over.
                expire_session_cookie(request)
                pages.not_logged_in(request)
            elif failure.check(AgentStartFailed):
                log.warn("Agent could not be started: {error}",
                         error=failure.getErrorMessage())
                pages.agent_start_failed(request)
            elif failure.check(ManagerUnavailable):
                log.warn("Manager unavailable: {error}", error=failure.getErrorMessage())
                pages.manager_unavailable(request)
            elif failure.check(DispatcherError):
                log.failure("Manager error while opening a session", failure)
                pages.manager_unavailable(request)
            else:
                log.failure("Unexpected error while forwarding", failure)
                pages.internal_error(request)

        def last_resort(failure: Failure) -> None:
            log.failure("Failed to answer a request", failure)
            if not (gone.happened or request.finished
                    or getattr(request, "startedWriting", False)):
                pages.internal_error(request)

        d.addCallbacks(forward, failed)
        d.addErrback(last_resort)
        return NOT_DONE_YET
