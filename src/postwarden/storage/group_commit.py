"""Group commit: the one thread that writes the queue database.

Every write of :class:`~postwarden.storage.sqlite_queue.SqliteQueueStore`
is a :class:`Job` put on the writer's queue.  The writer takes every job
waiting, runs each inside its own SAVEPOINT of one transaction (one failing
job does not sink the others) and commits once, then fsyncs the WAL once
for the whole batch (:class:`WalSync`).  Before the transaction
it runs each job's ``prepare`` (fdatasync of the job's spool file) and, if
any job has a spool file, fsyncs the spool directory, so that no committed
row can name a file whose data or directory entry is not yet durable.
Jobs that arrive while it waits for another process's write lock and
have no spool file join the transaction it is about to run; the others
wait for the next one.  Futures are resolved on their event loop with
``call_soon_threadsafe``.

Security exposure: none of its own; it executes the store's parameterised
statements.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postwarden.observe.log import get_logger
from postwarden.storage.base import StorageError
from postwarden.storage.spool import fsync_dir, storage_error

log = get_logger("queue")

# Most jobs merged into one transaction (bounds the work lost to one failure).
MAX_BATCH = 512
# Waiting for the write lock held by another process (begin_immediate).
LOCK_TIMEOUT = 30.0
LOCK_POLL = 0.0001
LOCK_STEADY = 0.003  # seconds of steady polling before backing off


@dataclass
class StoreStats:
    """Counters of the writer thread (read them from anywhere)."""

    transactions: int = 0  # write transactions committed
    messages: int = 0  # messages committed
    largest_batch: int = 0  # most jobs in one transaction


@dataclass(eq=False)
class Job:
    """One unit of work for the writer thread, run inside a SAVEPOINT."""

    apply: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    prepare: Callable[[], None] | None = None  # before the transaction (fsync body)
    spooled: bool = False  # needs the spool directory fsync'ed before commit
    after_commit: Callable[[Any], None] | None = None
    on_failure: Callable[[], None] | None = None
    error: BaseException | None = field(default=None, init=False)
    value: Any = field(default=None, init=False)


def _resolve(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # the waiter was cancelled; the work is done regardless
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def connect(db_path: Path, *, writer: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA foreign_keys = ON")
    if writer:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StorageError(f"cannot put {db_path} in WAL mode (got {mode})")
        # The WAL is fsync'ed by the writer itself after each commit, outside
        # the write lock (WalSync): the same durability as FULL.
        conn.execute("PRAGMA synchronous = NORMAL")
    else:
        conn.execute("PRAGMA query_only = ON")
    return conn


class WalSync:
    """fdatasync of the database's write-ahead log after a commit, with the
    write lock already released.

    With ``synchronous=FULL`` SQLite fsyncs the WAL inside COMMIT, holding
    the write lock meanwhile, so that the writers of several processes
    (workers.py) queued behind each other's fsyncs.  With ``NORMAL`` COMMIT
    only writes the WAL frames; the writer then syncs the WAL file itself
    before it resolves any future, so a 250 still means the transaction's
    frames are on disk, while another process can already write.  Frames
    that a checkpoint copies into the database are safe either way: in
    ``NORMAL`` mode SQLite syncs the WAL before a checkpoint and the
    database after it, before the WAL is reused (SQLite, "PRAGMA
    synchronous").
    """

    def __init__(self, db_path: Path) -> None:
        self.path = Path(f"{db_path}-wal")
        self.fd = -1
        self.inode = -1

    def __call__(self) -> None:
        st = os.stat(self.path)  # the WAL exists: a commit just wrote it
        if st.st_ino != self.inode:
            self.close()
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self.inode = os.fstat(self.fd).st_ino
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def begin_immediate(conn: sqlite3.Connection, timeout: float = LOCK_TIMEOUT) -> None:
    """BEGIN IMMEDIATE, waiting up to ``timeout`` seconds for the write lock.

    Other processes (worker processes, the CLI) write the same file.  SQLite's
    own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between tries, so
    that a lock held for half a millisecond by another process's commit cost
    the messages waiting here several milliseconds; this polls every
    LOCK_POLL seconds instead, for LOCK_STEADY seconds, and backs off only
    when the wait is longer than that.  With two processes accepting at
    once the lock is held most of the time, each time for well under a
    millisecond: a waiter that slept in growing steps left it free for
    a good part of each step."""
    now = time.monotonic()
    deadline, steady = now + timeout, now + LOCK_STEADY
    pause = LOCK_POLL
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        if time.monotonic() >= steady:
            pause = min(pause * 1.5, 0.01)


class GroupCommitWriter(threading.Thread):
    """The one thread that writes: batches jobs into group commits."""

    def __init__(self, db_path: Path, spool_dir: Path, stats: StoreStats,
                 init_schema: Callable[[sqlite3.Connection], None]) -> None:
        super().__init__(name="postwarden-queue-writer", daemon=True)
        self.db_path = db_path
        self.spool_dir = spool_dir
        self.stats = stats
        self.init_schema = init_schema
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._held: list[Job] = []
        self.stopping = False
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()

    def run(self) -> None:
        try:
            conn = connect(self.db_path, writer=True)
            self.init_schema(conn)
            # From now on it waits for the write lock itself (begin_immediate),
            # in finer steps than SQLite's busy handler.
            conn.execute("PRAGMA busy_timeout = 0")
        except BaseException as exc:
            self.ready.set_exception(storage_error(exc, "open queue database"))
            return
        self.ready.set_result(None)
        self.wal_sync = WalSync(self.db_path)
        try:
            self._loop(conn)
        finally:
            conn.close()
            self.wal_sync.close()

    def _loop(self, conn: sqlite3.Connection) -> None:
        while self._held or not self.stopping:
            if self._held:  # taken from the queue by _late_jobs, not run yet
                batch, self._held = self._held, []
            else:
                job = self.jobs.get()
                if job is None:
                    return
                batch = [job]
            while len(batch) < MAX_BATCH and not self.stopping:
                try:
                    nxt = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.stopping = True
                    break
                batch.append(nxt)
            self._run_batch(conn, batch)

    def _late_jobs(self, room: int) -> list[Job]:
        """Jobs that arrived while this writer waited for the write lock and
        need no fsync before the transaction (no spool file): they join the
        transaction that is about to run instead of waiting for the lock
        once more.  Under contention between processes the lock is the
        scarce thing, so fewer, larger transactions."""
        late: list[Job] = []
        while len(late) < room and not self.stopping:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.stopping = True
            elif job.spooled:
                self._held.append(job)
            else:
                late.append(job)
        return late

    def _run_batch(self, conn: sqlite3.Connection, batch: list[Job]) -> None:
        live = self._prepared(batch)
        late: list[Job] = []  # jobs that joined while _transaction waited for the lock
        try:
            if any(job.spooled for job in live):
                # The spool files' directory entries must be durable before
                # the rows naming them commit.
                fsync_dir(self.spool_dir)
            if live:
                self._transaction(conn, live, late)
                self.wal_sync()
        except Exception as exc:
            err = storage_error(exc, "queue commit")
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            for job in live:
                job.error = err
        self._finish(batch + late)

    @staticmethod
    def _prepared(jobs: list[Job]) -> list[Job]:
        """The jobs whose ``prepare`` succeeded; the others fail."""
        live: list[Job] = []
        for job in jobs:
            try:
                if job.prepare is not None:
                    job.prepare()
                live.append(job)
            except Exception as exc:
                job.error = storage_error(exc, "spool fsync")
        return live

    def _transaction(self, conn: sqlite3.Connection, jobs: list[Job], late: list[Job]) -> None:
        """All jobs in one transaction, with those that arrived while it
        waited for the lock (put in ``late``, and the prepared ones in
        ``jobs`` too).  First without savepoints (two
        statements fewer per job, and each statement is a round of the GIL
        between this thread and the event loop); if a job fails, the whole
        transaction is rolled back and run again with a savepoint per job,
        so that only the failing job fails."""
        begin_immediate(conn)
        late.extend(self._late_jobs(MAX_BATCH - len(jobs)))
        jobs.extend(self._prepared(late))
        try:
            values = [job.apply(conn) for job in jobs]
        except Exception:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        else:
            conn.execute("COMMIT")
            for job, value in zip(jobs, values, strict=True):
                job.value = value
            self._count(jobs)
            return
        self._transaction_by_job(conn, jobs)

    def _count(self, jobs: list[Job]) -> None:
        self.stats.transactions += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))

    def _transaction_by_job(self, conn: sqlite3.Connection, jobs: list[Job]) -> None:
        begin_immediate(conn)
        for job in jobs:
            conn.execute("SAVEPOINT job")
            try:
                job.value = job.apply(conn)
            except Exception as exc:
                if not conn.in_transaction:
                    raise  # SQLite rolled back the whole transaction
                conn.execute("ROLLBACK TO job")
                job.error = storage_error(exc, "queue write")
            conn.execute("RELEASE job")
        conn.execute("COMMIT")
        self._count(jobs)

    def _finish(self, batch: list[Job]) -> None:
        for job in batch:
            if job.error is None and job.after_commit is not None:
                try:
                    job.after_commit(job.value)
                except Exception as exc:  # the commit stands; only cleanup failed
                    log.warning("after_commit_failed", error=repr(exc))
            elif job.error is not None and job.on_failure is not None:
                with contextlib.suppress(Exception):
                    job.on_failure()
            with contextlib.suppress(RuntimeError):  # the loop is closed
                job.loop.call_soon_threadsafe(_resolve, job.future, job.value, job.error)
