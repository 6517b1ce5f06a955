"""What the proxy remembers of the manager's answers, and for how long.

Asking the manager twice per request (session, then agent address) would
cost a round trip over the socket on every request. :class:`ManagerCache`
keeps both answers and forgets them when the manager says so:

* while the manager connection is *subscribed*, pushes
  (``SessionEnded``, ``SessionsRevoked``, ``AgentStopped``) remove entries
  at once, so entries may live :data:`SUBSCRIBED_TTL` seconds. They still
  expire, so that the manager sees each session in use (its idle timeout)
  and its expiry and absolute lifetime take effect;
* when the connection drops, everything is forgotten (a push may have been
  missed), and until the next connection is subscribed, entries live only
  :data:`UNSUBSCRIBED_TTL` seconds, which keeps the promise that a revoked
  session stops working within one second;
* an answer that was asked for before a push arrived is not cached (a
  generation counter), so a late answer cannot resurrect what was revoked.

The same pushes close what is already open: :attr:`ManagerCache.exchanges`
(:class:`.open_exchanges.OpenExchanges`) holds every request forwarded to an
agent until it finishes, and a revocation closes those of the user (or of
the one session) at once, tunnels and long polls included. After a
reconnection (pushes may have been missed) the sessions of open exchanges
are asked about again, and those that ended are closed.

It also shares agent starts: every request of a session whose agent is not
known to run waits on the same ``ensure_agent`` (which carries that
session's token: the manager answers only for the token's own user, and the
agent starts with the credentials sealed under it), and the last start
failure of each session is kept for the waiting page.

An address is cached per user, and used only for a request whose session
resolved to that user (the session gate resolves first, then asks here by
the resolved name); the manager gave it against a session of that user, and
let the proxy connect to it (the agent firewall's grant) until that user's
last session ends: ``SessionsRevoked`` drops it with the sessions.

And it collects which users were active, and
reports them to the manager in batches every :data:`ACTIVITY_INTERVAL`
seconds, for idle culling (a user with an open tunnel counts as active at
every report, until the tunnel closes).
"""
from typing import Any, Dict, Optional, Set, Tuple

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..fanout import SharedResult
from ..protocol import AgentAddress, token_digest
from ..protocol import InvalidSession, InvalidUsername, UnknownUser
from .manager_interface import IInvalidationListener, IManager
from .open_exchanges import OpenExchanges

log = Logger()

SUBSCRIBED_TTL = 30.0
UNSUBSCRIBED_TTL = 0.5
ACTIVITY_INTERVAL = 30.0


