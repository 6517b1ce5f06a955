"""Every response the proxy writes itself: the login and logout forms, the
redirects, and the error pages a user may meet.

Pages are built with ``twisted.web.template`` (one layout in
``templates/page.html``, everything else as tags), so every value is escaped
by the flattener; nothing here loads anything from elsewhere. Each writer sets
the status, the headers every own page carries, writes the body and finishes
the request, so callers cannot forget one of them.

Browsers get HTML; scripts (``X-Requested-With: XMLHttpRequest``) get a short
JSON body they can act on.
"""
import json
from typing import Iterable, List, Optional, Sequence, Tuple

from twisted.python.filepath import FilePath
from twisted.web.server import Request
from twisted.web.template import (Element, Tag, XMLFile, flatten, renderer,
                                  tags)

from .header_policy import add_own_page_headers
from .next_path import with_next

LOGIN_PATH = b"/auth/login"
LOGOUT_PATH = b"/auth/logout"
INVALID_LOGIN = "Invalid username or password"

_TEMPLATE = FilePath(__file__).sibling("templates").child("page.html")


class Page(Element):
    """The common layout: a title and some content."""

    loader = XMLFile(_TEMPLATE)

    def __init__(self, title: str, content: Iterable[object],
                 head: Iterable[object] = ()) -> None:
        super().__init__()
        self._title = title
        self._content = list(content)
        self._head = list(head)

    @renderer
    def head_extra(self, request: object, tag: Tag) -> List[object]:
        return self._head

    @renderer
    def page_title(self, request: object, tag: Tag) -> Tag:
        return tag(self._title + " \u00b7 Pixelated")

    @renderer
    def heading(self, request: object, tag: Tag) -> Tag:
        return tag(self._title)

    @renderer
    def content(self, request: object, tag: Tag) -> List[object]:
        return self._content


def _flatten(element: Element) -> bytes:
    """Flatten a page that needs nothing asynchronous, right now."""
    chunks: List[bytes] = []
    failures: list = []
    done = flatten(None, element, chunks.append)
    done.addErrback(failures.append)
    if failures:
        failures[0].raiseException()
    return b"<!DOCTYPE html>\n" + b"".join(chunks)


def is_script_request(request: Request) -> bool:
    """Whether the request comes from a script rather than a navigation."""
    value = request.getHeader(b"x-requested-with") or b""
    return value.strip().lower() == b"xmlhttprequest"


def _finish(request: Request, code: int, content_type: bytes, body: bytes, *,
            no_store: bool, headers: Iterable[Tuple[bytes, bytes]] = ()) -> None:
    request.setResponseCode(code)
    add_own_page_headers(request, no_store=no_store)
    for name, value in headers:
        request.setHeader(name, value)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % (len(body),))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def write_page(request: Request, code: int, title: str, content: Iterable[object],
               *, no_store: bool = False,
               headers: Iterable[Tuple[bytes, bytes]] = (),
               head: Iterable[object] = ()) -> None:
    """Write a whole HTML page and finish the request."""
    _finish(request, code, b"text/html; charset=utf-8",
            _flatten(Page(title, content, head)), no_store=no_store, headers=headers)


def write_json(request: Request, code: int, document: dict, *,
               headers: Iterable[Tuple[bytes, bytes]] = ()) -> None:
    """Write a small JSON answer for scripts and finish the request."""
    _finish(request, code, b"application/json",
            json.dumps(document).encode("utf-8"), no_store=True, headers=headers)


def write_error(request: Request, code: int, error: str, title: str,
                content: Iterable[object], *,
                headers: Iterable[Tuple[bytes, bytes]] = ()) -> None:
    """An error answer in the form the client reads: ``{"error": error}`` for
    scripts, else a page (never cached); both with ``headers``."""
    if is_script_request(request):
        write_json(request, code, {"error": error}, headers=headers)
    else:
        write_page(request, code, title, content, no_store=True, headers=headers)


