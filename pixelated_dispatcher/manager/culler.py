"""Idle culling: stop agents nobody has used for ``timeout`` seconds.

The proxy reports which users were active, in batches (``ReportActivity``);
an agent counts as used from its start and at every report naming its user.
A check runs every ``interval`` seconds, so an agent idle for ``timeout`` is
stopped at most ``interval`` later. An agent in use is never culled, because
the proxy reports more often than ``timeout``.
"""
from typing import Dict, Iterable, Optional

from twisted.application.internet import TimerService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .metrics import ManagerMetrics
from .supervisor import AgentSupervisor


#: Seconds an agent may go unused before it is stopped (``--idle-timeout``).
AGENT_IDLE_TIMEOUT = 2 * 3600.0


class IdleCuller:
    log = Logger()

    def __init__(self, clock: IReactorTime, supervisor: AgentSupervisor, timeout: float,
                 metrics: Optional[ManagerMetrics] = None) -> None:
        self._clock = clock
        self._metrics = metrics
        self._supervisor = supervisor
        self.timeout = timeout
        self._last_activity: Dict[str, float] = {}
        supervisor.on_exit(self._agent_exited)

    def _agent_exited(self, username: str, reason: str) -> None:
        self._last_activity.pop(username, None)

    def activity(self, usernames: Iterable[str]) -> None:
        now = self._clock.seconds()
        running = self._supervisor.running()
        for username in usernames:
            if username in running:
                self._last_activity[username] = now

    def last_activity(self, username: str) -> Optional[float]:
        """When the agent was last used (its start counts), or None when not running."""
        agent = self._supervisor.running().get(username)
        if agent is None:
            return None
        return max(self._last_activity.get(username, 0.0), agent.started)

    def cull(self) -> int:
        """Stop every agent idle for longer than the timeout; returns how many."""
        if not self.timeout:
            return 0
        now = self._clock.seconds()
        culled = 0
        for username in list(self._supervisor.running()):
            last = self.last_activity(username)
            if last is not None and now - last > self.timeout:
                self.log.info("agent of {username}: idle for {idle:.0f} s",
                              username=username, idle=now - last)
                d = self._supervisor.stop(username, reason="idle for %d s" % (now - last))
                d.addErrback(lambda f: self.log.failure("culling failed", f))
                if self._metrics is not None:
                    self._metrics.culled()
                culled += 1
        return culled

    def service(self) -> TimerService:
        """A service running :meth:`cull` periodically."""
        interval = max(1.0, min(60.0, self.timeout / 4.0)) if self.timeout else 3600.0
        service = TimerService(interval, self.cull)
        service.clock = self._clock
        return service
