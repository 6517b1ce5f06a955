"""The header policy: what an agent receives, and what a browser gets back."""
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from pixelated_dispatcher.proxy.cookie_policy import DISPATCHER_COOKIE_NAMES
from pixelated_dispatcher.proxy.header_policy import (
    keep_response_header, request_headers_for_agent, response_headers_for_browser)

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
    lambda v: b";" not in v and b"\r" not in v and b"\n" not in v)


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
    return request_headers_for_agent(headers, client_ip="203.0.113.9", secure=secure)


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
        self.assertFalse(keep_response_header(b"Set-Cookie", spelled + b"=x" + attributes))

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
        outgoing = response_headers_for_browser(incoming)
        self.assertEqual(outgoing.getRawHeaders(b"set-cookie"),
                         [b"XSRF-TOKEN=abc; Path=/", b"lang=en"])
        self.assertEqual(outgoing.getRawHeaders(b"location"), [b"/inbox"])
        self.assertEqual(outgoing.getRawHeaders(b"content-type"), [b"text/html"])
        for hidden in (b"server", b"connection", b"transfer-encoding"):
            self.assertFalse(outgoing.hasHeader(hidden))