def redirect(request: Request, location: bytes) -> None:
    """303 See Other to a local path (the browser then GETs it)."""
    link = location.decode("ascii")
    write_page(request, 303, "Redirecting",
               [tags.p("Continue to ", tags.a(link, href=link), ".")],
               no_store=True, headers=[(b"location", location)])


# --- the auth forms ----------------------------------------------------------

def _csrf_field(token: str) -> Tag:
    return tags.input(type="hidden", name="csrf_token", value=token)


def banner_content(text: Optional[str]) -> List[object]:
    """The operator's banner (``--banner FILE``): plain text, one paragraph
    per blank-line-separated block, escaped like everything else."""
    if not text or not text.strip():
        return []
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    return [tags.div(*[tags.p(p) for p in paragraphs], class_="banner",
                     role="note", **{"aria-label": "Notice"})]


def login_form(request: Request, csrf_token: str, *, code: int = 200,
               message: Optional[str] = None, username: str = "",
               next_path: bytes = b"/", banner: Optional[str] = None,
               hint: Optional[str] = None,
               headers: Iterable[Tuple[bytes, bytes]] = ()) -> None:
    """The login form, optionally with the operator's banner, a message and
    a hint (how long to wait) above it. Works without JavaScript."""
    content: List[object] = banner_content(banner)
    if message:
        content.append(tags.p(message, class_="message", role="alert", id="login-error"))
    if hint:
        content.append(tags.p(hint, class_="hint", role="status"))
    next_field = []
    if next_path != b"/":
        next_field = [tags.input(type="hidden", name="next",
                                 value=next_path.decode("ascii"))]
    content.append(tags.form(
        _csrf_field(csrf_token), *next_field,
        tags.label("Username", for_="username"),
        tags.input(type="text", id="username", name="username", value=username,
                   autocomplete="username", autocapitalize="none",
                   spellcheck="false", required="required", autofocus="autofocus"),
        tags.label("Password", for_="password"),
        tags.input(type="password", id="password", name="password",
                   autocomplete="current-password", required="required"),
        tags.button("Log in", type="submit"),
        method="post", action=LOGIN_PATH.decode("ascii"),
        **({"aria-describedby": "login-error"} if message else {})))
    write_page(request, code, "Log in", content, no_store=True, headers=headers)


def logout_form(request: Request, csrf_token: str) -> None:
    """A one-button page to log out (where agents link their logout to)."""
    write_page(request, 200, "Log out", [
        tags.p("Log out and close your mailbox?"),
        tags.form(_csrf_field(csrf_token),
                  tags.button("Log out", type="submit"),
                  method="post", action=LOGOUT_PATH.decode("ascii")),
    ], no_store=True)


def _back_to_login() -> Tag:
    return tags.p(tags.a("Back to the login page", href=LOGIN_PATH.decode("ascii")))


# --- error pages -------------------------------------------------------------

def csrf_refused(request: Request) -> None:
    """403: the form did not come with this browser's CSRF token."""
    write_page(request, 403, "Form expired", [
        tags.p("This form has expired or did not come from this site. "
               "Please go back, reload the page and try again."),
        _back_to_login(),
    ], no_store=True)


def not_logged_in(request: Request, next_path: bytes = b"/") -> None:
    """No valid session: browsers go to the login form (which remembers the
    page asked for), scripts get 401."""
    if is_script_request(request):
        write_json(request, 401, {"error": "not logged in",
                                  "login": LOGIN_PATH.decode("ascii")})
    else:
        redirect(request, with_next(LOGIN_PATH, next_path))


MANAGER_RETRY_AFTER = b"5"
AGENT_RETRY_AFTER = b"10"
STARTING_RETRY_AFTER = b"2"
CAPACITY_RETRY_AFTER = b"60"
STARTING_PATH = b"/auth/starting"
#: Seconds between reloads of the waiting page.
WAITING_REFRESH = 1


def is_navigation(request: Request) -> bool:
    """Whether a browser is loading a page (rather than a script fetching
    data or an image): ``Sec-Fetch-Mode: navigate``, or, from browsers that
    do not send it, an ``Accept`` that asks for HTML."""
    if is_script_request(request):
        return False
    mode = request.getHeader(b"sec-fetch-mode")
    if mode is not None:
        return mode.strip().lower() == b"navigate"
    return b"text/html" in (request.getHeader(b"accept") or b"")


