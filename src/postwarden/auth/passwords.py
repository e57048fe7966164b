"""Password hashing: argon2id (RFC 9106) through argon2-cffi.

This module owns the one hash format postwarden stores for accounts
(``$argon2id$v=19$m=...,t=...,p=...$salt$hash``), password verification and
the passwords that ``postwarden init`` / ``user add`` generate.

Security exposure: :func:`verify_password` receives passwords from
unauthenticated clients (SMTP AUTH).  It compares in constant time (inside
libargon2), never raises (a malformed stored hash fails closed), and is
CPU- and memory-heavy on purpose, so the server must call
:func:`verify_password_async`, which runs it in a worker thread and never
blocks the event loop.  Pass ``None`` as the hash for an unknown user: the
same work is done against a dummy hash, so response time does not reveal
which accounts exist.  Passwords are never logged.
"""

from __future__ import annotations

import asyncio
import secrets
from functools import lru_cache

from argon2 import PasswordHasher, Type

# RFC 9106 4, second recommended option (t=3, p=4, m=64 MiB), with the
# memory halved so that one verification takes roughly 50-70 ms on a small
# server: slow for a guesser, tolerable for a login.  Changing these makes
# needs_rehash() true for older hashes (rehash on the next successful login).
TIME_COST = 3
MEMORY_COST_KIB = 32 * 1024
PARALLELISM = 4
HASH_LEN = 32
SALT_LEN = 16

# Generated passwords: 20 characters from an alphabet without look-alikes
# (0/O/o, 1/l/I), about 115 bits of entropy; letters and digits only, so
# they survive copy, paste and typing on a phone.
GENERATED_LENGTH = 20
ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789"

_hasher = PasswordHasher(
    time_cost=TIME_COST,
    memory_cost=MEMORY_COST_KIB,
    parallelism=PARALLELISM,
    hash_len=HASH_LEN,
    salt_len=SALT_LEN,
    type=Type.ID,
)


def hash_password(password: str) -> str:
    """The argon2id hash (PHC string format) of ``password``, with a random salt."""
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """True if ``password`` matches ``password_hash``.

    False on mismatch, on a malformed hash and when ``password_hash`` is
    ``None`` (unknown user: a dummy hash is verified so that timing is the
    same).  Never raises.
    """
    if password_hash is None:
        _verify(_dummy_hash(), password)
        return False
    return _verify(password_hash, password)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except Exception:
        # VerifyMismatchError, InvalidHashError, VerificationError and any
        # encoding problem with untrusted input: fail closed.
        return False


async def verify_password_async(password_hash: str | None, password: str) -> bool:
    """:func:`verify_password` in a worker thread (keeps the event loop free)."""
    return await asyncio.to_thread(verify_password, password_hash, password)


def needs_rehash(password_hash: str) -> bool:
    """True if the hash was made with other parameters (or is not a valid
    argon2 hash): store a fresh :func:`hash_password` after a good login."""
    try:
        return _hasher.check_needs_rehash(password_hash)
    except Exception:
        return True


def is_password_hash(text: str) -> bool:
    """True if ``text`` looks like a hash this module made (not a clear password)."""
    return text.startswith("$argon2id$")


def generate_password(length: int = GENERATED_LENGTH) -> str:
    """A random password from :data:`ALPHABET` (``secrets`` module)."""
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))
