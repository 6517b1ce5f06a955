"""Who may use which command of the manager socket: the one place that decides.

The peer's Unix credentials are read from the socket (``SO_PEERCRED``) when it
connects; its supplementary groups from ``/proc/<pid>/status`` at the same
moment. Root and members of the admin group may use every command; members
of the proxy group only the proxy commands, and those that name a user's
agent only with a live session of that user; everybody else nothing.
"""
import grp
import os
import socket
import struct
from typing import Any, FrozenSet, Optional, Type

import attr
from twisted.protocols import amp

from .. import protocol

ADMIN = "admin"
PROXY = "proxy"


@attr.s(frozen=True, auto_attribs=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int
    groups: FrozenSet[int] = frozenset()


def peer_credentials(transport: Any) -> Optional[PeerCredentials]:
    """The credentials of the process at the other end of a Unix socket."""
    try:
        raw = transport.getHandle().getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid, frozenset({gid}) | _supplementary_groups(pid))


def _supplementary_groups(pid: int) -> FrozenSet[int]:
    try:
        with open("/proc/%d/status" % pid) as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def group_id(name_or_number: Optional[str]) -> Optional[int]:
    """The gid of a group given by name or number; None if there is no such group."""
    if not name_or_number:
        return None
    if name_or_number.isdigit():
        return int(name_or_number)
    try:
        return grp.getgrnam(name_or_number).gr_gid
    except KeyError:
        return None


@attr.s(frozen=True, auto_attribs=True)
class PeerPolicy:
    """:param admin_gid: members may administer (None: root only).
    :param proxy_gid: members may use the proxy commands (None: nobody but admins).
    :param admin_uids: these users may administer: root, and the manager's
        own user (a manager run by a normal user in development).
    """
    admin_gid: Optional[int] = None
    proxy_gid: Optional[int] = None
    admin_uids: FrozenSet[int] = frozenset({0, os.getuid()})

    def role(self, peer: Optional[PeerCredentials]) -> Optional[str]:
        if peer is None:
            return None
        if peer.uid in self.admin_uids or (self.admin_gid is not None
                                           and self.admin_gid in peer.groups):
            return ADMIN
        if self.proxy_gid is not None and self.proxy_gid in peer.groups:
            return PROXY
        return None

    def allows(self, peer: Optional[PeerCredentials], command: Type[amp.Command]) -> bool:
        role = self.role(peer)
        if role == ADMIN:
            return True
        return role == PROXY and command in protocol.PROXY_COMMANDS

    def needs_session(self, peer: Optional[PeerCredentials],
                      command: Type[amp.Command]) -> bool:
        """Whether ``peer`` must show a live session of the user a command
        names (``EnsureAgent``, ``LocateAgent``): everybody but admins, so
        that a compromised proxy reaches only the agents of users whose
        session it holds."""
        return command in protocol.SESSION_BOUND_COMMANDS and self.role(peer) != ADMIN

    @classmethod
    def for_groups(cls, admin_group: Optional[str], proxy_group: Optional[str]) -> "PeerPolicy":
        return cls(group_id(admin_group), group_id(proxy_group))
