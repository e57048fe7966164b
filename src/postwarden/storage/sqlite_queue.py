"""The embedded queue: SQLite (WAL, ``synchronous=FULL``) plus a spool directory.

This module owns the commit point of the whole server.  ``commit`` returns a
queue id only after the body, the prepended header lines and the envelope
are on stable storage:

* bodies up to ``inline_max`` bytes are stored inline, as a BLOB in the
  message row, so one WAL fsync covers body and envelope;
* larger bodies were streamed to a spool file (:mod:`postwarden.storage.spool`);
  at commit the file is fdatasync'ed and the spool directory fsync'ed
  *before* the row commits.

Group commit: every write goes through one worker thread owning the only
writing connection.  Commits that arrive while a transaction is in progress
are batched into the next one (one fsync for many messages); the event loop
never waits for an fsync, only for a future resolved with
``call_soon_threadsafe``.

History: every change is written with an event row in the same
transaction (``queued`` at commit, one per recipient result, ``held``,
``released``, ``requeued``, ``deleted``, ``bounced``, ...); events outlive
the message and are pruned after :data:`EVENTS_KEEP`.  Tables and
migrations: :mod:`postwarden.storage.sqlite_schema`; the write
transactions: :mod:`postwarden.storage.sqlite_ops`.

Several instances, one database: the server and the CLI (another process)
each open a store on the same files.  Each has its own writer thread;
SQLite's WAL and busy timeout serialise their short write transactions, so
``flush``, ``requeue``, ``set_held`` and ``delete`` are safe while the server
runs.  Only the instance holding the spool lock (:attr:`owns_spool`, the
server) removes spool files: a ``delete`` by another instance removes the
row and leaves the file, which the owner collects later
(:meth:`SqliteQueueStore.collect_garbage`, every :data:`SPOOL_GC_INTERVAL`),
so a delivery reading it is never cut short.  Results for a message
deleted meanwhile are not recorded.

Self-validating records: the row is the commit record.  A spool file no row
names is garbage, removed at start by the instance holding the spool lock.
A row whose spool file is missing, or whose size or CRC-32 differs from the
values stored in the row, is moved to the ``corrupt`` state (Postfix's
corrupt queue), logged, and never delivered, not even in part: readers must
treat an exception from :meth:`SqliteQueueStore.read_message` as abort.

Security exposure: stores untrusted envelope strings and content.  All SQL
is parameterised; no path is built from client input (spool names are
generated); the database is created 0600 (SQLite gives its WAL and shm files
the same mode) and the spool directory 0700.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import os
import sqlite3
import time
import zlib
from collections.abc import AsyncGenerator, Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from postwarden import compactjson, limits
from postwarden.background import cancel_and_wait
from postwarden.envelope import Envelope, MailParams
from postwarden.ids import new_queue_id
from postwarden.observe.log import get_logger
from postwarden.storage import sqlite_ops as ops
from postwarden.storage.base import (
    BodyWriter,
    CommitMeta,
    DeliveryEvent,
    QueuedMessage,
    QueuedRecipient,
    RecipientResult,
    StorageError,
)
from postwarden.storage.group_commit import GroupCommitWriter, Job, StoreStats, connect
from postwarden.storage.spool import (
    SpoolBodyWriter,
    fsync_dir,
    is_spool_name,
    read_spool_file,
    storage_error,
)
from postwarden.storage.sqlite_ops import STATE_ACTIVE
from postwarden.storage.sqlite_schema import (
    EVENT_COLS,
    MSG_COLS,
    PENDING,
    RCPT_COLS,
    event_from_row,
    init_schema,
    insert_events,
    message_from_row,
    rcpt_params_json,
    recipient_from_row,
)

log = get_logger("queue")

READ_CHUNK = 64 * 1024
STATE_CORRUPT = "corrupt"
_LOCK_NAME = ".lock"
# due() reads up to this many recipient rows per message it may return.
DUE_ROWS_PER_MESSAGE = 4
# The history of a message is kept this long after its last event
# (``[trace] retention``).
EVENTS_KEEP = 30 * 86400.0
# The spool owner looks for orphaned spool files (bodies of messages that
# another process deleted) this often, and removes those untouched for
# SPOOL_GC_MIN_AGE: a body being written or committed has a fresh mtime.
SPOOL_GC_INTERVAL = 3600.0
SPOOL_GC_MIN_AGE = 3600.0


class MessageCorrupt(StorageError):
    """The message's body does not match its commit record; it is quarantined."""


