"""Which agents the proxy may reach: the manager's books of the firewall's grants.

The agent firewall (:mod:`.agent_firewall`) lets the proxy group connect to
an agent only while its endpoint is *granted*. The manager decides when
(``service.Manager``: a grant when it answers a request that showed a live
session of the agent's user, a revocation when that user's last session
ends); this module keeps the books, so that the request path needs no
``nft`` call for an agent that is granted already, and so that a
revocation names the endpoint that was granted.

One record per user: the agent granted (its :class:`RunningAgent`, so that
an agent started anew, even on the same port, is granted anew) and the
outcome of its ``grant`` (requests that come while it is in flight wait for
it: the proxy connects the moment it has its answer). Calls reach the
firewall in the order they are made (the firewall runs them in that order),
so a revocation made after a grant always wins.

An agent that ends loses its grant in the firewall with its entry (the
provider's ``release`` takes both), so :meth:`AgentGrants.forget` only
drops the record. A manager that starts finds the grants its predecessor
left (they outlive it as the agents do): :meth:`AgentGrants.recover` keeps
those of adopted agents whose users still have a live session (their open
tunnels go on) and revokes the rest.
"""
from typing import Any, Dict, Iterable, List, Mapping, Set

import attr
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger

from ..fanout import SharedResult
from .agent_firewall import Endpoint, IAgentFirewall
from .providers.interface import RunningAgent


def endpoint_of(agent: RunningAgent) -> Endpoint:
    return agent.address.host, agent.address.port


@attr.s(eq=False, auto_attribs=True)
class _Grant:
    agent: RunningAgent
    outcome: SharedResult

    @property
    def endpoint(self) -> Endpoint:
        return endpoint_of(self.agent)


class AgentGrants:
    """The agents granted to the proxy group, one per user at most."""

    log = Logger()

    def __init__(self, firewall: IAgentFirewall) -> None:
        #: the firewall the grants are made in (the providers' own)
        self.firewall = firewall
        self._grants: Dict[str, _Grant] = {}

    def granted(self) -> Dict[str, Endpoint]:
        """user name -> the endpoint granted for their agent (a grant in
        flight included)."""
        return {username: grant.endpoint for username, grant in self._grants.items()}

    def grant(self, agent: RunningAgent) -> "Deferred[bool]":
        """Fires once the proxy group may connect to ``agent``: at once,
        without asking the firewall, when it may already; with True when
        this call made the grant (False: it was made before)."""
        username = agent.username
        current = self._grants.get(username)
        if current is not None and current.agent == agent:
            if current.outcome.done:
                return succeed(False)
            return current.outcome.wait().addCallback(lambda _: False)
        if current is not None:
            # a record of an agent that ended unnoticed: its endpoint is no
            # grant of this user's any more (unless another user's agent has
            # it now, which the firewall granted afresh)
            self._revoke_unless_held(current.endpoint, username)
        made: Deferred = Deferred()
        grant = self._grants[username] = _Grant(agent, SharedResult(made))
        self.firewall.grant(*endpoint_of(agent)).addErrback(
            self._failed, username, grant).chainDeferred(made)
        return grant.outcome.wait().addCallback(lambda _: True)

    def _failed(self, failure: Any, username: str, grant: _Grant) -> Any:
        """A grant that failed is no record: the next request tries again."""
        if self._grants.get(username) is grant:
            del self._grants[username]
        return failure

    def revoke(self, username: str) -> Deferred:
        """The proxy group may no longer connect to ``username``'s agent
        (no firewall call when nothing was granted)."""
        grant = self._grants.pop(username, None)
        if grant is None:
            return succeed(None)
        return self._revoke_unless_held(grant.endpoint, username)

    def _revoke_unless_held(self, endpoint: Endpoint, username: str) -> Deferred:
        if any(other.endpoint == endpoint for name, other in self._grants.items()
               if name != username):
            return succeed(None)
        return self.firewall.revoke(*endpoint)

    def forget(self, username: str) -> None:
        """``username``'s agent ended: the provider's release took its grant
        away in the firewall; the record goes too."""
        self._grants.pop(username, None)

    def retain(self, usernames: Iterable[str]) -> "Deferred[List[str]]":
        """Revoke the grants of every user but ``usernames`` (those with a
        live session); fires with the users whose grant was revoked."""
        keep = set(usernames)
        return ensureDeferred(self._revoke_all(
            sorted(name for name in self._grants if name not in keep)))

    async def _revoke_all(self, usernames: List[str]) -> List[str]:
        for username in usernames:
            await self.revoke(username)
        return usernames

    def recover(self, agents: Mapping[str, RunningAgent], live: Set[str]) -> Deferred:
        """At manager start: keep the grants a previous manager left for
        ``agents`` (adopted) of users in ``live`` (with a live session);
        revoke every other grant."""
        return ensureDeferred(self._recover(agents, live))

    async def _recover(self, agents: Mapping[str, RunningAgent], live: Set[str]) -> None:
        left: Set[Endpoint] = set(await self.firewall.granted())
        kept: Set[Endpoint] = set()
        for username, agent in agents.items():
            endpoint = endpoint_of(agent)
            if username in live and endpoint in left:
                self._grants[username] = _Grant(agent, SharedResult(succeed(None)))
                kept.add(endpoint)
        for endpoint in sorted(left - kept):
            await self.firewall.revoke(*endpoint)
        if left:
            self.log.info("agent grants of the previous manager: {kept} kept (users with a"
                          " live session), {revoked} revoked", kept=len(kept),
                          revoked=len(left - kept))
