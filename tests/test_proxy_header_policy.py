"""The header policy: what an agent receives, and what a browser gets back."""
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from pixelated_dispatcher.proxy.cookie_policy import DISPATCHER_COOKIE_NAMES
from pixelated_dispatcher.proxy.header_policy import (
    HOP_BY_HOP, request_head, request_header_pairs, response_header_groups,
    rewrite_location, switching_protocols_head)

OURS = sorted(DISPATCHER_COOKIE_NAMES)

# Cookie names as a browser (or an attacker) might spell ours...
our_names = st.builds(
    lambda name, upper, pad: (b" " * pad) + (name.upper() if upper else name) + (b" " * pad),
    st.sampled_from(OURS + [b"pixelated-session", b"__Host-pixelated-session",
                            b"pixelated-csrf", b"__Host-pixelated-csrf"]),
    st.booleans(), st.integers(0, 2))
# ... and everybody else's (RFC 6265 token characters).
TOKEN = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
other_names = st.binary(min_size=1, max_size=20).map(
    lambda b: bytes(TOKEN[c % len(TOKEN)] for c in b)).filter(
    lambda n: n.strip().lower() not in DISPATCHER_COOKIE_NAMES)
values = st.binary(max_size=30).map(bytes.strip).filter(
    lambda v: b";" not in v and b"\r" not in v and b"\n" not in v and b"\x00" not in v)


def agent_cookies(headers: Headers) -> list:
    """The cookies as a server parses them (twisted.web's way: split on ';')."""
    pairs = []
    for value in headers.getRawHeaders(b"cookie", []):
        for pair in value.split(b";"):
            pair = pair.strip()
            if pair:
                pairs.append(pair)
    return pairs


def forward(headers: Headers, secure: bool = False) -> Headers:
    """What the agent receives, by the function the forwarder runs."""
    received = Headers()
    for name, value in request_header_pairs(headers, client_ip="203.0.113.9", secure=secure):
        received.addRawHeader(name, value)
    return received


def to_browser(incoming: Headers) -> Headers:
    """What the browser gets of an agent's response headers, by the function
    the forwarder runs (on lower-case names, as the agent client parses them)."""
    pairs = [(name.lower(), value) for name, values in incoming.getAllRawHeaders()
             for value in values]
    return Headers(response_header_groups(pairs))


class CookieHeaderToAgent(SynchronousTestCase):
    @settings(max_examples=300)
    @given(st.lists(st.tuples(st.booleans(), our_names, other_names, values),
                    max_size=8),
           st.integers(1, 3))
    def test_agent_never_gets_our_cookies_and_keeps_the_others(self, pairs, split):
        sent, expected = [], []
        for ours, our_name, other_name, value in pairs:
            if ours:
                sent.append(our_name + b"=" + value)
            else:
                sent.append(other_name + b"=" + value)
                expected.append((other_name + b"=" + value).strip())
        # Browsers send one Cookie header; some clients send several.
        chunks = [b"; ".join(sent[i::split]) for i in range(split)]
        received = agent_cookies(forward(Headers({b"Cookie": chunks})))
        for pair in received:
            self.assertNotIn(pair.split(b"=", 1)[0].strip().lower(), DISPATCHER_COOKIE_NAMES)
        self.assertEqual(sorted(received), sorted(p for p in expected if p))

    @settings(max_examples=300)
    @given(st.binary(max_size=200).filter(lambda b: b"\r" not in b and b"\n" not in b))
    def test_arbitrary_cookie_header_never_leaks_ours(self, raw):
        received = forward(Headers({b"Cookie": [raw + b";pixelated-session=secret"]}))
        for pair in agent_cookies(received):
            self.assertNotIn(pair.split(b"=", 1)[0].strip().lower(), DISPATCHER_COOKIE_NAMES)
        self.assertNotIn(b"pixelated-session=secret", b"".join(
            received.getRawHeaders(b"cookie", [])))

    def test_other_cookies_pass_in_order(self) -> None:
        received = forward(Headers({b"Cookie": [
            b"XSRF-TOKEN=abc; __Host-pixelated-session=tok; lang=en; pixelated-csrf=c"]}))
        self.assertEqual(received.getRawHeaders(b"cookie"), [b"XSRF-TOKEN=abc; lang=en"])

    def test_no_cookie_header_when_only_ours(self) -> None:
        received = forward(Headers({b"Cookie": [b"pixelated-session=tok"]}))
        self.assertFalse(received.hasHeader(b"cookie"))