# dataclasses.asdict() is a deep, generic copy: too slow for every commit.
_MAIL_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(MailParams))


class SqliteQueueStore:
    """The :class:`~postwarden.storage.base.QueueStore` of the embedded backend.

    Use ``await store.start()`` (or ``await SqliteQueueStore.open(...)``)
    before anything else and ``await store.close()`` at the end.  Callbacks
    in :attr:`on_commit` are called on the event loop with the queue id of
    each committed message; those in :attr:`on_queued` with the message
    itself, as :meth:`due` would return it (the queue runner of this process
    starts its delivery without reading it back).
    """

    def __init__(self, db_path: Path, spool_dir: Path,
                 inline_max: int = limits.INLINE_BODY_MAX,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.db_path = Path(db_path)
        self.spool_dir = Path(spool_dir)
        self.inline_max = inline_max
        self.stats = StoreStats()
        self.on_commit: list[Callable[[str], None]] = []
        self.on_queued: list[Callable[[QueuedMessage], None]] = []
        self.events_keep = EVENTS_KEEP  # [trace] retention
        self._clock = clock
        self._writer: GroupCommitWriter | None = None
        self._reader: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._gc_task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, db_path: Path, spool_dir: Path,
                   inline_max: int = limits.INLINE_BODY_MAX) -> SqliteQueueStore:
        store = cls(db_path, spool_dir, inline_max)
        await store.start()
        return store

    # -- life cycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the database (creating it), then collect spool garbage and
        quarantine broken rows if this is the only instance on the spool."""
        if self._writer is not None:
            return
        try:
            await asyncio.to_thread(self._prepare_paths)
        except OSError as exc:
            raise storage_error(exc, "create queue directories") from exc
        writer = GroupCommitWriter(self.db_path, self.spool_dir, self.stats, init_schema)
        writer.start()
        await asyncio.wrap_future(writer.ready)
        self._writer = writer
        try:
            self._reader = connect(self.db_path, writer=False)
            if self._take_lock():
                await self._recover()
        except BaseException:
            await self.close()
            raise

    def _prepare_paths(self) -> None:
        for d in (self.spool_dir, self.db_path.parent):
            if not d.is_dir():
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                fsync_dir(d.parent)
        # Create the database 0600 ourselves: SQLite would honour the umask.
        # (SQLite itself fsyncs the directory when it creates the WAL.)
        try:
            fd = os.open(self.db_path,
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        except FileExistsError:
            return
        os.close(fd)
        fsync_dir(self.db_path.parent)

    def _take_lock(self) -> bool:
        """Only the instance holding the spool lock may collect garbage: another
        process (the CLI, a second server) may have bodies in flight."""
        fd = os.open(self.spool_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.info("spool_shared", spool=str(self.spool_dir))
            return False
        self._lock_fd = fd
        return True

    @property
    def owns_spool(self) -> bool:
        """This instance holds the spool lock (the server): it alone removes
        spool files.  Others (the CLI) only change rows."""
        return self._lock_fd is not None

    async def _recover(self) -> None:
        removed = await asyncio.to_thread(self._collect_spool, 0.0)
        if removed:
            log.info("spool_garbage_removed", count=removed)
        for queue_id, reason in await asyncio.to_thread(self._check_rows):
            await self._mark_corrupt(queue_id, reason)
        await self.prune_events()
        self._gc_task = asyncio.create_task(self._gc_loop(), name="spool-gc")

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(SPOOL_GC_INTERVAL)
            try:
                await self.collect_garbage()
                await self.prune_events()
            except Exception as exc:  # keep running; try again next time
                log.error("spool_gc_failed", error=str(exc) or repr(exc))

    async def collect_garbage(self, min_age: float = SPOOL_GC_MIN_AGE) -> int:
        """Remove spool files no row names that were untouched for ``min_age``
        seconds (the bodies of messages another process deleted); only the
        spool owner does this.  The number removed."""
        if not self.owns_spool:
            return 0
        removed = await asyncio.to_thread(self._collect_spool, min_age)
        if removed:
            log.info("spool_garbage_removed", count=removed)
        return removed

    def _collect_spool(self, min_age: float) -> int:
        # Names first, files second: a body committed in between is not
        # named yet but has a fresh mtime, and min_age spares it (at start,
        # with min_age 0, nothing of ours is in flight).
        conn = connect(self.db_path, writer=False)
        try:
            named = {r[0] for r in conn.execute(
                "SELECT spool_name FROM messages WHERE spool_name IS NOT NULL")}
        finally:
            conn.close()
        removed = 0
        cutoff = time.time() - min_age
        with os.scandir(self.spool_dir) as entries:
            for entry in entries:
                if not is_spool_name(entry.name) or entry.name in named:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if min_age and entry.stat(follow_symlinks=False).st_mtime > cutoff:
                        continue
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def _check_rows(self) -> list[tuple[str, str]]:
        conn = connect(self.db_path, writer=False)
        try:
            rows = conn.execute(
                "SELECT queue_id, spool_name, body_size FROM messages "
                "WHERE spool_name IS NOT NULL AND state = ?", (STATE_ACTIVE,)).fetchall()
        finally:
            conn.close()
        broken: list[tuple[str, str]] = []
        for queue_id, name, size in rows:
            try:
                actual = os.stat(self.spool_dir / name, follow_symlinks=False).st_size
            except FileNotFoundError:
                broken.append((queue_id, "spool file missing"))
                continue
            if actual != size:
                broken.append((queue_id, f"spool file size {actual} != {size}"))
        return broken

    async def prune_events(self, keep: float | None = None) -> int:
        """Forget the history of messages gone for more than ``keep`` seconds
        (default :attr:`events_keep`)."""
        before = self._clock() - (self.events_keep if keep is None else keep)
        count: int = await self._submit(lambda conn: ops.prune_events(conn, before))
        return count

    async def close(self) -> None:
        """Finish queued writes, then close everything."""
        gc_task, self._gc_task = self._gc_task, None
        await cancel_and_wait(gc_task)
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is not None and writer.is_alive():
            writer.jobs.put(None)
            await asyncio.to_thread(writer.join)
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- writing ------------------------------------------------------------

    def new_body(self) -> SpoolBodyWriter:
        return SpoolBodyWriter(self.spool_dir, self.inline_max, owner=self)

    def _submit(self, apply: Callable[[sqlite3.Connection], Any], **kw: Any) -> asyncio.Future[Any]:
        if self._writer is None or self._closed:
            raise StorageError("queue store is not open")
        if not self._writer.is_alive():
            raise StorageError("queue writer thread has stopped")
        loop = asyncio.get_running_loop()
        job = Job(apply, loop, loop.create_future(), **kw)
        self._writer.jobs.put(job)
        return job.future

    async def commit(self, body: BodyWriter, envelope: Envelope, prepend: bytes,
                     meta: CommitMeta) -> str:
        if not isinstance(body, SpoolBodyWriter) or body.owner is not self:
            raise StorageError("body writer does not belong to this store")
        body.seal()
        inline = body.inline_body()
        received_at = self._clock()
        sender = str(envelope.sender) if envelope.sender is not None else ""
        size = len(prepend) + body.size
        rcpts = [(str(r.address), rcpt_params_json(r.params)) for r in envelope.recipients]
        if not rcpts:
            body.discard()
            raise StorageError("a message needs at least one recipient")
        params = envelope.params
        values = (sender, compactjson.dumps({f: getattr(params, f) for f in _MAIL_PARAM_FIELDS}),
                  received_at, size,
                  meta.client_ip, meta.helo, meta.auth_user, meta.listener, meta.session_id,
                  bytes(prepend), inline, body.spool_name, body.size, body.checksum)

        given = meta.queue_id  # named in the Received header already
        queued_text = (f"from=<{sender}>, size={size}, nrcpt={len(rcpts)}"
                       + (f", client={meta.client_ip}" if meta.client_ip else ""))

        def apply(conn: sqlite3.Connection) -> tuple[str, int]:
            for _ in range(1 if given else 8):
                queue_id = given or new_queue_id()
                try:
                    conn.execute(
                        "INSERT INTO messages (queue_id, sender, params, received_at, size, "
                        "client_ip, helo, auth_user, listener, session_id, prepend, body, "
                        "spool_name, body_size, checksum) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (queue_id, *values))
                except sqlite3.IntegrityError:
                    # Collision (80 random bits): draw again; a given id
                    # cannot change, so that commit fails (4xx).
                    continue
                if len(rcpts) == 1:  # the usual case: one statement fewer
                    last = conn.execute(
                        "INSERT INTO recipients (queue_id, address, params) VALUES (?, ?, ?)",
                        (queue_id, *rcpts[0])).lastrowid
                else:
                    conn.executemany(
                        "INSERT INTO recipients (queue_id, address, params) VALUES (?, ?, ?)",
                        [(queue_id, addr, params) for addr, params in rcpts])
                    # One writer holds the lock: the rows got consecutive ids
                    # (an INTEGER PRIMARY KEY takes the largest id + 1).
                    last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
                assert last is not None
                # The trace: one "queued" event per recipient (searchable by
                # sender, recipient and Message-ID); the first says how it came.
                conn.executemany(
                    f"INSERT INTO events ({EVENT_COLS}) VALUES "
                    "(?, ?, 'queued', ?, '', '', ?, ?, ?, ?)",
                    [(received_at, queue_id, addr, queued_text if i == 0 else "", sender,
                      meta.message_id, meta.detail if i == 0 else "")
                     for i, (addr, _) in enumerate(rcpts)])
                return queue_id, last - len(rcpts) + 1
            raise StorageError(f"queue id {queue_id} is taken")

        def after_commit(_value: Any) -> None:
            body.committed()
            self.stats.messages += 1

        try:
            future = self._submit(apply, prepare=body.sync, spooled=inline is None,
                                  after_commit=after_commit, on_failure=body.discard)
        except StorageError:
            body.discard()
            raise
        queue_id: str
        first_id: int
        queue_id, first_id = await future
        log.debug("queued", queue_id=queue_id, session=meta.session_id or None,
                 sender=f"<{sender}>", size=size, nrcpt=len(rcpts),
                 inline=inline is not None)
        for hook in list(self.on_commit):
            try:
                hook(queue_id)
            except Exception as exc:
                log.error("on_commit_failed", queue_id=queue_id, error=repr(exc))
        if self.on_queued:
            msg = QueuedMessage(
                queue_id, sender, params,
                [QueuedRecipient(first_id + i, addr, r.params)
                 for i, ((addr, _), r) in enumerate(zip(rcpts, envelope.recipients,
                                                         strict=True))],
                received_at, size, meta.client_ip, meta.helo, meta.auth_user, meta.listener)
            for queued in list(self.on_queued):
                try:
                    queued(msg)
                except Exception as exc:
                    log.error("on_queued_failed", queue_id=queue_id, error=repr(exc))
        return queue_id

    async def record_results(self, queue_id: str, results: list[RecipientResult],
                             events: Sequence[DeliveryEvent] = ()) -> None:
        """Store attempt outcomes with their history events (and ``events``,
        e.g. "bounced"); remove the message when nothing is pending.  Nothing
        is written if the message was deleted meanwhile."""
        results, events = list(results), list(events)
        now = self._clock()
        await self._submit(lambda conn: ops.record_results(conn, queue_id, results, events, now),
                           after_commit=self._removed(queue_id, "delivered"))

    def _removed(self, queue_id: str, why: str) -> Callable[[Any], None]:
        def after_commit(value: tuple[bool, str | None]) -> None:
            deleted, spool_name = value
            if not deleted:
                return
            if spool_name is not None and self.owns_spool:
                # After the commit: a crash in between leaves only garbage.
                # Another process (the CLI) leaves the file to the owner's
                # garbage collection: the server may be reading it right now.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.spool_dir / spool_name)
            log.info("removed", queue_id=queue_id, reason=why)
        return after_commit

    async def delete(self, queue_id: str) -> bool:
        """Remove a message whatever its recipients' state (``queue delete``,
        no bounce).  A delivery in progress then records nothing."""
        now = self._clock()
        value: tuple[bool, str | None] = await self._submit(
            lambda conn: ops.delete(conn, queue_id, now),
            after_commit=self._removed(queue_id, "deleted"))
        return value[0]

    async def set_held(self, queue_id: str, held: bool) -> bool:
        """Hold (no delivery) or release a message; False if it does not exist.
        A delivery already in progress finishes."""
        now = self._clock()
        found: bool = await self._submit(lambda conn: ops.set_held(conn, queue_id, held, now))
        return found

    async def requeue(self, queue_id: str) -> bool:
        """Pending recipients start over (no attempts, due now) and the
        message is released; False if it does not exist."""
        now = self._clock()
        found: bool = await self._submit(lambda conn: ops.requeue(conn, queue_id, now))
        return found

    async def flush(self, queue_id: str | None = None) -> int:
        """Pending recipients of one message (or all), unless held, become due
        now; the number of recipients that are due now."""
        now = self._clock()
        count: int = await self._submit(lambda conn: ops.flush(conn, queue_id, now))
        return count

    async def history(self, queue_id: str) -> list[DeliveryEvent]:
        """The events of a message, oldest first (kept after its removal)."""
        try:
            rows = self._read().execute(
                f"SELECT {EVENT_COLS} FROM events WHERE queue_id = ? ORDER BY id",
                (queue_id,)).fetchall()
        except sqlite3.Error as exc:
            raise storage_error(exc, "queue read") from exc
        return [event_from_row(r) for r in rows]

    async def add_events(self, events: Sequence[DeliveryEvent]) -> None:
        """Add lines to messages' histories (a complaint about a message
        long delivered), whether or not the messages are still queued."""
        events = list(events)
        await self._submit(lambda conn: insert_events(conn, events))

    async def find_message_id(self, message_id: str, limit: int = 10) -> list[str]:
        """The queue ids of the messages queued with this Message-ID
        (``<...>``), newest first (by the ``events_message_id`` index)."""
        try:
            rows = self._read().execute(
                "SELECT queue_id FROM events WHERE message_id = ? AND message_id <> '' "
                "AND event = 'queued' GROUP BY queue_id ORDER BY max(id) DESC LIMIT ?",
                (message_id, limit)).fetchall()
        except sqlite3.Error as exc:
            raise storage_error(exc, "queue read") from exc
        return [str(r[0]) for r in rows]

    async def _mark_corrupt(self, queue_id: str, reason: str) -> bool:
        """Quarantine the message; False if it no longer exists (deleted)."""
        now = self._clock()

        def apply(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("UPDATE messages SET state = ? WHERE queue_id = ?",
                               (STATE_CORRUPT, queue_id))
            if cur.rowcount == 0:
                return False
            insert_events(conn, [DeliveryEvent(now, queue_id, "corrupt", reply=reason)])
            return True
        found: bool = await self._submit(apply)
        if found:
            log.error("corrupt", queue_id=queue_id, reason=reason)
        return found

    # -- reading ------------------------------------------------------------

    def _read(self) -> sqlite3.Connection:
        if self._reader is None:
            raise StorageError("queue store is not open")
        return self._reader

    def _recipients(self, ids: Iterable[str], where: str = "",
                    args: tuple[Any, ...] = ()) -> dict[str, list[QueuedRecipient]]:
        ids = list(ids)
        out: dict[str, list[QueuedRecipient]] = {i: [] for i in ids}
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            marks = ",".join("?" * len(part))
            for row in self._read().execute(
                    f"SELECT {RCPT_COLS} FROM recipients WHERE queue_id IN ({marks}) {where} "
                    "ORDER BY id", (*part, *args)):
                out[row[1]].append(recipient_from_row(row))
        return out

    def _messages(self, rows: list[Any], rcpts: dict[str, list[QueuedRecipient]]
                  ) -> list[QueuedMessage]:
        return [message_from_row(row, rcpts[row[0]]) for row in rows]

    async def due(self, now: float, limit: int,
                  skip: Collection[str] = ()) -> list[QueuedMessage]:
        """Active, unheld messages with recipients due at ``now`` (only those
        recipients), the longest-waiting first, but none in ``skip``."""
        conn = self._read()
        try:
            conn.execute("BEGIN")
            # INDEXED BY: without statistics the planner would scan every
            # recipient; the partial index holds only the pending ones, in
            # next_attempt order, so the walk stops after LIMIT rows (no
            # grouping of the whole backlog at every call: with thousands
            # queued that cost milliseconds per call).  The first row of each
            # message is its earliest due recipient.
            rows_wanted = (limit + len(skip)) * DUE_ROWS_PER_MESSAGE
            while True:
                found = [r[0] for r in conn.execute(
                    "SELECT r.queue_id FROM recipients r INDEXED BY recipients_due "
                    "JOIN messages m ON m.queue_id = r.queue_id "
                    f"WHERE r.status IN {PENDING} AND r.next_attempt <= ? "
                    "AND m.held = 0 AND m.state = ? "
                    "ORDER BY r.next_attempt, r.queue_id LIMIT ?",
                    (now, STATE_ACTIVE, rows_wanted))]
                ids = [i for i in dict.fromkeys(found) if i not in skip][:limit]
                if len(ids) >= limit or len(found) < rows_wanted:
                    break
                rows_wanted *= 4  # messages with many due recipients: read further
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            rows = conn.execute(f"SELECT {MSG_COLS} FROM messages WHERE queue_id IN ({marks})",
                                ids).fetchall()
            rcpts = self._recipients(ids, f"AND status IN {PENDING} AND next_attempt <= ?",
                                     (now,))
        except sqlite3.Error as exc:
            raise storage_error(exc, "queue read") from exc
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
        order = {queue_id: i for i, queue_id in enumerate(ids)}
        rows.sort(key=lambda r: order[r[0]])
        return self._messages(rows, rcpts)

    async def get(self, queue_id: str) -> QueuedMessage | None:
        msgs = await self._select("WHERE queue_id = ?", (queue_id,))
        return msgs[0] if msgs else None

    async def _select(self, clause: str, args: tuple[Any, ...]) -> list[QueuedMessage]:
        conn = self._read()
        try:
            conn.execute("BEGIN")
            rows = conn.execute(f"SELECT {MSG_COLS} FROM messages {clause}", args).fetchall()
            rcpts = self._recipients([r[0] for r in rows])
        except sqlite3.Error as exc:
            raise storage_error(exc, "queue read") from exc
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
        return self._messages(rows, rcpts)

    async def state(self, queue_id: str) -> str | None:
        """``"active"``, ``"corrupt"``, or ``None`` if there is no such message."""
        row = self._read().execute("SELECT state FROM messages WHERE queue_id = ?",
                                   (queue_id,)).fetchone()
        return None if row is None else str(row[0])

    async def read_message(self, queue_id: str) -> AsyncGenerator[bytes, None]:
        """Prepended headers, then the body, in chunks of at most 64 KiB.

        The body is checked against the size and CRC-32 of its row; on a
        mismatch the message is marked corrupt and :class:`MessageCorrupt` is
        raised, possibly after some chunks were yielded: the consumer must
        then discard what it wrote (Maildir: the tmp file; SMTP: no final dot).
        """
        try:
            row = self._read().execute(
                "SELECT prepend, body, spool_name, body_size, checksum, state FROM messages "
                "WHERE queue_id = ?", (queue_id,)).fetchone()
        except sqlite3.Error as exc:
            raise storage_error(exc, "queue read") from exc
        if row is None:
            raise StorageError(f"no message {queue_id}")
        prepend, body, spool_name, size, checksum, state = row
        if state != STATE_ACTIVE:
            raise MessageCorrupt(f"message {queue_id} is {state}")
        if body is not None:
            if len(body) != size or zlib.crc32(body) != checksum:
                await self._corrupt(queue_id, "inline body does not match its checksum")
            if prepend:
                yield bytes(prepend)
            for start in range(0, len(body), READ_CHUNK):
                yield bytes(body[start:start + READ_CHUNK])
            return
        async for chunk in self._read_spool(queue_id, prepend, spool_name, size, checksum):
            yield chunk

    async def _read_spool(self, queue_id: str, prepend: bytes, name: str, size: int,
                          checksum: int) -> AsyncGenerator[bytes, None]:
        async for chunk in read_spool_file(self.spool_dir / name, prepend, size, checksum,
                                           functools.partial(self._corrupt, queue_id)):
            yield chunk

    async def _corrupt(self, queue_id: str, reason: str) -> NoReturn:
        """Quarantine the message and raise :class:`MessageCorrupt`."""
        try:
            found = await self._mark_corrupt(queue_id, reason)
        except StorageError as exc:
            log.error("corrupt_mark_failed", queue_id=queue_id, error=str(exc))
        else:
            if not found:  # deleted (by the CLI) while we were reading it
                raise StorageError(f"message {queue_id} was deleted")
        raise MessageCorrupt(f"message {queue_id}: {reason}")

    # Last: a method named ``list`` shadows the builtin in later signatures.
    async def list(self, limit: int = 1000) -> list[QueuedMessage]:
        """Every message (with all its recipients), oldest first."""
        return await self._select("ORDER BY received_at, queue_id LIMIT ?", (limit,))
