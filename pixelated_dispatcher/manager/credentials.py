"""The credentials line an agent reads on its standard input at start.

The Pixelated user agent in ``--organization-mode`` reads one JSON object
``{"leap_provider_hostname", "user", "password"}`` from stdin. The password
comes from the secrets sealed under the session whose request starts the
agent (``sealed_credentials``); it is never written to disk, argv or the
environment, and the line is dropped once delivered.
"""
import json
from typing import Dict

#: the key of the password among a session's sealed secrets
PASSWORD = "password"


def secrets_at_login(password: str) -> Dict[str, str]:
    """What a login seals for its session: what the agent needs to start."""
    return {PASSWORD: password}


def credentials_line(leap_provider_hostname: str, username: str,
                     secrets: Dict[str, str]) -> bytes:
    """The JSON line for ``username``'s agent, from its session's secrets."""
    document = {"leap_provider_hostname": leap_provider_hostname,
                "user": username,
                "password": secrets[PASSWORD]}
    return json.dumps(document).encode("utf-8") + b"\n"
