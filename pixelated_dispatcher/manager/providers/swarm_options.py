"""The manager's ``--provider swarm`` options, and the provider built from them.

Every ``--agent-*`` and ``--docker-*`` option of the docker provider means the
same here (:func:`.docker_options.settings_from_config` reads them); the
swarm adds placement, a CPU limit, the poll interval and the firewall check.
"""
import os
from typing import Any, Mapping, Optional

from twisted.python import usage

from .docker_engine import DockerEngine
from .docker_options import docker_host_from, settings_from_config
from .swarm import SwarmProvider, SwarmSettings
from .swarm_placement import PlacementBook, parse_label

SWARM_OPT_PARAMETERS = [
    ["swarm-node-label", None, "pixelated.agents=true",
     "swarm provider: agents are placed only on nodes carrying this label (key=value)."],
    ["agent-cpus", None, "1", "swarm provider: CPU limit of each agent (cores, e.g. 0.5)."],
    ["swarm-poll-interval", None, "2",
     "swarm provider: seconds between looks at nodes and tasks (swarm has no task"
     " events); an agent on a node that died is reported stopped within this plus the"
     " swarm's heartbeat period."],
    ["swarm-firewall-recheck", None, "300",
     "swarm provider: seconds a node's firewall check result is kept; then a node"
     " running agents is checked again, any other at its next agent start (a manager"
     " restart forgets them all)."],
]

SWARM_OPT_FLAGS = [
    ["swarm-skip-firewall-check", None,
     "swarm provider: do not check that only the proxy host reaches agent ports on each"
     " node (a probe from another node, docs/cluster.rst step 4). Only for sites that"
     " filter those ports elsewhere: keeping other hosts out is then their job."],
]

#: the placement record, in the manager's state directory
PLACEMENT_FILE = "swarm-placement.json"


def swarm_settings_from_config(config: Mapping[str, Any]) -> SwarmSettings:
    try:
        label = parse_label(config["swarm-node-label"])
    except ValueError as error:
        raise usage.UsageError("--swarm-node-label: %s" % error)
    numbers = {}
    for key, minimum in (("agent-cpus", 0.01), ("swarm-poll-interval", 0.1),
                         ("swarm-firewall-recheck", 0.0)):
        try:
            numbers[key] = float(config[key])
        except (TypeError, ValueError):
            raise usage.UsageError("--%s must be a number, not %r" % (key, config[key]))
        if numbers[key] < minimum:
            raise usage.UsageError("--%s must be at least %s" % (key, minimum))
    return SwarmSettings(node_label=label, cpus=numbers["agent-cpus"],
                         poll_interval=numbers["swarm-poll-interval"],
                         firewall_check=not config.get("swarm-skip-firewall-check"),
                         firewall_recheck=numbers["swarm-firewall-recheck"])


def make_swarm_provider(reactor: Any, config: Mapping[str, Any],
                        environ: Optional[Mapping[str, str]] = None) -> SwarmProvider:
    """The swarm provider for the parsed manager options (usage.UsageError if invalid)."""
    settings = settings_from_config(config)
    swarm = swarm_settings_from_config(config)
    host = docker_host_from(config, environ)
    path = os.path.join(config["state-dir"], PLACEMENT_FILE)
    try:
        book = PlacementBook(path)
    except (OSError, ValueError) as error:
        raise usage.UsageError("cannot read the swarm placement record %s: %s" % (path, error))
    return SwarmProvider(reactor, DockerEngine(reactor, host), settings, swarm,
                         placements=book,
                         keep_on_close=not config.get("stop-agents-on-exit"))
