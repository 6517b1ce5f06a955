"""Sending a browser's request to its user's agent and the answer back.

:class:`IForwarder` is the seam: the session gate decides *whom* a request
belongs to and hands it to a forwarder with the agent's address. Today's
forwarder is built on ``twisted.web.proxy.ReverseProxyResource`` (a new
HTTP/1.0 connection per request, request body buffered); the streaming
keep-alive client that replaces it only has to provide the same interface.

Known flaws of the stock resource fixed here, because they are cheap:

* the browser's ``Host`` is kept (the stock one rewrites it to the agent's
  loopback address) and ``X-Forwarded-*`` are set, through
  :mod:`.header_policy`, which also keeps the dispatcher's cookies away from
  the agent in both directions and drops hop-by-hop headers;
* repeated request headers are joined instead of keeping only the last;
* an agent that cannot be reached, or closes without answering, gets the
  browser a 502 page instead of a bare 501;
* when the browser goes away, the connection to the agent is closed at once
  (and a late answer is not written to a dead request);
* ``getChild`` builds children of the same class, keeping subclass overrides.
"""
import warnings
from typing import Any, Dict, Optional
from urllib.parse import quote as urlquote

import attr
from twisted.internet.interfaces import IConnector, IReactorTCP
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET
from zope.interface import Interface, implementer

from ..protocol import AgentAddress
from . import pages
from .browser_connection import client_ip
from .header_policy import keep_response_header, request_headers_for_agent

with warnings.catch_warnings():
    # HTTPClient, which the stock proxy is built on, is deprecated since
    # Twisted 24.7; that is the very reason this module keeps it replaceable.
    warnings.simplefilter("ignore", DeprecationWarning)
    from twisted.web.proxy import (ProxyClient, ProxyClientFactory,
                                   ReverseProxyResource)

log = Logger()


class IForwarder(Interface):
    """Something that passes one browser request on to an agent."""

    def forward(request, address):
        """Send ``request`` to the agent at ``address`` (an
        :class:`~pixelated_dispatcher.protocol.AgentAddress`) and write the
        agent's answer, or an error page, to ``request``, finishing it.
        Returns nothing; the request is the forwarder's from now on."""


class AgentProxyClient(ProxyClient):
    """One HTTP/1.0 exchange with an agent, filtered by the header policy."""

    factory: "AgentProxyClientFactory"
    _answered = False

    def connectionMade(self) -> None:
        if self.factory.client_gone:
            self.transport.abortConnection()
            return
        super().connectionMade()

    def handleStatus(self, version: bytes, code: bytes, message: bytes) -> None:
        self._answered = True
        super().handleStatus(version, code, message)

    def handleHeader(self, key: bytes, value: bytes) -> None:
        if keep_response_header(key, value):
            super().handleHeader(key, value)

    def handleResponsePart(self, buffer: bytes) -> None:
        if not (self._finished or self.factory.client_gone):
            super().handleResponsePart(buffer)

    def handleResponseEnd(self) -> None:
        if self._finished:
            return
        if self.factory.client_gone:
            self._finished = True
            self.transport.abortConnection()
            return
        if not self._answered:
            self._finished = True
            log.warn("Agent at {rest} closed the connection without answering",
                     rest=self.rest)
            pages.agent_unreachable(self.father)
            self.transport.loseConnection()
            return
        super().handleResponseEnd()


class AgentProxyClientFactory(ProxyClientFactory):
    """Connects to the agent for one request; follows the browser's fate."""

    protocol = AgentProxyClient

    def __init__(self, command: bytes, rest: bytes, version: bytes,
                 headers: Dict[bytes, bytes], data: bytes, father: IRequest) -> None:
        super().__init__(command, rest, version, headers, data, father)
        self.client_gone = False
        self.connector: Optional[IConnector] = None
        self._agent_client: Optional[AgentProxyClient] = None
        father.notifyFinish().addErrback(self._browser_went_away)

    def buildProtocol(self, addr: Any) -> AgentProxyClient:
        client = super().buildProtocol(addr)
        client.factory = self
        self._agent_client = client
        return client

    def _browser_went_away(self, reason: Failure) -> None:
        self.client_gone = True
        client = self._agent_client
        if client is not None and client.transport is not None:
            client.transport.abortConnection()
        elif self.connector is not None:
            try:
                self.connector.stopConnecting()
            except Exception:  # not connecting any more: nothing to stop
                pass

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if self.client_gone:
            return
        log.warn("Cannot reach agent at {rest}: {reason}",
                 rest=self.rest, reason=reason.getErrorMessage())
        pages.agent_unreachable(self.father)


class AgentProxyResource(ReverseProxyResource):
    """``ReverseProxyResource`` with the fixes listed in the module docstring.

    ``path`` is the request path as the agent should see it; the query string
    is taken from each request.
    """

    proxyClientFactoryClass = AgentProxyClientFactory
    connect_timeout = 10

    def getChild(self, path: bytes, request: IRequest) -> "AgentProxyResource":
        return self.__class__(
            self.host, self.port,
            self.path + b"/" + urlquote(path, safe="").encode("ascii"),
            self.reactor)

    def render(self, request: IRequest) -> Any:
        headers = request_headers_for_agent(
            request.requestHeaders, client_ip=client_ip(request),
            secure=request.isSecure())
        request.content.seek(0, 0)
        body = request.content.read()
        flat = {name.lower(): b", ".join(values)
                for name, values in headers.getAllRawHeaders()}
        if body or request.requestHeaders.hasHeader(b"content-length") \
                or request.requestHeaders.hasHeader(b"transfer-encoding"):
            flat[b"content-length"] = b"%d" % (len(body),)
        query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        rest = self.path + (b"?" + query if query else b"")
        factory = self.proxyClientFactoryClass(
            request.method, rest, request.clientproto, flat, body, request)
        factory.connector = self.reactor.connectTCP(
            self.host, self.port, factory, timeout=self.connect_timeout)
        return NOT_DONE_YET


@implementer(IForwarder)
@attr.s(auto_attribs=True)
class ReverseProxyForwarder:
    """Forwards each request over a new connection with :class:`AgentProxyResource`."""

    reactor: IReactorTCP

    def forward(self, request: IRequest, address: AgentAddress) -> None:
        path = request.uri.split(b"?", 1)[0]
        AgentProxyResource(address.host, address.port, path, self.reactor).render(request)
