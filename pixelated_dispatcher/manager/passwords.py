"""Password hashing with argon2id, always off the reactor thread.

The parameters are pinned here because argon2-cffi's defaults differ between
Debian 12 (21.1) and PyPI (25.x); a hash records its own parameters, so
changing them later only needs a rehash at the next login
(:meth:`PasswordHasher.needs_rehash`).

Hashing uses a dedicated, small thread pool: argon2 releases the GIL, and a
pool no larger than the spare cores keeps the reactor responsive while many
logins arrive at once (see twisted-notes §7).
"""
import hashlib
import hmac
import os
from typing import Optional

import argon2
import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


@attr.s(frozen=True, auto_attribs=True)
class HashParameters:
    """argon2id cost parameters."""
    time_cost: int = 2
    memory_cost_kib: int = 19456
    parallelism: int = 1


#: What production uses: OWASP's recommended argon2id configuration (19 MiB,
#: two passes, one lane; Password Storage Cheat Sheet). About 35 ms per
#: verification on one core here, so a 2-core server takes dozens of logins
#: a second while serving; RFC 9106's 64 MiB / t=3 costs about 5x that
#: (``--argon2-memory 65536 --argon2-time-cost 3`` for operators who prefer
#: it; docs/benchmarks.rst shows both). Hashes record their parameters, so a
#: change takes effect at each user's next login.
PRODUCTION = HashParameters()

#: Cheap parameters for tests that are about behaviour, not cost.
FAST_FOR_TESTS = HashParameters(time_cost=1, memory_cost_kib=256, parallelism=1)


#: Prefix of hashes imported from the original pixelated-dispatcher:
#: ``$legacy-scrypt$<salt>$<hex of scrypt(password, salt, N=16384, r=8, p=1, 64 bytes)>``
#: where ``salt`` is used as its ASCII bytes, as the original did. They are
#: verified with :func:`hashlib.scrypt` and replaced by argon2id at the first
#: successful login.
LEGACY_SCRYPT = "$legacy-scrypt$"


def legacy_scrypt_hash(salt: str, hex_digest: str) -> str:
    """The stored form of an original dispatcher's ``[auth]`` salt and hash."""
    if "$" in salt or not salt:
        raise ValueError("unusable salt")
    bytes.fromhex(hex_digest)
    if len(hex_digest) != 128:
        raise ValueError("hashed_password must be 128 hex digits")
    return LEGACY_SCRYPT + salt + "$" + hex_digest.lower()


def _verify_legacy_scrypt(encoded: str, password: str) -> bool:
    salt, expected = encoded[len(LEGACY_SCRYPT):].split("$", 1)
    computed = hashlib.scrypt(password.encode("utf-8"), salt=salt.encode("ascii"),
                              n=16384, r=8, p=1, dklen=64, maxmem=64 * 1024 * 1024)
    return hmac.compare_digest(computed.hex(), expected)


def _default_pool_size() -> int:
    return max(1, (os.cpu_count() or 1) - 1)


class PasswordHasher:
    """Hashes and verifies passwords in its own thread pool.

    Start it with :meth:`start` and stop it with :meth:`stop` (the manager
    service does both).
    """

    def __init__(self, reactor: IReactorThreads, parameters: HashParameters = PRODUCTION,
                 threads: Optional[int] = None) -> None:
        self._reactor = reactor
        self._hasher = argon2.PasswordHasher(
            time_cost=parameters.time_cost, memory_cost=parameters.memory_cost_kib,
            parallelism=parameters.parallelism, hash_len=32, salt_len=16,
            type=argon2.Type.ID)
        size = threads or _default_pool_size()
        self._pool = ThreadPool(minthreads=1, maxthreads=size, name="password-hashing")
        # A hash of a random password, verified against when the user does not
        # exist, so that unknown users and wrong passwords take the same time.
        self._dummy_hash: Optional[str] = None

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    def hash(self, password: str) -> "Deferred[str]":
        """Deferred firing with the encoded argon2id hash of ``password``."""
        return deferToThreadPool(self._reactor, self._pool, self._hasher.hash, password)

    def verify(self, encoded: Optional[str], password: str) -> "Deferred[bool]":
        """Deferred firing with True if ``password`` matches ``encoded``.

        ``encoded`` may be None (unknown user): the same work is done against
        a dummy hash and the answer is False.
        """
        return deferToThreadPool(self._reactor, self._pool, self._verify, encoded, password)

    def needs_rehash(self, encoded: str) -> bool:
        if encoded.startswith(LEGACY_SCRYPT):
            return True
        return self._hasher.check_needs_rehash(encoded)

    def _verify(self, encoded: Optional[str], password: str) -> bool:
        if encoded is None:
            if self._dummy_hash is None:
                self._dummy_hash = self._hasher.hash(os.urandom(16).hex())
            encoded, password, known = self._dummy_hash, password, False
        else:
            known = True
        if encoded.startswith(LEGACY_SCRYPT):
            try:
                return _verify_legacy_scrypt(encoded, password)
            except (ValueError, UnicodeError):
                return False
        try:
            return self._hasher.verify(encoded, password) and known
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHash:
            return False
