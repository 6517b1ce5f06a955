"""A stand-in manager for proxy benchmarks: ``FakeManager`` behind the real
AMP commands on a Unix socket (``pixelated_dispatcher.testing.fake_manager_server``),
with users whose agents run at fixed addresses. It keeps the manager
(argon2, SQLite, process start) out of the figures: with the session cache the
proxy asks the manager about once per 30 seconds per session anyway.

    python bench/proxy_bench_manager.py SOCKET USERNAME PASSWORD AGENT_PORT \
        [USERNAME PASSWORD AGENT_PORT ...]
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import reactor  # noqa: E402

from pixelated_dispatcher.protocol import AgentAddress  # noqa: E402
from pixelated_dispatcher.testing.fake_manager import FakeManager  # noqa: E402
from pixelated_dispatcher.testing.fake_manager_server import (  # noqa: E402
    FakeManagerResponder, ManagerSocket)


def main() -> None:
    path, users = sys.argv[1], sys.argv[2:]
    manager = FakeManager()
    for i in range(0, len(users) - 2, 3):
        username, password, port = users[i:i + 3]
        manager.add_user(username, password)
        manager.place_agent(username, AgentAddress("127.0.0.1", int(port)))
    if os.path.exists(path):
        os.unlink(path)
    ManagerSocket(reactor, path, FakeManagerResponder(manager)).start(mode=0o600)
    reactor.run()


if __name__ == "__main__":
    main()
