"""The one header policy of the proxy: for traffic between browsers and
agents, both directions, and for the proxy's own answers.

The forwarder (:mod:`.forwarding`, including the ``101`` head that opens a
WebSocket tunnel), the site (:mod:`.site`), the proxy's own pages
(:mod:`.pages`) and the HTTPS redirect (:mod:`.redirect_http`) ask this
module what to send, so the rules live in one place:

* hop-by-hop headers belong to one connection and are never passed on;
* ``X-Forwarded-For``, ``-Proto`` and ``-Host`` describe the browser's
  connection as the proxy saw it; whatever the browser claimed in them (or in
  ``Forwarded``/``X-Real-IP``) is dropped, never trusted;
* the dispatcher's own cookies never reach an agent, and an agent cannot set
  or clear them (:mod:`.cookie_policy`);
* the agent does not get to announce its server software either, and
  neither does the proxy (``Server`` is removed from its own answers);
* over TLS, every answer of the proxy tells the browser to stay on HTTPS
  (:data:`HSTS`), and the pages the proxy writes itself carry
  :data:`OWN_PAGE_HEADERS` (the agents' pages are the agents' business).
"""
import re
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple
from urllib.parse import urlsplit

from twisted.web.http_headers import Headers
from twisted.web.server import Request

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
    tokens: Set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def cookie_header_for_agent(values: Iterable[bytes]) -> List[bytes]:
    """All ``Cookie`` headers of a request merged into one value without the
    dispatcher's cookies; an empty list when nothing is left."""
    merged = b"; ".join(
        kept for kept in (strip_dispatcher_cookies(v) for v in values) if kept)
    return [merged] if merged else []


_ALWAYS_DROPPED = HOP_BY_HOP | FORWARDING_CLAIMS | BODY_FRAMING | frozenset([b"cookie"])

#: What may stand in a header value that we write ourselves.
_UNSAFE_VALUE_BYTES = b"\x00\r\n"


def _safe(value: bytes) -> bytes:
    """A header value with CR, LF and NUL removed (defence in depth: the
    channel refuses requests carrying them already)."""
    if len(value.translate(None, _UNSAFE_VALUE_BYTES)) != len(value):
        return value.translate(None, _UNSAFE_VALUE_BYTES)
    return value


def request_header_pairs(incoming: Headers, *, client_ip: str, secure: bool,
                         upgrade: bool = False) -> List[Tuple[bytes, bytes]]:
    """The headers an agent receives for a browser request, as
    ``(lower-case name, value)`` pairs; repeated headers stay repeated.

    ``Host`` is kept as the browser sent it (agents build links from it);
    ``X-Forwarded-Host`` repeats it for frameworks that look there. With
    ``upgrade`` (a WebSocket handshake being tunnelled), ``Upgrade`` and
    ``Connection: upgrade`` are passed on, as the handshake needs them.
    """
    listed = _connection_tokens(incoming)
    dropped = _ALWAYS_DROPPED | listed if listed else _ALWAYS_DROPPED
    pairs: List[Tuple[bytes, bytes]] = []
    cookies: List[bytes] = []
    host: Optional[bytes] = None
    upgrade_to: List[bytes] = []
    for name, values in incoming.getAllRawHeaders():
        lower = name.lower()
        if lower in dropped:
            if lower == b"cookie":
                cookies.extend(values)
            elif lower == b"upgrade":
                upgrade_to.extend(values)
            continue
        if lower == b"host":
            host = values[-1]
        for value in values:
            pairs.append((lower, _safe(value)))
    if cookies:
        for value in cookie_header_for_agent(cookies):
            pairs.append((b"cookie", _safe(value)))
    if upgrade and upgrade_to:
        pairs.append((b"connection", b"upgrade"))
        pairs.append((b"upgrade", _safe(upgrade_to[-1])))
    pairs.append((b"x-forwarded-for", _safe(client_ip.encode("ascii", "replace"))))
    pairs.append((b"x-forwarded-proto", b"https" if secure else b"http"))
    if host is not None:
        pairs.append((b"x-forwarded-host", _safe(host)))
    return pairs


def request_head(method: bytes, target: bytes,
                 pairs: Sequence[Tuple[bytes, bytes]],
                 body_length: Optional[int]) -> bytes:
    """The bytes of an HTTP/1.1 request head to an agent (keep-alive)."""
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in pairs:
        parts += [name, b": ", value, b"\r\n"]
    if body_length is not None:
        parts += [b"content-length: ", b"%d" % (body_length,), b"\r\n"]
    parts.append(b"\r\n")
    return b"".join(parts)


def rewrite_location(location: bytes, agent_authorities: Iterable[bytes],
                     public_origin: bytes) -> bytes:
    """``Location`` as the browser should see it: an absolute URL pointing at
    the agent's own loopback address (``agent_authorities``, e.g.
    ``127.0.0.1:41001`` and ``localhost:41001``) is moved to the proxy's
    public origin (``https://mail.example.org``); anything else is kept."""
    lowered = location.lower()
    if not (lowered.startswith(b"http://") or lowered.startswith(b"https://")):
        return location
    try:
        parts = urlsplit(location.decode("latin-1"))
    except ValueError:
        return location
    authority = parts.netloc.rsplit("@", 1)[-1].lower().encode("latin-1")
    if authority not in agent_authorities:
        return location
    rest = location[len(parts.scheme) + 3 + len(parts.netloc):]
    return public_origin + (rest if rest.startswith((b"/", b"?", b"#")) else b"/" + rest)


