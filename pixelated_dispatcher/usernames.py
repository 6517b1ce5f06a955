"""The one rule for user names, applied by the manager, the proxy and ctl.

A user name becomes a directory name, a container name and part of log lines,
so it is kept to a small, unambiguous alphabet: lowercase ASCII letters,
digits, ``.``, ``_`` and ``-``; 1 to 64 characters; not starting with ``.`` or
``-`` (no hidden directories, no option look-alikes).
"""
import re

MAX_LENGTH = 64

#: The rule as a regular expression (to be matched whole); other patterns
#: that contain a user name build on it.
PATTERN = r"[a-z0-9_][a-z0-9._-]{0,63}"

_VALID = re.compile(PATTERN)


class InvalidUsernameError(ValueError):
    """The name breaks the user name rule."""


def is_valid_username(name: str) -> bool:
    """Whether ``name`` follows the user name rule."""
    return isinstance(name, str) and _VALID.fullmatch(name) is not None


def check_username(name: str) -> str:
    """Return ``name`` unchanged, or raise :class:`InvalidUsernameError`."""
    if not is_valid_username(name):
        raise InvalidUsernameError(
            "invalid user name %r: use 1-64 lowercase letters, digits, '.', '_' or '-',"
            " not starting with '.' or '-'" % (name,))
    return name
