"""Where a user's agent runs on a swarm: chosen once, then kept.

A user's data lives on the node where their agent first ran (the data
directory is a bind mount on that node), so the node is chosen once -- the
node with the fewest running agents among the ready, active nodes carrying the
agent label -- and recorded in a small JSON file of the manager's state. Every
later start goes to the recorded node or fails clearly; moving a user's data
to another node is not supported (``pixelated-ctl move`` says so).
"""
import json
import os
from typing import Dict, Iterable, List, Mapping, Optional

import attr


class PlacementError(Exception):
    """No node can run the agent now; ``str()`` says why, for the operator."""


@attr.s(frozen=True, auto_attribs=True)
class NodeView:
    """What placement needs to know of a swarm node."""
    id: str
    hostname: str
    address: str
    state: str
    availability: str
    labels: Mapping[str, str]

    @classmethod
    def from_json(cls, node: dict) -> "NodeView":
        spec = node.get("Spec") or {}
        status = node.get("Status") or {}
        address = status.get("Addr") or ""
        if address in ("", "0.0.0.0"):
            # a manager may report 0.0.0.0; its advertised manager address is right
            manager = (node.get("ManagerStatus") or {}).get("Addr") or ""
            address = manager.rpartition(":")[0] or address
        return cls(id=node["ID"], hostname=(node.get("Description") or {}).get("Hostname", ""),
                   address=address, state=status.get("State", "unknown"),
                   availability=spec.get("Availability", "active"),
                   labels=dict(spec.get("Labels") or {}))

    @property
    def usable(self) -> bool:
        return self.state == "ready" and self.availability == "active"

    def describe(self) -> str:
        return "%s (%s)" % (self.hostname or self.id, self.id[:12])


def parse_label(text: str) -> "tuple[str, str]":
    """``key=value`` (the ``--swarm-node-label`` option) as a pair; ValueError if not."""
    key, eq, value = str(text).partition("=")
    if not eq or not key.strip() or any(c.isspace() for c in text):
        raise ValueError("a node label is key=value, not %r" % (text,))
    return key, value


def choose_node(nodes: Iterable[NodeView], running: Mapping[str, int],
                label: "tuple[str, str]", refused: Optional[Mapping[str, str]] = None) -> NodeView:
    """The usable node with ``label`` that runs the fewest agents (ties: by host name).

    ``refused``: ``{node id: why}`` of nodes that must not get agents now
    (their firewall let a probe through, :mod:`.swarm_firewall`)."""
    key, value = label
    refused = refused or {}
    candidates: List[NodeView] = [n for n in nodes if n.labels.get(key) == value]
    usable = [n for n in candidates if n.usable and n.id not in refused]
    if not usable and any(n.usable for n in candidates):
        raise PlacementError("no swarm node with the label %s=%s may run agents now: %s"
                             % (key, value, "; ".join(refused[n.id] for n in candidates
                                                      if n.usable and n.id in refused)))
    if not usable:
        if not candidates:
            raise PlacementError(
                "no swarm node carries the label %s=%s: label the nodes that may run agents"
                " (docker node update --label-add %s=%s NODE)" % (key, value, key, value))
        raise PlacementError("no swarm node with the label %s=%s is ready and active (%s)"
                             % (key, value, ", ".join("%s: %s/%s" % (n.describe(), n.state,
                                                                      n.availability)
                                                      for n in candidates)))
    return min(usable, key=lambda n: (running.get(n.id, 0), n.hostname, n.id))


def recorded_node(nodes: Iterable[NodeView], node_id: str, username: str) -> NodeView:
    """The node recorded for ``username``, if it can run the agent now."""
    for node in nodes:
        if node.id == node_id:
            if node.state != "ready":
                raise PlacementError(
                    "the node %s that holds the data of %s is %s; the agent starts again"
                    " once the node is back" % (node.describe(), username, node.state))
            if node.availability != "active":
                raise PlacementError(
                    "the node %s that holds the data of %s is %s (docker node update"
                    " --availability active makes it take agents again)"
                    % (node.describe(), username, node.availability))
            return node
    raise PlacementError(
        "the node %s that holds the data of %s has left the swarm; moving a user's data"
        " to another node is not supported (docs/cluster.rst)" % (node_id[:12], username))


class PlacementBook:
    """``{username: node id}`` in a JSON file (written atomically, mode 0600).

    The file is tiny (one entry per user who ever had an agent) and written
    only when a user's first agent is placed.
    """

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self._nodes: Dict[str, str] = {}
        if path is not None and os.path.exists(path):
            with open(path) as f:
                loaded = json.load(f)
            if not isinstance(loaded, dict):
                raise ValueError("%s is not a placement record" % path)
            self._nodes = {str(k): str(v) for k, v in loaded.items()}

    def get(self, username: str) -> Optional[str]:
        return self._nodes.get(username)

    def record(self, username: str, node_id: str) -> None:
        self._nodes[username] = node_id
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        temporary = self.path + ".new"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._nodes, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.path)

    def forget(self, username: str) -> None:
        """Undo a placement that never held data (its first start failed)."""
        if self._nodes.pop(username, None) is not None:
            self._write()

    def counts(self) -> Dict[str, int]:
        """How many users each node holds the data of."""
        found: Dict[str, int] = {}
        for node_id in self._nodes.values():
            found[node_id] = found.get(node_id, 0) + 1
        return found
