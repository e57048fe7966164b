"""Identifiers: session ids in the logs, queue ids in the queue and in
Received headers.

Both are random, so that one cannot be guessed from another (a queue id is
shown to the client in the 250 reply).  The randomness comes from the
kernel's CSPRNG, read 4 KiB at a time: two getrandom(2) calls per message
were a measurable part of accepting one.

Security exposure: none beyond their unpredictability; they name nothing
on disk (spool files are named separately).
"""

from __future__ import annotations

import base64
import os
import threading

_POOL_SIZE = 4096


class _Entropy:
    """Bytes from os.urandom, handed out once each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._pos + n > len(self._pool):
                self._pool = os.urandom(max(_POOL_SIZE, n))
                self._pos = 0
            out = self._pool[self._pos:self._pos + n]
            self._pos += n
            return out


_entropy = _Entropy()


def random_hex(nbytes: int) -> str:
    """``nbytes`` random bytes as hex (e.g. for unique file names)."""
    return _entropy.take(nbytes).hex()


def new_session_id() -> str:
    """10 hex characters (40 random bits): short enough to grep by eye."""
    return _entropy.take(5).hex()


def new_queue_id() -> str:
    """16 characters of RFC 4648 base32 (80 random bits): upper case,
    URL-safe."""
    return base64.b32encode(_entropy.take(10)).decode("ascii")
