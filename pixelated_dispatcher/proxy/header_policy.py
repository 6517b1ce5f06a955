"""One header policy for traffic between browsers and agents, both directions.

Whatever forwards requests (today a ``ReverseProxyResource`` subclass, later a
streaming client) asks this module what to send, so the rules live in one
place:

* hop-by-hop headers belong to one connection and are never passed on;
* ``X-Forwarded-For``, ``-Proto`` and ``-Host`` describe the browser's
  connection as the proxy saw it; whatever the browser claimed in them (or in
  ``Forwarded``/``X-Real-IP``) is dropped, never trusted;
* the dispatcher's own cookies never reach an agent, and an agent cannot set
  or clear them (:mod:`.cookie_policy`);
* the agent does not get to announce its server software either.
"""
from typing import Iterable, List

from twisted.web.http_headers import Headers

from .cookie_policy import is_dispatcher_set_cookie, strip_dispatcher_cookies

#: RFC 9110 section 7.6.1, plus the non-standard ones still seen in the wild.
HOP_BY_HOP = frozenset([
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
])

#: Claims about the client that only the proxy may make.
FORWARDING_CLAIMS = frozenset([
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
    b"x-forwarded-port", b"forwarded", b"x-real-ip",
])

#: Headers about the body as the browser sent it; the proxy has read the
#: whole body already and describes it itself.
BODY_FRAMING = frozenset([b"content-length", b"expect"])


def _connection_tokens(headers: Headers) -> frozenset:
    """Header names listed in ``Connection``: hop-by-hop for this message."""
    tokens = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def cookie_header_for_agent(values: Iterable[bytes]) -> List[bytes]:
    """All ``Cookie`` headers of a request merged into one value without the
    dispatcher's cookies; an empty list when nothing is left."""
    merged = b"; ".join(
        kept for kept in (strip_dispatcher_cookies(v) for v in values) if kept)
    return [merged] if merged else []


def request_headers_for_agent(incoming: Headers, *, client_ip: str,
                              secure: bool) -> Headers:
    """The headers an agent receives for a browser request.

    ``Host`` is kept as the browser sent it (agents build links from it);
    ``X-Forwarded-Host`` repeats it for frameworks that look there.
    """
    dropped = HOP_BY_HOP | FORWARDING_CLAIMS | BODY_FRAMING | _connection_tokens(incoming)
    outgoing = Headers()
    for name, values in incoming.getAllRawHeaders():
        lower = name.lower()
        if lower in dropped or lower == b"cookie":
            continue
        outgoing.setRawHeaders(lower, list(values))
    cookies = cookie_header_for_agent(incoming.getRawHeaders(b"cookie", []))
    if cookies:
        outgoing.setRawHeaders(b"cookie", cookies)
    outgoing.setRawHeaders(b"x-forwarded-for", [client_ip.encode("ascii", "replace")])
    outgoing.setRawHeaders(b"x-forwarded-proto", [b"https" if secure else b"http"])
    host = incoming.getRawHeaders(b"host")
    if host:
        outgoing.setRawHeaders(b"x-forwarded-host", [host[-1]])
    return outgoing


def keep_response_header(name: bytes, value: bytes) -> bool:
    """Whether one header of an agent's response may reach the browser."""
    lower = name.lower()
    if lower in HOP_BY_HOP or lower == b"server":
        return False
    if lower == b"set-cookie" and is_dispatcher_set_cookie(value):
        return False
    return True


def response_headers_for_browser(incoming: Headers) -> Headers:
    """The headers of an agent's response as the browser may see them."""
    dropped = _connection_tokens(incoming)
    outgoing = Headers()
    for name, values in incoming.getAllRawHeaders():
        if name.lower() in dropped:
            continue
        kept = [v for v in values if keep_response_header(name, v)]
        if kept:
            outgoing.setRawHeaders(name, kept)
    return outgoing
