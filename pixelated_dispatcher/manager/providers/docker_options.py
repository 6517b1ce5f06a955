"""The manager's ``--provider docker`` options, and the provider built from them.

The manager tap adds :data:`DOCKER_OPT_PARAMETERS` to its options and calls
:func:`make_docker_provider` when ``--provider docker`` is given. The tap's own
``--agent-command`` (a command line with ``{port}``, ``{data_dir}`` and
``{username}``) replaces the image's command when given, and
``--agent-stop-grace`` is Docker's stop timeout.
"""
import ipaddress
import os
import re
import shlex
from typing import Any, Callable, Mapping, Optional, TypeVar

from twisted.python import usage

from .agent_ports import DEFAULT_AGENT_PORTS, PortRange
from .docker import DockerAgentSettings, DockerProvider
from .docker_engine import DEFAULT_DOCKER_HOST, DockerEngine, check_docker_host
from .loopback_guard import MODES, LoopbackGuard

N = TypeVar("N", bound=float)

DOCKER_OPT_PARAMETERS = [
    ["docker-host", None, None,
     "Docker engine address, unix:///path/docker.sock or tcp://HOST:PORT"
     " (default: $DOCKER_HOST, else %s)." % DEFAULT_DOCKER_HOST],
    ["agent-image", None, "pixelated/pixelated-user-agent",
     "Docker image of the agent (pulled when missing)."],
    ["agent-memory", None, "512m",
     "Memory limit of each agent (e.g. 512m, 1g): its container, or its cgroup with the"
     " process provider (0: none)."],
    ["agent-pids", None, "256",
     "Process limit of each agent (container, or cgroup with the process provider)."],
    ["agent-cpu-shares", None, "1024",
     "CPU share of each agent under contention, relative to the others' (Docker's"
     " --cpu-shares; 1024 is normal; a cgroup's cpu.shares or cpu.weight with the"
     " process provider)."],
    ["agent-user", None, "65534:65534",
     "Numeric UID:GID the agent runs as inside its container (not root)."],
    ["agent-port", None, "4567", "Port the agent listens on inside its container."],
    ["agent-data-mount", None, "/mnt/user",
     "Where the user's data directory appears inside the container."],
    ["agent-start-timeout", None, "60",
     "Seconds an agent may take to answer HTTP before its start fails."],
    ["docker-instance", None, "pixelated-agent",
     "Prefix of the agent containers' names and value of their"
     " org.pixelated.dispatcher label; give each dispatcher sharing one engine its own."],
    ["docker-network", None, None,
     "Docker network of the agents, made if missing with inter-container traffic off"
     " (default: <docker-instance>-net)."],
    ["docker-network-subnet", None, None,
     "IPv4 subnet for that network when the manager makes it, e.g. 10.99.0.0/24"
     " (default: Docker chooses)."],
    ["docker-loopback-guard", None, "auto",
     "Drop packets for 127.0.0.0/8 that arrive from the network (iptables raw table):"
     " auto (for Docker < 28, which lets them reach published ports), on, or off."],
]

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse_memory(text: str) -> int:
    """Docker's memory notation (``512m``, ``1g``, ``300000000``) in bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([bkmg]?)b?\s*", str(text).lower())
    if not match:
        raise ValueError("not a memory size")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _number(config: Mapping[str, Any], key: str, convert: Callable[[Any], N],
            minimum: float) -> N:
    try:
        value = convert(config[key])
    except (TypeError, ValueError):
        raise usage.UsageError("--%s must be a number, not %r" % (key, config[key]))
    if value < minimum:
        raise usage.UsageError("--%s must be at least %s" % (key, minimum))
    return value


def settings_from_config(config: Mapping[str, Any]) -> DockerAgentSettings:
    """Validated :class:`DockerAgentSettings` from the parsed options."""
    try:
        memory = parse_memory(config["agent-memory"])
    except ValueError:
        raise usage.UsageError("--agent-memory must be a size like 512m or 1g, not %r"
                               % (config["agent-memory"],))
    if memory < 6 * 1024 * 1024:
        raise usage.UsageError("--agent-memory must be at least 6m (Docker's minimum)")
    user = str(config["agent-user"])
    if not re.fullmatch(r"\d+:\d+", user):
        raise usage.UsageError("--agent-user must be numeric UID:GID, not %r" % (user,))
    if user.split(":")[0] == "0":
        raise usage.UsageError("--agent-user must not be root (UID 0)")
    port = _number(config, "agent-port", int, 1)
    if port > 65535:
        raise usage.UsageError("--agent-port must be a TCP port (1-65535)")
    mount = config["agent-data-mount"]
    if not mount.startswith("/") or ":" in mount or mount.rstrip("/") == "":
        raise usage.UsageError("--agent-data-mount must be an absolute path other than /")
    image = (config["agent-image"] or "").strip()
    if not image or any(c.isspace() for c in image):
        raise usage.UsageError("--agent-image must name an image")
    command = config.get("agent-command")
    if command is not None:
        try:
            words = shlex.split(command)
            [w.format(port=1, data_dir="d", username="u") for w in words]
        except (ValueError, KeyError, IndexError) as error:
            raise usage.UsageError("--agent-command is not a valid command line: %s" % error)
        if not words:
            raise usage.UsageError("--agent-command is empty")
    instance = config.get("docker-instance") or "pixelated-agent"
    if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}", instance):
        raise usage.UsageError("--docker-instance must be letters, digits, '.', '_' or '-'")
    network = config.get("docker-network") or None
    if network is not None and not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}", network):
        raise usage.UsageError("--docker-network must be letters, digits, '.', '_' or '-'")
    subnet = config.get("docker-network-subnet") or None
    if subnet is not None:
        try:
            subnet = str(ipaddress.IPv4Network(subnet))
        except ValueError as error:
            raise usage.UsageError("--docker-network-subnet: %s" % (error,))
    host_ports = config.get("agent-port-range") or DEFAULT_AGENT_PORTS
    if not isinstance(host_ports, PortRange):
        try:
            host_ports = PortRange.parse(host_ports)
        except ValueError as error:
            raise usage.UsageError("--agent-port-range: %s" % (error,))
    return DockerAgentSettings(
        image=image, memory=memory, instance=instance,
        network=network, network_subnet=subnet, host_ports=host_ports,
        pids=_number(config, "agent-pids", int, 1),
        cpu_shares=_number(config, "agent-cpu-shares", int, 2),
        user=user, port=port, data_mount=mount.rstrip("/"),
        start_timeout=_number(config, "agent-start-timeout", float, 1),
        command=command,
        stop_grace=float(config.get("agent-stop-grace") or 10.0))


def docker_host_from(config: Mapping[str, Any],
                     environ: Optional[Mapping[str, str]] = None) -> str:
    environ = os.environ if environ is None else environ
    host = config.get("docker-host") or environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
    try:
        return check_docker_host(host)
    except ValueError as error:
        raise usage.UsageError(str(error))


def make_docker_provider(reactor: Any, config: Mapping[str, Any],
                         environ: Optional[Mapping[str, str]] = None,
                         firewall: Optional[Any] = None) -> DockerProvider:
    """The docker provider for the parsed manager options (usage.UsageError if invalid)."""
    settings = settings_from_config(config)
    host = docker_host_from(config, environ)
    mode = config.get("docker-loopback-guard") or "auto"
    if mode not in MODES:
        raise usage.UsageError("--docker-loopback-guard must be one of: " + ", ".join(MODES))
    return DockerProvider(reactor, DockerEngine(reactor, host), settings,
                          loopback_guard=LoopbackGuard(reactor, mode), firewall=firewall)
