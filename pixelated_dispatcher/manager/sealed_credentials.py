"""What an agent needs to start, sealed under the session it was given to.

At login the manager seals the secrets the user's agent needs at start
(today the password; a JSON object, so that more can join it) under a key
derived from the new session's token, and stores the sealed record in the
session's row, next to the token's SHA-256. The token itself is never
stored: the browser holds it, and the proxy sends it with the request that
needs the agent. So the key exists only while such a request is served:

* a copy of the state directory (a backup, a stolen disk) holds ciphertext
  and token digests, from which neither the key nor the password follows;
* a manager restart loses nothing: the owner's next request brings the
  token, which opens the record, and the agent starts with the password;
* ending the session (logout, expiry, ``passwd``, ``logout NAME``,
  ``remove``) deletes the row and with it the record.

Key: HKDF-SHA256 of the token with a random salt per record. The token has
256 random bits, so a fast KDF is enough (a slow one protects guessable
secrets; this one is not). Cipher: AES-256-GCM with a random nonce; the
associated data binds the record to the user name and the token's digest,
so a record moved to another session or user does not open. Every failure
to open (wrong token, wrong user, a flipped bit, a truncated record) is one
:class:`SealBroken`, never a wrong plaintext.

Record layout: version (1 byte) | salt (16) | nonce (12) | ciphertext+tag.

These functions block (a few dozen microseconds each): the manager calls
them in a thread pool, never on the reactor.
"""
import json
import os
from typing import Dict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..protocol import token_digest

VERSION = b"\x01"
SALT_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
_HEADER = len(VERSION) + SALT_BYTES + NONCE_BYTES
_PURPOSE = b"pixelated-dispatcher sealed agent credentials v1"


class SealBroken(Exception):
    """The record does not open with this token and user name: it was sealed
    for another session or user, or it was altered or cut short."""


def _encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _key(token: str, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                info=_PURPOSE).derive(_encoded(token))


def _associated_data(token: str, username: str) -> bytes:
    return b"\0".join([_PURPOSE, _encoded(username), token_digest(token).encode("ascii")])


def seal(token: str, username: str, secrets: Dict[str, str]) -> bytes:
    """The sealed record of ``secrets`` for this session of ``username``."""
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    plaintext = json.dumps(secrets, sort_keys=True).encode("ascii")
    ciphertext = AESGCM(_key(token, salt)).encrypt(
        nonce, plaintext, _associated_data(token, username))
    return VERSION + salt + nonce + ciphertext


def unseal(token: str, username: str, record: bytes) -> Dict[str, str]:
    """The secrets sealed by :func:`seal` with the same token and user name;
    :class:`SealBroken` for anything else."""
    record = bytes(record)
    if len(record) < _HEADER + TAG_BYTES or record[:1] != VERSION:
        raise SealBroken("not a sealed credentials record of a known version")
    salt = record[1:1 + SALT_BYTES]
    nonce = record[1 + SALT_BYTES:_HEADER]
    try:
        plaintext = AESGCM(_key(token, salt)).decrypt(
            nonce, record[_HEADER:], _associated_data(token, username))
    except InvalidTag:
        raise SealBroken("the sealed credentials do not open with this session")
    secrets = json.loads(plaintext.decode("ascii"))
    if not (isinstance(secrets, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in secrets.items())):
        raise SealBroken("the sealed credentials are not a JSON object of strings")
    return secrets
