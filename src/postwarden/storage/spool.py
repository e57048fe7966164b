"""Message bodies on their way to the commit point: the spool.

:class:`SpoolBodyWriter` is the :class:`~postwarden.storage.base.BodyWriter`
of the SQLite queue.  A body stays in memory while it is at most
``inline_max`` bytes (it is then committed inline, in the database row);
beyond that it spills to a spool file that is written as chunks arrive, so
memory per session stays bounded whatever the message size.  The writer
keeps a running size and CRC-32 so the committed row can later prove that
its spool file is whole.

Security exposure: writes untrusted message content to disk.  Spool file
names are generated here from a CSPRNG (never from client input), created
with ``O_EXCL | O_NOFOLLOW`` and mode 0600 in a 0700 directory.  ``write``
is a plain ``os.write`` to the page cache; the fsync that makes the body
durable happens at commit, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
import sqlite3
import threading
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import NoReturn

from postwarden.storage.base import StorageError, StorageFull

SPOOL_SUFFIX = ".spool"
_SPOOL_NAME = re.compile(r"\A[0-9a-f]{32}\.spool\Z")
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def is_spool_name(name: str) -> bool:
    """``name`` looks like a file this module created (others are left alone)."""
    return bool(_SPOOL_NAME.match(name))


def storage_error(exc: BaseException, what: str) -> StorageError:
    """Translate an OS or SQLite error into the storage exception tree.

    Disk full, quota exceeded and file-size limit become :class:`StorageFull`
    (the client gets 452 4.3.1); everything else :class:`StorageError`.
    """
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, OSError):
        detail = f"{what}: {exc.strerror or exc}"
        return StorageFull(detail) if exc.errno in _FULL_ERRNOS else StorageError(detail)
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        detail = f"{what}: {exc}"
        return StorageFull(detail) if code == sqlite3.SQLITE_FULL else StorageError(detail)
    return StorageError(f"{what}: {exc!r}")


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until everything is written (writes may be short)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def fsync_dir(path: Path) -> None:
    """Make the directory entries in ``path`` durable (new or removed files)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSyncer:
    """:func:`fsync_dir` shared by the threads that changed one directory.

    A directory fsync makes durable every entry change made in it before
    the fsync began.  Threads that rename files into the same directory at
    once (concurrent Maildir deliveries to one mailbox) therefore need not
    each pay for one: a caller takes a ticket after its change, and returns
    once an fsync that *started* after its ticket has completed.  While one
    runs, the callers that arrive meanwhile wait for it to end and then
    share the next one (group commit, as for the queue's WAL).  A failed
    fsync raises in the thread that ran it; the waiters then try again
    themselves, so an error is never hidden from the caller that needs it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        # directory -> [tickets taken, tickets covered, fsync running]
        self._dirs: dict[Path, list[int]] = {}

    def sync(self, path: Path) -> None:
        """Return once ``path``'s entries changed before the call are durable."""
        with self._cond:
            state = self._dirs.setdefault(path, [0, 0, 0])
            state[0] += 1
            ticket = state[0]
            while state[1] < ticket:
                if state[2]:
                    self._cond.wait()
                    continue
                state[2] = 1
                covers = state[0]  # every change before this moment
                self._cond.release()
                try:
                    fsync_dir(path)
                except BaseException:
                    self._cond.acquire()
                    state[2] = 0
                    self._cond.notify_all()
                    raise
                self._cond.acquire()
                state[1], state[2] = covers, 0
                self._cond.notify_all()
            if state[0] == state[1] and not state[2] and self._dirs.get(path) is state:
                del self._dirs[path]  # nobody waits: forget the directory


