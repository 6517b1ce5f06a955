#!/usr/bin/env python3
"""The proxy's own CPU per forwarded request, in one process, without
sockets: the real site (channel, session gate, forwarder, agent client) on
in-memory transports, a logged-in keep-alive browser connection and a
pooled agent connection, ``--requests`` small requests in a row.

    .venv/bin/python bench/proxy_cpu.py [--requests 20000] [--body 2048] [--profile]

This is the Python half of what ``bench/proxy_throughput`` measures as CPU
per request (no system calls, no TLS, no scheduling): steady to a few
percent even on a loaded machine (``time.process_time``), so small
changes to the hot path can be compared one by one. ``--profile`` prints
the top of a ``cProfile`` of the same loop.
"""
import argparse
import cProfile
import os
import pstats
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402

from pixelated_dispatcher.protocol import AgentAddress  # noqa: E402
from pixelated_dispatcher.proxy.forwarding import StreamingForwarder  # noqa: E402
from pixelated_dispatcher.proxy.site import make_site  # noqa: E402
from pixelated_dispatcher.testing.fake_manager import FakeManager  # noqa: E402

AGENT = AgentAddress("127.0.0.1", 41001)


class Loop:
    """One browser connection and one agent connection, driven by hand."""

    def __init__(self, body: int, minimal: bool = False) -> None:
        self.clock = MemoryReactorClock()
        manager = FakeManager()
        manager.add_user("alice", "a-secret")
        manager.place_agent("alice", AGENT)
        token = manager.open_session("alice")
        self.site = make_site(manager, self.clock, forwarder=StreamingForwarder(self.clock))
        self.site.reactor = self.clock
        address = IPv4Address("TCP", "127.0.0.1", 50001)
        self.channel = self.site.buildProtocol(address)
        self.browser = StringTransport(peerAddress=address)
        self.channel.makeConnection(self.browser)
        self.request = (
            b"GET /blob?size=%d HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0)"
            b" Gecko/20100101 Firefox/128.0\r\n"
            b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
            b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\n"
            b"Cookie: pixelated-session=%s; theme=dark\r\n\r\n" % (body, token.encode()))
        if minimal:  # what wrk sends
            self.request = (b"GET /blob?size=%d HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                            b"Cookie: pixelated-session=%s\r\n\r\n" % (body, token.encode()))
        self.answer = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"
                       b"Date: Thu, 03 Dec 2026 03:00:00 GMT\r\n"
                       b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n"
                       b"Last-Modified: Thu, 03 Dec 2026 02:59:00 GMT\r\nConnection: keep-alive\r\n"
                       b"ETag: \"6929a0c4-800\"\r\nAccept-Ranges: bytes\r\n\r\n" % (body,)
                       + b"x" * body)
        self.agent = None
        self.agent_transport = None
        for _ in range(2):  # resolves the session, opens and reuses the agent connection
            answer = self.one()
            if not answer.startswith(b"HTTP/1.1 200 OK") or not answer.endswith(b"x" * body):
                raise SystemExit("not the page: %r" % (answer[:300],))

    def one(self) -> bytes:
        self.channel.dataReceived(self.request)
        if self.agent is None:
            host, port, factory, _, _ = self.clock.tcpClients.pop(0)
            self.agent = factory.buildProtocol(None)
            self.agent_transport = StringTransport()
            self.agent.makeConnection(self.agent_transport)
        self.agent_transport.clear()
        self.agent.dataReceived(self.answer)
        answer = self.browser.value()
        self.browser.clear()
        return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--body", type=int, default=2048)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--minimal", action="store_true",
                        help="the request wrk sends (Host and Cookie only)")
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    loop = Loop(options.body, options.minimal)
    n = min(options.requests, 10 ** 6)
    if options.profile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(n):
            loop.one()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(40)
        return
    figures = []
    for _ in range(min(options.repeat, 50)):
        started = time.process_time()
        for _ in range(n):
            loop.one()
        figures.append((time.process_time() - started) * 1e6 / n)
    figures.sort()
    print("%.1f us CPU per request (median of %d x %d; min %.1f, max %.1f)"
          % (figures[len(figures) // 2], len(figures), n, figures[0], figures[-1]))


if __name__ == "__main__":
    main()
