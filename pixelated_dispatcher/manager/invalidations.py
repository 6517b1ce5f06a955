"""Invalidations the manager pushes to subscribed proxies.

A proxy may cache sessions and agent addresses only because the manager
tells it at once when one of them stops being true. Listeners are the AMP
connections that sent ``Subscribe``; a listener that fails is logged and
skipped, never allowed to break the manager's own work.
"""
from typing import List

from twisted.logger import Logger
from zope.interface import Interface

from ..fanout import tell_all


class IInvalidationListener(Interface):
    """Somebody who must hear at once what stopped being true (a subscribed
    proxy's AMP connection). The proxy's side of the same push is
    :class:`pixelated_dispatcher.proxy.manager_interface.IInvalidationListener`.
    """

    def session_ended(token_digest: str) -> None:
        """One session ended; ``token_digest`` is the hex SHA-256 of its token."""

    def sessions_revoked(username: str) -> None:
        """Every session of ``username`` ended."""

    def agent_stopped(username: str) -> None:
        """The agent of ``username`` is gone."""


class Invalidations:
    """The manager's subscribers, and the three things it tells them all."""

    log = Logger()

    def __init__(self) -> None:
        self._listeners: List[IInvalidationListener] = []

    def subscribe(self, listener: IInvalidationListener) -> None:
        if listener not in self._listeners:
            self._listeners.append(listener)

    def unsubscribe(self, listener: IInvalidationListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def session_ended(self, token_digest: str) -> None:
        self._tell("session_ended", token_digest)

    def sessions_revoked(self, username: str) -> None:
        self._tell("sessions_revoked", username)

    def agent_stopped(self, username: str) -> None:
        self._tell("agent_stopped", username)

    def _tell(self, method: str, value: str) -> None:
        tell_all(self._listeners, lambda listener: getattr(listener, method)(value),
                 method, self.log)