def waiting(request: Request, next_path: bytes) -> None:
    """200: "starting your mailbox", reloading itself every second (meta
    refresh, no JavaScript) until the agent is ready."""
    again = with_next(STARTING_PATH, next_path).decode("ascii")
    write_page(request, 200, "Starting your mailbox", [
        tags.p("Your mailbox is being started. This page reloads by itself; "
               "it usually takes a few seconds.", role="status"),
        tags.p(tags.a("Reload now", href=again)),
    ], no_store=True, head=[
        tags.meta(**{"http-equiv": "refresh",
                     "content": "%d;url=%s" % (WAITING_REFRESH, again)})])


def agent_starting(request: Request, next_path: bytes) -> None:
    """The agent is being started: scripts get 503 with Retry-After,
    browsers the waiting page."""
    if is_script_request(request) or not is_navigation(request):
        write_error(request, 503, "mailbox starting", "Starting your mailbox", [
            tags.p("Your mailbox is being started. Please try again in a few seconds.")],
            headers=[(b"retry-after", STARTING_RETRY_AFTER)])
        return
    waiting(request, next_path)


def capacity_reached(request: Request) -> None:
    """503: no more mailboxes can run right now."""
    write_error(request, 503, "capacity reached", "Please try again later", [
        tags.p("Too many mailboxes are open right now, so yours cannot be "
               "started at the moment. Please try again in a minute."),
        tags.p(tags.a("Try again", href="/"), " or ",
               tags.a("go back to the login page", href=LOGIN_PATH.decode("ascii")), "."),
    ], headers=[(b"retry-after", CAPACITY_RETRY_AFTER)])


def manager_unavailable(request: Request) -> None:
    """503: the manager cannot be asked right now."""
    write_error(request, 503, "service unavailable", "Temporarily unavailable", [
        tags.p("The service is temporarily unavailable. "
               "Please try again in a few seconds."),
        _back_to_login(),
    ], headers=[(b"retry-after", MANAGER_RETRY_AFTER)])


def agent_start_failed(request: Request) -> None:
    """503: the user's agent could not be started."""
    write_error(request, 503, "mailbox could not be started", "Mailbox unavailable", [
        tags.p("Your mailbox could not be started. Please try again in a "
               "little while; if this keeps happening, contact your administrator."),
        tags.p(tags.a("Try again", href="/"), ", ",
               tags.a("log out", href=LOGOUT_PATH.decode("ascii")), " or ",
               tags.a("go back to the login page", href=LOGIN_PATH.decode("ascii")), "."),
    ], headers=[(b"retry-after", AGENT_RETRY_AFTER)])


def agent_timed_out(request: Request) -> None:
    """504: the agent took the request but stayed silent too long (hung,
    stopped, swapping). Unlike 502 it is running, so nothing is restarted;
    the user can only try again."""
    write_error(request, 504, "mailbox did not answer in time",
                "Your mailbox did not answer in time", [
                    tags.p("Your mailbox is taking too long to answer; it may be busy. "
                           "Please reload the page in a moment."),
                    tags.p("If this keeps happening, contact your administrator."),
                ])


def bad_request(request: Request) -> None:
    """400: a request the proxy will not pass on."""
    write_page(request, 400, "Bad request", [tags.p("The request was malformed.")],
               no_store=True)


def method_not_allowed(request: Request, allowed: Sequence[bytes]) -> None:
    """405 with the methods this address does accept."""
    write_page(request, 405, "Method not allowed",
               [tags.p("This address does not accept that method.")],
               no_store=True, headers=[(b"allow", b", ".join(allowed))])


def internal_error(request: Request) -> None:
    """500: something the proxy did not expect; the log has the details."""
    write_page(request, 500, "Something went wrong", [
        tags.p("Something went wrong on our side. Please try again."),
        _back_to_login(),
    ], no_store=True)
