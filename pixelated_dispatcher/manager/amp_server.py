"""The manager's end of the AMP socket: translate commands into Manager calls.

Responders only translate. Every error a command did not declare would make
AMP close the connection (failing every other call in flight), so anything
that is not one of the contract's errors becomes ``InternalError`` here, after
being logged with its traceback.

The peer's Unix credentials are read once per connection (``SO_PEERCRED``)
and every command is checked by :class:`PeerPolicy` in one place.
"""
import socket
import struct
from functools import wraps
from typing import Optional

import attr
from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from .. import protocol as p
from .service import Manager

log = Logger()


@attr.s(frozen=True, auto_attribs=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(transport) -> Optional[PeerCredentials]:
    """The credentials of the process at the other end of a Unix socket."""
    try:
        raw = transport.getHandle().getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    return PeerCredentials(*struct.unpack("3i", raw))


class PeerPolicy:
    """Who may use which command.

    For now whoever can open the socket (mode 0660: root and the socket's
    group) may use every command; the manager issue narrows this per peer.
    """

    def allows(self, peer: Optional[PeerCredentials], command) -> bool:
        return True


def _translated(command):
    """Wrap a responder: check the policy, translate unexpected errors."""
    def decorate(method):
        @wraps(method)
        def responder(self, **kwargs):
            if not self.policy.allows(self.peer, command):
                log.warn("refused {command} to {peer}", command=command.__name__, peer=self.peer)
                raise p.PermissionDenied("permission denied")
            d = maybeDeferred(method, self, **kwargs)
            d.addErrback(_translate_unexpected, command)
            return d
        return command.responder(responder)
    return decorate


def _translate_unexpected(failure, command):
    if failure.check(*command.allErrors):
        return failure
    log.failure("unexpected error in {command}", failure, command=command.__name__)
    raise p.InternalError("internal error in the manager (see its log)")


class ManagerLocator(amp.CommandLocator):
    """Answers the commands of one connection."""

    def __init__(self, manager: Manager, policy: PeerPolicy,
                 peer: Optional[PeerCredentials]) -> None:
        self.manager = manager
        self.policy = policy
        self.peer = peer

    @_translated(p.Authenticate)
    def authenticate(self, username, password, client):
        d = self.manager.authenticate(username, password, client)
        return d.addCallback(lambda token: {"token": token})

    @_translated(p.ResolveSession)
    def resolve_session(self, token):
        return self.manager.resolve_session(token).addCallback(lambda u: {"username": u})

    @_translated(p.EndSession)
    def end_session(self, token):
        return self.manager.end_session(token).addCallback(lambda u: {"username": u})

    @_translated(p.EnsureAgent)
    def ensure_agent(self, username):
        return self.manager.ensure_agent(username).addCallback(_address)

    @_translated(p.LocateAgent)
    def locate_agent(self, username):
        return self.manager.locate_agent(username).addCallback(_address)

    @_translated(p.AddUser)
    def add_user(self, username, password):
        return self.manager.add_user(username, password).addCallback(lambda _: {})

    @_translated(p.RemoveUser)
    def remove_user(self, username):
        return self.manager.remove_user(username).addCallback(lambda _: {})

    @_translated(p.ListUsers)
    def list_users(self):
        return self.manager.list_users().addCallback(
            lambda users: {"users": [{"username": u, "state": s} for u, s in users]})

    @_translated(p.StartAgent)
    def start_agent(self, username):
        return self.manager.start_agent(username).addCallback(_address)

    @_translated(p.StopAgent)
    def stop_agent(self, username):
        return self.manager.stop_agent(username).addCallback(lambda _: {})

    @_translated(p.AgentInfo)
    def agent_info(self, username):
        def answer(status):
            agent = status.agent
            return {"username": status.username, "state": status.state,
                    "host": agent.address.host if agent else "",
                    "port": agent.address.port if agent else 0,
                    "pid": agent.pid if agent else 0,
                    "started": agent.started if agent else 0.0}
        return self.manager.agent_info(username).addCallback(answer)


def _address(address):
    return {"host": address.host, "port": address.port}


class ManagerAMP(amp.AMP):
    """One connection to the manager socket."""

    def __init__(self, manager: Manager, policy: PeerPolicy) -> None:
        super().__init__()
        self._manager = manager
        self._policy = policy

    def connectionMade(self) -> None:
        super().connectionMade()
        self.locator = ManagerLocator(self._manager, self._policy,
                                      peer_credentials(self.transport))


class ManagerAMPFactory(Factory):

    def __init__(self, manager: Manager, policy: Optional[PeerPolicy] = None) -> None:
        self._manager = manager
        self._policy = policy or PeerPolicy()

    def buildProtocol(self, addr):
        return ManagerAMP(self._manager, self._policy)
