"""``--listen`` endpoint descriptions, with TLS that is modern on every Twisted.

A ``ssl:`` description is parsed here rather than by Twisted's
``serverFromString``: on Twisted 22.4 (Debian 12) that parser allows TLS 1.0
and offers non-forward-secret ciphers, and its string has no option against
it. We read the same keys (``port``, ``privateKey``, ``certKey``,
``extraCertChain``, ``dhParameters``, ``interface``, ``backlog``; ``\\``
escapes the next character, so ``\\:`` is a colon in a path) and build
the OpenSSL context ourselves with TLS 1.2 as the minimum and only
ECDHE/DHE key exchange with AEAD ciphers (TLS 1.3 suites are all of that
kind), in an OpenSSL context made without Python callbacks
(:func:`server_context`: the unit's ``MemoryDenyWriteExecute=yes``). Any
other description (``tcp:``, ``unix:``, ``systemd:``, ...) that names
``privateKey`` (and ``certKey``...) gets the same TLS from us, wrapped
around the plain endpoint (``TLSMemoryBIOFactory``), so a socket-activated
``systemd:`` listener is TLS 1.2+ too; without those keys it goes to
``serverFromString`` unchanged (plain HTTP, e.g. behind another proxy).

The TLS settings live in a :class:`ReloadableTLS`: :meth:`ReloadableTLS.reload`
reads the key and certificate files again (in a thread) and new connections
use them, while connections already open keep theirs (``SIGHUP`` in the
tap); a reload that fails keeps the old certificate and says why.

The key and certificates are read while the options are parsed, so a
missing, unreadable or broken file stops ``twistd`` with one clear sentence
before anything listens (and while it still runs with the privileges to read
the key).
"""
import re
import socket
from typing import Any, Dict, List, Optional, Tuple

import attr
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import (IListeningPort, IOpenSSLContextFactory,
                                         IStreamServerEndpoint)
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from zope.interface import implementer

#: Forward secrecy and authenticated encryption only (TLS 1.2; TLS 1.3 has
#: nothing else). DHE suites are used only when ``dhParameters`` are given.
CIPHERS = ("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
           ":!aNULL:!eNULL:!MD5:!DSS:!SHA1")

_SSL_KEYS = frozenset(["port", "privateKey", "certKey", "extraCertChain",
                       "dhParameters", "interface", "backlog", "reusePort"])
_TLS_KEYS = frozenset(["privateKey", "certKey", "extraCertChain", "dhParameters"])

log = Logger()

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


def split_description(description: str) -> Tuple[List[str], Dict[str, str]]:
    """Split an endpoint description as Twisted does: ``:`` separates fields,
    the first ``=`` in a field separates a key from its value, and ``\\``
    takes the next character literally."""
    fields: List[List[str]] = []
    current: List[str] = [""]
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current[-1] += next(chars, "")
        elif char == ":":
            fields.append(current)
            current = [""]
        elif char == "=" and len(current) == 1:
            current.append("")
        else:
            current[-1] += char
    fields.append(current)
    args = [f[0] for f in fields if len(f) == 1]
    kwargs = {f[0]: f[1] for f in fields if len(f) == 2}
    return args, kwargs


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UsageError("cannot read the TLS %s file %s: %s"
                         % (what, path, e.strerror or e))


@attr.s(frozen=True, auto_attribs=True)
class ServerTLSContext:
    """One loaded key and certificate as a ready OpenSSL context."""

    context: SSL.Context
    extraCertChain: List[Any]

    def getContext(self) -> SSL.Context:
        return self.context


