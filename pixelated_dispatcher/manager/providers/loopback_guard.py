"""Keep ports published on 127.0.0.1 on this machine (Docker before 28).

Docker publishes an agent's port with a DNAT rule that matches
``-d 127.0.0.1``. Before Docker 28 nothing stops a host on the same network
segment from sending packets to 127.0.0.1 through our interface: they are
DNAT-ed before the kernel's martian check and reach the agent (moby#45610;
Debian 12's docker.io 20.10 is affected). Docker 28 adds a raw-table rule
against it; for older engines the manager adds the same kind of rule itself:

    iptables -t raw -I PREROUTING ! -i lo -d 127.0.0.0/8 -j DROP

(with a comment naming us). Loopback traffic arrives on ``lo`` and is not
affected. The rule stays when the manager stops, because the containers do.
``iptables`` runs as a child process, never blocking the reactor.
"""
import functools
import re
from typing import Any, Callable, Coroutine, Optional, Tuple, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger

from .docker_engine import IDockerEngine

T = TypeVar("T")

RULE = ["PREROUTING", "!", "-i", "lo", "-d", "127.0.0.0/8",
        "-m", "comment", "--comment", "pixelated-dispatcher loopback guard", "-j", "DROP"]

MODES = ("auto", "on", "off")

#: the first Docker release that guards published loopback ports itself
FIXED_IN = 28


def _deferred(method: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., "Deferred[T]"]:
    """Coroutine methods that hand Deferreds to their (Twisted) callers."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> "Deferred[T]":
        return ensureDeferred(method(*args, **kwargs))
    return wrapper


class LoopbackGuardFailed(Exception):
    """The guard is needed but could not be installed."""


def engine_needs_guard(version: str) -> bool:
    """Whether a Docker engine of ``version`` ("20.10.24+dfsg1", "28.0.1") needs the guard."""
    match = re.match(r"\s*(\d+)", version or "")
    return match is None or int(match.group(1)) < FIXED_IN


class LoopbackGuard:
    """Installs :data:`RULE` once when the engine needs it (``mode`` auto), always
    (on), or never (off)."""

    log = Logger()

    def __init__(self, reactor: Any, mode: str = "auto", iptables: str = "iptables") -> None:
        if mode not in MODES:
            raise ValueError("loopback guard mode must be one of %s" % ", ".join(MODES))
        self.mode = mode
        self.iptables = iptables
        self.installed = False
        self.needed: Optional[bool] = None
        self._reactor = reactor

    async def _run(self, *args: str) -> Tuple[int, str]:
        out, err, code = await getProcessOutputAndValue(
            self.iptables, ["-w", "5", "-t", "raw"] + list(args),
            env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"}, reactor=self._reactor)
        return code, (err or out).decode("utf-8", "replace").strip()

    @_deferred
    async def ensure(self, engine: IDockerEngine) -> None:
        """Install the rule if this engine needs it; LoopbackGuardFailed if that fails."""
        if self.installed or self.mode == "off":
            return
        if self.mode == "auto" and self.needed is None:
            info = await engine.version()
            self.needed = engine_needs_guard(info.get("Version", ""))
            if not self.needed:
                self.log.info("Docker {version} guards published loopback ports itself",
                              version=info.get("Version"))
        if self.mode == "auto" and not self.needed:
            return
        await self.install()

    @_deferred
    async def is_installed(self) -> bool:
        try:
            code, _ = await self._run("-C", *RULE)
        except OSError:
            return False
        return code == 0

    @_deferred
    async def install(self) -> None:
        if await self.is_installed():
            self.installed = True
            return
        try:
            code, message = await self._run("-I", *RULE)
        except OSError as error:
            code, message = -1, str(error)
        if code != 0:
            raise LoopbackGuardFailed(
                "refusing to start agents: this Docker engine lets other hosts on the"
                " network reach ports published on 127.0.0.1, and the guard rule could"
                " not be installed (%s -t raw -I %s: %s); run the manager as root with"
                " iptables installed, or pass --docker-loopback-guard off if the network"
                " is protected otherwise" % (self.iptables, " ".join(RULE), message))
        self.installed = True
        self.log.info("installed the loopback guard: iptables -t raw -I {rule}",
                      rule=" ".join(RULE))

    @_deferred
    async def remove(self) -> None:
        """Remove the rule (for tests and uninstallation)."""
        while await self.is_installed():
            code, message = await self._run("-D", *RULE)
            if code != 0:
                raise LoopbackGuardFailed("could not remove the loopback guard: %s" % message)
        self.installed = False
