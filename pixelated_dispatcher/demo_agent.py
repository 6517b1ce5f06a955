"""A small single-user web app that stands in for the Pixelated user agent.

It lets anyone try the dispatcher (and lets the tests prove it works) without
installing Pixelated. It behaves like the real agent where the dispatcher can
tell the difference:

* it reads one JSON line of credentials from standard input *before* it serves
  anything (the real agent in ``--organization-mode`` does the same), and shows
  "Mailbox of <user>" only if those credentials name the user it was started
  for;
* it keeps its state in its data directory (a visit counter), so a restart of
  the agent, or of the whole dispatcher, is visible to the user;
* it listens on ``127.0.0.1:<port>`` exactly as told, and exits on SIGTERM.

For the tests it has a few extra pages: ``/health``, ``/whoami``, ``/echo``
(the headers it received, to prove what the proxy forwards and what it must
not), ``/blob?size=N`` (a streamed download of N bytes), ``POST /upload``
(byte count and SHA-256 of a streamed upload), ``/wait?seconds=N`` (a long
poll: the answer comes after N seconds), ``/tunnel`` (an ``Upgrade``
answered with ``101``, then every byte echoed, as a WebSocket stand-in) and
``/hog?mib=N`` (allocates and keeps N MiB, as a runaway agent would).

Run it as::

    python -m pixelated_dispatcher.demo_agent --port P --data-dir D --username U
"""
import argparse
import hashlib
import html
import json
import os
import sys
from typing import IO, Any, Dict, List, Optional, Tuple, Union

import attr
from twisted.internet.interfaces import IPullProducer
from twisted.logger import ILogObserver, Logger, eventAsText, globalLogBeginner
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

log = Logger()

#: longest credentials line we accept; the real one is well under 2 KiB
MAX_CREDENTIALS_LINE = 64 * 1024

#: largest ``/blob`` we serve; big enough to prove streaming, small enough to
#: stop a typo from streaming forever
MAX_BLOB_SIZE = 8 * 1024 ** 3

#: the ``/blob`` pattern: bytes 0..255 repeated; a chunk is a whole number of
#: patterns so every chunk starts at a pattern boundary
BLOB_CHUNK = bytes(range(256)) * 256

#: status the agent exits with when it cannot start (port taken, data dir unusable)
EXIT_CANNOT_START = 3


@attr.s(frozen=True, auto_attribs=True)
class Identity:
    """Who this agent serves and what the credentials line told it."""
    username: str
    #: ``user`` from the credentials line, None if there was no valid line
    credentials_user: Optional[str]
    leap_provider_hostname: Optional[str]
    #: whether a non-empty password arrived; the password itself is not kept
    password_received: bool
    #: hex SHA-256 of the credentials line as read (None without a valid
    #: one): lets a test check that the right password arrived, as the test
    #: image's ``/cgi-bin/echo`` does. The real agent shows nothing of it.
    credentials_sha256: Optional[str] = None

    @property
    def authenticated(self) -> bool:
        return self.credentials_user == self.username


def read_credentials(stream: IO[bytes], username: str) -> Tuple[Identity, Optional[str]]:
    """Read the one credentials line; return the identity and a problem (or None).

    Like the real agent this blocks until the line (or EOF) arrives; it runs
    before the reactor does. A missing or broken line is not fatal: the agent
    then serves its "credentials did not match" page, which is what a user
    would see if the dispatcher fed it the wrong credentials.
    """
    line = stream.readline(MAX_CREDENTIALS_LINE)
    nobody = Identity(username, None, None, False)
    if not line.strip():
        return nobody, "no credentials on standard input"
    try:
        data = json.loads(line.decode("utf-8"))
    except ValueError:
        return nobody, "credentials line is not valid JSON"
    if not isinstance(data, dict) or not isinstance(data.get("user"), str):
        return nobody, "credentials line has no \"user\" string"
    password = data.get("password")
    hostname = data.get("leap_provider_hostname")
    return Identity(
        username=username,
        credentials_user=data["user"],
        leap_provider_hostname=hostname if isinstance(hostname, str) else None,
        password_received=isinstance(password, str) and password != "",
        credentials_sha256=hashlib.sha256(line).hexdigest(),
    ), None


