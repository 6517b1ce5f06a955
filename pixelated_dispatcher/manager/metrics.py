"""Prometheus metrics of the manager, served only when ``--metrics`` is given.

Each manager has its own registry (no process-global state, so tests can run
several managers). Names follow Prometheus conventions with the prefix
``pixelated_``. Nothing here ever carries a password, a token or a user name
as a label (user names would make the series unbounded).
"""
from typing import Callable, Dict, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from twisted.web.resource import IResource


def _failure_kind(reason: str) -> str:
    """A bounded label for why a start failed."""
    text = reason.lower()
    for needle, kind in (("capacity", "capacity"), ("did not answer", "timeout"),
                         ("timed out", "timeout"), ("timeout", "timeout"),
                         ("exited", "exited"), ("signal", "killed"),
                         ("image", "image"), ("engine", "engine")):
        if needle in text:
            return kind
    return "other"


class _AgentStates:
    """Collects the number of agents in each state when scraped."""

    def __init__(self, counts: Callable[[], Dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("pixelated_agents", "Agents by state", labels=["state"])
        for state, count in sorted(self._counts().items()):
            family.add_metric([state], count)
        yield family


class _AgentsPerNode:
    """Collects the running agents on each cluster node when scraped (node
    names are bounded by the cluster's size, unlike user names)."""

    def __init__(self, counts: Callable[[], Dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("pixelated_agents_per_node", "Running agents by node",
                                   labels=["node"])
        for node, count in sorted(self._counts().items()):
            family.add_metric([node], count)
        yield family


class ManagerMetrics:

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.logins = Counter("pixelated_logins", "Login attempts by outcome",
                              ["outcome"], registry=self.registry)
        self.starts = Counter("pixelated_agent_starts", "Agent starts that succeeded",
                              registry=self.registry)
        self.start_seconds = Histogram(
            "pixelated_agent_start_seconds", "Time from start request to a serving agent",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120), registry=self.registry)
        self.start_failures = Counter("pixelated_agent_start_failures",
                                      "Agent starts that failed, by kind", ["kind"],
                                      registry=self.registry)
        self.culls = Counter("pixelated_agent_culls", "Agents stopped for idleness",
                             registry=self.registry)

    def watch_states(self, counts: Callable[[], Dict[str, int]]) -> None:
        self.registry.register(_AgentStates(counts))

    def watch_nodes(self, counts: Callable[[], Dict[str, int]]) -> None:
        self.registry.register(_AgentsPerNode(counts))

    def login(self, outcome: str) -> None:
        """``outcome``: ok, failed or rate_limited."""
        self.logins.labels(outcome).inc()

    def started(self, seconds: float) -> None:
        self.starts.inc()
        self.start_seconds.observe(seconds)

    def start_failed(self, reason: str) -> None:
        self.start_failures.labels(_failure_kind(reason)).inc()

    def culled(self) -> None:
        self.culls.inc()

    def resource(self) -> IResource:
        """A twisted.web resource serving the metrics in the text format."""
        from prometheus_client.twisted import MetricsResource
        return MetricsResource(registry=self.registry)
