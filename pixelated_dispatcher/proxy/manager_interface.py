"""The manager as the proxy sees it: four questions and nothing more.

The proxy can be compromised without giving away other users' data because
this is all it can ask. ``manager_client.AMPManagerClient`` is the real
implementation; ``fake_manager.FakeManager`` is the in-memory one used by
proxy unit tests. Both pass ``tests/manager_contract.py``.

Errors are the classes of :mod:`pixelated_dispatcher.protocol`
(``InvalidCredentials``, ``InvalidSession``, ``AgentStartFailed``, ...) plus
:class:`ManagerUnavailable` when the manager cannot be reached.
"""
from zope.interface import Interface


class ManagerUnavailable(Exception):
    """The manager socket cannot be reached right now."""


class IManager(Interface):

    def authenticate(username, password, client):
        """Deferred firing with a new opaque session token (str), or failing
        with ``InvalidCredentials``. ``client`` identifies the caller (IP)."""

    def resolve_session(token):
        """Deferred firing with the user name (str) of the session, or failing
        with ``InvalidSession``."""

    def end_session(token):
        """Deferred revoking the session (and stopping the agent); fires with
        the user name or fails with ``InvalidSession``."""

    def ensure_agent(username):
        """Deferred firing with the :class:`~pixelated_dispatcher.protocol.AgentAddress` of the user's running
        agent, starting it first if needed; fails with ``AgentStartFailed``."""