@attr.s(auto_attribs=True)
class VisitCounter:
    """How often the mailbox page was opened, kept in a file in the data dir.

    The file is tiny, so reading and writing it on the reactor thread is
    cheaper than a thread hop; it is replaced atomically so a SIGKILL never
    leaves half a number behind.
    """
    path: str
    count: int = 0

    def load(self) -> None:
        """Read the count; raise OSError if the data dir is unusable."""
        try:
            with open(self.path, "rb") as f:
                text = f.read(64)
        except FileNotFoundError:
            self.count = 0
            return
        try:
            self.count = int(text.decode("ascii").strip() or "0")
        except ValueError:
            log.warn("visit counter {path} is corrupt; starting from 0", path=self.path)
            self.count = 0

    def increment(self) -> int:
        self.count += 1
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(b"%d\n" % (self.count,))
        os.replace(tmp, self.path)
        return self.count


def _page(title: str, body: str) -> bytes:
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>%s</title></head>\n"
            "<body>\n%s\n</body></html>\n" % (html.escape(title), body)).encode("utf-8")


def _json(request: server.Request, value: object, code: int = http.OK) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value, sort_keys=True).encode("utf-8") + b"\n"


def _text(request: server.Request, text: str, code: int = http.OK) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return text.encode("utf-8") + b"\n"


class MailboxPage(Resource):
    """``/``: the user's "mailbox", or a refusal if the credentials did not match."""
    isLeaf = True

    def __init__(self, identity: Identity, counter: VisitCounter) -> None:
        super().__init__()
        self.identity = identity
        self.counter = counter

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        name = html.escape(self.identity.username)
        if not self.identity.authenticated:
            request.setResponseCode(http.FORBIDDEN)
            return _page("Credentials did not match", (
                "<h1>Credentials did not match</h1>\n"
                "<p>This agent belongs to %s, but the credentials it received "
                "do not name that user.</p>" % (name,)))
        visits = self.counter.increment()
        return _page("Mailbox of %s" % (self.identity.username,), (
            "<h1>Mailbox of %s</h1>\n"
            "<p>This mailbox has been opened <span id=\"visits\">%d</span> time%s.</p>\n"
            "<p><a href=\"/about\">About this agent</a></p>"
            % (name, visits, "" if visits == 1 else "s")))

    def render_HEAD(self, request: server.Request) -> bytes:
        """Answer without counting a visit: readiness probes use HEAD."""
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        if not self.identity.authenticated:
            request.setResponseCode(http.FORBIDDEN)
        return b""


class AboutPage(Resource):
    """``/about``: a second page, so a browser test can follow a link."""
    isLeaf = True

    def __init__(self, identity: Identity) -> None:
        super().__init__()
        self.identity = identity

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return _page("About", (
            "<h1>About</h1>\n<p>A demo agent of the pixelated-dispatcher, serving %s.</p>\n"
            "<p><a href=\"/\">Back to the mailbox</a></p>"
            % (html.escape(self.identity.username),)))


