"""What several test modules share: temporary directories and ports, test
certificates and TLS handshakes, the fake manager on a socket and the
proxy's client to it, and an in-memory browser for the proxy's pages.

Test modules import from here, not from each other (importing a test module
also imports, and may run again, its test cases). Larger fixtures have a
module of their own, named after what it holds: ``dispatcher_case``,
``docker_stack``, ``real_docker_case``, ``dockerd``, ``process_fixtures``,
``firewall_probes``, ``netns``, ``forwarding_setup``, ``clocked_proxy``,
``real_proxy``, ``https_browser``, ``swarm_cluster``.
"""
import re
import shutil
import socket
import ssl as stdlib_ssl
import tempfile
import warnings
from http.cookies import SimpleCookie
from typing import Any, Callable, Dict, List, Optional, Tuple

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.iweb import IResponse
from zope.interface import implementer

from pixelated_dispatcher.demo import write_self_signed_certificate
from pixelated_dispatcher.proxy.forwarding import IForwarder
from pixelated_dispatcher.proxy.manager_client import AMPManagerClient
from pixelated_dispatcher.testing.fake_manager import FakeManager
from pixelated_dispatcher.testing.fake_manager_server import FakeManagerResponder, ManagerSocket


def temporary_directory(test: Any) -> str:
    """A new directory, removed after ``test``. Short and outside the work
    tree: Unix socket paths are limited to 107 bytes."""
    path = tempfile.mkdtemp(prefix="pxd-")
    test.addCleanup(shutil.rmtree, path, True)
    return path


def start_client(test: TestCase, path: str, **kwargs: Any) -> AMPManagerClient:
    """The proxy's manager client on ``path``, running until ``test`` ends."""
    client = AMPManagerClient.for_socket(reactor, path, **kwargs)
    client.service.startService()
    test.addCleanup(client.service.stopService)
    return client


def start_manager(test: TestCase, path: str, manager: FakeManager,
                  locator: Optional[FakeManagerResponder] = None) -> ManagerSocket:
    """``manager`` answering AMP on ``path`` until ``test`` ends."""
    server = ManagerSocket(reactor, path, locator or FakeManagerResponder(manager))
    server.start()
    test.addCleanup(server.stop)
    return server


def fast_retries(attempt: int) -> float:
    """A retry policy for AMPManagerClient that does not make tests wait."""
    return 0.05


def make_certificate(directory: str) -> Tuple[str, str]:
    """A self-signed certificate for localhost and its key as PEM files
    (the demo's); returns the key's and the certificate's paths."""
    paths = write_self_signed_certificate(directory)
    return paths["key"], paths["cert"]


def handshake(port: int, minimum: stdlib_ssl.TLSVersion, maximum: stdlib_ssl.TLSVersion,
              ciphers: Optional[str] = None) -> Tuple[str, str]:
    """Connect with a client limited to [minimum, maximum]; returns the
    negotiated (version, cipher) or raises ``ssl.SSLError``. Blocking: run it
    in a thread."""
    context = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = stdlib_ssl.CERT_NONE
    # Let the client itself offer old versions and weak suites, so that a
    # refusal can only come from the server.
    context.set_ciphers(ciphers or "ALL:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 on purpose
        context.minimum_version = minimum
        context.maximum_version = maximum
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.version(), tls.cipher()[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@implementer(IForwarder)
class RecordingForwarder:
    """Answers for the agent: "agent HOST:PORT", and remembers what it got."""

    def __init__(self) -> None:
        self.forwarded: List[Tuple[bytes, object]] = []

    def forward(self, request, address, agent_gone, user="") -> None:
        self.forwarded.append((request.uri, address))
        request.setResponseCode(200)
        request.write(b"agent %s:%d" % (address.host.encode(), address.port))
        request.finish()


class Browser:
    """One browser (its own cookie jar) talking to a proxy root in memory."""

    def __init__(self, test: SynchronousTestCase, root, secure: bool = False) -> None:
        self.test = test
        self.stub = StubTreq(root)
        self.origin = ("https" if secure else "http") + "://dispatcher.example"

    def request(self, method: str, path: str, *, data: Optional[Dict[str, object]] = None,
                headers: Optional[Dict[bytes, List[bytes]]] = None,
                meanwhile: Optional[Callable[[], object]] = None
                ) -> Tuple[IResponse, bytes]:
        """``meanwhile`` runs after the request is sent and before the answer
        is taken (a test moves its clock there)."""
        d = self.stub.request(method, self.origin + path, data=data, headers=headers,
                              allow_redirects=False)
        self.stub.flush()
        if meanwhile is not None:
            meanwhile()
            self.stub.flush()
        response = self.test.successResultOf(d)
        body = self.stub.content(response)
        self.stub.flush()
        return response, self.test.successResultOf(body)

    def get(self, path: str, **kwargs: object) -> Tuple[IResponse, bytes]:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, data: Dict[str, object], **kwargs: object
             ) -> Tuple[IResponse, bytes]:
        return self.request("POST", path, data=data, **kwargs)

    def csrf_from_form(self, path: str = "/auth/login") -> str:
        response, body = self.get(path)
        match = re.search(rb'name="csrf_token" value="([^"]+)"', body)
        self.test.assertIsNotNone(match, body)
        return match.group(1).decode()

    def login(self, username: str, password: str) -> Tuple[IResponse, bytes]:
        csrf = self.csrf_from_form()
        return self.post("/auth/login", {"username": username, "password": password,
                                          "csrf_token": csrf})


def set_cookies(response: IResponse) -> Dict[str, str]:
    """Set-Cookie headers of a response: cookie name → the whole header."""
    result = {}
    for raw in response.headers.getRawHeaders(b"set-cookie", []):
        result[raw.split(b"=", 1)[0].decode()] = raw.decode()
    return result


def cookie_value(header: str) -> str:
    """The value of the cookie a ``Set-Cookie`` header sets."""
    cookie = SimpleCookie()
    cookie.load(header.split(";", 1)[0])
    return next(iter(cookie.values())).value


def header(response: IResponse, name: bytes) -> Optional[bytes]:
    """The first value of a response header, or None."""
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None
