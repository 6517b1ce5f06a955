"""The manager's domain: users, sessions and agents, as one service.

:class:`Manager` answers every question of the AMP contract in domain terms
(it raises the contract's errors but knows nothing of AMP); ``amp_server``
translates. It owns the database thread, the hashing pool and the supervisor,
starts them in order and stops them in reverse.
"""
import os
from typing import List, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ..protocol import AgentAddress, AgentNotRunning, InvalidCredentials
from .credentials import CredentialsVault
from .database import Database
from .passwords import PRODUCTION, HashParameters, PasswordHasher
from .providers.interface import IAgentProvider
from .registry import UserRegistry
from .sessions import SessionStore
from .supervisor import STOPPED, AgentStatus, AgentSupervisor


class Manager(Service):
    """Users, sessions and agents of one state directory."""

    log = Logger()

    def __init__(self, reactor, state_dir: str, provider: IAgentProvider,
                 leap_provider: str, hash_parameters: HashParameters = PRODUCTION) -> None:
        self._reactor = reactor
        self.state_dir = state_dir
        self._database = Database(reactor, os.path.join(state_dir, "dispatcher.sqlite"))
        self._hasher = PasswordHasher(reactor, hash_parameters)
        self._file_pool = ThreadPool(minthreads=0, maxthreads=2, name="files")
        self._vault = CredentialsVault(leap_provider)
        self.users = UserRegistry(self._database, self._hasher, reactor)
        self.sessions = SessionStore(self._database, reactor)
        self.supervisor = AgentSupervisor(reactor, provider, os.path.join(state_dir, "users"),
                                          self._vault.line_for, self._file_pool)
        self._ready: Deferred = Deferred()

    # --- lifecycle ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self._hasher.start()
        self._file_pool.start()
        d = self._database.start()
        d.addCallback(lambda _: self.supervisor.recover())
        d.addCallback(lambda _: self.log.info("manager ready, state in {dir}", dir=self.state_dir))
        d.addCallback(lambda _: self._ready.callback(None))
        d.addErrback(self._failed_to_start)

    def _failed_to_start(self, failure) -> None:
        self.log.failure("manager could not start", failure)
        self._ready.errback(failure)
        self._ready.addErrback(lambda _: None)
        self._reactor.stop()

    @inlineCallbacks
    def stopService(self):
        super().stopService()
        try:
            yield self.supervisor.close()
        finally:
            self._hasher.stop()
            self._file_pool.stop()
            yield self._database.stop()

    def ready(self) -> Deferred:
        """Fires once the database is open and agents are recovered."""
        d = Deferred()
        self._ready.addBoth(lambda result: (d.callback(result), result)[1])
        return d

    # --- proxy questions -----------------------------------------------------

    @inlineCallbacks
    def authenticate(self, username: str, password: str, client: str):
        yield self.ready()
        if not (yield self.users.verify(username, password)):
            self.log.info("failed login for {username!r} from {client}",
                          username=username[:64], client=client)
            raise InvalidCredentials("invalid username or password")
        self._vault.remember(username, password)
        token = yield self.sessions.create(username, client)
        self.log.info("{username} logged in from {client}", username=username, client=client)
        return token

    @inlineCallbacks
    def resolve_session(self, token: str):
        yield self.ready()
        username = yield self.sessions.resolve(token)
        return username

    @inlineCallbacks
    def end_session(self, token: str):
        """Log out. When it was the user's last session, stop the agent and
        forget the password."""
        yield self.ready()
        username = yield self.sessions.end(token)
        self.log.info("{username} logged out", username=username)
        if (yield self.sessions.count(username)) == 0:
            self._vault.forget(username)
            yield self.supervisor.stop(username)
        return username

    @inlineCallbacks
    def ensure_agent(self, username: str):
        yield self.ready()
        yield self.users.require(username)
        address = yield self.supervisor.ensure(username)
        return address

    @inlineCallbacks
    def locate_agent(self, username: str):
        yield self.ready()
        yield self.users.require(username)
        agent = self.supervisor.running().get(username)
        if agent is None:
            raise AgentNotRunning("the agent of %s is not running" % (username,))
        return agent.address

    # --- administration --------------------------------------------------------

    @inlineCallbacks
    def add_user(self, username: str, password: str):
        yield self.ready()
        yield self.users.add(username, password)
        self.log.info("added user {username}", username=username)

    @inlineCallbacks
    def remove_user(self, username: str):
        """Remove the user, end their sessions and stop their agent. Their
        data directory stays on disk."""
        yield self.ready()
        yield self.users.require(username)
        yield self.supervisor.stop(username)
        yield self.users.remove(username)
        self._vault.forget(username)
        self.log.info("removed user {username}", username=username)

    @inlineCallbacks
    def list_users(self):
        """``[(username, agent state)]`` sorted by name."""
        yield self.ready()
        names = yield self.users.usernames()
        result: List[Tuple[str, str]] = [(name, self.supervisor.state(name)) for name in names]
        return result

    @inlineCallbacks
    def stop_agent(self, username: str):
        yield self.ready()
        yield self.users.require(username)
        if self.supervisor.state(username) == STOPPED:
            raise AgentNotRunning("the agent of %s is not running" % (username,))
        yield self.supervisor.stop(username)

    @inlineCallbacks
    def agent_info(self, username: str):
        yield self.ready()
        yield self.users.require(username)
        status: AgentStatus = self.supervisor.status(username)
        return status

    def start_agent(self, username: str) -> "Deferred[AgentAddress]":
        return self.ensure_agent(username)
