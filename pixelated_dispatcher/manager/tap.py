"""``twistd pixelated-manager``: options, and the wiring of the manager's services.

Only wiring lives here: the domain is in ``service.Manager``, the socket
protocol in ``amp_server``, who may do what in ``peer_policy``, agents in
``providers``.
"""
import os
import shlex
import socket
from typing import Any, Callable, Collection, List, Optional, TypeVar

from twisted.application.internet import StreamServerEndpointService
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from ..protocol import DEFAULT_SOCKET
from .agent_accounts import UidRange
from .agent_firewall import MODES as FIREWALL_MODES, IAgentFirewall, NoFirewall, make_firewall
from .amp_server import ManagerAMPFactory
from .culler import AGENT_IDLE_TIMEOUT
from .passwords import PRODUCTION, HashParameters
from .peer_policy import PeerPolicy, group_id
from .providers.agent_ports import DEFAULT_AGENT_PORTS, PortRange, check_outside_ephemeral
from .providers.interface import IAgentProvider
from .providers.process import DEMO_AGENT_COMMAND as DEFAULT_AGENT_COMMAND
from .service import Manager, ManagerSettings
from .sessions import SESSION_IDLE_TIMEOUT, SESSION_MAX_AGE

N = TypeVar("N", bound=float)

log = Logger()

PROVIDERS = ("process", "docker", "swarm")


def _default_leap_provider() -> str:
    """The machine's domain (``mail.example.org`` → ``example.org``)."""
    fqdn = socket.getfqdn()
    return fqdn.split(".", 1)[1] if "." in fqdn else fqdn


def _docker_parameters(exclude: Collection[str]) -> List[List[Any]]:
    """The docker provider's options, less those the manager defines itself."""
    from .providers.docker_options import DOCKER_OPT_PARAMETERS
    from .providers.swarm_options import SWARM_OPT_PARAMETERS
    return [option for option in DOCKER_OPT_PARAMETERS + SWARM_OPT_PARAMETERS
            if option[0] not in exclude]


def _swarm_flags() -> List[List[Any]]:
    from .providers.swarm_options import SWARM_OPT_FLAGS
    return [list(flag) for flag in SWARM_OPT_FLAGS]


def _non_negative(kind: Callable[[str], N]) -> Callable[[str], N]:
    def parse(text: str) -> N:
        value = kind(text)
        if value < 0:
            raise ValueError("must not be negative")
        return value
    parse.__name__ = kind.__name__
    return parse


