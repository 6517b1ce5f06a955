"""Bodies stream through the proxy instead of piling up in it: a 1 GiB
download and a 256 MiB upload through a real ``twistd pixelated-proxy``
process grow its peak resident memory by less than 64 MiB, and arrive intact.

The proxy runs against the stand-in manager of the benchmarks
(``bench/proxy_bench_manager.py``) and a real demo agent, over plain HTTP
on 127.0.0.1 (TLS would only add CPU time, not memory).
"""
import hashlib

from .real_proxy import PATTERN, RealProxy, read_head, status_kib

LIMIT = 64 * 2 ** 20


class StreamingMemory(RealProxy):

    def baseline(self) -> int:
        sock = self.connect()
        sock.sendall(b"GET /blob?size=1048576 HTTP/1.1\r\nHost: x\r\nCookie: %s\r\n"
                     b"Connection: close\r\n\r\n" % self.cookie.encode())
        while sock.recv(1 << 20):
            pass
        return status_kib(self.proxy.pid, "VmRSS") * 1024

    def test_one_gib_download(self) -> None:
        before = self.baseline()
        size = 2 ** 30
        sock = self.connect()
        sock.sendall(b"GET /blob?size=%d HTTP/1.1\r\nHost: x\r\nCookie: %s\r\n\r\n"
                     % (size, self.cookie.encode()))
        data = read_head(sock)
        head, body = data.split(b"\r\n\r\n", 1)
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertIn(b"Content-Length: %d" % size, head)
        received = len(body)
        digest = hashlib.sha256(body)
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        while received < size:
            n = sock.recv_into(buffer)
            self.assertTrue(n, "closed after %d bytes" % received)
            if received < (1 << 20):
                digest.update(view[:n])
            received += n
        self.assertEqual(received, size)
        grown = self.grown(before)
        self.assertLess(grown, LIMIT, "peak RSS grew by %d MiB" % (grown >> 20))

    def test_256_mib_upload(self) -> None:
        self.upload(b"application/octet-stream")

    def test_256_mib_form_upload_is_not_parsed_by_the_proxy(self) -> None:
        # twisted.web would read a form POST (urlencoded or multipart) whole
        # into memory to parse it into request.args; a forwarded one must
        # stay in its spool file. (The demo agent cannot take multipart.)
        self.upload(b"application/x-www-form-urlencoded")

    def upload(self, content_type: bytes) -> None:
        before = self.baseline()
        size = 256 * 2 ** 20
        sock = self.connect()
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nCookie: %s\r\n"
                     b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n"
                     % (self.cookie.encode(), content_type, size))
        digest = hashlib.sha256()
        chunk = PATTERN * 16  # 1 MiB
        for _ in range(size // len(chunk)):
            sock.sendall(chunk)
            digest.update(chunk)
        data = read_head(sock)
        while not data.rstrip().endswith(b"}"):
            data += sock.recv(65536)
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data[:300])
        self.assertIn(b'"bytes": %d' % size, data)
        self.assertIn(digest.hexdigest().encode(), data)
        grown = self.grown(before)
        self.assertLess(grown, LIMIT, "peak RSS grew by %d MiB" % (grown >> 20))
