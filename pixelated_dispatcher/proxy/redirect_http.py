"""``--redirect-http ENDPOINT``: a plain-HTTP listener that only sends
browsers to HTTPS.

Every request, whatever its method or path, gets ``308 Permanent Redirect``
(``301`` for ``GET``/``HEAD``, which every client understands) to the same
path on ``https://`` and the same host name, with the HTTPS port added when
it is not 443. Nothing is forwarded, no cookie is read or set, and the
answer carries the proxy's own security headers. A request without a usable
``Host`` gets a 400.
"""
import re
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from . import pages
from .channel import ProxyChannel
from .header_policy import describe_proxy

_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


class RedirectToHTTPS(Resource):
    """Answers everything with a redirect to ``https://``."""

    isLeaf = True

    def __init__(self, https_port: int = 443) -> None:
        super().__init__()
        self._port = https_port

    def render(self, request: Request) -> Any:
        describe_proxy(request)  # plain HTTP: no HSTS, which needs TLS
        match = _HOST.fullmatch(request.getHeader(b"host") or b"")
        if match is None or not request.uri.startswith(b"/"):
            pages.bad_request(request)
            return NOT_DONE_YET
        host = match.group(1)
        if self._port != 443:
            host += b":%d" % (self._port,)
        location = b"https://" + host + request.uri
        code = 301 if request.method in (b"GET", b"HEAD") else 308
        pages.write_page(request, code, "Moved to HTTPS", [
            pages.tags.p("This site is served over HTTPS: ",
                         pages.tags.a(location.decode("ascii"), href=location.decode("ascii")))
        ], no_store=False, headers=[(b"location", location)])
        return NOT_DONE_YET


def make_redirect_site(https_port: int = 443) -> Site:
    site = Site(RedirectToHTTPS(https_port))
    site.protocol = ProxyChannel  # type: ignore[assignment,method-assign]
    site.displayTracebacks = False
    return site
