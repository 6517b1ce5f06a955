"""``twistd pixelated-proxy``: its options, and wiring the proxy together.

``makeService`` builds nothing but the tree of services: the connection to
the manager (a ``ClientService`` that reconnects by itself) and one listening
endpoint per ``--listen``, all serving the same site. Ports are bound in
``privilegedStartService`` (before twistd drops privileges), and a port that
cannot be bound stops startup instead of leaving a proxy that serves nothing.
"""
from typing import Any, List, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.python import usage

from .manager_client import DEFAULT_SOCKET, AMPManagerClient
from .site import make_site
from .tls import parse_listen

DEFAULT_LISTEN = ("ssl:443:privateKey=/etc/ssl/private/ssl-cert-snakeoil.key"
                  ":certKey=/etc/ssl/certs/ssl-cert-snakeoil.pem")


class Options(usage.Options):
    """Command line of ``twistd pixelated-proxy``."""

    synopsis = "[--manager-socket PATH] [--listen ENDPOINT ...]"

    optParameters = [
        ["manager-socket", None, DEFAULT_SOCKET,
         "Unix socket of pixelated-manager."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        # usage.Options shows this docstring as the option's help, verbatim.
        """Twisted server endpoint to serve on, e.g. ssl:443:privateKey=key.pem:certKey=cert.pem (TLS 1.2+ is enforced) or tcp:8080:interface=127.0.0.1; may be given more than once [default: ssl:443 with the snakeoil certificate of ssl-cert]."""  # noqa: E501
        self["listen"].append(description)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        # Parsing loads TLS keys now, so a bad file is a usage error.
        self["listeners"] = [parse_listen(d) for d in self["listen"]]


def makeService(options: Options, reactor: Optional[Any] = None) -> IService:
    """The proxy: a manager connection and the site on every endpoint."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor
        reactor = global_reactor
    proxy = MultiService()
    manager = AMPManagerClient.for_socket(reactor, options["manager-socket"])
    manager.service.setName("manager-connection")
    manager.service.setServiceParent(proxy)
    site = make_site(manager, reactor)
    listeners: List[Any] = options.get("listeners") or [
        parse_listen(d) for d in options["listen"] or [DEFAULT_LISTEN]]
    for listener in listeners:
        server = StreamServerEndpointService(listener.endpoint(reactor), site)
        # As strports does: a port that cannot be bound aborts startup.
        server._raiseSynchronously = True
        server.setServiceParent(proxy)
    return proxy
