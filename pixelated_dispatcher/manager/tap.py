"""``twistd pixelated-manager``: options, and the wiring of the manager's services.

Only wiring lives here: the domain is in ``service.Manager``, the socket
protocol in ``amp_server``, agents in ``providers``.
"""
import os
import shlex
import socket

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.python import usage

from .amp_server import ManagerAMPFactory
from .passwords import PRODUCTION
from .service import Manager

from .providers.process import DEMO_AGENT_COMMAND as DEFAULT_AGENT_COMMAND

PROVIDERS = ("process", "docker")


def _default_leap_provider() -> str:
    """The machine's domain (``mail.example.org`` → ``example.org``)."""
    fqdn = socket.getfqdn()
    return fqdn.split(".", 1)[1] if "." in fqdn else fqdn


def _docker_parameters(exclude):
    """The docker provider's options, less those the manager defines itself."""
    from .providers.docker_options import DOCKER_OPT_PARAMETERS
    return [option for option in DOCKER_OPT_PARAMETERS if option[0] not in exclude]


class Options(usage.Options):
    optParameters = [
        ["socket", None, "/run/pixelated/manager.sock",
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
         "Seconds an agent has to answer HTTP after its start.", float],
        ["agent-stop-grace", None, 10.0, "Seconds between SIGTERM and SIGKILL.", float],
    ]
    optParameters += _docker_parameters(exclude={option[0] for option in optParameters})

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
        if self["leap-provider"] is None:
            self["leap-provider"] = _default_leap_provider()
        self["state-dir"] = os.path.abspath(self["state-dir"])
        self["socket"] = os.path.abspath(self["socket"])


def make_provider(reactor, options):
    if options["provider"] == "docker":
        from .providers.docker_options import make_docker_provider
        return make_docker_provider(reactor, options)
    from .providers.process import ProcessProvider
    return ProcessProvider(reactor, options["agent-command"] or DEFAULT_AGENT_COMMAND,
                           start_timeout=options["agent-start-timeout"],
                           stop_grace=options["agent-stop-grace"])


def makeService(options, reactor=None, hash_parameters=PRODUCTION):
    if reactor is None:
        from twisted.internet import reactor
    top = MultiService()
    manager = Manager(reactor, options["state-dir"], make_provider(reactor, options),
                      options["leap-provider"], hash_parameters)
    manager.setServiceParent(top)
    socket_dir = os.path.dirname(options["socket"])
    if not os.path.isdir(socket_dir):
        os.makedirs(socket_dir, mode=0o750)
    endpoint = UNIXServerEndpoint(reactor, options["socket"], mode=0o660, wantPID=True)
    listener = StreamServerEndpointService(endpoint, ManagerAMPFactory(manager))
    listener._raiseSynchronously = True
    listener.setServiceParent(top)
    return top
