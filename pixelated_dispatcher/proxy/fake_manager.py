"""An in-memory manager for fast proxy tests.

It keeps users, passwords and sessions in dictionaries and answers at once
(already-fired Deferreds), so web tests run synchronously. Tests steer it
through a few knobs: add users, place a user's agent at an address, make an
agent fail to start, or make the whole manager unreachable.

It passes the same contract suite as the real client talking to the real
manager (``tests/manager_contract.py``), so what proxy tests learn from it
holds for the real thing.
"""
import secrets
from typing import Dict, List, Set, Tuple, Union

import attr
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from ..protocol import (AgentAddress, AgentStartFailed, InvalidCredentials,
                        InvalidSession, InvalidUsername, UnknownUser)
from ..usernames import is_valid_username
from .manager_interface import IManager, ManagerUnavailable

#: Where agents of users without a configured address pretend to be.
FIRST_FAKE_PORT = 47001


@implementer(IManager)
@attr.s(auto_attribs=True)
class FakeManager:
    """An :class:`IManager` in memory.

    :ivar users: user name → password.
    :ivar sessions: token → user name, for the sessions currently open.
    :ivar running: users whose agent runs (started by ``ensure_agent``,
        stopped by ``end_session``).
    :ivar logins: ``(username, client)`` of every authentication attempt.
    :ivar reachable: when False, every call fails with ``ManagerUnavailable``.
    """

    users: Dict[str, str] = attr.ib(factory=dict)
    sessions: Dict[str, str] = attr.ib(factory=dict)
    running: Set[str] = attr.ib(factory=set)
    logins: List[Tuple[str, str]] = attr.ib(factory=list)
    reachable: bool = True
    _agents: Dict[str, Union[AgentAddress, Exception]] = attr.ib(factory=dict)
    _next_port: int = FIRST_FAKE_PORT

    # --- knobs for tests ---------------------------------------------------

    def add_user(self, username: str, password: str) -> None:
        """Create a user (the contract fixture's one hook)."""
        self.users[username] = password

    def place_agent(self, username: str, address: AgentAddress) -> None:
        """Make ``ensure_agent(username)`` answer ``address``."""
        self._agents[username] = address

    def fail_agent_start(self, username: str, reason: str = "the agent did not start") -> None:
        """Make ``ensure_agent(username)`` fail with ``AgentStartFailed``."""
        self._agents[username] = AgentStartFailed(reason)

    def open_session(self, username: str) -> str:
        """A session for ``username`` as if the user had logged in."""
        token = secrets.token_urlsafe(32)
        self.sessions[token] = username
        return token

    # --- IManager ------------------------------------------------------------

    def _unreachable(self) -> Deferred:
        return fail(ManagerUnavailable("the fake manager is switched off"))

    def authenticate(self, username: str, password: str, client: str) -> Deferred:
        if not self.reachable:
            return self._unreachable()
        self.logins.append((username, client))
        if username not in self.users or self.users[username] != password:
            return fail(InvalidCredentials("invalid username or password"))
        return succeed(self.open_session(username))

    def resolve_session(self, token: str) -> Deferred:
        if not self.reachable:
            return self._unreachable()
        if token not in self.sessions:
            return fail(InvalidSession("unknown session"))
        return succeed(self.sessions[token])

    def end_session(self, token: str) -> Deferred:
        if not self.reachable:
            return self._unreachable()
        if token not in self.sessions:
            return fail(InvalidSession("unknown session"))
        username = self.sessions.pop(token)
        self.running.discard(username)
        return succeed(username)

    def ensure_agent(self, username: str) -> Deferred:
        if not self.reachable:
            return self._unreachable()
        if not is_valid_username(username):
            return fail(InvalidUsername(username))
        if username not in self.users:
            return fail(UnknownUser(username))
        if username not in self._agents:
            self._agents[username] = AgentAddress("127.0.0.1", self._next_port)
            self._next_port += 1
        outcome = self._agents[username]
        if isinstance(outcome, Exception):
            return fail(outcome)
        self.running.add(username)
        return succeed(outcome)
