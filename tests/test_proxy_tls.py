"""``--listen`` parsing and the TLS it gives: real handshakes against a
listener on 127.0.0.1 with a certificate made for the test."""
import os
import shutil
import subprocess
import ssl as stdlib_ssl
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from pixelated_dispatcher.proxy.tls import (PlainListener, TLSListener, parse_listen,
                                            split_description)

from .helpers import handshake, make_certificate, temporary_directory


class HandshakeTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.key, self.cert = make_certificate(temporary_directory(self))

    @inlineCallbacks
    def listen(self, listener: Any) -> Any:
        port = yield listener.endpoint(reactor).listen(Site(Resource()))
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def ours(self) -> TLSListener:
        return parse_listen("ssl:0:privateKey=%s:certKey=%s:interface=127.0.0.1"
                            % (self.key, self.cert))

    @inlineCallbacks
    def test_tls_1_3_and_1_2_work_with_forward_secret_aead(self) -> Any:
        port = yield self.listen(self.ours())
        version, _ = yield deferToThread(handshake, port, stdlib_ssl.TLSVersion.TLSv1_3,
                                         stdlib_ssl.TLSVersion.TLSv1_3)
        self.assertEqual(version, "TLSv1.3")
        version, cipher = yield deferToThread(
            handshake, port, stdlib_ssl.TLSVersion.TLSv1_2, stdlib_ssl.TLSVersion.TLSv1_2)
        self.assertEqual(version, "TLSv1.2")
        self.assertTrue(cipher.startswith("ECDHE-"), cipher)
        self.assertTrue("GCM" in cipher or "CHACHA20" in cipher, cipher)

    @inlineCallbacks
    def test_tls_1_1_is_refused(self) -> Any:
        port = yield self.listen(self.ours())
        yield self.assertFailure(
            deferToThread(handshake, port, stdlib_ssl.TLSVersion.TLSv1,
                          stdlib_ssl.TLSVersion.TLSv1_1),
            stdlib_ssl.SSLError, ConnectionError)

    @inlineCallbacks
    def test_the_old_client_is_refused_by_the_server_not_by_itself(self) -> Any:
        """Control for the test above: the same client gets through to a
        server that allows TLS 1.0, so the refusal is our server's doing."""
        pem = open(self.cert, "rb").read() + open(self.key, "rb").read()
        both = ssl.PrivateCertificate.loadPEM(pem)
        lax = ssl.CertificateOptions(
            privateKey=both.privateKey.original, certificate=both.original,
            insecurelyLowerMinimumTo=ssl.TLSVersion.TLSv1_0)
        lax.getContext().set_cipher_list(b"ALL:@SECLEVEL=0")
        port = yield self.listen(_Fixed(SSL4ServerEndpoint(
            reactor, 0, lax, interface="127.0.0.1")))
        try:
            version, _ = yield deferToThread(
                handshake, port, stdlib_ssl.TLSVersion.TLSv1, stdlib_ssl.TLSVersion.TLSv1_1)
        except (stdlib_ssl.SSLError, ConnectionError) as e:
            self.skipTest("this OpenSSL cannot speak TLS 1.1 at all (%s)" % (e,))
        self.assertIn(version, ("TLSv1", "TLSv1.1"))

    @inlineCallbacks
    def test_ciphers_without_forward_secrecy_are_refused(self) -> Any:
        port = yield self.listen(self.ours())
        yield self.assertFailure(
            deferToThread(handshake, port, stdlib_ssl.TLSVersion.TLSv1_2,
                          stdlib_ssl.TLSVersion.TLSv1_2,
                          "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA:@SECLEVEL=0"),
            stdlib_ssl.SSLError, ConnectionError)


class _Fixed:
    """A listener for an endpoint built by hand."""

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def endpoint(self, reactor: Any) -> Any:
        return self._endpoint


class ParseListenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = temporary_directory(self)
        self.key, self.cert = make_certificate(self.directory)

    def test_split_like_twisted(self) -> None:
        self.assertEqual(split_description(r"ssl:443:privateKey=C\:\\keys\:a=b.pem:x=1"),
                         (["ssl", "443"], {"privateKey": r"C:\keys:a=b.pem", "x": "1"}))

    def test_ssl_description_with_everything(self) -> None:
        chain = os.path.join(self.directory, "chain.pem")
        shutil.copy(self.cert, chain)
        listener = parse_listen(
            "ssl:port=8443:privateKey=%s:certKey=%s:extraCertChain=%s"
            ":interface=127.0.0.1:backlog=7" % (self.key, self.cert, chain))
        self.assertEqual((listener.port, listener.interface, listener.backlog),
                         (8443, "127.0.0.1", 7))
        self.assertEqual(len(listener.options.extraCertChain), 1)

    def test_escaped_colon_in_path(self) -> None:
        odd = os.path.join(self.directory, "with:colon")
        os.mkdir(odd)
        key = shutil.copy(self.key, os.path.join(odd, "k.pem"))
        cert = shutil.copy(self.cert, os.path.join(odd, "c.pem"))
        listener = parse_listen("ssl:8443:privateKey=%s:certKey=%s" % (
            key.replace(":", r"\:"), cert.replace(":", r"\:")))
        self.assertEqual(listener.port, 8443)

    def test_uppercase_ssl_gets_our_tls_too(self) -> None:
        listener = parse_listen("SSL:8443:privateKey=%s:certKey=%s" % (self.key, self.cert))
        self.assertIsInstance(listener, TLSListener)

    def test_missing_key_file_is_a_usage_error(self) -> None:
        missing = os.path.join(self.directory, "nope.key")
        error = self.assertRaises(UsageError, parse_listen,
                                  "ssl:443:privateKey=%s:certKey=%s" % (missing, self.cert))
        self.assertIn(missing, str(error))
        self.assertIn("private key", str(error))

    def test_unreadable_certificate_is_a_usage_error(self) -> None:
        error = self.assertRaises(UsageError, parse_listen, "ssl:443:privateKey=%s:certKey=%s"
                                  % (self.key, self.directory))
        self.assertIn(self.directory, str(error))

    def test_garbage_certificate_is_a_usage_error(self) -> None:
        garbage = os.path.join(self.directory, "garbage.pem")
        with open(garbage, "w") as f:
            f.write("this is not a certificate\n")
        self.assertRaises(UsageError, parse_listen,
                          "ssl:443:privateKey=%s:certKey=%s" % (self.key, garbage))

    def test_key_of_another_certificate_is_a_usage_error(self) -> None:
        other_key, _ = make_certificate(temporary_directory(self))
        error = self.assertRaises(UsageError, parse_listen,
                                  "ssl:443:privateKey=%s:certKey=%s" % (other_key, self.cert))
        self.assertIn("do not match", str(error))

    def test_chain_without_certificates_is_a_usage_error(self) -> None:
        empty = os.path.join(self.directory, "empty.pem")
        open(empty, "w").close()
        self.assertRaises(UsageError, parse_listen,
                          "ssl:443:privateKey=%s:certKey=%s:extraCertChain=%s"
                          % (self.key, self.cert, empty))

    def test_dh_parameters_are_loaded(self) -> None:
        params = os.path.join(self.directory, "dh.pem")
        subprocess.run(["openssl", "dhparam", "-dsaparam", "-out", params, "2048"],
                       check=True, capture_output=True, timeout=120)
        listener = parse_listen("ssl:443:privateKey=%s:certKey=%s:dhParameters=%s"
                                % (self.key, self.cert, params))
        self.assertIsInstance(listener, TLSListener)

    def test_broken_dh_parameters_are_a_usage_error_naming_the_file(self) -> None:
        params = os.path.join(self.directory, "dh.pem")
        with open(params, "w") as f:
            f.write("-----BEGIN DH PARAMETERS-----\nnot base64\n-----END DH PARAMETERS-----\n")
        error = self.assertRaises(UsageError, parse_listen,
                                  "ssl:443:privateKey=%s:certKey=%s:dhParameters=%s"
                                  % (self.key, self.cert, params))
        self.assertIn("cannot load the Diffie-Hellman parameters " + params, str(error))

    def test_sslmethod_is_refused(self) -> None:
        error = self.assertRaises(UsageError, parse_listen,
                                  "ssl:443:privateKey=%s:certKey=%s:sslmethod=TLSv1_METHOD"
                                  % (self.key, self.cert))
        self.assertIn("TLS 1.2", str(error))

    def test_plain_endpoints_go_to_twisted(self) -> None:
        self.assertEqual(parse_listen("tcp:8080:interface=127.0.0.1"),
                         PlainListener("tcp:8080:interface=127.0.0.1"))
        self.assertIsInstance(parse_listen("unix:/run/pixelated/proxy.sock"), PlainListener)

    def test_nonsense_is_a_usage_error(self) -> None:
        self.assertRaises(UsageError, parse_listen, "carrier-pigeon:443")
        self.assertRaises(UsageError, parse_listen, "tcp:http")
        self.assertRaises(UsageError, parse_listen, "ssl:https:privateKey=%s:certKey=%s"
                          % (self.key, self.cert))


class BacklogTests(SynchronousTestCase):
    """A burst of new browsers must not overflow the listen queue: Twisted's
    default of 50 drops SYNs, which then wait seconds for retransmits."""

    def test_listeners_queue_1024_connections_unless_told(self) -> None:
        from twisted.internet.testing import MemoryReactor

        from pixelated_dispatcher.proxy.tls import DEFAULT_BACKLOG, parse_listen
        self.assertEqual(DEFAULT_BACKLOG, 1024)
        for description, expected in (("tcp:8080:interface=127.0.0.1", 1024),
                                      ("tcp:8080:interface=127.0.0.1:backlog=64", 64)):
            reactor = MemoryReactor()
            parse_listen(description).endpoint(reactor).listen(object())
            self.assertEqual(reactor.tcpServers[0][2], expected, description)