class OtherRequestHeaders(SynchronousTestCase):
    def test_forwarding_claims_of_the_client_are_replaced(self) -> None:
        received = forward(Headers({
            b"Host": [b"mail.example.org"],
            b"X-Forwarded-For": [b"6.6.6.6"],
            b"X-Forwarded-Proto": [b"https"],
            b"X-Forwarded-Host": [b"evil.example"],
            b"Forwarded": [b"for=6.6.6.6"],
            b"X-Real-IP": [b"6.6.6.6"],
        }))
        self.assertEqual(received.getRawHeaders(b"x-forwarded-for"), [b"203.0.113.9"])
        self.assertEqual(received.getRawHeaders(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(received.getRawHeaders(b"x-forwarded-host"), [b"mail.example.org"])
        self.assertEqual(received.getRawHeaders(b"host"), [b"mail.example.org"])
        self.assertFalse(received.hasHeader(b"forwarded"))
        self.assertFalse(received.hasHeader(b"x-real-ip"))

    def test_proto_is_https_on_tls(self) -> None:
        received = forward(Headers({b"Host": [b"mail.example.org"]}), secure=True)
        self.assertEqual(received.getRawHeaders(b"x-forwarded-proto"), [b"https"])

    def test_hop_by_hop_headers_stay_behind(self) -> None:
        received = forward(Headers({
            b"Connection": [b"keep-alive, X-Secret-Hop"],
            b"Keep-Alive": [b"timeout=5"],
            b"Transfer-Encoding": [b"chunked"],
            b"Upgrade": [b"websocket"],
            b"Proxy-Authorization": [b"Basic eA=="],
            b"TE": [b"trailers"],
            b"X-Secret-Hop": [b"1"],
            b"Accept": [b"text/html"],
        }))
        names = {name.lower() for name, _ in received.getAllRawHeaders()}
        self.assertEqual(names, {b"accept", b"x-forwarded-for", b"x-forwarded-proto"})

    def test_repeated_headers_are_all_kept(self) -> None:
        received = forward(Headers({b"X-Dup": [b"one", b"two"]}))
        self.assertEqual(received.getRawHeaders(b"x-dup"), [b"one", b"two"])


class ResponseHeaders(SynchronousTestCase):
    @given(st.sampled_from(OURS), st.booleans(), st.sampled_from(
        [b"", b"; Path=/", b"; Max-Age=0", b"; Domain=example.org; Secure"]))
    def test_agent_cannot_set_or_clear_our_cookies(self, name, upper, attributes):
        spelled = name.upper() if upper else name
        incoming = Headers({b"Set-Cookie": [spelled + b"=x" + attributes]})
        self.assertFalse(to_browser(incoming).hasHeader(b"set-cookie"))

    def test_agent_cookies_and_headers_pass(self) -> None:
        incoming = Headers({
            b"Set-Cookie": [b"XSRF-TOKEN=abc; Path=/", b"pixelated-session=stolen",
                            b"lang=en"],
            b"Content-Type": [b"text/html"],
            b"Location": [b"/inbox"],
            b"Server": [b"TwistedWeb/22.4.0"],
            b"Connection": [b"close"],
            b"Transfer-Encoding": [b"chunked"],
        })
        outgoing = to_browser(incoming)
        self.assertEqual(outgoing.getRawHeaders(b"set-cookie"),
                         [b"XSRF-TOKEN=abc; Path=/", b"lang=en"])
        self.assertEqual(outgoing.getRawHeaders(b"location"), [b"/inbox"])
        self.assertEqual(outgoing.getRawHeaders(b"content-type"), [b"text/html"])
        for hidden in (b"server", b"connection", b"transfer-encoding"):
            self.assertFalse(outgoing.hasHeader(hidden))


# --- the whole forwarded head, for arbitrary header sets -----------------------

header_names = st.one_of(
    st.sampled_from([b"Connection", b"Keep-Alive", b"TE", b"Trailer", b"Upgrade",
                     b"Transfer-Encoding", b"Proxy-Authorization", b"Proxy-Connection",
                     b"Cookie", b"X-Forwarded-For", b"Forwarded", b"Host", b"Accept",
                     b"Content-Length", b"Expect", b"X-Custom"]),
    st.binary(min_size=1, max_size=12).map(
        lambda b: bytes(TOKEN[c % len(TOKEN)] for c in b)))
header_values = st.one_of(
    st.binary(max_size=40),
    st.lists(st.one_of(our_names.map(lambda n: n + b"=tok"), st.just(b"lang=en"),
                       st.sampled_from([b"X-Custom", b"close", b"upgrade"])),
             max_size=4).map(b"; ".join))


class ForwardedHead(SynchronousTestCase):
    """For any header set a browser (or an attacker) sends, the request head
    the agent receives has no dispatcher cookie, no hop-by-hop header, no
    header named in Connection, no CR/LF/NUL inside a line, and only our
    X-Forwarded-* claims."""

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.tuples(header_names, header_values), max_size=12),
           st.booleans())
    def test_forwarded_head_is_clean(self, headers, secure):
        incoming = Headers()
        for name, value in headers:
            incoming.addRawHeader(name, value)
        listed = set()
        for value in incoming.getRawHeaders(b"connection", []):
            listed.update(t.strip().lower() for t in value.split(b",") if t.strip())
        pairs = request_header_pairs(incoming, client_ip="203.0.113.9", secure=secure)
        head = request_head(b"GET", b"/x", pairs, None)
        self.assertTrue(head.endswith(b"\r\n\r\n"))
        lines = head[:-4].split(b"\r\n")
        self.assertEqual(lines[0], b"GET /x HTTP/1.1")
        seen = {}
        for line in lines[1:]:
            self.assertNotIn(b"\n", line)
            self.assertNotIn(b"\r", line)
            self.assertNotIn(b"\x00", line)
            name, _, value = line.partition(b": ")
            seen.setdefault(name, []).append(value)
            self.assertNotIn(name, HOP_BY_HOP)
            if name not in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                            b"host"):
                self.assertNotIn(name, listed)
            if name == b"cookie":
                for pair in value.split(b";"):
                    self.assertNotIn(pair.split(b"=", 1)[0].strip().lower(),
                                     DISPATCHER_COOKIE_NAMES)
        self.assertEqual(seen[b"x-forwarded-for"], [b"203.0.113.9"])
        self.assertEqual(seen[b"x-forwarded-proto"], [b"https" if secure else b"http"])
        self.assertNotIn(b"forwarded", seen)
        self.assertNotIn(b"content-length", seen)
        self.assertNotIn(b"expect", seen)
        self.assertLessEqual(len(seen.get(b"cookie", [])), 1)

    def test_upgrade_is_kept_only_for_a_tunnel(self) -> None:
        incoming = Headers({b"Connection": [b"Upgrade"], b"Upgrade": [b"websocket"],
                            b"Sec-WebSocket-Key": [b"k"]})
        plain = dict(request_header_pairs(incoming, client_ip="a", secure=True))
        tunnel = dict(request_header_pairs(incoming, client_ip="a", secure=True,
                                           upgrade=True))
        self.assertNotIn(b"upgrade", plain)
        self.assertEqual((tunnel[b"upgrade"], tunnel[b"connection"]),
                         (b"websocket", b"upgrade"))
        self.assertEqual(tunnel[b"sec-websocket-key"], b"k")

    def test_body_length_is_ours(self) -> None:
        head = request_head(b"POST", b"/", [(b"host", b"h")], 12)
        self.assertIn(b"\r\ncontent-length: 12\r\n", head)


