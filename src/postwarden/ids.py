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


# Crockford's base32: digits before letters, so that ids sort by time.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Every pair of characters, by the 10 bits they encode: base64.b32encode
# is pure Python and took most of the time of making an id.
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]

# 45 bits of milliseconds since 1970 (9 characters) last until the year 3084.
_TIME_BITS = 45


def new_queue_id() -> str:
    """25 characters, upper case and URL-safe: 9 of the time in milliseconds,
    16 of 80 random bits (module docstring)."""
    return queue_id_at(time.time_ns() // 1_000_000, _entropy.take(10))


def queue_id_at(ms: int, random10: bytes) -> str:
    """The queue id made at ``ms`` (milliseconds since 1970) with the 10
    random bytes ``random10``: 45 bits of the one and the 80 of the other,
    5 to a character, most significant first."""
    t = ms & ((1 << _TIME_BITS) - 1)
    r = int.from_bytes(random10[:5], "big")  # 40 bits each: small ints
    s = int.from_bytes(random10[5:], "big")
    p = _PAIRS
    return "".join((_CROCKFORD[t >> 40], p[(t >> 30) & 1023], p[(t >> 20) & 1023],
                    p[(t >> 10) & 1023], p[t & 1023],
                    p[r >> 30], p[(r >> 20) & 1023], p[(r >> 10) & 1023], p[r & 1023],
                    p[s >> 30], p[(s >> 20) & 1023], p[(s >> 10) & 1023], p[s & 1023]))