@implementer(IInvalidationListener)
class ManagerCache:
    """Session and agent answers of ``manager``, kept as long as safe."""

    def __init__(self, manager: IManager, clock: Any, *,
                 subscribed_ttl: float = SUBSCRIBED_TTL,
                 unsubscribed_ttl: float = UNSUBSCRIBED_TTL,
                 activity_interval: float = ACTIVITY_INTERVAL) -> None:
        self.manager = manager
        self._clock = clock
        self._subscribed_ttl = subscribed_ttl
        self._unsubscribed_ttl = unsubscribed_ttl
        self.is_subscribed = False
        self._generation = 0
        #: token → (username, expiry, digest)
        self._sessions: Dict[str, Tuple[str, float, str]] = {}
        self._digests: Dict[str, str] = {}
        #: username → (address, expiry)
        self._addresses: Dict[str, Tuple[AgentAddress, float]] = {}
        #: (username, token) → that session's ensure_agent in flight
        self._starts: Dict[Tuple[str, str], SharedResult] = {}
        #: token → the failure of its last start, until shown
        self._start_failures: Dict[str, Failure] = {}
        self._active: Set[str] = set()
        #: requests forwarded to agents and not finished (tunnels included)
        self.exchanges = OpenExchanges()
        self._missed_pushes = False
        self._reporter = LoopingCall(self.report_activity)
        self._reporter.clock = clock
        self._activity_interval = activity_interval

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to the manager's pushes and start reporting activity."""
        d = maybeDeferred(self.manager.subscribe, self)
        d.addErrback(lambda f: log.info("Not subscribed yet: {error}",
                                        error=f.getErrorMessage()))
        if not self._reporter.running:
            self._reporter.start(self._activity_interval, now=False).addErrback(
                lambda f: log.failure("Activity reports stopped", f))

    def stop(self) -> Deferred:
        """Send the last activity report and stop reporting."""
        if self._reporter.running:
            self._reporter.stop()
        return self.report_activity()

    def _ttl(self) -> float:
        return self._subscribed_ttl if self.is_subscribed else self._unsubscribed_ttl

    # --- sessions --------------------------------------------------------------------

    def cached_user(self, token: str) -> Optional[str]:
        """The user of ``token`` if a fresh answer is at hand (no Deferred)."""
        entry = self._sessions.get(token)
        if entry is None:
            return None
        if entry[1] <= self._clock.seconds():
            self._drop_session(token)
            return None
        return entry[0]

    def resolve(self, token: str) -> Deferred:
        """The user of ``token``, from the cache or the manager."""
        cached = self.cached_user(token)
        if cached is not None:
            return succeed(cached)
        generation = self._generation

        def remember(username: str) -> str:
            if generation == self._generation:
                digest = token_digest(token)
                self._sessions[token] = (username, self._clock.seconds() + self._ttl(),
                                         digest)
                self._digests[digest] = token
            return username
        return maybeDeferred(self.manager.resolve_session, token).addCallback(remember)

    def forget_session(self, token: str) -> None:
        """Forget one token (logout, or the manager said it is invalid)."""
        self._generation += 1
        self._drop_session(token)

    def _drop_session(self, token: str) -> None:
        self._start_failures.pop(token, None)
        entry = self._sessions.pop(token, None)
        if entry is not None:
            self._digests.pop(entry[2], None)

    # --- agents ------------------------------------------------------------------------

    def cached_address(self, username: str) -> Optional[AgentAddress]:
        """The address of the user's running agent, if fresh (no Deferred)."""
        entry = self._addresses.get(username)
        if entry is None:
            return None
        if entry[1] <= self._clock.seconds():
            del self._addresses[username]
            return None
        return entry[0]

    def starting(self, username: str) -> bool:
        """Whether an ``ensure_agent`` for the user is in flight."""
        return any(name == username for name, _ in self._starts)

    def start_failure(self, token: str) -> Optional[Failure]:
        """The failure of the last start asked for with this session, once
        (then forgotten)."""
        return self._start_failures.pop(token, None)

    def ensure(self, username: str, token: str) -> Deferred:
        """The agent address of ``username``, whose session ``token`` is:
        cached, or from one ``ensure_agent`` call shared by the session's
        requests (which starts the agent if needed)."""
        cached = self.cached_address(username)
        if cached is not None:
            return succeed(cached)
        key = (username, token)
        shared = self._starts.get(key)
        if shared is not None:
            return shared.wait()
        self._start_failures.pop(token, None)
        generation = self._generation

        def done(result: Any) -> Any:
            # Before any waiter hears it: they find the state it leaves.
            self._starts.pop(key, None)
            if isinstance(result, Failure):
                self._start_failures[token] = result
            elif generation == self._generation:
                self._addresses[username] = (result, self._clock.seconds() + self._ttl())
            return result
        shared = SharedResult(
            maybeDeferred(self.manager.ensure_agent, username, token).addBoth(done))
        if not shared.done:
            self._starts[key] = shared
        return shared.wait()

    def forget_address(self, username: str) -> None:
        """The agent did not answer at its address: ask again next time."""
        self._generation += 1
        self._addresses.pop(username, None)

    # --- activity --------------------------------------------------------------------

    def touch(self, username: str) -> None:
        """The user's agent was just used."""
        self._active.add(username)

    def report_activity(self) -> Deferred:
        """Send the users active since the last report (and prune the cache)."""
        now = self._clock.seconds()
        for token in [t for t, e in self._sessions.items() if e[1] <= now]:
            self._drop_session(token)
        for username in [u for u, e in self._addresses.items() if e[1] <= now]:
            del self._addresses[username]
        active, self._active = self._active | self.exchanges.tunnel_users(), set()
        if not active:
            return succeed(None)
        d = maybeDeferred(self.manager.report_activity, sorted(active))

        def failed(failure: Failure) -> None:
            log.warn("Could not report activity: {error}", error=failure.getErrorMessage())
            self._active |= active  # try again next time
        return d.addErrback(failed)

    # --- IInvalidationListener ---------------------------------------------------------

    def subscribed(self) -> None:
        self.is_subscribed = True
        if self._missed_pushes:
            self._missed_pushes = False
            self._recheck_open_sessions()

    def reset(self) -> None:
        self.is_subscribed = False
        self._missed_pushes = True
        self._generation += 1
        self._sessions.clear()
        self._digests.clear()
        self._addresses.clear()

    def _recheck_open_sessions(self) -> None:
        """Ask again about the sessions of open exchanges (a revocation may
        have been pushed while the connection was down); close the ended."""
        for token in self.exchanges.tokens():
            def ended(failure: Failure, token: str = token) -> None:
                if failure.check(InvalidSession, UnknownUser, InvalidUsername):
                    self.exchanges.close_token(token, "session ended while the manager"
                                               " connection was down")
                else:
                    log.info("Could not check a session: {error}",
                             error=failure.getErrorMessage())
            maybeDeferred(self.manager.resolve_session, token).addErrback(ended)

    def session_ended(self, token_digest: str) -> None:
        self._generation += 1
        token = self._digests.pop(token_digest, None)
        if token is not None:
            self._sessions.pop(token, None)
        self.exchanges.close_session(token_digest, "session ended")

    def sessions_revoked(self, username: str) -> None:
        self._generation += 1
        for token in [t for t, e in self._sessions.items() if e[0] == username]:
            self._drop_session(token)
        # The manager took back the proxy's grant of the agent with the last
        # session (the agent firewall): the address is asked for again, with
        # the next session, which grants it anew.
        self._addresses.pop(username, None)
        self._active.discard(username)
        self.exchanges.close_user(username, "sessions revoked")

    def agent_stopped(self, username: str) -> None:
        self._generation += 1
        self._addresses.pop(username, None)
        # Open exchanges stay: the agent's end closes their agent side, and
        # a request in flight gets the "starting" page (or 503) instead of a
        # cut connection.