class HealthPage(Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return _text(request, "ok")


class WhoAmIPage(Resource):
    """``/whoami``: what the agent learnt from its credentials (never the password)."""
    isLeaf = True

    def __init__(self, identity: Identity) -> None:
        super().__init__()
        self.identity = identity

    def render_GET(self, request: server.Request) -> bytes:
        i = self.identity
        return _json(request, {
            "username": i.username,
            "authenticated": i.authenticated,
            "credentials_user": i.credentials_user,
            "leap_provider_hostname": i.leap_provider_hostname,
            "password_received": i.password_received,
            "credentials_sha256": i.credentials_sha256,
        })


class EchoPage(Resource):
    """``/echo``: the request as the agent saw it, so tests can check what the
    proxy forwards (and that the dispatcher's own cookie is not among it)."""
    isLeaf = True

    def __init__(self, identity: Identity) -> None:
        super().__init__()
        self.identity = identity

    def render(self, request: server.Request) -> bytes:
        headers: Dict[str, List[str]] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            key = name.decode("latin-1").lower()
            headers.setdefault(key, []).extend(v.decode("latin-1") for v in values)
        return _json(request, {
            "method": request.method.decode("latin-1"),
            "path": request.path.decode("latin-1"),
            "uri": request.uri.decode("latin-1"),
            "username": self.identity.username,
            "headers": headers,
        })


@implementer(IPullProducer)
@attr.s(auto_attribs=True)
class _PatternProducer:
    """Writes ``remaining`` bytes of the blob pattern, one chunk per pull, so a
    download of gigabytes needs one chunk of memory and follows the client's pace."""
    request: server.Request
    remaining: int
    _stopped: bool = False

    def start(self) -> None:
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self._stopped:
            return
        if self.remaining <= 0:
            self._stopped = True
            self.request.unregisterProducer()
            self.request.finish()
            return
        n = min(self.remaining, len(BLOB_CHUNK))
        self.remaining -= n
        self.request.write(BLOB_CHUNK if n == len(BLOB_CHUNK) else BLOB_CHUNK[:n])

    def stopProducing(self) -> None:
        self._stopped = True


class BlobPage(Resource):
    """``/blob?size=N``: stream N bytes (0..8 GiB) of a known pattern."""
    isLeaf = True

    def render_GET(self, request: server.Request) -> Union[bytes, int]:
        values = request.args.get(b"size", [])
        size = None
        if len(values) == 1 and values[0].isdigit():
            size = int(values[0])
        if size is None or size > MAX_BLOB_SIZE:
            return _text(request, "size must be a whole number of bytes from 0 to %d"
                         % (MAX_BLOB_SIZE,), http.BAD_REQUEST)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % (size,))
        if request.method == b"HEAD":
            return b""
        _PatternProducer(request, size).start()
        return server.NOT_DONE_YET


class UploadPage(Resource):
    """``POST /upload``: byte count and SHA-256 of the body, computed as it
    streamed in (see :class:`DigestingBody`)."""
    isLeaf = True

    def render_POST(self, request: server.Request) -> bytes:
        body: Any = request.content  # a DigestingBody (see make_site)
        return _json(request, {"bytes": body.size, "sha256": body.digest.hexdigest()})


class DigestingBody:
    """Stands in for ``request.content``: hashes and counts the body instead
    of buffering it, so uploads of any size cost no memory or disk.

    Twisted's request only needs ``write``, ``tell``, ``seek``, ``read`` and
    ``close`` from it; ``read`` returns nothing (no page here reads a body).
    """

    def __init__(self) -> None:
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self.digest.update(data)

    def tell(self) -> int:
        return self.size

    def seek(self, offset: int, whence: int = 0) -> None:
        pass

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


#: longest ``/wait``
MAX_WAIT = 600


class WaitPage(Resource):
    """``/wait?seconds=N``: answer after N seconds (a long poll)."""
    isLeaf = True

    def render_GET(self, request: server.Request) -> object:
        from twisted.internet import reactor
        values = request.args.get(b"seconds", [])
        if len(values) != 1 or not values[0].isdigit() or int(values[0]) > MAX_WAIT:
            return _text(request, "seconds must be a whole number from 0 to %d" % (MAX_WAIT,),
                         http.BAD_REQUEST)
        call = reactor.callLater(int(values[0]), lambda: (
            request.write(_text(request, "waited")), request.finish()))
        def gone(_: object) -> None:
            if call.active():
                call.cancel()
        request.notifyFinish().addErrback(gone)
        return server.NOT_DONE_YET


