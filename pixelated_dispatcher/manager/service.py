"""The manager's domain: users, sessions and agents, as one service.

:class:`Manager` answers every question of the AMP contract in domain terms
(it raises the contract's errors but knows nothing of AMP); ``amp_server``
translates. It owns the database thread, the hashing pool, the supervisor
and the idle culler, starts them in order and stops them in reverse.

It also decides which agents the proxy may reach (``agent_grants``, on the
agent firewall): the agent of a user whose live session a request showed,
from the moment it answers that request until the user's last session ends
(logout, expiry, ``passwd``, ``logout NAME``, ``remove``) or the agent ends.
Requests without a session (``pixelated-ctl``) open nothing.
"""
import os
import shutil
from typing import Any, Callable, Dict, Generator, List, Optional, Tuple

import attr
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..protocol import (AgentAddress, AgentNotRunning, BadRequest, InvalidCredentials,
                        InvalidSession, UserExists, rate_limited, token_digest)
from ..usernames import is_valid_username
from .agent_accounts import AgentAccounts, UidRange
from .agent_firewall import FirewallError, IAgentFirewall, NoFirewall
from .agent_grants import AgentGrants
from .agent_usage import resident_memory
from .invalidations import Invalidations
from .credentials import credentials_line, secrets_at_login
from .culler import AGENT_IDLE_TIMEOUT, IdleCuller
from .database import Database
from .legacy_import import LegacyUser, read_legacy_root
from .login_limits import LoginLimiter
from .metrics import ManagerMetrics
from .passwords import PRODUCTION, HashParameters, PasswordHasher
from .providers.interface import (IAgentProvider, ILimitsAgents, IMeasuresMemory,
                                  IRunsOnNodes, RunningAgent)
from .registry import UserRegistry
from .sealed_credentials import SealBroken, seal, unseal
from .sessions import SESSION_IDLE_TIMEOUT, SESSION_MAX_AGE, SessionStore, new_token
from .supervisor import STOPPED, AgentStatus, AgentSupervisor


#: What an ``inlineCallbacks`` method is, before the decorator makes it a
#: Deferred.
Steps = Generator[Deferred, Any, Any]


@attr.s(frozen=True, auto_attribs=True)
class ManagerSettings:
    """Everything an operator can tune (see the tap's options)."""
    leap_provider: str = "localhost"
    hash_parameters: HashParameters = PRODUCTION
    #: threads hashing passwords (0: one less than the CPUs, at least one)
    hash_threads: int = 0
    session_idle_timeout: float = SESSION_IDLE_TIMEOUT
    session_max_age: float = SESSION_MAX_AGE
    idle_timeout: float = AGENT_IDLE_TIMEOUT
    max_agents: int = 0
    max_concurrent_starts: int = 0
    login_free_failures: int = 5
    login_backoff_base: float = 1.0
    login_backoff_max: float = 900.0
    #: failed logins of one name from all networks before the global backoff
    login_global_free_failures: int = 100
    #: uids for agents; None: agents run as the manager's own user
    agent_uids: Optional[UidRange] = None


@attr.s(frozen=True, auto_attribs=True)
class AgentDetails:
    """What ``pixelated-ctl info`` shows."""
    status: AgentStatus
    memory: int
    last_activity: float
    #: the cluster node the agent runs on ("" unless the provider has nodes)
    node: str = ""
    #: the resource limits of agents, in words ("" when the provider has none)
    limits: str = ""


#: Seconds between two sweeps of expired sessions (and so of the
#: credentials sealed under them).
SESSION_SWEEP_INTERVAL = 300.0

#: The one answer to a request naming a user its session does not belong
#: to, whether or not that user exists.
NO_SUCH_SESSION = "no such session, or it has expired"


