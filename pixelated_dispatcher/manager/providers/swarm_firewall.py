"""Only the proxy host reaches agent ports: the swarm provider's check of a node's firewall.

A task's port is published in host mode on every address of its node; the
node set-up step 4 of ``docs/cluster.rst`` adds a ``DOCKER-USER`` rule that
refuses connections to published ports from anyone but the proxy host. The
manager cannot read a node's rules, so it tries what an intruder would: once
an agent on a node answers, a one-shot task on *another* node (a normal
bridge network; its connections leave that node with the node's address,
which is not the proxy host's) opens a TCP connection to the agent's
``NODE:PORT``.

Why another node: a container on the agent's own node never passes the
node's ``DOCKER-USER`` chain on its way to a published port (Docker sends
traffic from its own bridges to the published port through ``docker-proxy``
on the node, not through the forwarding path the rule sits in), so a probe
there connects whether the rule exists or not -- tried on a real swarm.

The probe's exit status says what it saw (see :data:`PROBE_SCRIPT`): the
agent answered (the node is *unsafe*: its agent is stopped and nothing runs
there until a recheck finds it refused), the connection was refused (safe),
no answer within 3 s (safe: something drops it, e.g. a firewall outside the
node), or the image has no ``nc``. Verdicts are kept per node for
``recheck`` seconds (then a node running agents is probed again in the
background, any other at its next start) and forgotten at a manager restart.
"""
import errno
import socket
from typing import Callable, Dict, Iterable, List, Mapping, Optional

import attr

from .swarm_placement import NodeView

#: exit statuses of :data:`PROBE_SCRIPT`
REACHED, REFUSED, NO_ANSWER, NO_NC = 10, 11, 12, 13
#: seconds the probe waits for the connection
CONNECT_TIMEOUT = 3
#: ``sh -c PROBE_SCRIPT HOST PORT``: needs ``sh`` and an ``nc`` with ``-w``
#: (busybox, netcat-openbsd and netcat-traditional all say "refused")
PROBE_SCRIPT = (
    "command -v nc >/dev/null || exit %d; "
    "r=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w %d \"$0\" \"$1\" 2>&1); "
    "case \"$r\" in HTTP/*) exit %d;; *[Rr]efused*) exit %d;; esac; exit %d"
    % (NO_NC, CONNECT_TIMEOUT, REACHED, REFUSED, NO_ANSWER))
#: where the operator reads what to do
SET_UP_STEP = "docs/cluster.rst, set-up step 4"


def probe_command(host: str, port: int) -> List[str]:
    """The probe task's command: connect to ``host:port``."""
    return ["sh", "-c", PROBE_SCRIPT, host, str(port)]


class FirewallCheckError(Exception):
    """The check could not be made; ``str()`` says why, for the operator."""


def unsafe_reason(node: NodeView, prober: NodeView, host: str, port: int) -> str:
    return ("node %s lets hosts other than the proxy host reach agent ports: a probe from"
            " node %s (%s) connected to an agent at %s:%d. Add the DOCKER-USER rule of %s"
            " on that node; no agent runs there until a recheck finds the port refused"
            % (node.describe(), prober.describe(), prober.address, host, port, SET_UP_STEP))


def could_not_check(node: NodeView, why: str) -> FirewallCheckError:
    return FirewallCheckError(
        "cannot check that only the proxy host reaches agent ports on node %s: %s (%s;"
        " --swarm-skip-firewall-check turns the check off)" % (node.describe(), why,
                                                               SET_UP_STEP))


def is_local_address(address: str) -> bool:
    """Whether ``address`` is one of this host's (the proxy host's) addresses:
    a socket can be bound to it."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError as error:
        if error.errno in (errno.EADDRNOTAVAIL, errno.EINVAL, errno.EAFNOSUPPORT):
            return False
        raise
    return True


def probers(nodes: Iterable[NodeView], target: NodeView, label: "tuple[str, str]",
            is_local: Callable[[str], bool] = is_local_address) -> List[NodeView]:
    """The nodes a probe of ``target`` may run on, best first: ready, active,
    not ``target``, not the proxy host (its connections would be allowed);
    labelled nodes first (they have the agent image), then by host name and id."""
    key, value = label
    candidates = [n for n in nodes
                  if n.usable and n.id != target.id and n.address and not is_local(n.address)]
    return sorted(candidates, key=lambda n: (n.labels.get(key) != value, n.hostname, n.id))


@attr.s(frozen=True, auto_attribs=True)
class Verdict:
    safe: bool
    reason: str
    at: float


class FirewallVerdicts:
    """What the last check of each node found, for ``recheck`` seconds."""

    def __init__(self, recheck: float) -> None:
        self.recheck = recheck
        self._verdicts: Dict[str, Verdict] = {}

    def _current(self, node_id: str, now: float) -> Optional[Verdict]:
        verdict = self._verdicts.get(node_id)
        if verdict is not None and now - verdict.at >= self.recheck:
            del self._verdicts[node_id]
            return None
        return verdict

    def needs_check(self, node_id: str, now: float) -> bool:
        return self._current(node_id, now) is None

    def unsafe(self, now: float) -> Mapping[str, str]:
        """``{node id: reason}`` of the nodes found unsafe (and not yet due a recheck)."""
        return {node_id: verdict.reason for node_id, verdict in list(self._verdicts.items())
                if not verdict.safe and self._current(node_id, now) is not None}

    def record(self, node_id: str, safe: bool, reason: str, now: float) -> None:
        self._verdicts[node_id] = Verdict(safe, reason, now)

    def forget_safe(self, ready: Iterable[str]) -> None:
        """Keep "safe" only for the ``ready`` nodes: the rule of a node that went
        down or left may not have survived (a reboot without a persistent rule)."""
        keep = set(ready)
        for node_id, verdict in list(self._verdicts.items()):
            if verdict.safe and node_id not in keep:
                del self._verdicts[node_id]
