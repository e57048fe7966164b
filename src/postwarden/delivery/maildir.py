"""Local delivery into Maildir (https://cr.yp.to/proto/maildir.html).

A message for ``local@domain`` is written to
``<mail_dir>/<domain>/<local>/Maildir/tmp/<unique>``, fsync'ed, renamed
into ``new/``, and ``new/`` is fsync'ed: only then is the delivery reported
done (the queue marks the recipient delivered after that, so delivery is at
least once).  A ``Return-Path:`` (RFC 5321 4.4) and a ``Delivered-To:`` line
are prepended.  Lines are stored with LF endings, the Maildir convention
(the network form CRLF is converted back by readers such as Dovecot).

Messages that fit in memory (the common case) are stored by one thread in
batches, as the queue group-commits (:class:`GroupWriter`): every message
waiting is written to ``tmp/``, the writeback of all of them is started at
once (``sync_file_range(2)``, through ctypes: the os module has no binding
for it), then each is fsync'ed, renamed into ``new/``, and each ``new/`` of
the batch is fsync'ed once.  On a journaling filesystem the first fsync's
journal commit then covers every file of the batch, so a batch costs two
journal commits instead of two per message.  Bigger messages are streamed
to their file by a pool of threads and synced one by one.

Every OS error is a temporary failure: the recipient stays queued and is
retried; only an unusable mailbox name is a permanent one.

:class:`MaildirTransport` is the :class:`~postwarden.delivery.transport.Transport`
for next hop ``maildir``: it expands each recipient to its mailboxes
(aliases, through the router) and writes one copy per mailbox.

Security exposure: the mailbox name comes from the envelope (untrusted).
Both parts are lower-cased and refused unless they are safe as one path
component (no ``/``, ``\\``, NUL or control characters, no leading dot),
so nothing escapes ``mail_dir``; files are created ``O_EXCL | O_NOFOLLOW``,
mode 0600, in 0700 directories.  Header values are stripped of CR, LF and
NUL so that an envelope cannot inject header lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import functools
import itertools
import os
import queue
import socket
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from postwarden.delivery.result import DeliveryResult, worst
from postwarden.delivery.transport import DeliveryJob
from postwarden.ids import random_hex
from postwarden.message.lineends import to_lf
from postwarden.observe.log import get_logger
from postwarden.storage.base import StorageError
from postwarden.storage.spool import DirSyncer, fsync_dir, write_all

log = get_logger("maildir")

NAME_MAX = 255
# Threads doing the file work of the messages streamed to their file (too
# big for the GroupWriter) and of clean-ups.  They spend their time waiting
# for the disk, without the GIL, so more of them than cores lets concurrent
# deliveries share its latency instead of queueing behind asyncio's default
# executor (cores + 4 threads, shared with everything else).
IO_THREADS = 16
# Chunks are gathered up to this size before a write (fewer thread hops);
# a message that fits goes to the GroupWriter whole.
WRITE_BUFFER = 256 * 1024
# Most messages stored in one batch of the GroupWriter.
BATCH_MAX = 64
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_counter = itertools.count()
RELAY = "local"
READY_MAX = 10_000  # Maildirs remembered as existing
PATHS_MAX = 10_000  # mailboxes whose Maildir path is remembered
_T = TypeVar("_T")
UNKNOWN_MAILBOX = DeliveryResult.failed("5.1.1", "mailbox unavailable", relay=RELAY)
LOOKUP_FAILED = DeliveryResult.deferred("4.3.0", "mailbox lookup failed", relay=RELAY)
QUEUE_FILE_UNREADABLE = DeliveryResult.deferred("4.3.0", "queue file unreadable", relay=RELAY)

# Mailboxes (local@domain) of one recipient address; empty: no such user.
Expand = Callable[[str], Awaitable[tuple[str, ...]]]


class UnsafeMailbox(ValueError):
    """The mailbox name cannot be used as a path."""


def _check_part(part: str, what: str) -> str:
    if not part:
        raise UnsafeMailbox(f"empty {what}")
    if part.startswith("."):
        raise UnsafeMailbox(f"{what} starts with a dot")
    if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
        raise UnsafeMailbox(f"{what} is too long")
    for c in part:
        if c in "/\\" or ord(c) < 0x21 or ord(c) == 0x7F or c in "\u2028\u2029":
            raise UnsafeMailbox(f"{what} contains {c!r}")
    return part


def mailbox_parts(mailbox: str) -> tuple[str, str]:
    """``(domain, local)``, lower-cased and safe as path components."""
    local, sep, domain = mailbox.rpartition("@")
    if not sep:
        raise UnsafeMailbox("no domain")
    domain = domain.lower()
    if domain.endswith("."):
        domain = domain[:-1]
    _check_part(domain, "domain")
    # RFC 5321 2.3.5: a domain is dot-separated labels; no empty label.
    if ".." in domain or not all(c.isalnum() or c in "-." for c in domain):
        raise UnsafeMailbox("domain is not a host name")
    return domain, _check_part(local.lower(), "local part")


@functools.lru_cache(maxsize=1)
def _host() -> str:
    """The host name as the maildir spec escapes it (read once: a syscall
    per delivery showed in profiles)."""
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"


def unique_name() -> str:
    """``time.MusecPpidRrandQn.host`` (maildir spec, "unique names")."""
    now = time.time()
    host = _host()
    return (f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}"
            f"R{random_hex(8)}Q{next(_counter)}.{host}")


_NO_LINE_BREAKS = str.maketrans("", "", "\r\n\0")


def _header_value(text: str) -> str:
    return text.translate(_NO_LINE_BREAKS)


def trace_headers(mailbox: str, sender: str) -> bytes:
    """The lines prepended to the stored message."""
    return (f"Return-Path: <{_header_value(sender)}>\n"
            f"Delivered-To: {_header_value(mailbox)}\n").encode("utf-8", "surrogateescape")


@dataclass(slots=True)
class _Target:
    maildir: Path
    tmp: Path
    new: Path


def _writeback_starter() -> Callable[[int], None] | None:
    """``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)``: start writing a
    file's dirty pages without waiting.  None where libc has no such call."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int

    def start(fd: int) -> None:
        # Only a head start: the fsync that follows decides, and reports.
        call(fd, 0, 0, SYNC_FILE_RANGE_WRITE)

    return start


