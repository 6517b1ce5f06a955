"""Parsing an agent's response head: the status line and the header lines
(agent_client.parse_status_line, parse_header_lines), for any bytes an agent
(or a compromised one) may send."""
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pixelated_dispatcher.proxy.agent_client import (AgentProtocolError, parse_header_lines,
                                                     parse_status_line)


class StatusLine(SynchronousTestCase):
    def test_code_reason_and_version(self) -> None:
        self.assertEqual(parse_status_line(b"HTTP/1.1 200 OK"), (200, b"OK", True))
        self.assertEqual(parse_status_line(b"HTTP/1.0 404 Not Found"), (404, b"Not Found", False))
        self.assertEqual(parse_status_line(b"HTTP/1.1 204"), (204, b"", True))

    def test_anything_else_is_refused(self) -> None:
        for line in (b"", b"HTTP/2 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK",
                     b"ICY 200 OK", b"HTTP/1.1 abc OK", b"HTTP/1.1"):
            self.assertRaises(AgentProtocolError, parse_status_line, line)

    @settings(max_examples=300)
    @given(st.binary(max_size=40))
    def test_arbitrary_bytes_parse_or_are_refused(self, line: bytes) -> None:
        try:
            code, _, _ = parse_status_line(line)
        except AgentProtocolError:
            return
        self.assertTrue(100 <= code <= 999 and line.startswith(b"HTTP/1."))


class HeaderLines(SynchronousTestCase):
    def test_framing(self) -> None:
        framing = parse_header_lines(
            [b"HTTP/1.1 200 OK", b"Content-Length: 12", b"X-A:  1 ", b"Set-Cookie: a=1"],
            keep_alive=True)
        self.assertEqual((framing.length, framing.chunked, framing.keep_alive), (12, False, True))
        self.assertEqual(framing.headers, [(b"content-length", b"12"), (b"x-a", b"1"),
                                           (b"set-cookie", b"a=1")])

    def test_connection_and_transfer_encoding_decide_keep_alive(self) -> None:
        self.assertFalse(parse_header_lines([b"", b"Connection: close"], True).keep_alive)
        self.assertTrue(parse_header_lines([b"", b"Connection: keep-alive"], False).keep_alive)
        self.assertFalse(parse_header_lines([b"", b"Transfer-Encoding: gzip"], True).keep_alive)
        chunked = parse_header_lines([b"", b"Transfer-Encoding: gzip, chunked"], True)
        self.assertTrue(chunked.chunked and chunked.keep_alive)

    def test_bad_lines_and_conflicting_lengths_are_refused(self) -> None:
        for lines in ([b"", b"no colon"], [b"", b": empty name"], [b"", b"Name : x"],
                      [b"", b" Name: x"], [b"", b"Content-Length: -1"],
                      [b"", b"Content-Length: 1", b"Content-Length: 2"]):
            self.assertRaises(AgentProtocolError, parse_header_lines, lines, True)
        same = parse_header_lines([b"", b"Content-Length: 3", b"Content-Length: 3"], True)
        self.assertEqual(same.length, 3)

    @settings(max_examples=300)
    @given(st.lists(st.binary(max_size=30).filter(lambda b: b"\r\n" not in b), max_size=8),
           st.booleans())
    def test_arbitrary_lines_parse_or_are_refused(self, lines: list, keep_alive: bool) -> None:
        try:
            framing = parse_header_lines([b"HTTP/1.1 200 OK"] + lines, keep_alive)
        except AgentProtocolError:
            return
        self.assertEqual(len(framing.headers), len(lines))
        for name, _ in framing.headers:
            self.assertEqual(name, name.lower())
            self.assertTrue(name and name[:1] not in b" \t" and name[-1:] not in b" \t")