class Manager(MultiService):
    """Users, sessions and agents of one state directory."""

    log = Logger()

    def __init__(self, reactor: Any, state_dir: str, provider: IAgentProvider,
                 settings: ManagerSettings = ManagerSettings(),
                 firewall: Optional[IAgentFirewall] = None) -> None:
        """:param firewall: the agent firewall the provider protects its
            agents with; the manager grants the proxy its agents there."""
        super().__init__()
        self._reactor = reactor
        self._provider = provider
        self.state_dir = state_dir
        self.settings = settings
        self._database = Database(reactor, os.path.join(state_dir, "dispatcher.sqlite"))
        self._hasher = PasswordHasher(reactor, settings.hash_parameters,
                                      settings.hash_threads or None)
        self._file_pool = ThreadPool(minthreads=0, maxthreads=2, name="files")
        # Sealing and opening credentials take microseconds; a pool of their
        # own keeps logins and starts from queueing behind file work (a
        # remove --purge of a large mailbox).
        self._sealing_pool = ThreadPool(minthreads=0, maxthreads=1, name="sealing")
        self.invalidations = Invalidations()
        self.limiter = LoginLimiter(
            reactor, settings.login_free_failures, settings.login_backoff_base,
            settings.login_backoff_max,
            global_free_failures=settings.login_global_free_failures)
        self.users = UserRegistry(self._database, self._hasher, reactor)
        self.sessions = SessionStore(self._database, reactor, settings.session_idle_timeout,
                                     settings.session_max_age)
        self.accounts = AgentAccounts(self._database, settings.agent_uids) \
            if settings.agent_uids else None
        self.metrics = ManagerMetrics()
        if IRunsOnNodes.providedBy(provider):
            self.metrics.watch_nodes(IRunsOnNodes(provider).agents_per_node)
        self.supervisor = AgentSupervisor(
            reactor, provider, os.path.join(state_dir, "users"), self._file_pool,
            settings.max_agents, settings.max_concurrent_starts, self.metrics)
        self.grants = AgentGrants(firewall if firewall is not None else NoFirewall())
        self.supervisor.on_exit(self._agent_ended)
        self.culler = IdleCuller(reactor, self.supervisor, settings.idle_timeout, self.metrics)
        self._ready: Deferred = Deferred()

    # --- lifecycle ------------------------------------------------------------

    def startService(self) -> None:
        # Others may pass through (agents running under their own uids reach
        # their data directories below) but not list; the database is 0600.
        os.makedirs(self.state_dir, mode=0o711, exist_ok=True)
        os.chmod(self.state_dir, 0o711)
        self._hasher.start()
        self._file_pool.start()
        self._sealing_pool.start()
        d = self._database.start()
        d.addCallback(lambda _: self.supervisor.recover())
        d.addCallback(lambda _: self._recover_grants())
        d.addCallback(self._started)
        d.addErrback(self._failed_to_start)

    def _started(self, _: object) -> None:
        # Children (the culler's timer) start only once agents are recovered.
        self.culler.service().setServiceParent(self)
        sweeper = TimerService(SESSION_SWEEP_INTERVAL, self._sweep_sessions)
        sweeper.clock = self._reactor
        sweeper.setServiceParent(self)
        super().startService()
        self.log.info("manager ready, state in {dir}", dir=self.state_dir)
        self._ready.callback(None)

    def _failed_to_start(self, failure: Failure) -> None:
        self.log.failure("manager could not start", failure)
        self._ready.errback(failure)
        self._ready.addErrback(lambda _: None)
        self._reactor.stop()

    @inlineCallbacks
    def stopService(self) -> Steps:
        yield super().stopService()
        try:
            yield self.supervisor.close()
        finally:
            self._hasher.stop()
            self._file_pool.stop()
            self._sealing_pool.stop()
            yield self._database.stop()

    @inlineCallbacks
    def _sweep_sessions(self) -> Steps:
        """Delete expired sessions, and with them the credentials sealed
        under them and the proxy's grants of the agents of users left
        without a live session (whom the proxies are told about as
        ``SessionsRevoked``). Never fails (the timer would stop)."""
        try:
            purged = yield self.sessions.purge_expired()
            live = yield self.sessions.live_users()
            revoked = yield self.grants.retain(live)
            for username in revoked:
                # every session of theirs has ended: the proxies drop what
                # they hold of them (the agent's address, open tunnels)
                self.invalidations.sessions_revoked(username)
        except Exception:
            self.log.failure("sweeping expired sessions failed")
            return
        if purged:
            self.log.info("{purged} expired sessions (and their sealed credentials) deleted",
                          purged=purged)

    @inlineCallbacks
    def _recover_grants(self) -> Steps:
        """The grants a previous manager left: kept for adopted agents of
        users with a live session, revoked for the rest."""
        live = yield self.sessions.live_users()
        try:
            yield self.grants.recover(self.supervisor.running(), live)
        except FirewallError as error:
            self.log.error("the proxy's grants of the previous manager's agents could not"
                           " be checked: {error}", error=str(error))

    def _revoke_grant(self, username: str) -> Deferred:
        """The proxy may no longer reach ``username``'s agent. A firewall
        that fails is logged; what the caller does next (end sessions, stop
        the agent, whose release takes the grant away) still happens."""
        def failed(failure: Failure) -> None:
            failure.trap(FirewallError)
            self.log.error("the proxy keeps its access to the agent of {username}: {error}",
                           username=username, error=failure.getErrorMessage())
        return self.grants.revoke(username).addErrback(failed)

    def _agent_ended(self, username: str, reason: str) -> None:
        self.grants.forget(username)
        self.invalidations.agent_stopped(username)

    def ready(self) -> Deferred:
        """Fires once the database is open and agents are recovered."""
        d: Deferred = Deferred()

        def tell(result: Any) -> Any:
            d.callback(result)
            return result
        self._ready.addBoth(tell)
        return d

    def _in_files_thread(self, function: Callable[..., Any], *args: object) -> Deferred:
        return deferToThreadPool(self._reactor, self._file_pool, function, *args)

    def _in_sealing_thread(self, function: Callable, *args: object) -> Deferred:
        return deferToThreadPool(self._reactor, self._sealing_pool, function, *args)

    # --- proxy questions -----------------------------------------------------

    @inlineCallbacks
    def authenticate(self, username: str, password: str, client: str) -> Steps:
        yield self.ready()
        wait = self.limiter.wait_for(username, client)
        if wait > 0:
            self.log.warn("login of {username!r} from {client} refused: rate limited",
                          username=username[:64], client=client)
            self.metrics.login("rate_limited")
            raise rate_limited(int(wait) + 1)
        if not (yield self.users.verify(username, password)):
            self.limiter.failed(username, client)
            self.metrics.login("failed")
            self.log.info("failed login for {username!r} from {client}",
                          username=username[:64], client=client)
            raise InvalidCredentials("invalid username or password")
        self.limiter.succeeded(username, client)
        self.metrics.login("ok")
        token = new_token()
        sealed = yield self._in_sealing_thread(seal, token, username,
                                                secrets_at_login(password))
        yield self.sessions.create(username, client, token, sealed)
        self.log.info("{username} logged in from {client}", username=username, client=client)
        return token

    def resolve_session(self, token: str) -> "Deferred[str]":
        # The proxy asks this for every uncached request: once the manager is
        # ready, go straight to the store.
        if self._ready.called:
            return self.sessions.resolve(token)
        return self.ready().addCallback(lambda _: self.sessions.resolve(token))

    @inlineCallbacks
    def end_session(self, token: str) -> Steps:
        """Log out (deleting the credentials sealed under the session). When
        it was the user's last session, stop the agent."""
        yield self.ready()
        username = yield self.sessions.end(token)
        self.invalidations.session_ended(token_digest(token))
        self.log.info("{username} logged out", username=username)
        if not (yield self.sessions.has_live(username)):
            yield self._revoke_grant(username)
            yield self.supervisor.stop(username, reason="logout")
        return username

    @inlineCallbacks
    def _require_owner(self, username: str, token: Optional[str]) -> Steps:
        """With a token: it must be a live session of ``username``, else
        ``InvalidSession`` -- the same answer for another user's name, a
        name nobody has and a name that breaks the rule, so that a proxy
        learns nothing about users whose session it does not hold. Without
        one (admin peers only; ``amp_server`` sees to that): the user must
        exist."""
        if token is None:
            yield self.users.require(username)
            return
        owner = None
        if is_valid_username(username):
            owner = yield self.sessions.resolve(token)
        if owner != username:
            raise InvalidSession(NO_SUCH_SESSION)

    @inlineCallbacks
    def ensure_agent(self, username: str, token: Optional[str] = None,
                     reason: str = "request") -> Steps:
        """The address of the user's agent, started if needed with the
        credentials sealed under the session ``token``. Without a token
        (an operator) a stopped agent is not started: it would have no
        password (``AgentStartFailed`` says so)."""
        yield self.ready()
        yield self._require_owner(username, token)
        credentials: Optional[Callable[[], Deferred]] = None
        if token is not None:
            def credentials() -> Deferred:
                return self._open_credentials(username, token)
        address = yield self.supervisor.ensure(username, reason, credentials)
        if token is not None:
            yield self._grant(username, address)
        return address

    @inlineCallbacks
    def _grant(self, username: str, address: AgentAddress) -> Steps:
        """Let the proxy connect to ``username``'s agent at ``address``,
        before the answer that names it leaves (no firewall call when it
        may already). Called once a live session of ``username`` was shown."""
        agent = self.supervisor.running().get(username)
        if agent is None or agent.address != address:
            return  # it ended meanwhile: nothing to open (the proxy asks again)
        made = yield self.grants.grant(agent)
        if made and not (yield self.sessions.has_live(username)):
            # the last session ended while this grant was being made
            yield self.grants.revoke(username)
            raise InvalidSession(NO_SUCH_SESSION)

    @inlineCallbacks
    def _open_credentials(self, username: str, token: str) -> Steps:
        """The credentials line sealed under this session at login.

        A session without a record that opens (one opened before the
        manager sealed them, or a record altered on disk) cannot start the
        agent properly, and an agent is never started without its password:
        the session ends and the browser is sent to the login form, whose
        next login seals a fresh record."""
        record = yield self.sessions.sealed_credentials(token)
        problem = "it has none (it predates sealed credentials)"
        if record is not None:
            try:
                secrets = yield self._in_sealing_thread(unseal, token, username, record)
            except SealBroken as error:
                problem = str(error)
            else:
                return credentials_line(self.settings.leap_provider, username, secrets)
        yield self.sessions.end(token).addErrback(lambda f: f.trap(InvalidSession))
        self.invalidations.session_ended(token_digest(token))
        self.log.warn("a session of {username} ended: its agent must start, and the"
                      " credentials sealed under the session do not open: {problem}",
                      username=username, problem=problem)
        raise InvalidSession("the agent of %s needs the credentials of a new login"
                             % (username,))

    @inlineCallbacks
    def locate_agent(self, username: str, token: Optional[str] = None) -> Steps:
        yield self.ready()
        yield self._require_owner(username, token)
        agent = self.supervisor.running().get(username)
        if agent is None:
            raise AgentNotRunning("the agent of %s is not running" % (username,))
        if token is not None:
            yield self._grant(username, agent.address)
        return agent.address

    def report_activity(self, usernames: List[str]) -> None:
        self.culler.activity(usernames)

    # --- administration --------------------------------------------------------

    @inlineCallbacks
    def add_user(self, username: str, password: str) -> Steps:
        yield self.ready()
        yield self.users.add(username, password)
        self.log.info("added user {username}", username=username)

    @inlineCallbacks
    def set_password(self, username: str, password: str) -> Steps:
        """Change the password and end every session (a stolen session must
        not outlive a password change)."""
        yield self.ready()
        yield self.users.set_password(username, password)
        yield self._revoke(username)
        self.log.info("changed the password of {username}", username=username)

    @inlineCallbacks
    def revoke_sessions(self, username: str) -> Steps:
        yield self.ready()
        yield self.users.require(username)
        count = yield self._revoke(username)
        self.log.info("ended {count} sessions of {username}", count=count, username=username)
        return count

    @inlineCallbacks
    def _revoke(self, username: str) -> Steps:
        """End every session of the user, and so delete every record of
        their credentials."""
        count = yield self.sessions.end_all(username)
        yield self._revoke_grant(username)
        self.invalidations.sessions_revoked(username)
        return count

    @inlineCallbacks
    def remove_user(self, username: str, purge: bool = False) -> Steps:
        """Remove the user, end their sessions and stop their agent. Their
        data directory stays on disk unless ``purge``."""
        yield self.ready()
        yield self.users.require(username)
        # Sessions first: the proxies close the user's open connections
        # before the agent goes, instead of seeing it vanish under a request
        # and asking for it to be started again.
        yield self._revoke(username)
        yield self.supervisor.stop(username, reason="user removed")
        yield self.users.remove(username)  # its sessions and sealed records go too
        self.invalidations.sessions_revoked(username)
        if purge:
            yield self._in_files_thread(shutil.rmtree,
                                        os.path.join(self.state_dir, "users", username), True)
            if self.accounts is not None:
                yield self.accounts.release(username)
        self.log.info("removed user {username}{purged}", username=username,
                      purged=" and their data" if purge else "")

    @inlineCallbacks
    def reset_data(self, username: str) -> Steps:
        """Stop the agent and empty the user's data directory."""
        yield self.ready()
        yield self.users.require(username)
        yield self.supervisor.stop(username, reason="data reset")
        yield self._in_files_thread(_empty_directory, self.supervisor.data_dir(username))
        self.log.info("emptied the data of {username}", username=username)

    @inlineCallbacks
    def list_users(self, after: str = "", limit: int = -1) -> Steps:
        """``[(username, agent state)]`` sorted by name."""
        yield self.ready()
        names = yield self.users.usernames(after, limit)
        result: List[Tuple[str, str]] = [(name, self.supervisor.state(name)) for name in names]
        return result

    @inlineCallbacks
    def stop_agent(self, username: str) -> Steps:
        yield self.ready()
        yield self.users.require(username)
        if self.supervisor.state(username) == STOPPED:
            raise AgentNotRunning("the agent of %s is not running" % (username,))
        yield self.supervisor.stop(username, reason="operator")

    def start_agent(self, username: str) -> "Deferred[AgentAddress]":
        """``pixelated-ctl start``: the operator holds no session, so this
        answers the address of a running agent and refuses to start a stopped
        one (it would start without its password, and its user would later
        be served an agent that cannot open their mailbox)."""
        return self.ensure_agent(username, None, reason="operator")

    @inlineCallbacks
    def agent_info(self, username: str) -> Steps:
        yield self.ready()
        yield self.users.require(username)
        status: AgentStatus = self.supervisor.status(username)
        memory = 0
        if status.agent is not None:
            memory = (yield self._memory({username: status.agent})).get(username, 0)
        limits = (ILimitsAgents(self._provider).limits()
                  if ILimitsAgents.providedBy(self._provider) else "")
        return AgentDetails(status, memory, self.culler.last_activity(username) or 0.0,
                            self.node_of(username), limits)

    def node_of(self, username: str) -> str:
        """The node ``username``'s agent runs on, for providers with nodes (swarm)."""
        if not IRunsOnNodes.providedBy(self._provider):
            return ""
        return IRunsOnNodes(self._provider).node_of(username) or ""

    def _memory(self, agents: Dict[str, RunningAgent]) -> "Deferred[Dict[str, int]]":
        """Memory of these running agents: as the provider measures it (the
        docker provider asks the engine's stats), else the resident memory
        of each agent's process tree."""
        if IMeasuresMemory.providedBy(self._provider):
            return IMeasuresMemory(self._provider).memory_usage().addCallback(
                lambda usage: {name: usage.get(name, 0) for name in agents})
        return self._in_files_thread(
            lambda: {name: resident_memory(agent.pid) for name, agent in agents.items()})

    @inlineCallbacks
    def list_sessions(self, username: str) -> Steps:
        yield self.ready()
        yield self.users.require(username)
        sessions = yield self.sessions.of_user(username)
        return sessions

    @inlineCallbacks
    def stats(self) -> Steps:
        """``(users, sessions, {username: (memory, started)})``."""
        yield self.ready()
        users = yield self.users.count()
        sessions = yield self.sessions.count()
        running = self.supervisor.running()
        memory = yield self._memory(running)
        agents: Dict[str, Tuple[int, float]] = {
            name: (memory[name], agent.started) for name, agent in running.items()}
        return users, sessions, agents

    @inlineCallbacks
    def import_legacy(self, root: str, after: str = "", limit: int = 100) -> Steps:
        """Import a page of an original dispatcher's users; see legacy_import.

        Returns ``([(username, outcome, detail)], more)``; outcome is
        ``imported`` or ``skipped``.
        """
        yield self.ready()
        if not os.path.isabs(root):
            raise BadRequest("give the legacy root as an absolute path, not %r" % (root,))
        try:
            found: List[LegacyUser] = yield self._in_files_thread(read_legacy_root, root)
        except OSError as error:
            raise BadRequest("cannot read %s: %s" % (root, error.strerror or error))
        page = [user for user in found if user.username > after]
        more = limit >= 0 and len(page) > limit
        page = page[:limit] if limit >= 0 else page
        report = []
        for user in page:
            outcome = yield self._import_one(user)
            report.append((user.username,) + outcome)
        return report, more

    @inlineCallbacks
    def _import_one(self, user: LegacyUser) -> Steps:
        if user.problem or user.password_hash is None:  # read_legacy_root sets one
            return "skipped", user.problem or "no password set in user.cfg"
        try:
            yield self.users.add_with_hash(user.username, user.password_hash)
        except UserExists:
            stored = yield self.users.stored_hash(user.username)
            if stored == user.password_hash:
                return "skipped", "imported already"
            return "skipped", "a user of that name exists already"
        detail = "no data directory"
        if user.data_dir:
            target = self.supervisor.data_dir(user.username)
            detail = yield self._in_files_thread(_move_data, user.data_dir, target)
        self.log.info("imported legacy user {username}: {detail}", username=user.username,
                      detail=detail)
        return "imported", detail


def _empty_directory(path: str) -> None:
    if not os.path.isdir(path):
        return
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _move_data(source: str, target: str) -> str:
    """Move the old data directory into place; never overwrite data."""
    if os.path.exists(target) and os.listdir(target):
        return "data left in %s: %s is not empty" % (source, target)
    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
    if os.path.isdir(target):
        os.rmdir(target)
    shutil.move(source, target)
    os.chmod(target, 0o700)
    return "data moved from %s" % (source,)
