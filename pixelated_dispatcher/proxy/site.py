"""The proxy's web site: which resource answers which path, and the headers
that describe the proxy itself.

``/auth/login``, ``/auth/logout`` and ``/auth/starting`` (the waiting page)
are the proxy's own; every other path belongs to the logged-in user's agent
(:class:`.session_gate.SessionGate`). Connections are
:class:`.channel.ProxyChannel`: malformed or ambiguous requests are refused
with 400 before any of this runs.
Site-wide headers (no ``Server``; HSTS over TLS) are set here by the header
policy (:func:`.header_policy.describe_proxy`), before anything is written.
"""
from typing import Any, Optional

from twisted.internet.interfaces import ILoggingContext, IProtocolFactory
from twisted.internet.task import Clock
from twisted.web.resource import IResource, Resource
from twisted.web import http
from twisted.web.server import Request, Site
from zope.interface import implementer_only

from .channel import ProxyChannel
from .forwarding import IForwarder, StreamingForwarder
from .header_policy import describe_proxy
from .login import LoginResource, LogoutResource
from .manager_cache import ManagerCache
from .manager_interface import IManager
from .session_gate import SessionGate
from .starting_page import StartingPage

class DispatcherRoot(Resource):
    """Routes requests; exactly ``/auth/login`` and ``/auth/logout`` are ours."""

    #: the cache its pages share (set by :func:`make_root`)
    cache: Optional[ManagerCache] = None

    def __init__(self, login: IResource, logout: IResource, agents: IResource,
                 starting: Optional[IResource] = None) -> None:
        super().__init__()
        self._login = login
        self._logout = logout
        self._agents = agents
        self._starting = starting

    def getChildWithDefault(self, name: bytes, request: Request) -> IResource:
        # Traversal always starts here, after twisted.web has set its defaults
        # and before anything is written: the one place for site-wide headers.
        describe_proxy(request)
        rest = request.postpath or []
        if name == b"auth" and len(rest) == 1:
            if rest[0] == b"login":
                return self._login
            if rest[0] == b"logout":
                return self._logout
            if rest[0] == b"starting" and self._starting is not None:
                return self._starting
        return self._agents

    def render(self, request: Request) -> Any:
        return self._agents.render(request)


def make_root(manager: IManager, forwarder: IForwarder, *, clock: Any = None,
              cache: Optional[ManagerCache] = None,
              banner: Optional[str] = None) -> DispatcherRoot:
    """The resource tree of the proxy. ``clock`` times the wait for a
    starting agent (a ``Clock`` that never advances when not given)."""
    clock = clock if clock is not None else Clock()
    if cache is None:
        cache = ManagerCache(manager, clock)
    root = DispatcherRoot(LoginResource(cache, banner), LogoutResource(cache),
                          SessionGate(cache, forwarder, clock), StartingPage(cache, clock))
    root.cache = cache
    return root


class ProxyRequest(Request):
    """A request whose body, when it goes to an agent, is left alone.

    ``twisted.web`` parses ``POST`` bodies of type ``multipart/form-data``
    and ``application/x-www-form-urlencoded`` into ``args`` before any
    resource runs, reading a multipart body whole into memory; a forwarded
    upload must stay in its spool file and reach the agent unparsed. Only
    the proxy's own pages (``/auth/...``, whose bodies the channel limits to
    64 KiB) get ``args``.
    """

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if path.startswith(b"/auth/"):
            return super().requestReceived(command, path, version)
        assert self.content is not None  # made by the channel with the request
        self.content.seek(0, 0)
        self.args = {}
        self.method, self.uri = command, path
        self.clientproto = version
        self.path = path.split(b"?", 1)[0]
        self.process()


#: Seconds a browser connection may stay idle (or take to send a request
#: head) before it is closed; no timeout applies while an answer is awaited.
IDLE_TIMEOUT = 180


@implementer_only(IProtocolFactory, ILoggingContext)
class ProxySite(Site):
    """The site; writes no access log unless given a file (a line per
    request costs about a tenth of the proxy's time on small pages, and
    the URLs users open are theirs).

    Not an ``IProtocolNegotiationFactory`` (``Site`` is): the proxy speaks
    HTTP/1.1 only (``ProxyChannel``), so it must not offer ``h2`` by ALPN
    when the ``h2`` package happens to be installed, and Twisted 22.4's TLS
    would otherwise install an ALPN callback per connection, which the proxy
    unit's ``MemoryDenyWriteExecute=yes`` forbids (see ``tls.server_context``).
    """

    #: what the site's pages and channels ask (None: no session is ever live)
    cache: Optional[ManagerCache] = None
    #: what forwards the agents' paths (closed by whoever runs the site)
    forwarder: Optional[IForwarder] = None

    def log(self, request: http.Request) -> None:
        if self.logPath is not None:
            super().log(request)


def make_site(manager: IManager, reactor: Any,
              forwarder: Optional[IForwarder] = None,
              banner: Optional[str] = None,
              access_log: Optional[str] = None,
              cache: Optional[ManagerCache] = None) -> "ProxySite":
    """The proxy's site, served on every ``--listen`` endpoint (TLS or not is
    decided per request, so one site serves them all). ``site.cache`` is the
    :class:`ManagerCache` (made here unless given) and ``site.forwarder`` the
    forwarder (likewise); whoever runs the site starts and stops them."""
    if forwarder is None:
        forwarder = StreamingForwarder(reactor)
    root = make_root(manager, forwarder, clock=reactor, banner=banner, cache=cache)
    site = ProxySite(root, logPath=access_log, timeout=IDLE_TIMEOUT)
    site.requestFactory = ProxyRequest
    site.protocol = ProxyChannel  # type: ignore[assignment,method-assign]
    site.displayTracebacks = False
    site.cache = root.cache
    site.forwarder = forwarder
    return site
