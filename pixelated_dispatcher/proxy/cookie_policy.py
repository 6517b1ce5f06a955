"""The dispatcher's own cookies: their names, their attributes, and keeping them
away from the agents.

The proxy sets two cookies on the browser:

* the *session* cookie holds the opaque token the manager gave at login; it is
  the key to the user's agent, so it is ``HttpOnly``, ``SameSite=Lax`` and,
  on TLS, ``Secure`` with the ``__Host-`` prefix (which the browser only
  accepts from a secure origin, for ``Path=/`` and without ``Domain``, so a
  sibling host cannot plant one);
* the *CSRF* cookie holds a random value that the login and logout forms echo
  back (double submit); ``SameSite=Strict`` so a cross-site POST never
  carries it.

An agent must never see either of them (a compromised or buggy agent could
otherwise act as its user elsewhere, or as another user), and must not be able
to set or clear them. Both directions are enforced here, by name, and every
spelling of the names is treated as ours (browsers and servers disagree on
case and whitespace, so the safe side is to drop more, not less).
"""
import re
import secrets
from typing import Optional

from twisted.web.server import Request

SESSION_COOKIE = b"pixelated-session"
CSRF_COOKIE = b"pixelated-csrf"
SECURE_PREFIX = b"__Host-"

DISPATCHER_COOKIE_NAMES = frozenset(
    name.lower()
    for base in (SESSION_COOKIE, CSRF_COOKIE)
    for name in (base, SECURE_PREFIX + base))

#: What a token may look like in a cookie: the manager's tokens and ours are
#: URL-safe base64; anything else is refused before it reaches the manager.
_TOKEN = re.compile(rb"[A-Za-z0-9_\-.~+/=]{16,512}")

_EXPIRED = b"Thu, 01 Jan 1970 00:00:00 GMT"


def is_dispatcher_cookie_name(name: bytes) -> bool:
    """Whether ``name`` (from a ``Cookie`` or ``Set-Cookie`` header) is one
    of ours, whatever its case or surrounding whitespace."""
    return name.strip().lower() in DISPATCHER_COOKIE_NAMES


def strip_dispatcher_cookies(cookie_header: bytes) -> bytes:
    """The value of a ``Cookie`` header without the dispatcher's cookies.

    Pairs are split on ``;`` as servers do; every other pair is kept, in its
    order and with its bytes, minus surrounding whitespace. Returns ``b""``
    when nothing is left.
    """
    kept = []
    for pair in cookie_header.split(b";"):
        pair = pair.strip()
        if not pair:
            continue
        # A pair without "=" is a nameless cookie to browsers but a name to
        # some servers: judge it by what comes before "=", or by all of it.
        if not is_dispatcher_cookie_name(pair.split(b"=", 1)[0]):
            kept.append(pair)
    return b"; ".join(kept)


def is_dispatcher_set_cookie(set_cookie_value: bytes) -> bool:
    """Whether a ``Set-Cookie`` header value would set one of our cookies."""
    first = set_cookie_value.split(b";", 1)[0]
    if b"=" not in first:
        return False
    return is_dispatcher_cookie_name(first.split(b"=", 1)[0])


def is_plausible_token(value: Optional[bytes]) -> bool:
    """Whether a cookie value can be a token at all (cheap filter before asking
    the manager, and a guard against writing a header-breaking value)."""
    return value is not None and _TOKEN.fullmatch(value) is not None


def new_csrf_token() -> str:
    """A fresh random CSRF token (256 bits)."""
    return secrets.token_urlsafe(32)


def _name(request: Request, base: bytes) -> bytes:
    return SECURE_PREFIX + base if request.isSecure() else base


def session_cookie_name(request: Request) -> bytes:
    """The session cookie's name for this request (``__Host-`` on TLS)."""
    return _name(request, SESSION_COOKIE)


def csrf_cookie_name(request: Request) -> bytes:
    """The CSRF cookie's name for this request (``__Host-`` on TLS)."""
    return _name(request, CSRF_COOKIE)


def session_token(request: Request) -> Optional[str]:
    """The session token the browser sent, if it looks like one."""
    value = request.getCookie(session_cookie_name(request))
    return value.decode("ascii") if is_plausible_token(value) else None


def csrf_token(request: Request) -> Optional[str]:
    """The CSRF token the browser holds, if it looks like one."""
    value = request.getCookie(csrf_cookie_name(request))
    return value.decode("ascii") if is_plausible_token(value) else None


def set_session_cookie(request: Request, token: str) -> None:
    """Give the browser its session token (a browser-session cookie: it goes
    when the browser closes; the manager decides how long it is valid)."""
    encoded = token.encode("ascii")
    if not is_plausible_token(encoded):
        raise ValueError("the manager returned a token unfit for a cookie")
    request.addCookie(session_cookie_name(request), encoded, path=b"/",
                      secure=request.isSecure(), httpOnly=True, sameSite="lax")


def expire_session_cookie(request: Request) -> None:
    """Tell the browser to forget its session token."""
    request.addCookie(session_cookie_name(request), b"", path=b"/",
                      expires=_EXPIRED, max_age="0",
                      secure=request.isSecure(), httpOnly=True, sameSite="lax")


def ensure_csrf_cookie(request: Request) -> str:
    """The browser's CSRF token, issuing a new cookie when it has none, so that
    several open forms (tabs) keep working together."""
    token = csrf_token(request)
    if token is None:
        token = new_csrf_token()
        request.addCookie(csrf_cookie_name(request), token.encode("ascii"),
                          path=b"/", secure=request.isSecure(), httpOnly=True,
                          sameSite="strict")
    return token