class Options(usage.Options):
    optParameters: List[List[Any]] = [
        ["socket", None, DEFAULT_SOCKET,
         "Path of the AMP socket that the proxy and pixelated-ctl connect to."],
        ["state-dir", None, "/var/lib/pixelated",
         "Directory for the user database and the users' data."],
        ["provider", None, "process", "How agents run: " + " or ".join(PROVIDERS) + "."],
        ["agent-command", None, None,
         "Agent command line with {port}, {data_dir} and {username} placeholders"
         " (process provider default: the bundled demo agent)."],
        ["leap-provider", None, None,
         "LEAP provider host name given to agents (default: this machine's domain)."],
        ["agent-start-timeout", None, 60.0,
         "Seconds an agent has to answer HTTP after its start.", _non_negative(float)],
        ["agent-stop-grace", None, 10.0, "Seconds between SIGTERM and SIGKILL.",
         _non_negative(float)],
        ["agent-uid-range", None, "200000-299999",
         "Unix uids for agents (one per user; gid = uid). Used when the manager runs"
         " as root."],
        ["proxy-group", None, "pixelated-proxy",
         "Group of the socket; its members may use the proxy commands."],
        ["admin-group", None, "pixelated-admin",
         "Members of this group (and root) may use every command."],
        ["idle-timeout", None, AGENT_IDLE_TIMEOUT,
         "Stop agents unused for this many seconds (0: never).", _non_negative(float)],
        ["max-agents", None, 0, "At most this many agents at once (0: no limit).",
         _non_negative(int)],
        ["max-concurrent-starts", None, 0,
         "At most this many agent starts at once; others queue (0: no limit).",
         _non_negative(int)],
        ["session-idle-timeout", None, SESSION_IDLE_TIMEOUT,
         "End sessions unused for this many seconds.", _non_negative(float)],
        ["session-max-age", None, SESSION_MAX_AGE,
         "End sessions this many seconds after login.", _non_negative(float)],
        ["login-free-failures", None, 5,
         "Failed logins per user name and client network (/24, /64), or per client"
         " address, before the backoff starts.",
         _non_negative(int)],
        ["login-global-free-failures", None, 100,
         "Failed logins per user name from all networks before the backoff starts"
         " for that name everywhere.",
         _non_negative(int)],
        ["argon2-time-cost", None, PRODUCTION.time_cost,
         "argon2id passes for new password hashes.", _non_negative(int)],
        ["argon2-memory", None, PRODUCTION.memory_cost_kib,
         "argon2id memory (KiB) for new password hashes.", _non_negative(int)],
        ["hash-threads", None, 0,
         "Threads that hash passwords (0: one less than the CPUs, at least one).",
         _non_negative(int)],
        ["metrics", None, None,
         "Serve Prometheus metrics on this endpoint, e.g. tcp:9101:interface=127.0.0.1"
         " (default: off)."],
        ["agent-port-range", None, str(DEFAULT_AGENT_PORTS),
         "Host ports for agents (process agents' ports, Docker's published ports);"
         " must lie outside /proc/sys/net/ipv4/ip_local_port_range."],
        ["agent-firewall", None, "auto",
         "Who may connect to agents: auto (nftables when the manager is root: only root"
         " and --proxy-group), nftables, or none (every local user)."],
        ["login-backoff-max", None, 900.0,
         "Longest wait (seconds) imposed after repeated failed logins.",
         _non_negative(float)],
    ]
    optParameters += _docker_parameters(exclude={option[0] for option in optParameters})
    optFlags = [
        ["stop-agents-on-exit", None,
         "Stop every agent when the manager stops (default: leave them running; the next"
         " manager adopts them, so a restart or upgrade logs nobody out)."],
    ] + _swarm_flags()

    def postOptions(self) -> None:
        if self["provider"] not in PROVIDERS:
            raise usage.UsageError("--provider must be one of: " + ", ".join(PROVIDERS))
        if self["agent-command"] is not None:
            try:
                words = shlex.split(self["agent-command"])
            except ValueError as error:
                raise usage.UsageError("--agent-command is not a valid command line: %s" % error)
            if not words:
                raise usage.UsageError("--agent-command is empty")
            if self["provider"] == "process" and not any("{port}" in w for w in words):
                raise usage.UsageError("--agent-command needs a {port} placeholder: the"
                                       " process provider tells the agent where to listen")
        try:
            self["agent-uid-range"] = UidRange.parse(self["agent-uid-range"])
        except ValueError as error:
            raise usage.UsageError("--agent-uid-range: %s" % error)
        try:
            self["agent-port-range"] = PortRange.parse(self["agent-port-range"])
            check_outside_ephemeral(self["agent-port-range"])
        except ValueError as error:
            raise usage.UsageError("--agent-port-range: %s" % error)
        if self["agent-firewall"] not in FIREWALL_MODES:
            raise usage.UsageError("--agent-firewall must be one of: "
                                   + ", ".join(FIREWALL_MODES))
        if self["agent-firewall"] == "nftables" and os.geteuid() != 0:
            raise usage.UsageError("--agent-firewall nftables needs a manager running as root")
        if self["argon2-time-cost"] < 1 or self["argon2-memory"] < 8:
            raise usage.UsageError("argon2 needs at least one pass and 8 KiB of memory")
        if self["leap-provider"] is None:
            self["leap-provider"] = _default_leap_provider()
        self["state-dir"] = os.path.abspath(self["state-dir"])
        self["socket"] = os.path.abspath(self["socket"])


def settings_from(options: usage.Options) -> ManagerSettings:
    return ManagerSettings(
        leap_provider=options["leap-provider"],
        hash_parameters=HashParameters(options["argon2-time-cost"], options["argon2-memory"]),
        hash_threads=options["hash-threads"],
        session_idle_timeout=options["session-idle-timeout"],
        session_max_age=options["session-max-age"],
        idle_timeout=options["idle-timeout"], max_agents=options["max-agents"],
        max_concurrent_starts=options["max-concurrent-starts"],
        login_free_failures=options["login-free-failures"],
        login_global_free_failures=options["login-global-free-failures"],
        login_backoff_max=options["login-backoff-max"],
        # Root can give each user's agent (process or container) a uid of its own.
        agent_uids=options["agent-uid-range"] if os.getuid() == 0 else None)