_start_writeback = _writeback_starter()


@dataclass(eq=False, slots=True)
class _Store:
    """One whole message for the GroupWriter."""

    target: _Target
    data: bytes
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    fd: int = -1
    error: OSError | None = None


def _settle(future: asyncio.Future[None], error: OSError | None) -> None:
    if future.done():  # the delivery was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(None)


class GroupWriter:
    """The thread that stores whole messages, a batch at a time (module
    docstring).  A message's future is resolved once its file is in
    ``new/`` and durable there, or with the OSError that stopped it (its
    file then is in neither ``tmp/`` nor ``new/``, except when only the
    final directory fsync failed: the file stays in ``new/`` and the
    delivery is retried, at least once)."""

    def __init__(self, open_tmp: Callable[[_Target], int]) -> None:
        self._open_tmp = open_tmp
        self._jobs: queue.SimpleQueue[_Store] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def store(self, target: _Target, data: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        job = _Store(target, data, loop, loop.create_future())
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="maildir-writer",
                                                    daemon=True)
                    self._thread.start()
        self._jobs.put(job)
        return job.future

    def _run(self) -> None:
        while True:
            batch = [self._jobs.get()]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except Exception as exc:  # a bug: fail the batch, keep the thread
                log.error("maildir_writer_failed", error=repr(exc))
                for job in batch:
                    job.error = job.error or OSError(errno.EIO, f"maildir writer: {exc!r}")
            for job in batch:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    job.loop.call_soon_threadsafe(_settle, job.future, job.error)

    def _write(self, batch: list[_Store]) -> None:
        written = []
        for job in batch:
            try:
                job.fd = self._open_tmp(job.target)
                write_all(job.fd, job.data)
                written.append(job)
            except OSError as exc:
                self._fail(job, exc)
        if _start_writeback is not None and len(written) > 1:
            for job in written:
                _start_writeback(job.fd)
        renamed: dict[Path, list[_Store]] = {}
        for job in written:
            # maildir spec: the file must be complete on disk before it
            # appears in new/, and its new/ entry durable before we say so.
            try:
                os.fsync(job.fd)
                os.close(job.fd)
                job.fd = -1
                os.rename(job.target.tmp, job.target.new)
            except OSError as exc:
                self._fail(job, exc)
                continue
            renamed.setdefault(job.target.new.parent, []).append(job)
        for directory, jobs in renamed.items():
            try:
                fsync_dir(directory)
            except OSError as exc:
                for job in jobs:
                    job.error = exc

    @staticmethod
    def _fail(job: _Store, exc: OSError) -> None:
        job.error = exc
        if job.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(job.fd)
            job.fd = -1
        with contextlib.suppress(OSError):
            os.unlink(job.target.tmp)


