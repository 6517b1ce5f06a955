"""``twistd pixelated-proxy``: its options, and wiring the proxy together.

``makeService`` builds nothing but the tree of services: the connection to
the manager (a ``ClientService`` that reconnects by itself), one listening
endpoint per ``--listen`` (all serving the same site), the optional
``--redirect-http`` listener, and :class:`ProxyService` around them, which

* refuses to serve while running as root (uid or euid 0) unless
  ``--allow-root`` is given: twistd binds the ports as root in
  ``privilegedStartService``, drops to ``--uid``/``--gid``, and only then
  calls ``startService``, where this is checked;
* subscribes the session cache to the manager's pushes and reports activity;
* reloads the TLS key and certificate on ``SIGHUP`` (open connections keep
  theirs; a broken new file keeps the old one and says so in the log);
* closes the kept-alive agent connections at stop.

A port that cannot be bound stops startup instead of leaving a proxy that
serves nothing.
"""
import math
import os
import signal
from typing import Any, List, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python import usage

from ..protocol import DEFAULT_SOCKET
from .agent_client import AGENT_TIMEOUT
from .forwarding import IForwarder, StreamingForwarder
from .manager_cache import ManagerCache
from .manager_client import AMPManagerClient
from .redirect_http import make_redirect_site
from .site import make_site
from .tls import PlainListener, parse_listen

log = Logger()

DEFAULT_LISTEN = ("ssl:443:privateKey=/etc/ssl/private/ssl-cert-snakeoil.key"
                  ":certKey=/etc/ssl/certs/ssl-cert-snakeoil.pem")

#: Longest banner file accepted (it is shown on every login page).
MAX_BANNER_BYTES = 16 * 1024


class RunningAsRoot(Exception):
    """The proxy would serve the internet as root."""


