"""A stand-in manager for proxy benchmarks: ``FakeManager`` behind the real
AMP commands on a Unix socket, with one user whose agent runs at a fixed
address. It keeps the manager (argon2, SQLite, process start) out of the
figures: with the session cache the proxy asks the manager about once per
30 seconds per session anyway.

    python bench/proxy_bench_manager.py SOCKET USERNAME PASSWORD AGENT_PORT
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import reactor  # noqa: E402
from twisted.internet.protocol import Factory  # noqa: E402
from twisted.protocols import amp  # noqa: E402

from pixelated_dispatcher import protocol as p  # noqa: E402
from pixelated_dispatcher.proxy.fake_manager import FakeManager  # noqa: E402


class Responder(amp.CommandLocator):
    def __init__(self, manager):
        self.manager = manager

    @p.Authenticate.responder
    def authenticate(self, username, password, client):
        return self.manager.authenticate(username, password, client).addCallback(
            lambda token: {"token": token})

    @p.ResolveSession.responder
    def resolve_session(self, token):
        return self.manager.resolve_session(token).addCallback(
            lambda username: {"username": username})

    @p.EndSession.responder
    def end_session(self, token):
        return self.manager.end_session(token).addCallback(
            lambda username: {"username": username})

    @p.EnsureAgent.responder
    def ensure_agent(self, username):
        return self.manager.ensure_agent(username).addCallback(
            lambda a: {"host": a.host, "port": a.port})

    @p.ReportActivity.responder
    def report_activity(self, usernames):
        return {}

    @p.Subscribe.responder
    def subscribe(self):
        return {}


def main():
    path, username, password, port = sys.argv[1:5]
    manager = FakeManager()
    manager.add_user(username, password)
    manager.place_agent(username, p.AgentAddress("127.0.0.1", int(port)))
    if os.path.exists(path):
        os.unlink(path)
    factory = Factory()
    factory.protocol = lambda: amp.AMP(locator=Responder(manager))
    reactor.listenUNIX(path, factory, mode=0o600)
    reactor.run()


if __name__ == "__main__":
    main()