def _makedirs(path: Path, stop: Path) -> None:
    """Create ``path`` (0700) and its missing parents below ``stop``, making
    each new directory entry durable."""
    if path.is_dir():
        return
    if path != stop and path.parent != path:
        _makedirs(path.parent, stop)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    fsync_dir(path.parent)


class MaildirDelivery:
    """Writes messages into ``<mail_dir>/<domain>/<local>/Maildir``."""

    def __init__(self, mail_dir: Path, threads: int = IO_THREADS) -> None:
        self.mail_dir = Path(mail_dir)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="maildir")
        # Concurrent deliveries into one new/ share its fsync.
        self._dir_sync = DirSyncer()
        # Maildirs whose tmp/, new/ and cur/ are known to exist (saves three
        # stat calls per delivery); forgotten when a delivery finds one gone.
        self._ready: set[Path] = set()
        self._paths: dict[str, Path] = {}  # mailbox -> its Maildir (path_for)
        self._writer = GroupWriter(self._open_tmp)

    async def _io(self, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args))

    def path_for(self, mailbox: str) -> Path:
        """The Maildir of ``mailbox``; raises :class:`UnsafeMailbox`.
        Remembered for the last mailboxes (the checks and the path
        arithmetic cost more than the rest of a delivery's set-up)."""
        path = self._paths.get(mailbox)
        if path is not None:
            return path
        domain, local = mailbox_parts(mailbox)
        path = self.mail_dir / domain / local / "Maildir"
        # Defence in depth: the checks above already make escape impossible.
        if path.parent.parent.parent != self.mail_dir:
            raise UnsafeMailbox("path escapes the mail directory")
        if len(self._paths) >= PATHS_MAX:
            self._paths.clear()
        self._paths[mailbox] = path
        return path

    async def deliver(self, mailbox: str, sender: str,
                      message: AsyncIterable[bytes]) -> DeliveryResult:
        """Store ``message`` (the chunks of the queued message) for ``mailbox``.

        Exceptions raised by ``message`` itself (a corrupt queue file) are
        re-raised after the partial tmp file is removed; nothing is left in
        ``new/``.
        """
        try:
            maildir = self.path_for(mailbox)
        except UnsafeMailbox as exc:
            log.warning("unsafe_mailbox", mailbox=mailbox, reason=str(exc))
            return DeliveryResult.failed("5.1.3", "bad destination mailbox address")
        name = unique_name()
        target = _Target(maildir, maildir / "tmp" / name, maildir / "new" / name)
        fd: int | None = None
        try:
            buf = bytearray(trace_headers(mailbox.lower(), sender))
            carry = b""  # a CR at the end of a chunk may start a CRLF
            async for chunk in message:
                chunk = carry + chunk
                carry = b"\r" if chunk.endswith(b"\r") else b""
                buf += to_lf(chunk[: len(chunk) - len(carry)])
                if len(buf) >= WRITE_BUFFER:
                    if fd is None:
                        fd = await self._io(self._open_tmp, target)
                    await self._io(write_all, fd, buf)
                    buf = bytearray()
            buf += carry
            if fd is None:
                # The whole message fitted in the buffer (the common case).
                await self._writer.store(target, bytes(buf))
            else:
                if buf:
                    await self._io(write_all, fd, buf)
                to_close, fd = fd, None
                await self._io(self._commit, to_close, target)
        except OSError as exc:
            self._ready.discard(maildir)  # recreated at the retry if it was removed
            await self._io(self._cleanup, fd, target)
            log.warning("maildir_error", mailbox=mailbox, errno=exc.errno,
                        error=exc.strerror or str(exc))
            return temporary_result(exc)
        except BaseException:
            await asyncio.shield(self._io(self._cleanup, fd, target))
            raise
        return DeliveryResult.delivered("delivered to maildir")

    def _open_tmp(self, target: _Target) -> int:
        if target.maildir in self._ready:
            try:
                return os.open(target.tmp, _O_CREATE, 0o600)
            except FileNotFoundError:  # removed since: create it again
                self._ready.discard(target.maildir)
        for sub in ("tmp", "new", "cur"):
            _makedirs(target.maildir / sub, self.mail_dir)
        if len(self._ready) >= READY_MAX:
            self._ready.clear()
        self._ready.add(target.maildir)
        return os.open(target.tmp, _O_CREATE, 0o600)

    def _commit(self, fd: int, target: _Target) -> None:
        # maildir spec: the file must be complete on disk before it
        # appears in new/, and its new/ entry durable before we say so.
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(target.tmp, target.new)
        self._dir_sync.sync(target.new.parent)

    @staticmethod
    def _cleanup(fd: int | None, target: _Target) -> None:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(target.tmp)


