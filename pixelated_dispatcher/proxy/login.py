"""The login and logout resources: ``/auth/login`` and ``/auth/logout``.

They only translate between HTML forms and the manager: the manager checks
passwords, rate-limits and owns the sessions; these resources check the form's
CSRF token (double submit: the hidden ``csrf_token`` field must equal this
browser's CSRF cookie), turn answers into cookies and pages, and keep every
failure to log in indistinguishable ("Invalid username or password"; a
rate-limited attempt gets the same words plus how long to wait).

A form posted from another site is refused with 403 before anything else:
``Origin`` (when sent) must be this site and ``Sec-Fetch-Site`` (when sent)
must not be ``cross-site``. The logout also accepts the Pixelated user
agent's own double submit: its logout button posts ``csrftoken`` equal to
its ``XSRF-TOKEN`` cookie.

After a login the agent is started at once and the browser goes to the
waiting page (``/auth/starting``), which sends it on to the page it first
asked for (``next``, local paths only) as soon as the agent is ready.
"""
import hmac
from typing import Any, List, Optional, Union

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..protocol import (DispatcherError, InvalidCredentials, InvalidSession,
                        RateLimited, retry_after)
from ..usernames import is_valid_username
from . import pages
from .cookie_policy import (csrf_token, ensure_csrf_cookie, expire_session_cookie,
                            session_token, set_session_cookie)
from .browser_connection import Disconnection, client_ip
from .manager_cache import ManagerCache
from .manager_interface import ManagerUnavailable
from .next_path import requested_next, with_next

#: The Pixelated user agent's CSRF cookie and form field.
AGENT_CSRF_COOKIE = b"XSRF-TOKEN"
AGENT_CSRF_FIELD = b"csrftoken"

log = Logger()

#: What a ``render`` method returns: a body, or ``NOT_DONE_YET`` when it
#: finishes the request itself later.
RenderResult = Union[bytes, int]

#: Far above any real password, far below AMP's 64 KiB value limit.
MAX_PASSWORD_BYTES = 4096


def form_field(request: Request, name: bytes) -> Optional[str]:
    """The first value of a form field as text, or None when it is missing or
    is not UTF-8 (no stored user name or password can match such bytes)."""
    values: List[bytes] = (request.args or {}).get(name) or []
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _equal(expected: Optional[bytes], submitted: Optional[str]) -> bool:
    if not expected or not submitted:
        return False
    return hmac.compare_digest(expected, submitted.encode("utf-8"))


def same_origin(request: Request) -> bool:
    """Whether nothing in the request says it comes from another site."""
    fetch_site = (request.getHeader(b"sec-fetch-site") or b"").strip().lower()
    if fetch_site == b"cross-site":
        return False
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    host = request.getHeader(b"host") or b""
    scheme = b"https://" if request.isSecure() else b"http://"
    return origin.strip().lower() == (scheme + host).lower()


def csrf_matches(request: Request) -> bool:
    """Whether the form was sent by a page this browser got from us."""
    if not same_origin(request):
        return False
    expected = csrf_token(request)
    return _equal(expected.encode("utf-8") if expected else None,
                  form_field(request, b"csrf_token"))


def agent_csrf_matches(request: Request) -> bool:
    """The Pixelated agent's double submit: field ``csrftoken`` equals the
    ``XSRF-TOKEN`` cookie (which only pages of this origin can read)."""
    if not same_origin(request):
        return False
    return _equal(request.getCookie(AGENT_CSRF_COOKIE), form_field(request, AGENT_CSRF_FIELD))


def _method_not_allowed(request: Request) -> RenderResult:
    pages.method_not_allowed(request, [b"GET", b"HEAD", b"POST"])
    return NOT_DONE_YET