def make_agent_firewall(reactor: Any, options: usage.Options) -> IAgentFirewall:
    """The agents' firewall: its table is named after the state directory
    (one per manager); the proxy group's sockets may connect to the agents
    the manager grants. The swarm provider's agents run on other nodes:
    none (see docs/cluster.rst)."""
    if options["provider"] == "swarm":
        return NoFirewall()
    return make_firewall(reactor, options["agent-firewall"], options["state-dir"],
                         group_id(options["proxy-group"]), os.geteuid() == 0)


def make_provider(reactor: Any, options: usage.Options,
                  firewall: Optional[IAgentFirewall] = None) -> IAgentProvider:
    """The provider of ``--provider``; process and docker agents behind
    ``firewall`` (default: :func:`make_agent_firewall`)."""
    if firewall is None:
        firewall = make_agent_firewall(reactor, options)
    if options["provider"] == "docker":
        from .providers.docker_options import make_docker_provider
        return make_docker_provider(reactor, options, firewall=firewall)
    if options["provider"] == "swarm":
        from .providers.swarm_options import make_swarm_provider
        return make_swarm_provider(reactor, options)
    from .providers.process import ProcessProvider
    return ProcessProvider(reactor, options["agent-command"] or DEFAULT_AGENT_COMMAND,
                           start_timeout=options["agent-start-timeout"],
                           stop_grace=options["agent-stop-grace"],
                           state_dir=os.path.join(options["state-dir"], "agents"),
                           keep_on_close=not options["stop-agents-on-exit"],
                           agent_ports=options["agent-port-range"], firewall=firewall,
                           cgroups=process_cgroups(options))


def process_cgroups(options: Any) -> Optional[Any]:
    """The process provider's resource limits: a cgroup per agent when the
    manager is root (without root, agents run as the manager's own user and
    nothing is limited); a host where they cannot be applied is an error,
    not a silent lack of limits."""
    from .providers.agent_cgroup import (CgroupUnavailable, find_cgroups, group_name,
                                         limits_from_config)
    try:
        limits = limits_from_config(options)
    except ValueError as error:
        raise usage.UsageError(str(error))
    if os.getuid() != 0 or not limits.any:
        return None
    try:
        return find_cgroups(limits, group_name(options["state-dir"]))
    except (CgroupUnavailable, OSError) as error:
        raise usage.UsageError("agents cannot get their resource limits: %s" % (error,))


class _ManagerSocket(StreamServerEndpointService):
    """The AMP listener; gives the socket and its directory to the proxy group."""

    def __init__(self, reactor: Any, path: str, factory: IProtocolFactory, group: str) -> None:
        super().__init__(UNIXServerEndpoint(reactor, path, mode=0o660, wantPID=True), factory)
        self._raiseSynchronously = True
        self._path = path
        self._group = group

    def privilegedStartService(self) -> None:
        directory = os.path.dirname(self._path)
        os.makedirs(directory, mode=0o750, exist_ok=True)
        os.chmod(directory, 0o750)
        super().privilegedStartService()
        gid = group_id(self._group)
        if gid is None:
            log.warn("group {group} does not exist: the socket keeps the manager's group",
                     group=self._group)
            return
        for path in (directory, self._path):
            os.chown(path, -1, gid)


def makeService(options: usage.Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    top = MultiService()
    firewall = make_agent_firewall(reactor, options)
    provider = make_provider(reactor, options, firewall)
    manager = Manager(reactor, options["state-dir"], provider,
                      settings_from(options), firewall=firewall)
    if manager.accounts is not None:
        provider.accounts = manager.accounts.account_for
    manager.setServiceParent(top)
    policy = PeerPolicy.for_groups(options["admin-group"], options["proxy-group"])
    listener = _ManagerSocket(reactor, options["socket"], ManagerAMPFactory(manager, policy),
                              options["proxy-group"])
    listener.setServiceParent(top)
    if options["metrics"]:
        metrics = strports.service(options["metrics"], Site(manager.metrics.resource()))
        metrics.setServiceParent(top)
    return top