def temporary_result(exc: OSError) -> DeliveryResult:
    """RFC 3463: X.2.2 mailbox full, X.3.1 system storage, else X.2.0/X.3.0."""
    if exc.errno == errno.EDQUOT:
        return DeliveryResult.deferred("4.2.2", "mailbox full")
    if exc.errno in (errno.ENOSPC, errno.EFBIG):
        return DeliveryResult.deferred("4.3.1", "insufficient system storage")
    return DeliveryResult.deferred("4.3.0", "mailbox temporarily unavailable")


async def _aclose(it: AsyncIterator[bytes]) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        await aclose()


class MaildirTransport:
    """The ``maildir`` transport: each recipient's mailboxes get one copy.

    ``expand`` is usually ``Router.mailboxes`` (alias expansion); without it
    a recipient is its own mailbox.  A recipient's copies are combined with
    :func:`~postwarden.delivery.result.worst` (one deferral retries them
    all: at least once).  A mailbox named twice in one job is written once.
    """

    def __init__(self, delivery: MaildirDelivery, expand: Expand | None = None) -> None:
        self.delivery = delivery
        self._expand = expand

    async def deliver(self, job: DeliveryJob) -> list[DeliveryResult]:
        done: dict[str, DeliveryResult] = {}
        results = []
        for rcpt in job.recipients:
            try:
                boxes = (await self._expand(rcpt.address) if self._expand is not None
                         else (rcpt.address.lower(),))
            except Exception as exc:  # a lookup failure is temporary, never a bounce
                log.warning("mailbox_lookup_failed", queue_id=job.message.queue_id,
                            rcpt=rcpt.address, error=repr(exc))
                results.append(LOOKUP_FAILED)
                continue
            if not boxes:
                results.append(UNKNOWN_MAILBOX)
                continue
            outcomes = []
            for box in boxes:
                if box not in done:
                    done[box] = await self._one(job, box)
                outcomes.append(done[box])
            results.append(worst(outcomes))
        return results

    async def _one(self, job: DeliveryJob, mailbox: str) -> DeliveryResult:
        chunks = job.open_message()
        try:
            result = await self.delivery.deliver(mailbox, job.message.sender, chunks)
        except StorageError as exc:  # corrupt or deleted: nothing was stored
            log.error("read_failed", queue_id=job.message.queue_id, error=str(exc))
            return QUEUE_FILE_UNREADABLE
        finally:
            await _aclose(chunks)
        return dataclasses.replace(result, relay=RELAY)