class LocationRewriting(SynchronousTestCase):
    AGENT = (b"127.0.0.1:41001", b"localhost:41001")
    PUBLIC = b"https://mail.example.org"

    def test_agent_loopback_location_goes_to_the_public_origin(self) -> None:
        for location, expected in [
                (b"http://127.0.0.1:41001/inbox?x=1", b"https://mail.example.org/inbox?x=1"),
                (b"http://localhost:41001/", b"https://mail.example.org/"),
                (b"HTTP://127.0.0.1:41001", b"https://mail.example.org/"),
                (b"http://user@127.0.0.1:41001/a", b"https://mail.example.org/a")]:
            self.assertEqual(rewrite_location(location, self.AGENT, self.PUBLIC), expected)

    def test_other_locations_are_kept(self) -> None:
        for location in (b"/inbox", b"https://example.com/x", b"http://127.0.0.1:41002/",
                         b"inbox", b"//127.0.0.1:41001/x"):
            self.assertEqual(rewrite_location(location, self.AGENT, self.PUBLIC), location)

    def test_groups_keep_every_set_cookie_and_rewrite_location(self) -> None:
        groups = response_header_groups([
            (b"set-cookie", b"a=1"), (b"set-cookie", b"pixelated-session=x"),
            (b"set-cookie", b"b=2"), (b"location", b"http://127.0.0.1:41001/y"),
            (b"connection", b"x-hop"), (b"x-hop", b"1"), (b"keep-alive", b"5"),
            (b"server", b"agent")],
            agent_authorities=self.AGENT, public_origin=self.PUBLIC)
        self.assertEqual(groups, {b"set-cookie": [b"a=1", b"b=2"],
                                  b"location": [b"https://mail.example.org/y"]})


