"""A stamp file that tells every process "these tables changed", and the
lookup cache that trusts it.

The directory lives in ``postwarden.db`` beside the queue.  Every queue
commit, by any process, makes SQLite drop the page cache of every other
connection to the file (WAL read transactions compare the whole file's
change counter), so each directory lookup during a busy spell re-reads its
B-tree pages: 45-56 µs for the three lookups of a recipient, measured in a
loop beside a committing writer, about 2% of the instructions of an
accepted message and the system calls of the page reads.  SQLite has no
notion of "this table did not change".

So the writers of the directory (the CLI, the web admin, the PostgreSQL
replica; all through :meth:`SqliteDirectory._write`) write a fresh random
token into ``<db>-dirstamp`` *after* their commit, and a server process
answers a lookup from its cache when the token it reads now is the one it
read *before* it queried the database for that entry.  Any commit after the
query is followed by a new token, so a cached answer is never older than
the last completed change: ``postwarden user add`` still applies to the
next RCPT, as without a cache.  Reading the token is one ``pread`` of a
file kept open.

Changes made around the stamp (an ``sqlite3`` shell on the file, a restored
backup) are seen within :data:`MAX_AGE` seconds, the most any entry is kept.
A stamp that cannot be read (permissions) turns the cache off: every lookup
queries the database, as before.

Security exposure: the token is random and says nothing; the file is
created 0600 like the database beside it.  An attacker who could write it
could only make the server query more (a new token) or, by restoring an old
token, serve answers at most :data:`MAX_AGE` seconds old.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Generic, TypeVar

from postwarden.observe.log import get_logger

log = get_logger("storage")

SUFFIX = "-dirstamp"
# The longest an answer is kept, whatever the stamp says.
MAX_AGE = 5.0
# Entries kept; the cache starts over when full (unknown recipients
# are cached too, and a client may try many).
MAX_ENTRIES = 10_000
_TOKEN_BYTES = 16  # hex: 32 bytes in the file, written at offset 0

V = TypeVar("V")


class ChangeStamp:
    """The stamp file of ``db_path``.

    A reader keeps the file open and reads the token with one ``pread``:
    writers change it in place, never replace it.  The file is opened again
    every :data:`MAX_AGE` seconds, so that one deleted or replaced by hand
    is noticed within that time too; ``dup2`` swaps the descriptor, so a
    read in another thread never sees it closed or reused.
    """

    def __init__(self, db_path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = f"{db_path}{SUFFIX}"
        self.clock = clock
        self._fd = -1
        self._opened = 0.0
        self._lock = threading.Lock()

    def read(self) -> bytes | None:
        """The current token; b"" when there is no stamp file yet; None when
        it cannot be read (then nothing may be cached)."""
        if self._fd < 0 or self.clock() - self._opened >= MAX_AGE:
            opened = self._open()
            if opened is not None:
                return opened
        try:
            return os.pread(self._fd, 2 * _TOKEN_BYTES, 0)
        except OSError:
            return None

    def _open(self) -> bytes | None:
        """(Re)open the file: None when open, else what :meth:`read` returns."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return b""  # looked for again at the next read: a writer may create it
        except OSError:
            return None
        with self._lock:
            if self._fd < 0:
                self._fd = fd
            else:
                os.dup2(fd, self._fd)  # atomic for a concurrent pread
                os.close(fd)
            self._opened = self.clock()
        return None

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def bump(self) -> None:
        """Stamp a change (after its commit).  A fixed-size write in place:
        a concurrent reader sees the old token, the new one, or a mix of
        both, which differs from the old one too."""
        token = secrets.token_hex(_TOKEN_BYTES).encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.pwrite(fd, token, 0)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("change_stamp_failed", path=self.path, error=str(exc),
                        effect=f"running servers see the change within {MAX_AGE:g} s")


class StampedCache(Generic[V]):
    """Answers kept with the token read before they were computed."""

    def __init__(self, stamp: ChangeStamp, clock: Callable[[], float] = time.monotonic) -> None:
        self.stamp = stamp
        self.clock = clock
        self._entries: dict[Hashable, tuple[bytes, float, V]] = {}

    def get(self, key: Hashable, compute: Callable[[], V]) -> V:
        token = self.stamp.read()
        if token is None:
            return compute()
        now = self.clock()
        entry = self._entries.get(key)
        if entry is not None and entry[0] == token and now < entry[1]:
            return entry[2]
        value = compute()  # an exception caches nothing
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = (token, now + MAX_AGE, value)
        return value

    def clear(self) -> None:
        self._entries.clear()
