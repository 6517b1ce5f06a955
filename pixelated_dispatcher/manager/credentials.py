"""The credentials line an agent reads on its standard input at start.

The Pixelated user agent in ``--organization-mode`` reads one JSON object
``{"leap_provider_hostname", "user", "password"}`` from stdin. The manager
learns the password when the user logs in and keeps it in memory only while
that user has a session, so that it can start (or restart) the agent; it is
never written to disk, argv or the environment.
"""
import json
from typing import Dict, Iterable


class CredentialsVault:
    """In-memory passwords of logged-in users, and the line built from them."""

    def __init__(self, leap_provider_hostname: str) -> None:
        self._leap_provider = leap_provider_hostname
        self._passwords: Dict[str, str] = {}

    def remember(self, username: str, password: str) -> None:
        self._passwords[username] = password

    def forget(self, username: str) -> None:
        self._passwords.pop(username, None)

    def forget_all_except(self, usernames: Iterable[str]) -> int:
        """Forget every password but those of ``usernames``; how many went."""
        keep = set(usernames)
        gone = [name for name in self._passwords if name not in keep]
        for name in gone:
            del self._passwords[name]
        return len(gone)

    def knows(self, username: str) -> bool:
        """Whether the user's password is here (they logged in to this manager)."""
        return username in self._passwords

    def line_for(self, username: str) -> bytes:
        """The JSON line for ``username``; the password is empty when unknown
        (an agent started by an operator before the user logged in)."""
        document = {"leap_provider_hostname": self._leap_provider,
                    "user": username,
                    "password": self._passwords.get(username, "")}
        return json.dumps(document).encode("utf-8") + b"\n"
