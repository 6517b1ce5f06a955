"""The proxy's web site: which resource answers which path, and the headers
that describe the proxy itself.

``/auth/login`` and ``/auth/logout`` are the proxy's own; every other path
belongs to the logged-in user's agent (:class:`.session_gate.SessionGate`).
The site does not say which server software it runs (``Server`` is removed),
and over TLS every response tells the browser to stay on HTTPS (HSTS).
"""
from typing import Optional

from twisted.internet.interfaces import IReactorTCP
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from .forwarding import IForwarder, ReverseProxyForwarder
from .login import LoginResource, LogoutResource
from .manager_interface import IManager
from .session_gate import SessionGate

#: One year; without includeSubDomains, which is the operator's decision.
HSTS = b"max-age=31536000"


class DispatcherRoot(Resource):
    """Routes requests; exactly ``/auth/login`` and ``/auth/logout`` are ours."""

    def __init__(self, login: IResource, logout: IResource, agents: IResource) -> None:
        super().__init__()
        self._login = login
        self._logout = logout
        self._agents = agents

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        # Traversal always starts here, after twisted.web has set its defaults
        # and before anything is written: the one place for site-wide headers.
        request.responseHeaders.removeHeader(b"server")
        if request.isSecure():
            request.setHeader(b"strict-transport-security", HSTS)
        if name == b"auth" and len(request.postpath) == 1:
            if request.postpath[0] == b"login":
                return self._login
            if request.postpath[0] == b"logout":
                return self._logout
        return self._agents

    def render(self, request: IRequest) -> bytes:
        return self._agents.render(request)


def make_root(manager: IManager, forwarder: IForwarder) -> DispatcherRoot:
    """The resource tree of the proxy."""
    return DispatcherRoot(LoginResource(manager), LogoutResource(manager),
                          SessionGate(manager, forwarder))


def make_site(manager: IManager, reactor: IReactorTCP,
              forwarder: Optional[IForwarder] = None) -> Site:
    """The proxy's site, served on every ``--listen`` endpoint (TLS or not is
    decided per request, so one site serves them all)."""
    if forwarder is None:
        forwarder = ReverseProxyForwarder(reactor)
    site = Site(make_root(manager, forwarder))
    site.displayTracebacks = False
    return site
