"""Which host port an agent gets: a dedicated range, and a quarantine.

Both providers (the process provider's agents, the Docker provider's
published ports) choose ports here, so the policy has one home:

* **A range of their own** (``--agent-port-range``, default 20000-29999),
  outside the kernel's range of ephemeral ports
  (``/proc/sys/net/ipv4/ip_local_port_range``, 32768-60999 on Linux): no
  outgoing connection of any program is ever given an agent's port by the
  kernel, so the agents' ports are a set the operator can name (and
  firewall), and a squatter must bind one deliberately.
* **Random within it**, tried with a bind before it is handed out.
* **Quarantine**: a port another user's agent gave up less than
  :data:`PORT_QUARANTINE` seconds ago is not handed out. The proxy caches
  each user's agent address until the manager's AgentStopped push reaches
  it (milliseconds, and a proxy that loses the manager forgets every
  address): were the port reused at once, a request of the stopped agent's
  user could reach the new agent of someone else in between. (Docker used to
  pick published ports itself, round-robin over its whole range and from the
  beginning again after a restart of dockerd; now the manager picks them
  here too.)
"""
import errno
import random
import socket
from typing import AbstractSet, Callable, Dict, Optional, Set, Tuple

import attr
from twisted.internet.interfaces import IReactorTime

#: Seconds during which a port an agent gave up is not handed to another
#: user's agent (see the module docstring).
PORT_QUARANTINE = 600.0

#: where Linux says which ports it hands out for outgoing connections
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"

#: how many random ports a choice tries before it gives up
CHOICE_ATTEMPTS = 64


class NoFreePort(Exception):
    """Every port tried was taken or quarantined."""


@attr.s(frozen=True, auto_attribs=True)
class PortRange:
    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> "PortRange":
        """``"20000-29999"`` → PortRange(20000, 29999); unprivileged ports only."""
        try:
            first, last = (int(part) for part in str(text).split("-", 1))
        except ValueError:
            raise ValueError("a port range looks like 20000-29999, not %r" % (text,))
        if not 1024 <= first <= last <= 65535:
            raise ValueError("the port range %r must lie within 1024-65535" % (text,))
        return cls(first, last)

    def __contains__(self, port: int) -> bool:
        return self.first <= port <= self.last

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return "%d-%d" % (self.first, self.last)

    def overlaps(self, other: "PortRange") -> bool:
        return self.first <= other.last and other.first <= self.last


DEFAULT_AGENT_PORTS = PortRange(20000, 29999)


def ephemeral_port_range(path: str = EPHEMERAL_RANGE_FILE) -> Optional[PortRange]:
    """The kernel's range of ports for outgoing connections (None if unknown)."""
    try:
        with open(path) as f:
            first, last = (int(word) for word in f.read().split())
    except (OSError, ValueError):
        return None
    return PortRange(first, last)


def check_outside_ephemeral(ports: PortRange, path: str = EPHEMERAL_RANGE_FILE) -> None:
    """ValueError (one sentence for the operator) if ``ports`` overlaps the
    kernel's ephemeral ports."""
    ephemeral = ephemeral_port_range(path)
    if ephemeral is not None and ports.overlaps(ephemeral):
        raise ValueError(
            "the agent port range %s overlaps the ports Linux gives to outgoing connections"
            " (%s, %s); choose a range outside it, e.g. 20000-29999" % (ports, ephemeral, path))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can be bound now (as agents bind: SO_REUSEADDR,
    so a closed connection in TIME_WAIT does not count as taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


@attr.s(auto_attribs=True, eq=False)
class PortAllocator:
    """Chooses agents' ports from ``ports`` (see the module docstring).

    :param clock: ``seconds()`` gives the time (the reactor).
    :param is_free: ``is_free(port)``: may the port be handed out now
        (the Docker provider with a remote engine cannot know).
    """
    clock: IReactorTime
    ports: PortRange = DEFAULT_AGENT_PORTS
    quarantine: float = PORT_QUARANTINE
    is_free: Callable[[int], bool] = port_is_free
    _random: random.Random = attr.ib(factory=random.SystemRandom)
    #: port -> (user, when) of the ports agents gave up
    _released: Dict[int, Tuple[str, float]] = attr.ib(init=False, factory=dict)

    def choose(self, username: str, busy: AbstractSet[int] = frozenset()) -> int:
        """A port for ``username``'s agent: in the range, not in ``busy``
        (ports of the caller's other agents), not quarantined for this user,
        free a moment ago; NoFreePort after CHOICE_ATTEMPTS tries."""
        excluded = set(busy) | self.quarantined(username)
        for _ in range(CHOICE_ATTEMPTS):
            port = self._random.randint(self.ports.first, self.ports.last)
            if port not in excluded and self.is_free(port):
                return port
            excluded.add(port)
        raise NoFreePort("no free port for the agent of %s in %s after %d tries (%d in"
                         " quarantine): widen --agent-port-range"
                         % (username, self.ports, CHOICE_ATTEMPTS, len(self._released)))

    def released(self, port: int, username: str) -> None:
        """``username``'s agent gave ``port`` up (it ended): quarantine it."""
        self._released[port] = (username, self.clock.seconds())

    def quarantined(self, username: str) -> Set[int]:
        """Ports that agents of users other than ``username`` gave up less
        than ``quarantine`` seconds ago (older entries are dropped)."""
        since = self.clock.seconds() - self.quarantine
        for port, (_, when) in list(self._released.items()):
            if when <= since:
                del self._released[port]
        return {port for port, (user, _) in self._released.items() if user != username}