class SpoolBodyWriter:
    """In memory up to ``inline_max`` bytes, then a spool file in ``spool_dir``.

    Life cycle: *open* (``write``/``abort`` by the session) -> *sealed* when
    handed to ``commit`` (the store owns it from then on; ``abort`` by the
    session is a no-op so that it cannot pull the file from under a commit
    in progress) -> *committed* or *discarded*.
    """

    def __init__(self, spool_dir: Path, inline_max: int, owner: object = None) -> None:
        self._dir = spool_dir
        self._inline_max = inline_max
        self.owner = owner
        # The body while in memory: the chunks as written, joined once when
        # the whole is asked for (a 100 KB message was copied five times
        # more by growing a bytearray and converting it at each read).
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._fd: int | None = None
        self._name: str | None = None
        self._size = 0
        self._crc = 0
        self._state = "open"

    @property
    def size(self) -> int:
        return self._size

    @property
    def checksum(self) -> int:
        """CRC-32 of the body written so far."""
        return self._crc

    @property
    def spool_name(self) -> str | None:
        """The spool file name, or ``None`` while the body is in memory."""
        return self._name

    @property
    def buffered(self) -> int:
        """Bytes held in memory (at most ``inline_max``)."""
        return self._buffered

    def _in_memory(self) -> bytes:
        """The chunks held in memory as one bytes object, joined once."""
        chunks = self._chunks
        if len(chunks) == 1:
            return chunks[0]
        joined = b"".join(chunks)
        self._chunks = [joined] if joined else []
        return joined

    def write(self, chunk: bytes) -> None:
        if self._state != "open":
            raise StorageError(f"body writer is {self._state}")
        if not chunk:
            return
        try:
            if self._fd is None and self._name is None \
                    and self._buffered + len(chunk) <= self._inline_max:
                # Kept by reference: a mutable buffer is copied first.
                self._chunks.append(chunk if type(chunk) is bytes else bytes(chunk))
                self._buffered += len(chunk)
            else:
                if self._fd is None:
                    self._spill()
                assert self._fd is not None
                write_all(self._fd, chunk)
        except OSError as exc:
            self._discard()
            raise storage_error(exc, "spool write") from exc
        self._size += len(chunk)
        self._crc = zlib.crc32(chunk, self._crc)

    def _spill(self) -> None:
        name = secrets.token_hex(16) + SPOOL_SUFFIX
        self._fd = os.open(self._dir / name, _O_CREATE, 0o600)
        self._name = name
        if self._buffered:
            write_all(self._fd, self._in_memory())
        self._chunks, self._buffered = [], 0

    def read_back(self) -> bytes:
        """Everything written so far (for checks that need the whole message
        before the commit, such as DKIM; blocking for a spool file)."""
        if self._name is None:
            return self._in_memory()
        with open(self._dir / self._name, "rb") as f:
            return f.read()

    def abort(self) -> None:
        """Discard the body, unless a commit owns it already."""
        if self._state == "open":
            self._discard()

    # The methods below are for the store only.

    def seal(self) -> None:
        if self._state != "open":
            raise StorageError(f"body writer is {self._state}")
        self._state = "sealed"

    def inline_body(self) -> bytes | None:
        """The body if it stayed in memory, else ``None``."""
        return None if self._name is not None else self._in_memory()

    def sync(self) -> None:
        """fdatasync and close the spool file (blocking: run off the loop)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

    def committed(self) -> None:
        self._state = "committed"
        self._chunks, self._buffered = [], 0

    def _discard(self) -> None:
        self._state = "discarded"
        self._chunks, self._buffered = [], 0
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._name is not None:
            # On failure the file is left for the garbage collection at start.
            with contextlib.suppress(OSError):
                os.unlink(self._dir / self._name)

    def discard(self) -> None:
        """Remove the body after a failed commit (store only)."""
        if self._state != "committed":
            self._discard()


READ_CHUNK = 64 * 1024


def _open_for_read(path: Path) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return fd, os.fstat(fd).st_size
    except OSError:
        os.close(fd)
        raise


async def read_spool_file(path: Path, prepend: bytes, size: int, checksum: int,
                          corrupt: Callable[[str], Awaitable[NoReturn]]
                          ) -> AsyncGenerator[bytes, None]:
    """``prepend``, then the committed body in spool file ``path``, in chunks
    of at most 64 KiB, checked against the ``size`` and CRC-32 of its row;
    a missing, short, long or altered file calls ``corrupt(reason)``, which
    marks the message and raises (possibly after chunks were yielded)."""
    try:
        fd, actual = await asyncio.to_thread(_open_for_read, path)
    except FileNotFoundError:
        await corrupt("spool file missing")
    except OSError as exc:
        raise storage_error(exc, "spool read") from exc
    try:
        if actual != size:
            await corrupt(f"spool file size {actual} != {size}")
        if prepend:
            yield bytes(prepend)
        crc = total = 0
        while True:
            try:
                chunk = await asyncio.to_thread(os.read, fd, READ_CHUNK)
            except OSError as exc:
                raise storage_error(exc, "spool read") from exc
            if not chunk:
                break
            total += len(chunk)
            if total > size:
                break
            crc = zlib.crc32(chunk, crc)
            yield chunk
        if total != size or crc != checksum:
            await corrupt("spool file does not match its checksum")
    finally:
        os.close(fd)
