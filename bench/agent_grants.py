"""What the proxy's agent grants cost: the manager's ``AgentGrants`` on a
real nftables table (needs root and nft; the table is removed at the end).

    .venv/bin/python -m bench.agent_grants [--agents 50] [--repeat 20]

Prints the mean time of a first grant (one ``nft`` call, what the first
request for an agent after a login waits for), of a grant of an agent
granted already (what every later request costs: no ``nft`` call), and of a
revocation (what a logout, ``passwd`` or ``logout NAME`` waits for).
"""
import argparse
import subprocess
import time
import uuid

from twisted.internet import defer, task

from pixelated_dispatcher.manager.agent_firewall import NftablesFirewall, table_name_for
from pixelated_dispatcher.manager.agent_grants import AgentGrants
from pixelated_dispatcher.manager.providers.interface import RunningAgent
from pixelated_dispatcher.protocol import AgentAddress


async def measure(reactor, agents: int, repeat: int) -> None:
    name = table_name_for("/bench/" + uuid.uuid4().hex)
    firewall = NftablesFirewall(reactor, name, 3990102, "pixelated bench")
    try:
        await firewall.start()
        grants = AgentGrants(firewall)
        running = [RunningAgent("user%d" % i, AgentAddress("127.0.0.1", 21000 + i), 0, 1.0)
                   for i in range(agents)]
        for agent in running:
            await firewall.protect("127.0.0.1", agent.address.port)
        began = time.perf_counter()
        for agent in running:
            await grants.grant(agent)
        first = (time.perf_counter() - began) / agents
        began = time.perf_counter()
        for _ in range(repeat):
            for agent in running:
                await grants.grant(agent)
        again = (time.perf_counter() - began) / (agents * repeat)
        began = time.perf_counter()
        for agent in running:
            await grants.revoke(agent.username)
        revoke = (time.perf_counter() - began) / agents
        print("%d agents: first grant %.1f ms, granted already %.1f us, revocation %.1f ms"
              % (agents, first * 1e3, again * 1e6, revoke * 1e3))
    finally:
        subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=20)
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(
        measure(reactor, arguments.agents, arguments.repeat)))


if __name__ == "__main__":
    main()