def _manager_trouble(request: Request, failure: Failure, doing: str) -> None:
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

    def __init__(self, cache: ManagerCache, banner: Optional[str] = None) -> None:
        super().__init__()
        self._cache = cache
        self._manager = cache.manager
        self._banner = banner

    def render_GET(self, request: Request) -> RenderResult:
        pages.login_form(request, ensure_csrf_cookie(request),
                         next_path=requested_next(request), banner=self._banner)
        return NOT_DONE_YET

    render_HEAD = render_GET

    def render_POST(self, request: Request) -> RenderResult:
        if not csrf_matches(request):
            pages.csrf_refused(request)
            return NOT_DONE_YET
        csrf = ensure_csrf_cookie(request)
        next_path = requested_next(request)
        username = form_field(request, b"username")
        password = form_field(request, b"password")
        if (username is None or password is None or not is_valid_username(username)
                or len(password.encode("utf-8")) > MAX_PASSWORD_BYTES):
            self._refuse(request, csrf, username, next_path)
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
            log.info("{username} logged in", username=username)
            # Start the agent now; the waiting page follows its progress.
            self._cache.ensure(username, token).addErrback(lambda f: None)
            pages.redirect(request, with_next(pages.STARTING_PATH, next_path))

        def refused(failure: Failure) -> None:
            if gone.happened:
                return
            if failure.check(InvalidCredentials):
                self._refuse(request, csrf, username, next_path)
            elif failure.check(RateLimited):
                wait = retry_after(failure.value)
                log.warn("Login refused, rate limited: {error}", error=failure.getErrorMessage())
                self._refuse(request, csrf, username, next_path, code=429,
                             hint="Too many attempts. Please wait %d second%s before "
                                  "trying again." % (wait, "" if wait == 1 else "s"),
                             headers=[(b"retry-after", b"%d" % (wait,))])
            elif failure.check(ManagerUnavailable, DispatcherError):
                _manager_trouble(request, failure, "logging in")
            else:
                log.failure("Unexpected error while logging in", failure)
                pages.internal_error(request)

        d.addCallbacks(logged_in, refused)
        d.addErrback(lambda f: log.failure("Failed to answer a login", f))
        return NOT_DONE_YET

    def _refuse(self, request: Request, csrf: str, username: Optional[str],
                next_path: bytes, code: int = 401, hint: Optional[str] = None,
                headers: Any = ()) -> None:
        """The one answer to every failed login: the form, one neutral message."""
        shown = username if username is not None and is_valid_username(username) else ""
        pages.login_form(request, csrf, code=code, message=pages.INVALID_LOGIN,
                         username=shown, next_path=next_path, banner=self._banner,
                         hint=hint, headers=headers)

    def render(self, request: Request) -> RenderResult:
        if request.method not in (b"GET", b"HEAD", b"POST"):
            return _method_not_allowed(request)
        return super().render(request)


class LogoutResource(Resource):
    """``GET`` asks for confirmation (agents link here); ``POST`` ends the
    session on the manager, which also stops the user's agent."""

    isLeaf = True

    def __init__(self, cache: ManagerCache) -> None:
        super().__init__()
        self._cache = cache
        self._manager = cache.manager

    def render_GET(self, request: Request) -> RenderResult:
        if session_token(request) is None:
            pages.redirect(request, pages.LOGIN_PATH)
        else:
            pages.logout_form(request, ensure_csrf_cookie(request))
        return NOT_DONE_YET

    render_HEAD = render_GET

    def render_POST(self, request: Request) -> RenderResult:
        if not (csrf_matches(request) or agent_csrf_matches(request)):
            pages.csrf_refused(request)
            return NOT_DONE_YET
        token = session_token(request)
        if token is None:
            self._logged_out(request)
            return NOT_DONE_YET
        gone = Disconnection.watch(request)
        self._cache.forget_session(token)
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
    def _logged_out(request: Request) -> None:
        expire_session_cookie(request)
        pages.redirect(request, pages.LOGIN_PATH)

    def render(self, request: Request) -> RenderResult:
        if request.method not in (b"GET", b"HEAD", b"POST"):
            return _method_not_allowed(request)
        return super().render(request)