def server_context(key: crypto.PKey, certificate: crypto.X509, extra_chain: List[crypto.X509],
                   dh_parameters: Optional[str]) -> SSL.Context:
    """A server context with the settings of Twisted's ``CertificateOptions``
    (TLS 1.2+, no compression, server cipher order, no resumption) minus its
    Python callbacks.

    Twisted always installs an ALPN selection callback (and 22.4 a
    certificate verification callback too): each is an ``ffi.callback()``,
    a trampoline in writable *and* executable memory, which the proxy unit's
    ``MemoryDenyWriteExecute=yes`` forbids, so the proxy could not start
    there. This context makes no callback: OpenSSL's own verification
    (there is no client certificate to verify) and no ALPN (HTTP/1.1 only).
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_options(SSL.OP_NO_SSLv2 | SSL.OP_NO_SSLv3 | SSL.OP_NO_TLSv1
                        | SSL.OP_NO_TLSv1_1 | SSL.OP_NO_COMPRESSION
                        | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_DH_USE
                        | SSL.OP_SINGLE_ECDH_USE | SSL.OP_NO_TICKET)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    try:
        # pyOpenSSL 24.3+ wants cryptography's objects (and warns about its own).
        context.use_certificate(certificate.to_cryptography())
        context.use_privatekey(key.to_cryptography_key())  # type: ignore[arg-type]
        for extra in extra_chain:
            context.add_extra_chain_cert(extra.to_cryptography())
    except TypeError:  # Debian 12's pyOpenSSL 23 takes only its own
        context.use_certificate(certificate)
        context.use_privatekey(key)
        for extra in extra_chain:
            context.add_extra_chain_cert(extra)
    context.check_privatekey()
    context.set_verify(SSL.VERIFY_NONE)
    context.set_session_id(b"pixelated-proxy")
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if dh_parameters is not None:
        try:
            context.load_tmp_dh(dh_parameters.encode())
        except SSL.Error as e:
            raise ValueError("cannot load the Diffie-Hellman parameters %s (%s)"
                             % (dh_parameters, e))
    # Last: newer pyOpenSSL tries a connection here, after which the context
    # may not change any more.
    context.set_cipher_list(CIPHERS.encode("ascii"))
    return context


def tls_options(private_key: str, certificate: str,
                extra_chain: Optional[str] = None,
                dh_parameters: Optional[str] = None) -> ServerTLSContext:
    """Server TLS from PEM files: TLS 1.2+, forward-secret AEAD only.

    Raises ``UsageError`` naming the file for anything wrong with them.
    """
    key_pem = _read(private_key, "private key")
    cert_pem = _read(certificate, "certificate")
    try:
        key_and_cert = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    except Exception as e:
        raise UsageError("cannot load the TLS certificate %s with the private key %s: %s"
                         % (certificate, private_key, e))
    chain = []
    if extra_chain is not None:
        chain = [ssl.Certificate.loadPEM(pem).original
                 for pem in _PEM_CERTIFICATE.findall(_read(extra_chain, "certificate chain"))]
        if not chain:
            raise UsageError("the TLS certificate chain file %s holds no PEM certificate"
                             % (extra_chain,))
    if dh_parameters is not None:
        _read(dh_parameters, "Diffie-Hellman parameters")
    try:
        context = server_context(key_and_cert.privateKey.original, key_and_cert.original,
                                 chain, dh_parameters)
    except SSL.Error as e:
        raise UsageError("the TLS private key %s does not fit the certificate %s (%s)"
                         % (private_key, certificate, e))
    except ValueError as e:
        raise UsageError(str(e))
    return ServerTLSContext(context, chain)


@implementer(IOpenSSLContextFactory)
class ReloadableTLS:
    """An (old-style) TLS context factory whose key and certificate can be
    replaced while serving: each new connection asks for the context of the
    moment; connections already open keep the one they got."""

    def __init__(self, private_key: str, certificate: str,
                 extra_chain: Optional[str] = None,
                 dh_parameters: Optional[str] = None) -> None:
        self.files = (private_key, certificate, extra_chain, dh_parameters)
        self.options = tls_options(*self.files)

    @property
    def extraCertChain(self) -> Any:
        return self.options.extraCertChain

    def getContext(self) -> Any:
        return self.options.getContext()

    def reload(self) -> Deferred:
        """Read the files again (off the reactor thread) and use them for new
        connections; on any problem keep the current ones and log why.
        Fires with True when the new files are in use."""
        d = deferToThread(tls_options, *self.files)

        def loaded(options: ServerTLSContext) -> bool:
            self.options = options
            log.info("TLS certificate {certificate} reloaded", certificate=self.files[1])
            return True

        def failed(failure: Any) -> bool:
            log.error("TLS certificate not reloaded, keeping the current one: {error}",
                      error=failure.getErrorMessage())
            return False
        return d.addCallbacks(loaded, failed)


#: Pending connections the kernel queues for a listener unless ``backlog=``
#: says otherwise. Twisted's default, 50, drops the SYNs of a burst of new
#: browsers (a thousand users reconnecting after a restart), which then wait
#: 1, 3, 7 seconds for their retransmits; the kernel caps this at somaxconn.
DEFAULT_BACKLOG = 1024


@implementer(IStreamServerEndpoint)
@attr.s(frozen=True, auto_attribs=True)
class ReusePortEndpoint:
    """A TCP listener with ``SO_REUSEPORT``: several proxy processes listen
    on the same address and port, and the kernel spreads new connections
    over them (one process per core; see docs/architecture.rst). Linux
    lets only processes of the same effective uid join such a group, so the
    port cannot be shared with another account's process.

    The socket is made here and handed to the reactor with
    ``adoptStreamPort`` (Twisted's ``tcp:`` endpoint has no such option)."""

    reactor: Any
    port: int
    interface: str = ""
    backlog: int = 1024

    def listen(self, factory: Any) -> Deferred:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            return fail(CannotListenError(self.interface, self.port, e))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"),
                       self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            port: IListeningPort = self.reactor.adoptStreamPort(sock.fileno(), family, factory)
        except Exception as e:
            return fail(CannotListenError(self.interface, self.port, e))
        finally:
            sock.close()  # the reactor holds its own copy of the descriptor
        return succeed(port)


def _yes(value: str, description: str) -> bool:
    if value.lower() in ("yes", "true", "1"):
        return True
    if value.lower() in ("no", "false", "0"):
        return False
    raise UsageError("--listen %s: reusePort is yes or no, not %r" % (description, value))


@attr.s(frozen=True, auto_attribs=True)
class TLSListener:
    """A parsed ``ssl:`` description with its key and certificate loaded."""

    port: int
    options: ReloadableTLS
    interface: str = ""
    backlog: int = DEFAULT_BACKLOG
    reuse_port: bool = False

    def endpoint(self, reactor: Any) -> IStreamServerEndpoint:
        if self.reuse_port:
            inner: Any = ReusePortEndpoint(reactor, self.port, self.interface, self.backlog)
        else:
            inner = TCP4ServerEndpoint(reactor, self.port, backlog=self.backlog,
                                       interface=self.interface)
        return TLSWrappedEndpoint(inner, self.options)

    @property
    def tls(self) -> Optional[ReloadableTLS]:
        return self.options


#: Application bytes per TLS record (the protocol's maximum).
TLS_RECORD = 16384
#: Bytes taken out of OpenSSL's memory BIO at a time: four full records
#: with their headers and tags.
TLS_BIO_READ = 4 * (TLS_RECORD + 64)


try:
    # pyOpenSSL's cffi binding of OpenSSL (private, but unchanged for a
    # decade): lets the hot path reuse one buffer instead of allocating and
    # zeroing 32 KiB per call, and see "nothing more" without an exception.
    from OpenSSL.SSL import _ffi as _openssl_ffi
    from OpenSSL.SSL import _lib as _openssl_lib
    _BIO_read = _openssl_lib.BIO_read
    _SSL_read = _openssl_lib.SSL_read
    _SSL_write = _openssl_lib.SSL_write
except (ImportError, AttributeError):  # pragma: no cover - the public API then
    _openssl_ffi = None


class RecordTLSProtocol(TLSMemoryBIOProtocol):
    """TLS that encrypts a write as full 16 KiB records, hands them to TCP
    in one call, and moves bytes through OpenSSL without allocating.

    ``TLSMemoryBIOProtocol`` cuts a write into 16 KiB slices (copies),
    and after each one reads the record out of OpenSSL's memory BIO and
    writes it to the TCP transport: for 1 MiB, 64 BIO round trips and 64
    transport writes, each ``bio_read``/``recv`` allocating and zeroing a
    32 KiB buffer and ending in an exception when there is nothing left
    (costly on PyPy). Here the slices are views, every record of the write
    is made first and the BIO is emptied once, through one reused buffer
    (the reactor is single-threaded); anything unusual (an OpenSSL error, a
    closed TLS session) goes the public pyOpenSSL way, which raises what
    Twisted expects. Twisted 26's ``BufferingTLSTransport`` (which gathers
    small writes until the next reactor turn, one timer per answer) is not
    used: the forwarder writes an answer's head and first body piece in one
    call already."""

    _fast = None

    def _buffer(self) -> Any:
        fast = self._fast
        if fast is None:
            connection = self._tlsConnection
            if (_openssl_ffi is not None and hasattr(connection, "_ssl")
                    and hasattr(connection, "_from_ssl")):
                fast = RecordTLSProtocol._fast = _openssl_ffi.new("char[]", TLS_BIO_READ)
            else:
                fast = False
        return fast

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        total = len(data)
        sent = 0
        if self._buffer():
            # One pointer to the whole write; each record from an offset.
            with _openssl_ffi.from_buffer(data) as pointer:
                ssl = connection._ssl
                while sent < total:
                    done = _SSL_write(ssl, pointer + sent, min(TLS_RECORD, total - sent))
                    if done <= 0:
                        break
                    sent += done
        if sent < total:
            view = memoryview(data)
            try:
                while sent < total:
                    try:
                        sent += connection.send(view[sent:sent + TLS_RECORD])
                    except SSL.WantReadError:
                        self._bufferedWrite(data[sent:])
                        break
                    except SSL.Error:
                        self._tlsShutdownFinished(Failure())
                        return
            finally:
                view.release()
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        """Hand every record the BIO holds to TCP, in one call (pieces of
        :data:`TLS_BIO_READ`: a larger buffer would be fresh memory pages
        from the kernel every time)."""
        fast = self._buffer()
        if not fast:
            return super()._flushSendBIO()
        pieces = []
        source = self._tlsConnection._from_ssl
        while True:
            n = _BIO_read(source, fast, TLS_BIO_READ)
            if n <= 0:
                break
            pieces.append(_openssl_ffi.buffer(fast, n)[:])
            if n < TLS_BIO_READ:
                break
        transport: Any = self.transport  # connected: the TCP transport
        if len(pieces) == 1:
            transport.write(pieces[0])
        elif pieces:
            transport.writeSequence(pieces)

    def _flushReceiveBIO(self) -> None:
        fast = self._buffer()
        if fast and not self._lostTLSConnection:
            ssl = self._tlsConnection._ssl
            while not self._lostTLSConnection and not self._aborted:
                n = _SSL_read(ssl, fast, TLS_BIO_READ)
                if n <= 0:
                    break
                ProtocolWrapper.dataReceived(self, _openssl_ffi.buffer(fast, n)[:])
        # What is left (nothing to read, the peer's close_notify, an error)
        # the public way, which also sends what OpenSSL wants to send.
        super()._flushReceiveBIO()


class RecordTLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` making :class:`RecordTLSProtocol` s."""

    protocol = RecordTLSProtocol


@implementer(IStreamServerEndpoint)
@attr.s(frozen=True, eq=False, auto_attribs=True)
class TLSWrappedEndpoint:
    """Our TLS around any plain stream server endpoint."""

    inner: IStreamServerEndpoint
    options: IOpenSSLContextFactory

    def listen(self, factory: Any) -> Deferred:
        return self.inner.listen(RecordTLSFactory(self.options, False, factory))


@attr.s(frozen=True, auto_attribs=True)
class PlainListener:
    """Any other description, left to Twisted's ``serverFromString``; with
    ``options`` (its description named a key), wrapped in our TLS."""

    description: str
    options: Optional[ReloadableTLS] = None
    #: ``reusePort=yes`` on a ``tcp:``/``tcp6:`` description: (port,
    #: interface, backlog) of a :class:`ReusePortEndpoint`.
    reuse_port: Optional[Tuple[int, str, int]] = None

    def endpoint(self, reactor: Any) -> IStreamServerEndpoint:
        if self.reuse_port is not None:
            inner: Any = ReusePortEndpoint(reactor, *self.reuse_port)
            return inner if self.options is None else TLSWrappedEndpoint(inner, self.options)
        description = self.description
        if description.split(":", 1)[0].strip().lower() in ("tcp", "tcp6") \
                and "backlog" not in split_description(description)[1]:
            description += ":backlog=%d" % DEFAULT_BACKLOG
        inner = serverFromString(reactor, description)
        if self.options is None:
            return inner
        return TLSWrappedEndpoint(inner, self.options)

    @property
    def tls(self) -> Optional[ReloadableTLS]:
        return self.options


def _int(value: str, what: str, description: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError("invalid %s %r in --listen %s" % (what, value, description))


def parse_ssl(description: str) -> TLSListener:
    """Parse and load an ``ssl:`` description (``UsageError`` when it is wrong)."""
    args, kwargs = split_description(description)
    positional = args[1:]  # args[0] is "ssl"
    unknown = set(kwargs) - _SSL_KEYS
    if "sslmethod" in unknown:
        raise UsageError("sslmethod is not supported in --listen: the proxy always "
                         "uses TLS 1.2 or newer")
    if unknown:
        raise UsageError("unknown option %s in --listen %s"
                         % (", ".join(sorted(unknown)), description))
    if len(positional) > 1 or (positional and "port" in kwargs):
        raise UsageError("--listen %s: give the port once, as ssl:PORT:..." % (description,))
    port = positional[0] if positional else kwargs.get("port")
    if port is None:
        raise UsageError("--listen %s has no port" % (description,))
    private_key = kwargs.get("privateKey", "server.pem")
    options = ReloadableTLS(private_key, kwargs.get("certKey", private_key),
                            kwargs.get("extraCertChain"), kwargs.get("dhParameters"))
    return TLSListener(port=_int(port, "port", description), options=options,
                       interface=kwargs.get("interface", ""),
                       backlog=_int(kwargs.get("backlog", str(DEFAULT_BACKLOG)), "backlog",
                                    description),
                       reuse_port=_yes(kwargs.get("reusePort", "no"), description))


def parse_listen(description: str) -> Any:
    """A ``--listen`` description as a listener with an ``endpoint(reactor)``
    method: :class:`TLSListener` for ``ssl:``, :class:`PlainListener` for the
    rest. Raises ``UsageError`` for what can be found wrong without listening."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind == "ssl":
        return parse_ssl(description)
    options = None
    args, kwargs = split_description(description)
    reuse_port = None
    if "reusePort" in kwargs:
        if kind not in ("tcp", "tcp6"):
            raise UsageError("--listen %s: reusePort is for tcp: and ssl: listeners"
                             % (description,))
        if _yes(kwargs.pop("reusePort"), description):
            positional = args[1:]
            port = positional[0] if positional else kwargs.get("port")
            if port is None:
                raise UsageError("--listen %s has no port" % (description,))
            reuse_port = (_int(port, "port", description), kwargs.get("interface", ""),
                          _int(kwargs.get("backlog", str(DEFAULT_BACKLOG)), "backlog",
                               description))
        description = join_description(args, kwargs)
    if _TLS_KEYS & set(kwargs):
        if "privateKey" not in kwargs:
            raise UsageError("--listen %s: give privateKey= (and certKey=) for TLS"
                             % (description,))
        options = ReloadableTLS(kwargs["privateKey"],
                                kwargs.get("certKey", kwargs["privateKey"]),
                                kwargs.get("extraCertChain"), kwargs.get("dhParameters"))
        description = join_description(
            args, {k: v for k, v in kwargs.items() if k not in _TLS_KEYS})
    try:
        # Endpoint constructors only store the reactor: this checks the syntax.
        serverFromString(None, description)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise UsageError("invalid --listen %s: %s" % (description, e))
    return PlainListener(description, options, reuse_port)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def join_description(args: List[str], kwargs: Dict[str, str]) -> str:
    """The inverse of :func:`split_description`."""
    fields = [_escape(a) for a in args]
    fields += ["%s=%s" % (_escape(k), _escape(v)) for k, v in kwargs.items()]
    return ":".join(fields)
