"""An in-memory manager for fast proxy tests.

It keeps users, passwords and sessions in dictionaries and answers at once
(already-fired Deferreds), so web tests run synchronously. Tests steer it
through a few knobs: add users, place a user's agent at an address, make an
agent fail to start, refuse logins as rate limited, reach capacity, make
the whole manager unreachable, or push invalidations (a stopped agent, revoked
sessions) to subscribed listeners as the real manager does.

It passes the same contract suite as the real client talking to the real
manager (``pixelated_dispatcher.testing.manager_contract``), so what proxy tests learn from it
holds for the real thing.
"""
import secrets
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import attr
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from ..protocol import (AgentAddress, AgentStartFailed, CapacityReached,
                        InvalidCredentials, InvalidSession, rate_limited, token_digest)
from ..proxy.manager_interface import IManager, ManagerUnavailable

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
    :ivar activity: every batch given to ``report_activity``.
    :ivar listeners: subscribed listeners (they hear pushes at once).
    :ivar resolves: how often ``resolve_session`` was asked (cache tests).
    :ivar ensures: how often ``ensure_agent`` was asked.
    """

    users: Dict[str, str] = attr.ib(factory=dict)
    sessions: Dict[str, str] = attr.ib(factory=dict)
    running: Set[str] = attr.ib(factory=set)
    logins: List[Tuple[str, str]] = attr.ib(factory=list)
    reachable: bool = True
    activity: List[List[str]] = attr.ib(factory=list)
    listeners: List[Any] = attr.ib(factory=list)
    resolves: int = 0
    ensures: int = 0
    _agents: Dict[str, Union[AgentAddress, Exception]] = attr.ib(factory=dict)
    _next_port: int = FIRST_FAKE_PORT
    _rate_limit: Optional[int] = None
    _pending_starts: Dict[str, List[Deferred]] = attr.ib(factory=dict)
    _slow: Set[str] = attr.ib(factory=set)

    # --- knobs for tests ---------------------------------------------------

    def add_user(self, username: str, password: str) -> None:
        """Create a user (the contract fixture's one hook)."""
        self.users[username] = password

    def place_agent(self, username: str, address: AgentAddress) -> None:
        """Make ``ensure_agent(username, token)`` answer ``address``."""
        self._agents[username] = address

    def fail_agent_start(self, username: str, reason: str = "the agent did not start") -> None:
        """Make ``ensure_agent(username, token)`` fail with ``AgentStartFailed``."""
        self._agents[username] = AgentStartFailed(reason)

    def rate_limit(self, seconds: Optional[int]) -> None:
        """Refuse every login as rate limited for ``seconds`` (None: stop)."""
        self._rate_limit = seconds

    def reach_capacity(self, username: str) -> None:
        """Make ``ensure_agent(username, token)`` fail with ``CapacityReached``."""
        self._agents[username] = CapacityReached("capacity reached")

    def slow_start(self, username: str) -> None:
        """Make ``ensure_agent(username, token)`` wait until :meth:`finish_start`."""
        self._slow.add(username)

    def finish_start(self, username: str) -> None:
        """Let a slow start of ``username`` answer (everybody waiting on it)."""
        self._slow.discard(username)
        for d in self._pending_starts.pop(username, []):
            self._answer_start(username, d)

    def stop_agent(self, username: str) -> None:
        """The agent stops (culled, crashed): subscribers hear ``agent_stopped``."""
        self.running.discard(username)
        self._push("agent_stopped", username)

    def revoke_sessions(self, username: str) -> None:
        """``pixelated-ctl logout NAME``: every session of the user ends."""
        for token in [t for t, u in self.sessions.items() if u == username]:
            del self.sessions[token]
        self._push("sessions_revoked", username)

    def disconnect(self) -> None:
        """The connection to the manager dropped: listeners must reset."""
        self._push("reset")

    def _push(self, method: str, *args: Any) -> None:
        for listener in list(self.listeners):
            getattr(listener, method)(*args)

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
        if self._rate_limit is not None:
            return fail(rate_limited(self._rate_limit))
        if username not in self.users or self.users[username] != password:
            return fail(InvalidCredentials("invalid username or password"))
        return succeed(self.open_session(username))

    def resolve_session(self, token: str) -> Deferred:
        if not self.reachable:
            return self._unreachable()
        self.resolves += 1
        if token not in self.sessions:
            return fail(InvalidSession("unknown session"))
        return succeed(self.sessions[token])

    def end_session(self, token: str) -> Deferred:
        if not self.reachable:
            return self._unreachable()
        if token not in self.sessions:
            return fail(InvalidSession("unknown session"))
        username = self.sessions.pop(token)
        self._push("session_ended", token_digest(token))
        if username not in self.sessions.values():
            self.stop_agent(username)
        return succeed(username)

    def ensure_agent(self, username: str, token: str) -> Deferred:
        if not self.reachable:
            return self._unreachable()
        if self.sessions.get(token) != username:
            # as the real manager: one answer, whether or not the user exists
            return fail(InvalidSession("no such session, or it has expired"))
        self.ensures += 1
        if username in self._slow:
            d: Deferred = Deferred()
            self._pending_starts.setdefault(username, []).append(d)
            return d
        d = Deferred()
        self._answer_start(username, d)
        return d

    def _answer_start(self, username: str, d: Deferred) -> None:
        if username not in self._agents:
            self._agents[username] = AgentAddress("127.0.0.1", self._next_port)
            self._next_port += 1
        outcome = self._agents[username]
        if isinstance(outcome, Exception):
            d.errback(outcome)
            return
        self.running.add(username)
        d.callback(outcome)

    def report_activity(self, usernames: Any) -> Deferred:
        if not self.reachable:
            return self._unreachable()
        self.activity.append(sorted(set(usernames)))
        return succeed(None)

    def subscribe(self, listener: Any) -> Deferred:
        if listener not in self.listeners:
            self.listeners.append(listener)
        if not self.reachable:
            return self._unreachable()
        listener.subscribed()
        return succeed(None)
