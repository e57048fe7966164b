"""Identifiers: session ids in the logs, queue ids in the queue and in
Received headers.

Both are random, so that one cannot be guessed from another (a queue id is
shown to the client in the 250 reply).  The randomness comes from the
kernel's CSPRNG, read 4 KiB at a time: two getrandom(2) calls per message
were a measurable part of accepting one.

A queue id begins with the time it was made, as Postfix's long queue ids
do (``enable_long_queue_ids``): 9 characters of milliseconds, then 16
characters of 80 random bits, in Crockford's base32 alphabet, whose digits
come before its letters, so that ids sort by time.  The queue id keys three
indexes of the queue (the messages, their recipients, their events).  With
purely random ids, the messages of one group commit each landed on a leaf
page of their own in every one of them; ids that grow with time append to
the same pages, so a commit writes fewer pages (see docs/performance.md).
Ids made before this format (16 characters, RFC 4648 base32, random only)
are still read everywhere: ids are opaque strings except to the feedback
report parser, which accepts both (:mod:`postwarden.message.feedback`).

Security exposure: none beyond their unpredictability, which rests on the
80 random bits alone (the time part is also in the Received field); they
name nothing on disk (spool files are named separately).
"""

from __future__ import annotations

import base64
import os
import threading
import time

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


# RFC 4648 base32 to Crockford's: the same 5-bit values, in ASCII order.
_SORTABLE = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567",
                            b"0123456789ABCDEFGHJKMNPQRSTVWXYZ")
QUEUE_ID_LENGTH = 25
# 45 bits of milliseconds since 1970 (9 characters) last until the year 3084.
_TIME_BITS = 45


def new_queue_id() -> str:
    """25 characters, upper case and URL-safe: 9 of the time in milliseconds,
    16 of 80 random bits (module docstring)."""
    return queue_id_at(time.time_ns() // 1_000_000, _entropy.take(10))


def queue_id_at(ms: int, random10: bytes) -> str:
    """The queue id made at ``ms`` (milliseconds since 1970) with the 10
    random bytes ``random10``."""
    ms &= (1 << _TIME_BITS) - 1
    bits = (ms << 83) | (int.from_bytes(random10, "big") << 3)  # 128 bits
    return base64.b32encode(bits.to_bytes(16, "big"))[:QUEUE_ID_LENGTH].translate(
        _SORTABLE).decode("ascii")
