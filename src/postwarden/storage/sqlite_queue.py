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
import base64
import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import sqlite3
import time
import zlib
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from postwarden import limits
from postwarden.envelope import Envelope, MailParams, RcptParams
from postwarden.observe.log import get_logger
from postwarden.storage.base import (
    BodyWriter,
    CommitMeta,
    QueuedMessage,
    QueuedRecipient,
    RcptStatus,
    RecipientResult,
    StorageError,
)
from postwarden.storage.group_commit import GroupCommitWriter, Job, StoreStats, connect
from postwarden.storage.spool import SpoolBodyWriter, fsync_dir, is_spool_name, storage_error

log = get_logger("queue")

SCHEMA_VERSION = 1
READ_CHUNK = 64 * 1024
STATE_ACTIVE = "active"
STATE_CORRUPT = "corrupt"
_PENDING = "('queued', 'deferred')"
_LOCK_NAME = ".lock"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS messages (
    queue_id     TEXT PRIMARY KEY,
    sender       TEXT NOT NULL,
    params       TEXT NOT NULL,
    received_at  REAL NOT NULL,
    size         INTEGER NOT NULL,
    client_ip    TEXT NOT NULL DEFAULT '',
    helo         TEXT NOT NULL DEFAULT '',
    auth_user    TEXT NOT NULL DEFAULT '',
    listener     TEXT NOT NULL DEFAULT '',
    session_id   TEXT NOT NULL DEFAULT '',
    held         INTEGER NOT NULL DEFAULT 0,
    state        TEXT NOT NULL DEFAULT 'active',
    prepend      BLOB NOT NULL,
    body         BLOB,
    spool_name   TEXT UNIQUE,
    body_size    INTEGER NOT NULL,
    checksum     INTEGER NOT NULL,
    CHECK ((body IS NULL) <> (spool_name IS NULL))
);
CREATE TABLE IF NOT EXISTS recipients (
    id           INTEGER PRIMARY KEY,
    queue_id     TEXT NOT NULL REFERENCES messages(queue_id) ON DELETE CASCADE,
    address      TEXT NOT NULL,
    params       TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'queued',
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_reply   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients(next_attempt) WHERE status IN {_PENDING};
CREATE INDEX IF NOT EXISTS recipients_queue ON recipients(queue_id);
PRAGMA user_version = {SCHEMA_VERSION};
"""

_MSG_COLS = ("queue_id, sender, params, received_at, size, client_ip, helo, auth_user, "
             "listener, held")
_RCPT_COLS = "id, queue_id, address, params, status, attempts, next_attempt, last_reply"


class MessageCorrupt(StorageError):
    """The message's body does not match its commit record; it is quarantined."""


def new_queue_id() -> str:
    """16 characters of RFC 4648 base32 (80 random bits): upper case, URL-safe."""
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii")


def _init_schema(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version != 0:
        raise StorageError(f"queue database schema {version} is not {SCHEMA_VERSION}")
    conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")


def _message(row: Sequence[Any], rcpts: list[QueuedRecipient]) -> QueuedMessage:
    p = json.loads(row[2])
    return QueuedMessage(
        queue_id=row[0], sender=row[1], params=MailParams(**p), recipients=rcpts,
        received_at=row[3], size=row[4], client_ip=row[5], helo=row[6], auth_user=row[7],
        listener=row[8], held=bool(row[9]))


def _recipient(row: Sequence[Any]) -> QueuedRecipient:
    p = json.loads(row[3])
    notify = tuple(p["notify"]) if p.get("notify") is not None else None
    return QueuedRecipient(
        id=row[0], address=row[2], params=RcptParams(notify=notify, orcpt=p.get("orcpt")),
        status=RcptStatus(row[4]), attempts=row[5], next_attempt=row[6], last_reply=row[7])


def _rcpt_params_json(params: RcptParams) -> str:
    notify = list(params.notify) if params.notify is not None else None
    return json.dumps({"notify": notify, "orcpt": params.orcpt})


class SqliteQueueStore:
    """The :class:`~postwarden.storage.base.QueueStore` of the embedded backend.

    Use ``await store.start()`` (or ``await SqliteQueueStore.open(...)``)
    before anything else and ``await store.close()`` at the end.  Callbacks
    in :attr:`on_commit` are called on the event loop with the queue id of
    each committed message (the queue runner wakes on them).
    """

    def __init__(self, db_path: Path, spool_dir: Path,
                 inline_max: int = limits.INLINE_BODY_MAX,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.db_path = Path(db_path)
        self.spool_dir = Path(spool_dir)
        self.inline_max = inline_max
        self.stats = StoreStats()
        self.on_commit: list[Callable[[str], None]] = []
        self._clock = clock
        self._writer: GroupCommitWriter | None = None
        self._reader: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
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
        writer = GroupCommitWriter(self.db_path, self.spool_dir, self.stats, _init_schema)
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

    async def _recover(self) -> None:
        removed, broken = await asyncio.to_thread(self._scan_spool)
        if removed:
            log.info("spool_garbage_removed", count=removed)
        for queue_id, reason in broken:
            await self._mark_corrupt(queue_id, reason)

    def _scan_spool(self) -> tuple[int, list[tuple[str, str]]]:
        conn = connect(self.db_path, writer=False)
        try:
            rows = conn.execute(
                "SELECT queue_id, spool_name, body_size, state FROM messages "
                "WHERE spool_name IS NOT NULL").fetchall()
        finally:
            conn.close()
        named = {r[1] for r in rows}
        removed = 0
        with os.scandir(self.spool_dir) as entries:
            for entry in entries:
                if is_spool_name(entry.name) and entry.name not in named:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        broken: list[tuple[str, str]] = []
        for queue_id, name, size, state in rows:
            if state != STATE_ACTIVE:
                continue
            try:
                actual = os.stat(self.spool_dir / name, follow_symlinks=False).st_size
            except FileNotFoundError:
                broken.append((queue_id, "spool file missing"))
                continue
            if actual != size:
                broken.append((queue_id, f"spool file size {actual} != {size}"))
        return removed, broken

    async def close(self) -> None:
        """Finish queued writes, then close everything."""
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
        rcpts = [(str(r.address), _rcpt_params_json(r.params)) for r in envelope.recipients]
        if not rcpts:
            body.discard()
            raise StorageError("a message needs at least one recipient")
        values = (sender, json.dumps(dataclasses.asdict(envelope.params)), received_at, size,
                  meta.client_ip, meta.helo, meta.auth_user, meta.listener, meta.session_id,
                  bytes(prepend), inline, body.spool_name, body.size, body.checksum)

        given = meta.queue_id  # named in the Received header already

        def apply(conn: sqlite3.Connection) -> str:
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
                conn.executemany(
                    "INSERT INTO recipients (queue_id, address, params) VALUES (?, ?, ?)",
                    [(queue_id, addr, params) for addr, params in rcpts])
                return queue_id
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
        queue_id: str = await future
        log.info("queued", queue_id=queue_id, session=meta.session_id or None,
                 sender=f"<{sender}>", size=size, nrcpt=len(rcpts),
                 inline=inline is not None)
        for hook in list(self.on_commit):
            try:
                hook(queue_id)
            except Exception as exc:
                log.error("on_commit_failed", queue_id=queue_id, error=repr(exc))
        return queue_id

    async def record_results(self, queue_id: str, results: list[RecipientResult]) -> None:
        updates = [(r.status.value, r.next_attempt, r.reply, r.rcpt_id, queue_id)
                   for r in results]

        def apply(conn: sqlite3.Connection) -> tuple[bool, str | None]:
            conn.executemany(
                "UPDATE recipients SET status = ?, attempts = attempts + 1, "
                "next_attempt = ?, last_reply = ? WHERE id = ? AND queue_id = ?", updates)
            pending = conn.execute(
                f"SELECT 1 FROM recipients WHERE queue_id = ? AND status IN {_PENDING} LIMIT 1",
                (queue_id,)).fetchone()
            if pending is not None:
                return False, None
            return self._delete_row(conn, queue_id)

        await self._submit(apply, after_commit=self._removed(queue_id, "delivered"))

    @staticmethod
    def _delete_row(conn: sqlite3.Connection, queue_id: str) -> tuple[bool, str | None]:
        row = conn.execute("SELECT spool_name FROM messages WHERE queue_id = ?",
                           (queue_id,)).fetchone()
        if row is None:
            return False, None
        conn.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,))
        return True, row[0]

    def _removed(self, queue_id: str, why: str) -> Callable[[Any], None]:
        def after_commit(value: tuple[bool, str | None]) -> None:
            deleted, spool_name = value
            if not deleted:
                return
            if spool_name is not None:
                # After the commit: a crash in between leaves only garbage.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.spool_dir / spool_name)
            log.info("removed", queue_id=queue_id, reason=why)
        return after_commit

    async def delete(self, queue_id: str) -> bool:
        """Remove a message whatever its recipients' state (``queue delete``)."""
        value: tuple[bool, str | None] = await self._submit(
            lambda conn: self._delete_row(conn, queue_id),
            after_commit=self._removed(queue_id, "deleted"))
        return value[0]

    async def set_held(self, queue_id: str, held: bool) -> bool:
        """Hold (no delivery) or release a message; False if it does not exist."""
        def apply(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("UPDATE messages SET held = ? WHERE queue_id = ?",
                               (int(held), queue_id))
            return cur.rowcount > 0
        found: bool = await self._submit(apply)
        return found

    async def _mark_corrupt(self, queue_id: str, reason: str) -> None:
        def apply(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE messages SET state = ? WHERE queue_id = ?",
                         (STATE_CORRUPT, queue_id))
        await self._submit(apply)
        log.error("corrupt", queue_id=queue_id, reason=reason)

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
                    f"SELECT {_RCPT_COLS} FROM recipients WHERE queue_id IN ({marks}) {where} "
                    "ORDER BY id", (*part, *args)):
                out[row[1]].append(_recipient(row))
        return out

    def _messages(self, rows: list[Any], rcpts: dict[str, list[QueuedRecipient]]
                  ) -> list[QueuedMessage]:
        return [_message(row, rcpts[row[0]]) for row in rows]

    async def due(self, now: float, limit: int) -> list[QueuedMessage]:
        """Active, unheld messages with recipients due at ``now`` (only those
        recipients), the longest-waiting first."""
        conn = self._read()
        try:
            conn.execute("BEGIN")
            # INDEXED BY: without statistics the planner would scan every
            # recipient; the partial index holds only the pending ones.
            ids = [r[0] for r in conn.execute(
                "SELECT r.queue_id FROM recipients r INDEXED BY recipients_due "
                "JOIN messages m ON m.queue_id = r.queue_id "
                f"WHERE r.status IN {_PENDING} AND r.next_attempt <= ? "
                "AND m.held = 0 AND m.state = ? "
                "GROUP BY r.queue_id ORDER BY MIN(r.next_attempt), r.queue_id LIMIT ?",
                (now, STATE_ACTIVE, limit))]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            rows = conn.execute(f"SELECT {_MSG_COLS} FROM messages WHERE queue_id IN ({marks})",
                                ids).fetchall()
            rcpts = self._recipients(ids, f"AND status IN {_PENDING} AND next_attempt <= ?",
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
            rows = conn.execute(f"SELECT {_MSG_COLS} FROM messages {clause}", args).fetchall()
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
        path = self.spool_dir / name
        try:
            fd, actual = await asyncio.to_thread(_open_for_read, path)
        except FileNotFoundError:
            await self._corrupt(queue_id, "spool file missing")
        except OSError as exc:
            raise storage_error(exc, "spool read") from exc
        try:
            if actual != size:
                await self._corrupt(queue_id, f"spool file size {actual} != {size}")
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
                await self._corrupt(queue_id, "spool file does not match its checksum")
        finally:
            os.close(fd)

    async def _corrupt(self, queue_id: str, reason: str) -> NoReturn:
        """Quarantine the message and raise :class:`MessageCorrupt`."""
        try:
            await self._mark_corrupt(queue_id, reason)
        except StorageError as exc:
            log.error("corrupt_mark_failed", queue_id=queue_id, error=str(exc))
        raise MessageCorrupt(f"message {queue_id}: {reason}")

    # Last: a method named ``list`` shadows the builtin in later signatures.
    async def list(self, limit: int = 1000) -> list[QueuedMessage]:
        """Every message (with all its recipients), oldest first."""
        return await self._select("ORDER BY received_at, queue_id LIMIT ?", (limit,))


def _open_for_read(path: Path) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return fd, os.fstat(fd).st_size
    except OSError:
        os.close(fd)
        raise
