"""Where to send the browser after login: the page it first asked for, and
only ever a path on this site (no open redirect).

The target travels as the ``next`` query parameter or form field. It is
accepted only as an origin-form path: starting with one ``/`` (not ``//``
and not ``/\\``, which browsers treat as another host), visible ASCII only
(no spaces, no control characters, no backslashes anywhere), not one of the
proxy's own auth pages, and not too long. Anything else becomes ``/``.
"""
import re
from typing import Optional
from urllib.parse import quote

from twisted.web.server import Request

HOME = b"/"
MAX_LENGTH = 2048

_LOCAL = re.compile(rb"/(?![/\\])[\x21-\x5b\x5d-\x7e]*")
_OWN_PAGES = (b"/auth/login", b"/auth/logout", b"/auth/starting")


def local_path(value: Optional[bytes]) -> bytes:
    """``value`` if it is a safe local path to go to, else ``/``."""
    if not value or len(value) > MAX_LENGTH or _LOCAL.fullmatch(value) is None:
        return HOME
    path = value.split(b"?", 1)[0].split(b"#", 1)[0].rstrip(b"/").lower()
    if path in _OWN_PAGES:
        return HOME
    return value


def requested_next(request: Request) -> bytes:
    """The ``next`` argument of a request (query or form), made safe."""
    values = (request.args or {}).get(b"next") or [None]
    return local_path(values[0])


def with_next(page: bytes, target: bytes) -> bytes:
    """``page`` with ``?next=target`` (omitted when the target is ``/``)."""
    target = local_path(target)
    if target == HOME:
        return page
    return page + b"?next=" + quote(target, safe="/").encode("ascii")
