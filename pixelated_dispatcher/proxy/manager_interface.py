"""The manager as the proxy sees it: a few questions and nothing more.

The proxy can be compromised without giving away other users' data because
this is all it can ask. ``manager_client.AMPManagerClient`` is the real
implementation; ``pixelated_dispatcher.testing.fake_manager.FakeManager`` is
the in-memory one used by proxy unit tests. Both pass
``pixelated_dispatcher.testing.manager_contract``.

Errors are the classes of :mod:`pixelated_dispatcher.protocol`
(``InvalidCredentials``, ``RateLimited``, ``InvalidSession``,
``AgentStartFailed``, ``CapacityReached``, ...) plus
:class:`ManagerUnavailable` when the manager cannot be reached.
"""
from typing import Iterable

from twisted.internet.defer import Deferred
from zope.interface import Interface


class ManagerUnavailable(Exception):
    """The manager socket cannot be reached right now."""


class IInvalidationListener(Interface):
    """Who wants to hear what the manager pushes (the proxy's caches)."""

    def subscribed() -> None:
        """Pushes flow from now on (a connection was made and subscribed)."""

    def reset() -> None:
        """Pushes may have been missed (the connection dropped): forget
        everything learnt from the manager."""

    def session_ended(token_digest: str) -> None:
        """The session whose token has this hex SHA-256 ended."""

    def sessions_revoked(username: str) -> None:
        """Every session of ``username`` ended."""

    def agent_stopped(username: str) -> None:
        """The agent of ``username`` is gone; its address is no longer valid."""


class IManager(Interface):

    def authenticate(username: str, password: str, client: str) -> Deferred:
        """Deferred firing with a new opaque session token (str), or failing
        with ``InvalidCredentials`` or ``RateLimited``. ``client``
        identifies the caller (IP) for the manager's rate limits."""

    def resolve_session(token: str) -> Deferred:
        """Deferred firing with the user name (str) of the session, or failing
        with ``InvalidSession``."""

    def end_session(token: str) -> Deferred:
        """Deferred revoking the session (and stopping the agent when it was
        the user's last one); fires with the user name or fails with
        ``InvalidSession``. Subscribers hear ``session_ended``."""

    def ensure_agent(username: str, token: str) -> Deferred:
        """Deferred firing with the :class:`~pixelated_dispatcher.protocol.AgentAddress`
        of the user's running agent, starting it first if needed; fails with
        ``AgentStartFailed`` or ``CapacityReached``. ``token`` is the session
        of the request: unless it is a live session of ``username``, fails
        with ``InvalidSession`` (also when there is no such user). The agent
        starts with the credentials sealed under that session at login."""

    def report_activity(usernames: Iterable[str]) -> Deferred:
        """Deferred: tell the manager these users' agents were used (for idle
        culling). Any number of names; split as the transport needs."""

    def subscribe(listener: IInvalidationListener) -> Deferred:
        """Deliver the manager's pushes to ``listener``
        (:class:`IInvalidationListener`) from now on, across reconnections.
        Returns a Deferred that fires once pushes flow (or fails with
        ``ManagerUnavailable`` when the manager cannot be reached now; the
        subscription stays and takes effect at the next connection)."""