class TunnelPage(Resource):
    """``/tunnel``: switch protocols on ``Upgrade`` and echo every byte (what
    a WebSocket looks like to the dispatcher: a byte stream both ways)."""
    isLeaf = True

    def render_GET(self, request: server.Request) -> object:
        upgrade = request.getHeader(b"upgrade")
        if not upgrade:
            return _text(request, "send Upgrade", http.BAD_REQUEST)
        channel = request.channel
        transport: Any = channel.transport
        transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + upgrade
                        + b"\r\nConnection: Upgrade\r\n\r\n")
        channel.setTimeout(None)
        channel.dataReceived = transport.write  # type: ignore[method-assign]
        return server.NOT_DONE_YET


#: what ``/hog`` allocated (kept for the agent's life)
_HOGGED: List[bytes] = []
#: largest ``/hog``
MAX_HOG_MIB = 4096


class HogPage(Resource):
    """``/hog?mib=N``: allocate (and write) N more MiB and keep them: a
    runaway agent, to show the memory limit at work."""
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        values = request.args.get(b"mib", [])
        if len(values) != 1 or not values[0].isdigit() or int(values[0]) > MAX_HOG_MIB:
            return _text(request, "mib must be a whole number from 0 to %d" % (MAX_HOG_MIB,),
                         http.BAD_REQUEST)
        for _ in range(int(values[0])):
            _HOGGED.append(b"h" * (1024 * 1024))  # written, so really resident
        return _text(request, "holding %d MiB" % (len(_HOGGED),))


class DemoRequest(server.Request):
    def gotLength(self, length: Optional[int]) -> None:
        self.content = DigestingBody()


def make_site(identity: Identity, counter: VisitCounter) -> server.Site:
    root = Resource()
    root.putChild(b"", MailboxPage(identity, counter))
    root.putChild(b"about", AboutPage(identity))
    root.putChild(b"health", HealthPage())
    root.putChild(b"whoami", WhoAmIPage(identity))
    root.putChild(b"echo", EchoPage(identity))
    root.putChild(b"blob", BlobPage())
    root.putChild(b"upload", UploadPage())
    root.putChild(b"wait", WaitPage())
    root.putChild(b"tunnel", TunnelPage())
    root.putChild(b"hog", HogPage())
    site = server.Site(root)
    site.requestFactory = DemoRequest
    return site


def _start_logging() -> None:
    """Plain lines on stderr (unbuffered): the provider adds time and user name."""
    @implementer(ILogObserver)
    def observer(event: dict) -> None:
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pixelated_dispatcher.demo_agent",
        description="A single-user demo web app for the pixelated-dispatcher."
                    " Reads one JSON credentials line on standard input.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--username", required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    _start_logging()
    identity, problem = read_credentials(sys.stdin.buffer, args.username)
    if problem is not None:
        log.warn("{problem}; serving {username} as unauthenticated",
                 problem=problem, username=args.username)
    elif not identity.authenticated:
        log.warn("credentials name another user; serving {username} as unauthenticated",
                 username=args.username)
    else:
        log.info("credentials received for {username}", username=args.username)

    counter = VisitCounter(os.path.join(args.data_dir, "visits"))
    try:
        counter.load()
    except OSError as e:
        log.error("cannot use data directory {dir}: {error}", dir=args.data_dir, error=e)
        return EXIT_CANNOT_START

    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError
    try:
        port: Any = reactor.listenTCP(args.port, make_site(identity, counter),  # type: ignore[arg-type]
                                      interface=args.interface)
    except CannotListenError as e:
        # the provider looks for "address already in use" to retry on another port
        log.error("cannot listen on {interface}:{port}: {error}",
                  interface=args.interface, port=args.port, error=e.socketError)
        return EXIT_CANNOT_START
    log.info("demo agent of {username} serving on http://{interface}:{port}/",
             username=args.username, interface=args.interface, port=port.getHost().port)
    reactor.run()  # stops cleanly on SIGTERM and SIGINT
    log.info("demo agent of {username} stopped", username=args.username)
    return 0


if __name__ == "__main__":
    sys.exit(main())