class SwitchingProtocolsHead(SynchronousTestCase):
    """The ``101`` head that opens a tunnel goes through the same filter as
    every other answer: the agent cannot smuggle what is stripped elsewhere."""

    AGENT = (b"127.0.0.1:41001",)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(header_names.map(bytes.lower), header_values.filter(
        lambda v: b"\r" not in v and b"\n" not in v)), max_size=10))
    def test_head_carries_only_what_the_policy_lets_through(self, headers):
        head = switching_protocols_head(headers, agent_authorities=self.AGENT,
                                        public_origin=b"https://mail.example.org")
        self.assertTrue(head.endswith(b"\r\n\r\n"))
        lines = head[:-4].split(b"\r\n")
        self.assertEqual(lines[:2], [b"HTTP/1.1 101 Switching Protocols",
                                     b"Connection: Upgrade"])
        self.assertTrue(lines[2].startswith(b"Upgrade: "))
        expected = response_header_groups(headers, agent_authorities=self.AGENT,
                                          public_origin=b"https://mail.example.org")
        self.assertEqual(lines[3:], [name + b": " + value
                                     for name, values in expected.items() for value in values])

    def test_server_and_our_cookies_are_stripped(self) -> None:
        head = switching_protocols_head(
            [(b"upgrade", b"websocket"), (b"server", b"agent/1"),
             (b"set-cookie", b"__Host-pixelated-session=stolen"),
             (b"sec-websocket-accept", b"abc")],
            agent_authorities=self.AGENT, public_origin=b"https://mail.example.org")
        self.assertEqual(head, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                               b"Upgrade: websocket\r\nsec-websocket-accept: abc\r\n\r\n")