def response_header_groups(pairs: Iterable[Tuple[bytes, bytes]], *,
                           agent_authorities: Iterable[bytes] = (),
                           public_origin: Optional[bytes] = None,
                           ) -> Dict[bytes, List[bytes]]:
    """The headers of an agent's response that may reach the browser, grouped
    by (lower-case) name in the agent's order; ``Location`` rewritten with
    :func:`rewrite_location` when ``public_origin`` is given."""
    groups: Dict[bytes, List[bytes]] = {}
    listed: Optional[frozenset] = None
    for name, value in pairs:
        if name == b"connection":
            tokens = frozenset(t.strip().lower() for t in value.split(b",") if t.strip())
            listed = tokens if listed is None else listed | tokens
    for name, value in pairs:
        if name in HOP_BY_HOP or name == b"server" or (listed and name in listed):
            continue
        if name == b"set-cookie" and is_dispatcher_set_cookie(value):
            continue
        if name == b"location" and public_origin is not None:
            value = rewrite_location(value, agent_authorities, public_origin)
        values = groups.get(name)
        if values is None:
            groups[name] = [value]
        else:
            values.append(value)
    return groups


#: A header name as RFC 9110 allows it (a token).
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

#: Names whose usual spelling is not capitalised word by word (as
#: ``twisted.web`` writes them).
_SPELLINGS = {b"content-md5": b"Content-MD5", b"dnt": b"DNT", b"etag": b"ETag",
              b"p3p": b"P3P", b"te": b"TE", b"www-authenticate": b"WWW-Authenticate",
              b"x-xss-protection": b"X-XSS-Protection"}
_spelled: Dict[bytes, bytes] = {}


def _spelling(name: bytes) -> bytes:
    """``content-type`` as ``Content-Type``, as twisted.web writes names
    (remembered: a proxy sees the same few dozen names all day)."""
    spelled = _spelled.get(name)
    if spelled is None:
        spelled = _SPELLINGS.get(name) or b"-".join(
            part[:1].upper() + part[1:] for part in name.split(b"-"))
        if len(_spelled) < 1024:
            _spelled[name] = spelled
    return spelled


def browser_response_head(version: bytes, code: int, reason: bytes,
                          site_headers: Iterable[Tuple[bytes, Sequence[bytes]]],
                          groups: Dict[bytes, List[bytes]], chunked: bool) -> bytes:
    """The bytes of the head of an agent's answer as the browser gets it, in
    one piece: the status line, the headers the site set for every answer
    (``site_headers``, e.g. ``Date``, ``Strict-Transport-Security``,
    ``Connection: close``) unless the agent sent its own, the agent's
    headers (``groups``, from :func:`response_header_groups`), and
    ``Transfer-Encoding: chunked`` when the body is re-chunked. Names that
    are not tokens are left out and CR, LF and NUL removed from values, as
    ``twisted.web`` would."""
    parts = [version, b" %d " % (code,), _safe(reason), b"\r\n"]
    for name, values in site_headers:
        if name.lower() in groups:
            continue
        for value in values:
            parts += [name, b": ", _safe(value), b"\r\n"]
    for name, values in groups.items():
        if _TOKEN.fullmatch(name) is None:
            continue
        spelled = _spelling(name)
        for value in values:
            parts += [spelled, b": ", _safe(value), b"\r\n"]
    if chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def switching_protocols_head(headers: Sequence[Tuple[bytes, bytes]], *,
                             agent_authorities: Iterable[bytes],
                             public_origin: bytes) -> bytes:
    """The ``101`` head the browser gets when its agent switched protocols:
    the agent's headers through :func:`response_header_groups` like every
    other answer's, then ``Connection: Upgrade`` and the agent's last
    ``Upgrade`` (both hop-by-hop, so the filter removed them)."""
    groups = response_header_groups(headers, agent_authorities=agent_authorities,
                                    public_origin=public_origin)
    upgrade = [v for n, v in headers if n == b"upgrade"][-1:] or [b"websocket"]
    lines = [b"HTTP/1.1 101 Switching Protocols", b"Connection: Upgrade",
             b"Upgrade: " + _safe(upgrade[0])]
    for name, values in groups.items():
        lines.extend(name + b": " + value for value in values)
    return b"\r\n".join(lines) + b"\r\n\r\n"


# --- the proxy's own answers ---------------------------------------------------

#: ``Strict-Transport-Security`` on every answer over TLS: one year; without
#: includeSubDomains, which is the operator's decision.
HSTS = b"max-age=31536000"

#: Headers on every page the proxy writes itself (not on the agents' pages:
#: those are the agents' business).
OWN_PAGE_HEADERS: Sequence[Tuple[bytes, bytes]] = (
    (b"x-frame-options", b"SAMEORIGIN"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"content-security-policy",
     b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
     b"frame-ancestors 'self'; base-uri 'none'"),
)


def describe_proxy(request: Request) -> None:
    """The headers every answer of the proxy carries, its own or an agent's,
    set before anything is written: no ``Server`` (twisted.web's default),
    and ``Strict-Transport-Security`` over TLS."""
    request.responseHeaders.removeHeader(b"server")
    if request.isSecure():
        request.setHeader(b"strict-transport-security", HSTS)


def add_own_page_headers(request: Request, *, no_store: bool = False) -> None:
    """The headers every response written by the proxy itself carries."""
    for name, value in OWN_PAGE_HEADERS:
        request.setHeader(name, value)
    if no_store:
        request.setHeader(b"cache-control", b"no-store")
