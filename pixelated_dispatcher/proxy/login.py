"""The login and logout resources: ``/auth/login`` and ``/auth/logout``.

They only translate between HTML forms and the manager: the manager checks
passwords, rate-limits and owns the sessions; these resources check the form's
CSRF token (double submit: the hidden ``csrf_token`` field must equal this
browser's CSRF cookie), turn answers into cookies and pages, and keep every
failure to log in indistinguishable ("Invalid username or password").
"""
import hmac
from typing import List, Optional

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ..protocol import DispatcherError, InvalidCredentials, InvalidSession
from ..usernames import is_valid_username
from . import pages
from .cookie_policy import (csrf_token, ensure_csrf_cookie, expire_session_cookie,
                            session_token, set_session_cookie)
from .browser_connection import Disconnection, client_ip
from .manager_interface import IManager, ManagerUnavailable

log = Logger()

#: Far above any real password, far below AMP's 64 KiB value limit.
MAX_PASSWORD_BYTES = 4096


def form_field(request: IRequest, name: bytes) -> Optional[str]:
    """The first value of a form field as text, or None when it is missing or
    is not UTF-8 (no stored user name or password can match such bytes)."""
    values: List[bytes] = (request.args or {}).get(name) or []
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None


def csrf_matches(request: IRequest) -> bool:
    """Whether the form was sent by a page this browser got from us."""
    expected = csrf_token(request)
    submitted = form_field(request, b"csrf_token")
    if expected is None or submitted is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), submitted.encode("utf-8"))


def _method_not_allowed(request: IRequest) -> bytes:
    pages.method_not_allowed(request, [b"GET", b"HEAD", b"POST"])
    return NOT_DONE_YET


def _manager_trouble(request: IRequest, failure: Failure, doing: str) -> None:
    """Log what went wrong with the manager and tell the browser to retry."""
    if failure.check(ManagerUnavailable):
        log.warn("Manager unavailable while {doing}: {error}",
                 doing=doing, error=failure.getErrorMessage())
    else:
        log.failure("Manager error while {doing}", failure, doing=doing)
    pages.manager_unavailable(request)


class LoginResource(Resource):
    """``GET`` shows the login form; ``POST`` logs in and opens a session."""

    isLeaf = True

    def __init__(self, manager: IManager) -> None:
        super().__init__()
        self._manager = manager

    def render_GET(self, request: IRequest) -> bytes:
        pages.login_form(request, ensure_csrf_cookie(request))
        return NOT_DONE_YET

    render_HEAD = render_GET

    def render_POST(self, request: IRequest) -> bytes:
        if not csrf_matches(request):
            pages.csrf_refused(request)
            return NOT_DONE_YET
        csrf = ensure_csrf_cookie(request)
        username = form_field(request, b"username")
        password = form_field(request, b"password")
        if (username is None or password is None or not is_valid_username(username)
                or len(password.encode("utf-8")) > MAX_PASSWORD_BYTES):
            self._refuse(request, csrf, username)
            return NOT_DONE_YET
        gone = Disconnection.watch(request)
        d = maybeDeferred(self._manager.authenticate, username, password,
                          client_ip(request))

        def logged_in(token: str) -> None:
            if gone.happened:
                return
            try:
                set_session_cookie(request, token)
            except ValueError:
                log.failure("Cannot put the manager's session token in a cookie")
                pages.internal_error(request)
                return
            pages.redirect(request, b"/")

        def refused(failure: Failure) -> None:
            if gone.happened:
                return
            if failure.check(InvalidCredentials):
                self._refuse(request, csrf, username)
            elif failure.check(ManagerUnavailable, DispatcherError):
                _manager_trouble(request, failure, "logging in")
            else:
                log.failure("Unexpected error while logging in", failure)
                pages.internal_error(request)

        d.addCallbacks(logged_in, refused)
        d.addErrback(lambda f: log.failure("Failed to answer a login", f))
        return NOT_DONE_YET

    def _refuse(self, request: IRequest, csrf: str, username: Optional[str]) -> None:
        """The one answer to every failed login: the form, one neutral message."""
        shown = username if username is not None and is_valid_username(username) else ""
        pages.login_form(request, csrf, code=401, message=pages.INVALID_LOGIN,
                         username=shown)

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD", b"POST"):
            return _method_not_allowed(request)
        return super().render(request)


class LogoutResource(Resource):
    """``GET`` asks for confirmation (agents link here); ``POST`` ends the
    session on the manager, which also stops the user's agent."""

    isLeaf = True

    def __init__(self, manager: IManager) -> None:
        super().__init__()
        self._manager = manager

    def render_GET(self, request: IRequest) -> bytes:
        if session_token(request) is None:
            pages.redirect(request, pages.LOGIN_PATH)
        else:
            pages.logout_form(request, ensure_csrf_cookie(request))
        return NOT_DONE_YET

    render_HEAD = render_GET

    def render_POST(self, request: IRequest) -> bytes:
        if not csrf_matches(request):
            pages.csrf_refused(request)
            return NOT_DONE_YET
        token = session_token(request)
        if token is None:
            self._logged_out(request)
            return NOT_DONE_YET
        gone = Disconnection.watch(request)
        d = maybeDeferred(self._manager.end_session, token)

        def ended(username: str) -> None:
            log.info("{username} logged out", username=username)
            if not gone.happened:
                self._logged_out(request)

        def failed(failure: Failure) -> None:
            if gone.happened:
                return
            if failure.check(InvalidSession):
                self._logged_out(request)
            elif failure.check(ManagerUnavailable, DispatcherError):
                # The session is still alive on the manager: keep the cookie so
                # that the user can try again and really end it.
                _manager_trouble(request, failure, "logging out")
            else:
                log.failure("Unexpected error while logging out", failure)
                pages.internal_error(request)

        d.addCallbacks(ended, failed)
        d.addErrback(lambda f: log.failure("Failed to answer a logout", f))
        return NOT_DONE_YET

    @staticmethod
    def _logged_out(request: IRequest) -> None:
        expire_session_cookie(request)
        pages.redirect(request, pages.LOGIN_PATH)

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD", b"POST"):
            return _method_not_allowed(request)
        return super().render(request)
