"""What the manager asks of a provider: start, stop and watch one agent per user.

A provider knows how to run an agent (a local process, a Docker container)
but nothing about users, passwords or sessions. The supervisor decides *when*;
the provider decides *how*. Every provider (and its in-memory fake) passes the
same contract tests in ``pixelated_dispatcher.testing.provider_contract``.
"""
from typing import Callable, Dict, Iterable, Optional

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from ...fanout import tell_all
from ...protocol import AgentAddress

_log = Logger()


@attr.s(frozen=True, auto_attribs=True)
class RunningAgent:
    """A started agent as the provider sees it."""
    username: str
    address: AgentAddress
    #: process id on this machine (0 when the provider has none to give)
    pid: int
    #: time.time() when the agent was started
    started: float


class AgentStartError(Exception):
    """The agent could not be started; ``str()`` is a clear reason for the operator."""


#: called as ``callback(username, reason)`` when an agent ends by itself or is stopped
ExitCallback = Callable[[str, str], None]

#: ``accounts(username)`` fires with the ``(uid, gid)`` the user's agent runs as
Accounts = Callable[[str], Deferred]


def notify_exit(callbacks: Iterable[ExitCallback], username: str, reason: str) -> None:
    """Tell every ``on_exit`` callback; one that fails is logged, the others
    still hear it."""
    tell_all(callbacks, lambda callback: callback(username, reason),
             "the exit of the agent of " + username, _log)


class IAgentProvider(Interface):
    """Runs at most one agent per user name and says when one ends."""

    name = Attribute("Short name of the provider, e.g. 'process' or 'docker'.")

    accounts = Attribute(
        "None (the default), or an :data:`Accounts` the manager sets before the"
        " first start when it gives every user an own uid and gid (it runs as"
        " root): the user's agent must then run as ``accounts(username)``."
        " A provider that runs no process of its own keeps it and ignores it.")

    def recover() -> Deferred:
        """Find agents that outlived a previous manager.

        Called once at manager start, before any ``start``. Adopts what it can
        and cleans up the rest; fires with the list of adopted
        :class:`RunningAgent`.
        """

    def start(username: str, data_dir: str, credentials: bytes) -> Deferred:
        """Start ``username``'s agent.

        :param str username: a valid user name.
        :param str data_dir: the user's data directory (exists already).
        :param bytes credentials: one line ending in ``\\n`` to write on the
            agent's standard input, then close it. Never put it anywhere else.
        :return: Deferred firing with :class:`RunningAgent` once the agent
            answers HTTP, or failing with :class:`AgentStartError` (after
            cleaning up whatever was started).
        """

    def stop(username: str) -> Deferred:
        """Stop ``username``'s agent (politely, then by force after a grace period).

        Fires with None once it is gone; does nothing if it does not run.
        """

    def running() -> Dict[str, RunningAgent]:
        """A snapshot ``{username: RunningAgent}`` of the agents that run now."""

    def on_exit(callback: ExitCallback) -> None:
        """Call ``callback(username, reason)`` whenever a started agent ends
        (crash, kill, stop). Several callbacks may be registered."""

    def close() -> Deferred:
        """The manager shuts down: fire once the provider is in a state that a
        restarted manager can pick up from (the process provider stops its
        agents; the docker provider leaves its containers running)."""


class IMeasuresMemory(Interface):
    """A provider that measures its agents' memory itself (the docker
    provider asks the engine). For any other provider the manager reads the
    resident memory of each agent's process tree (``agent_usage``), which
    needs the ``pid`` of :class:`RunningAgent`."""

    def memory_usage() -> Deferred:
        """Fires with ``{username: bytes}`` for the agents running now;
        agents that cannot be measured are left out."""


class IRunsOnNodes(Interface):
    """A provider whose agents run on several machines (the swarm provider):
    ``pixelated-ctl info``, ``stats`` and ``list --json`` name the node, and
    the metrics count agents per node."""

    def node_of(username: str) -> Optional[str]:
        """The name of the node ``username``'s agent runs on (None: it does
        not run)."""

    def agents_per_node() -> Dict[str, int]:
        """How many agents run on each node now."""


class ILimitsAgents(Interface):
    """A provider that limits its agents' resources (memory, processes, CPU
    share): the docker provider in the container, the process provider in a
    cgroup per agent."""

    def limits() -> str:
        """The limits every agent gets, and where they are applied, in
        words (``pixelated-ctl info``)."""