class Options(usage.Options):
    """Command line of ``twistd pixelated-proxy``."""

    synopsis = "[--manager-socket PATH] [--listen ENDPOINT ...] [--redirect-http ENDPOINT]"

    optParameters = [
        ["manager-socket", None, DEFAULT_SOCKET,
         "Unix socket of pixelated-manager."],
        ["redirect-http", None, None,
         "Plain-HTTP endpoint that only redirects to HTTPS, e.g. tcp:80."],
        ["banner", None, None,
         "Text file shown above the login form (plain text; blank lines separate paragraphs)."],
        ["access-log", None, None,
         "File for an access log, a line per request (default: none)."],
        ["agent-timeout", None, "%g" % (AGENT_TIMEOUT,),
         "Seconds an agent may stay silent while its answer is due (until the "
         "response head, and between two reads of the body); then the browser "
         "gets 504 (or, mid-body, a cut connection). 0 disables it."],
    ]
    optFlags = [
        ["allow-root", None, "Serve even while running as root (development only)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        # usage.Options shows this docstring as the option's help, verbatim.
        """Twisted server endpoint to serve on, e.g. ssl:443:privateKey=key.pem:certKey=cert.pem or tcp:8080:interface=127.0.0.1; privateKey/certKey on any endpoint (systemd:, tcp:) give TLS too; TLS 1.2+ is enforced; reusePort=yes on tcp: or ssl: lets several proxy processes (same account) share the port; may be given more than once [default: ssl:443 with the snakeoil certificate of ssl-cert]."""  # noqa: E501
        self["listen"].append(description)

    def postOptions(self) -> None:
        self["agent-timeout"] = seconds_option("agent-timeout", self["agent-timeout"])
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        # Parsing loads TLS keys now, so a bad file is a usage error.
        self["listeners"] = [parse_listen(d) for d in self["listen"]]
        if self["redirect-http"] is not None:
            self["redirect-listener"] = parse_listen(self["redirect-http"])
            if getattr(self["redirect-listener"], "tls", None) is not None:
                raise usage.UsageError("--redirect-http is plain HTTP: give no key")
        self["banner-text"] = None
        if self["banner"] is not None:
            try:
                with open(self["banner"], "rb") as f:
                    raw = f.read(MAX_BANNER_BYTES + 1)
            except OSError as e:
                raise usage.UsageError("cannot read the banner file %s: %s"
                                       % (self["banner"], e.strerror or e))
            if len(raw) > MAX_BANNER_BYTES:
                raise usage.UsageError("the banner file %s is over %d bytes"
                                       % (self["banner"], MAX_BANNER_BYTES))
            try:
                self["banner-text"] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise usage.UsageError("the banner file %s is not UTF-8" % (self["banner"],))


def seconds_option(name: str, value: Any) -> float:
    """A duration given on the command line: a finite number of seconds, 0
    or more (0 meaning "never"), else a usage error naming the option."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise usage.UsageError("--%s takes a number of seconds, 0 or more (0 disables "
                               "it), not %r" % (name, value))
    return seconds


def https_port(listeners: List[Any]) -> int:
    """The port browsers are redirected to: the first TLS listener's."""
    for listener in listeners:
        port = getattr(listener, "port", None)
        if getattr(listener, "tls", None) is not None and isinstance(port, int) and port:
            return port
    return 443


class ProxyService(MultiService):
    """The proxy's services, with the checks and hooks described above."""

    def __init__(self, reactor: Any, site: Any, listeners: List[Any], *,
                 cache: ManagerCache, forwarder: IForwarder,
                 allow_root: bool = False) -> None:
        """``cache`` is started and stopped with the service (its last
        activity report goes out before the manager connection closes);
        ``forwarder`` closes its agent connections at the end."""
        super().__init__()
        self._reactor = reactor
        self.site = site
        self.cache = cache
        self.forwarder = forwarder
        self.listeners = listeners
        self.allow_root = allow_root
        self._previous_sighup: Any = None

    def startService(self) -> None:
        if (os.getuid() == 0 or os.geteuid() == 0) and not self.allow_root:
            log.critical("pixelated-proxy refuses to serve as root: start it as its own "
                         "user (twistd --uid/--gid, or systemd User=), or give "
                         "--allow-root for development")
            raise RunningAsRoot("pixelated-proxy refuses to serve as root "
                                "(use twistd --uid/--gid, or --allow-root)")
        super().startService()
        self.cache.start()
        if any(getattr(listener, "tls", None) for listener in self.listeners):
            try:
                self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
            except ValueError:  # not the main thread (tests)
                self._previous_sighup = None

    def _sighup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload_tls)

    def reload_tls(self) -> Any:
        """Read every listener's key and certificate again."""
        from twisted.internet.defer import gatherResults
        return gatherResults([listener.tls.reload() for listener in self.listeners
                              if getattr(listener, "tls", None) is not None])

    def stopService(self) -> Any:
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        # The last activity report goes out while the manager connection is
        # still up; then everything stops.
        d = maybeDeferred(self.cache.stop)
        d.addErrback(lambda f: log.failure("Last activity report failed", f))
        d.addBoth(lambda _: super(ProxyService, self).stopService())

        def close_forwarder(result: Any) -> Any:
            self.forwarder.close()
            return result
        d.addBoth(close_forwarder)
        return d


def makeService(options: Options, reactor: Optional[Any] = None) -> IService:
    """The proxy: a manager connection and the site on every endpoint."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor
        reactor = global_reactor
    manager = AMPManagerClient.for_socket(reactor, options["manager-socket"])
    forwarder = StreamingForwarder(reactor,
                                   agent_timeout=float(options["agent-timeout"]))
    cache = ManagerCache(manager, reactor)
    site = make_site(manager, reactor, forwarder=forwarder, cache=cache,
                     banner=options.get("banner-text"), access_log=options["access-log"])
    listeners: List[Any] = options.get("listeners") or [
        parse_listen(d) for d in options["listen"] or [DEFAULT_LISTEN]]
    proxy = ProxyService(reactor, site, listeners, cache=cache, forwarder=forwarder,
                         allow_root=bool(options["allow-root"]))
    manager.service.setName("manager-connection")
    manager.service.setServiceParent(proxy)
    for listener in listeners:
        server = StreamServerEndpointService(listener.endpoint(reactor), site)
        # As strports does: a port that cannot be bound aborts startup.
        server._raiseSynchronously = True
        server.setServiceParent(proxy)
    redirect: Optional[PlainListener] = options.get("redirect-listener")
    if redirect is not None:
        server = StreamServerEndpointService(redirect.endpoint(reactor),
                                             make_redirect_site(https_port(listeners)))
        server._raiseSynchronously = True
        server.setName("redirect-http")
        server.setServiceParent(proxy)
    return proxy
