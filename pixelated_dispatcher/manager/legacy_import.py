"""Reading an original pixelated-dispatcher installation for ``import-legacy``.

The original kept one directory per user under its root (Debian:
``/var/lib/pixelated/dispatcher``): ``<user>/user.cfg`` with an INI section
``[auth]`` holding ``salt`` and ``hashed_password`` (hex scrypt, see
``passwords.LEGACY_SCRYPT``), and ``<user>/data/``, the agent's home. It also
kept non-user directories there (``providers``, ``virtualenv``). Everything
here only reads; the manager decides what to import.
"""
import configparser
import os
from typing import List, Optional

import attr

from ..usernames import is_valid_username
from .passwords import legacy_scrypt_hash

#: directories of the original's root that never were users
NOT_USERS = frozenset({"providers", "virtualenv"})


@attr.s(frozen=True, auto_attribs=True)
class LegacyUser:
    username: str
    #: the stored form of the old hash (``$legacy-scrypt$...``), or None
    password_hash: Optional[str]
    #: the old data directory, or None when there is none
    data_dir: Optional[str]
    #: why this entry cannot be imported, or None
    problem: Optional[str] = None


def read_legacy_root(root: str) -> List[LegacyUser]:
    """Every user directory of an original installation, sorted by name.

    Blocking (file reads): run it in a thread.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError("%s is not a directory" % (root,))
    found = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name in NOT_USERS or not os.path.isdir(path) or os.path.islink(path):
            continue
        found.append(_read_user(name, path))
    return found


def _read_user(name: str, path: str) -> LegacyUser:
    data = os.path.join(path, "data")
    data_dir = data if os.path.isdir(data) and not os.path.islink(data) else None
    if not is_valid_username(name):
        return LegacyUser(name, None, data_dir, "the name breaks the user name rule")
    config = configparser.ConfigParser(interpolation=None)
    try:
        with open(os.path.join(path, "user.cfg"), encoding="utf-8") as f:
            config.read_file(f)
    except FileNotFoundError:
        return LegacyUser(name, None, data_dir, "no user.cfg")
    except (OSError, UnicodeError, configparser.Error) as error:
        return LegacyUser(name, None, data_dir, "unreadable user.cfg (%s)" % (error,))
    salt = config.get("auth", "salt", fallback="").strip()
    hashed = config.get("auth", "hashed_password", fallback="").strip()
    if not salt or not hashed:
        return LegacyUser(name, None, data_dir, "no password set in user.cfg")
    try:
        encoded = legacy_scrypt_hash(salt, hashed)
    except ValueError as error:
        return LegacyUser(name, None, data_dir, "unusable password hash (%s)" % (error,))
    return LegacyUser(name, encoded, data_dir)
