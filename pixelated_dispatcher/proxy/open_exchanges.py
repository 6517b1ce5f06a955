"""The requests the proxy is forwarding to agents right now, by user and by
session: the one place that knows what a revocation must close.

A revoked session must stop working at once, also where the proxy does not
ask the manager again: a WebSocket tunnel or a long poll opened before the
revocation carries on for hours otherwise. :class:`OpenExchanges` records
every forwarded request from the moment the session gate hands it to the
forwarder until it finishes, and closes (aborts the browser's connection,
which drops the agent's side) those of a user or of one session when the
manager says so (``SessionsRevoked``, ``SessionEnded``). An agent that
stops (``AgentStopped``) closes its side of them itself.
A tunnel also counts as activity for idle culling while it is open, and
only while it is open: a closed one is no longer reported.
"""
from typing import Callable, Dict, Iterable, List, Optional, Set

import attr
from twisted.logger import Logger
from twisted.web.server import Request

from ..protocol import token_digest

log = Logger()


@attr.s(auto_attribs=True, eq=False)
class OpenExchange:
    """One forwarded request (or the tunnel it became)."""

    request: Request
    username: str
    token: str
    tunnel: bool


def abort_browser_connection(request: Request) -> None:
    """End the browser's side of ``request`` at once: the channel learns it
    is lost, the forwarder drops the agent's side (tunnel or request)."""
    channel = getattr(request, "channel", None)
    transport = getattr(channel, "transport", None)
    if transport is not None:
        transport.abortConnection()


class OpenExchanges:
    """Forwarded requests still open, by user; closes them on revocation."""

    def __init__(self, close: Callable[[Request], None] = abort_browser_connection) -> None:
        self._close = close
        self._by_user: Dict[str, Set[OpenExchange]] = {}

    def opened(self, request: Request, username: str, token: str, tunnel: bool) -> None:
        """``request`` of ``username``'s session ``token`` goes to the agent
        now; it is forgotten when it finishes (or its connection is lost)."""
        entry = OpenExchange(request, username, token, tunnel)
        self._by_user.setdefault(username, set()).add(entry)
        request.notifyFinish().addBoth(lambda _: self._forget(entry))

    def _forget(self, entry: OpenExchange) -> None:
        entries = self._by_user.get(entry.username)
        if entries is not None:
            entries.discard(entry)
            if not entries:
                del self._by_user[entry.username]

    def count(self, username: Optional[str] = None) -> int:
        """Open exchanges of ``username`` (of everybody when None)."""
        if username is not None:
            return len(self._by_user.get(username, ()))
        return sum(len(entries) for entries in self._by_user.values())

    def tunnel_users(self) -> Set[str]:
        """Users with an open tunnel (active for as long as it is open)."""
        return {name for name, entries in self._by_user.items()
                if any(entry.tunnel for entry in entries)}

    def tokens(self) -> Set[str]:
        """The session tokens that open exchanges were admitted with."""
        return {entry.token for entries in self._by_user.values() for entry in entries}

    def close_user(self, username: str, why: str) -> int:
        """Close every open exchange of ``username``; how many were open."""
        return self._close_all(list(self._by_user.get(username, ())), why)

    def close_session(self, digest: str, why: str) -> int:
        """Close the open exchanges of the session whose token digest is
        ``digest`` (digests are made here, for the few revocations, rather
        than for every request)."""
        return self._close_all([entry for entries in self._by_user.values()
                                for entry in entries if token_digest(entry.token) == digest],
                               why)

    def close_token(self, token: str, why: str) -> int:
        return self.close_session(token_digest(token), why)

    def _close_all(self, entries: Iterable[OpenExchange], why: str) -> int:
        closed: List[OpenExchange] = list(entries)
        for entry in closed:
            self._forget(entry)
            try:
                self._close(entry.request)
            except Exception:
                log.failure("Could not close a connection of {user}", user=entry.username)
        if closed:
            log.info("Closed {count} open connection(s) of {user}: {why}",
                     count=len(closed), user=closed[0].username, why=why)
        return len(closed)
