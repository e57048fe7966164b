"""The shared queue: PostgreSQL (asyncpg), for several nodes on one database.

The same :class:`~postwarden.storage.base.QueueStore` as
:class:`~postwarden.storage.sqlite_queue.SqliteQueueStore`, plus leases:

* **Commit point.**  ``commit`` returns once the transaction holding the
  body (in the ``messages`` row), the prepended headers, the envelope and
  the ``queued`` events has committed.  The session streams the body to a
  local spool file first (:class:`~postwarden.storage.spool.SpoolBodyWriter`,
  memory stays bounded); the file is removed once the row holds it.
* **Shared spool** (``[storage] shared_spool_dir``).  A body larger than
  the inline limit stays a file in a directory every node mounts; the
  session writes it there, the commit fdatasyncs it and its directory
  entry *before* the transaction that names it (``spool_name``) commits,
  and the file is removed after the transaction that removes the message.
  A crash between the two leaves an unreferenced file, which a node
  removes at start once it is a day old (:data:`SWEEP_AGE`).
* **Group commit.**  Commits that arrive while a transaction is in flight
  are batched into the next one (one WAL flush for many messages); up to
  :data:`COMMIT_LANES` batches run at once on different connections.  A
  batch that fails (a queue id taken) is redone one commit per savepoint,
  so one bad commit never sinks the others.
* **Leases.**  :meth:`PgQueueStore.claim` takes due messages with
  ``SELECT … FOR UPDATE SKIP LOCKED`` (two nodes never claim the same
  message) and writes ``lease_owner`` / ``lease_until``.  The node renews
  its leases at every heartbeat while it delivers; results release them.  A
  node that dies stops renewing: after at most ``[storage] lease`` seconds
  another node claims the message (at-least-once; such takeovers are
  counted, per node and in the history, since they may duplicate a
  delivery that was under way).
* **Wake-ups.**  Every commit batch sends ``NOTIFY postwarden_queue`` in its
  transaction; every node LISTENs and wakes its runner, so mail accepted on
  node A is delivered by B without waiting for a scan.
* **Nodes.**  Each store registers a row in ``nodes`` and updates its
  heartbeat and in-flight count (``postwarden nodes``).

Security exposure: stores untrusted envelope strings and content; every
value is a query parameter.  The DSN (which may hold a password) is never
logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import secrets
import socket
import time
import zlib
from collections.abc import AsyncGenerator, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import asyncpg

from postwarden import compactjson, limits
from postwarden.background import cancel_and_wait
from postwarden.envelope import Envelope, MailParams
from postwarden.ids import new_queue_id
from postwarden.observe.log import get_logger
from postwarden.storage.base import (
    BodyWriter,
    CommitMeta,
    DeliveryEvent,
    QueuedMessage,
    QueuedRecipient,
    RcptStatus,
    RecipientResult,
    StorageError,
)
from postwarden.storage.group_commit import StoreStats
from postwarden.storage.pg_schema import PENDING, prepare
from postwarden.storage.pg_sync import pg_sql
from postwarden.storage.settings import StorageSettings
from postwarden.storage.spool import (
    SpoolBodyWriter,
    fsync_dir,
    is_spool_name,
    read_spool_file,
    storage_error,
)
from postwarden.storage.sqlite_queue import MessageCorrupt
from postwarden.storage.sqlite_schema import (
    event_from_row,
    message_from_row,
    rcpt_params_json,
    recipient_from_row,
    split_reply,
)

log = get_logger("queue")

CHANNEL = "postwarden_queue"
READ_CHUNK = 64 * 1024
WHOLE_READ = 256 * 1024
STATE_ACTIVE = "active"
STATE_CORRUPT = "corrupt"
COMMIT_LANES = 4  # batches committing at once (each on its own connection)
BATCH_MAX = 256  # commits in one transaction at most
RECORD_RETRIES = 3  # a message's results after a deadlock
EVENTS_KEEP = 30 * 86400.0
# An unreferenced file in the shared spool older than this is garbage (a
# commit that failed, or a crash between a removal and its unlink); a
# younger one may be a body still being received by some node.
SWEEP_AGE = 86400.0
_FINAL = (RcptStatus.DELIVERED, RcptStatus.FAILED)
_MAIL_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(MailParams))

MSG_COLS = ("queue_id, sender, params, received_at, size, client_ip, helo, auth_user, "
            "listener, held")
RCPT_COLS = ("id, queue_id, address, params, status, attempts, next_attempt, last_reply, "
             "relay, last_attempt, final_ts, warned")
EVENT_COLS = "ts, queue_id, event, rcpt, relay, dsn, reply, sender, message_id, detail"
_INSERT_EVENT = (f"INSERT INTO events ({EVENT_COLS}) "
                 "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")


@dataclass(frozen=True, slots=True)
class LeaseStats:
    """What the leases did on this node (metrics, ``postwarden nodes``)."""

    claimed: int = 0
    takeovers: int = 0  # claims of a message whose lease expired (its node died)


@dataclass(eq=False)
class _Commit:
    queue_id: str
    given: bool
    message: tuple[Any, ...]
    recipients: list[tuple[str, str]]
    events: list[tuple[Any, ...]]
    future: asyncio.Future[str]
    error: BaseException | None = None


@dataclass(eq=False)
class _Record:
    queue_id: str
    results: list[RecipientResult]
    events: list[DeliveryEvent]
    now: float
    future: asyncio.Future[bool]
    spool_name: str = ""  # the shared spool file to unlink once removed


@dataclass
class _Counters:
    claimed: int = 0
    takeovers: int = 0
    in_flight: set[str] = field(default_factory=set)


def node_name() -> str:
    """A node id unique among the processes sharing the database."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class PgQueueStore:
    """The :class:`~postwarden.storage.base.QueueStore` of the PostgreSQL
    backend.  ``await store.start()`` first, ``await store.close()`` last;
    :attr:`on_commit` callbacks run on the loop for every commit of this
    store and for every commit another node announces (queue id ``""``)."""

    def __init__(self, settings: StorageSettings, spool_dir: Path,
                 inline_max: int = limits.INLINE_BODY_MAX, *,
                 clock: Callable[[], float] = time.time, node_id: str = "",
                 register: bool = True) -> None:
        self.settings = settings
        self.spool_dir = Path(spool_dir)
        # Bodies beyond inline_max: files in the shared spool, or in the row.
        self.shared_spool = (Path(settings.shared_spool_dir) if settings.shared_spool_dir
                             else None)
        self.inline_max = inline_max
        self.stats = StoreStats()
        self.on_commit: list[Callable[[str], None]] = []
        self.events_keep = EVENTS_KEEP
        self.node_id = node_id or node_name()
        self._register = register  # a node (serve) rather than a CLI command
        self._clock = clock
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._pending: list[_Commit] = []
        self._lanes = 0
        self._results: list[_Record] = []
        self._result_lanes = 0
        self._lane_tasks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._counters = _Counters()
        # The shared queue by state, refreshed at each heartbeat (/metrics).
        self.queue_state: dict[str, Any] = {}
        self._closed = False

    @property
    def lease_stats(self) -> LeaseStats:
        return LeaseStats(self._counters.claimed, self._counters.takeovers)

    @property
    def pool(self) -> asyncpg.Pool:
        """The connection pool (shared with the protection and greylist
        stores of this process)."""
        if self._pool is None:
            raise StorageError("queue store is not open")
        return self._pool

    @property
    def in_flight(self) -> int:
        return len(self._counters.in_flight)

    # -- life cycle ---------------------------------------------------------

    async def start(self) -> None:
        """Connect, create or migrate the tables, LISTEN, register the node."""
        if self._pool is not None:
            return
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.shared_spool is not None and not self.shared_spool.is_dir():
            raise StorageError(f"[storage] shared_spool_dir {self.shared_spool} is not a "
                               "directory (is the shared file system mounted?)")
        s = self.settings
        try:
            conn = await asyncpg.connect(s.dsn)
            try:
                await prepare(conn, s.schema)
            finally:
                await conn.close()
            self._pool = await asyncpg.create_pool(
                s.dsn, min_size=s.pool_min, max_size=s.pool_max,
                server_settings={"search_path": s.schema, "application_name": self._app_name})
            if self._register:
                await self._listen()
                now = self._clock()
                await self._pool.execute(
                    "INSERT INTO nodes (node_id, hostname, pid, started, heartbeat) "
                    "VALUES ($1, $2, $3, $4, $4) ON CONFLICT (node_id) DO UPDATE "
                    "SET heartbeat = $4", self.node_id, socket.gethostname(), os.getpid(), now)
                self._heartbeat = asyncio.create_task(self._beat(), name="pg-heartbeat")
                if self.shared_spool is not None:
                    await self.sweep_shared_spool()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self.close()
            raise StorageError(f"PostgreSQL at [storage] dsn: {_describe(exc)}") from exc
        log.info("pg_store_started", node=self.node_id, schema=s.schema)

    async def close(self) -> None:
        """Release this node's leases (others may deliver at once), deregister,
        close the pool."""
        self._closed = True
        beat, self._heartbeat = self._heartbeat, None
        await cancel_and_wait(beat)
        if self._lane_tasks:
            await asyncio.gather(*self._lane_tasks, return_exceptions=True)
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            listener, self._listener = self._listener, None
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.close()
            if self._register:
                with contextlib.suppress(Exception):
                    async with pool.acquire() as conn, conn.transaction():
                        await conn.execute("UPDATE messages SET lease_owner = '', lease_until = 0 "
                                           "WHERE lease_owner = $1", self.node_id)
                        await conn.execute("DELETE FROM nodes WHERE node_id = $1", self.node_id)
        finally:
            await pool.close()

    @property
    def _app_name(self) -> str:
        """What pg_stat_activity shows for this node's connections."""
        return f"postwarden {self.node_id}"[:63]

    async def _listen(self) -> None:
        """LISTEN on a connection of its own (outside the pool)."""
        conn = await asyncpg.connect(self.settings.dsn,
                                     server_settings={"application_name": self._app_name})
        try:
            await conn.add_listener(CHANNEL, self._notified)
        except BaseException:
            await conn.close()
            raise
        self._listener = conn

    async def _relisten(self) -> None:
        """After the LISTEN connection was lost (database restart, network):
        listen again, then wake the runner for what was missed meanwhile."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                await listener.close()
        await self._listen()
        log.info("pg_listen_restored", node=self.node_id)
        self._run_hooks("")

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload == self.node_id:
            return  # our own commit: the hooks ran already
        self._run_hooks("")

    def _run_hooks(self, queue_id: str) -> None:
        for hook in list(self.on_commit):
            try:
                hook(queue_id)
            except Exception as exc:
                log.error("on_commit_failed", queue_id=queue_id, error=repr(exc))

    async def _beat(self) -> None:
        """Renew the leases of deliveries in progress; say we are alive."""
        while True:
            await asyncio.sleep(self.settings.heartbeat)
            try:
                await self.heartbeat()
            except Exception as exc:  # keep beating: the database may come back
                log.error("heartbeat_failed", error=str(exc) or repr(exc))

    async def heartbeat(self) -> None:
        if self._register and (self._listener is None or self._listener.is_closed()):
            await self._relisten()
        now = self._clock()
        held = list(self._counters.in_flight)
        async with self._acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit TO off")  # as for claims
            if held:
                # SKIP LOCKED: a message whose results are being recorded
                # is skipped (its lease ends with them); waiting for it here
                # while holding others could deadlock with that transaction.
                await conn.execute(
                    "UPDATE messages SET lease_until = $1 WHERE queue_id IN "
                    "(SELECT queue_id FROM messages WHERE lease_owner = $2 "
                    "AND queue_id = ANY($3::text[]) FOR UPDATE SKIP LOCKED)",
                    now + self.settings.lease, self.node_id, held)
            await conn.execute(
                "UPDATE nodes SET heartbeat = $2, in_flight = $3, takeovers = $4 "
                "WHERE node_id = $1", self.node_id, now, len(held), self._counters.takeovers)
        self.queue_state = await self._queue_state(now)

    async def _queue_state(self, now: float) -> dict[str, Any]:
        """As observe.health.queue_state, for the shared queue."""
        messages = {"active": 0, "held": 0, "corrupt": 0}
        recipients = {"queued": 0, "deferred": 0}
        async with self._acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                             readonly=True):
            for state, held, count in await conn.fetch(
                    "SELECT state, held, count(*) FROM messages GROUP BY state, held"):
                key = "held" if held and state == STATE_ACTIVE else str(state)
                messages[key] = messages.get(key, 0) + int(count)
            for status, count in await conn.fetch(
                    f"SELECT status, count(*) FROM recipients WHERE status IN {PENDING} "
                    "GROUP BY status"):
                recipients[str(status)] = int(count)
            oldest = await conn.fetchval("SELECT min(received_at) FROM messages")
            bans = await conn.fetchval("SELECT count(*) FROM protect_bans "
                                       "WHERE until IS NULL OR until > $1", now)
        return {"messages": messages, "recipients": recipients,
                "oldest_seconds": round(now - oldest, 1) if oldest is not None else 0.0,
                "bans_active": int(bans)}

    def _acquire(self) -> Any:
        if self._pool is None or self._closed:
            raise StorageError("queue store is not open")
        return self._pool.acquire()

    # -- the commit point ---------------------------------------------------

    def new_body(self) -> BodyWriter:
        return SpoolBodyWriter(self.shared_spool or self.spool_dir, self.inline_max,
                               owner=self)

    async def sweep_shared_spool(self, older_than: float = SWEEP_AGE) -> int:
        """Remove files of the shared spool that no message names and that
        are older than ``older_than`` seconds; how many."""
        assert self.shared_spool is not None
        root = self.shared_spool
        cutoff = time.time() - older_than

        def old_names() -> list[str]:
            out = []
            for entry in os.scandir(root):
                with contextlib.suppress(OSError):
                    if is_spool_name(entry.name) and entry.stat().st_mtime < cutoff:
                        out.append(entry.name)
            return out
        names = await asyncio.to_thread(old_names)
        if not names:
            return 0
        async with self._acquire() as conn:
            used = {r[0] for r in await conn.fetch(
                "SELECT spool_name FROM messages WHERE spool_name = ANY($1::text[])", names)}
        garbage = [n for n in names if n not in used]
        await asyncio.to_thread(_unlink_all, root, garbage)
        if garbage:
            log.info("shared_spool_swept", files=len(garbage))
        return len(garbage)

    def _shared_body(self, body: SpoolBodyWriter) -> str:
        """fdatasync the body's file and its directory entry (blocking); its
        name.  Done before the transaction naming it commits."""
        assert self.shared_spool is not None and body.spool_name is not None
        body.sync()
        fsync_dir(self.shared_spool)
        return body.spool_name

    async def commit(self, body: BodyWriter, envelope: Envelope, prepend: bytes,
                     meta: CommitMeta) -> str:
        if not isinstance(body, SpoolBodyWriter) or body.owner is not self:
            raise StorageError("body writer from another store")
        body.seal()
        try:
            if self._pool is None or self._closed:
                raise StorageError("queue store is not open")
            rcpts = [(str(r.address), rcpt_params_json(r.params)) for r in envelope.recipients]
            if not rcpts:
                raise StorageError("a message needs at least one recipient")
            spool_name = ""
            try:
                if self.shared_spool is not None and body.spool_name is not None:
                    spool_name = await asyncio.to_thread(self._shared_body, body)
                    data = b""
                else:
                    data = await asyncio.to_thread(body.read_back)
            except OSError as exc:
                raise storage_error(exc, "spool write" if spool_name else "spool read") from exc
            body_size, checksum = ((body.size, body.checksum) if spool_name
                                   else (len(data), zlib.crc32(data)))
            received_at = self._clock()
            sender = str(envelope.sender) if envelope.sender is not None else ""
            size = len(prepend) + body_size
            params = envelope.params
            queue_id = meta.queue_id or new_queue_id()
            message = (queue_id, sender,
                       compactjson.dumps({f: getattr(params, f) for f in _MAIL_PARAM_FIELDS}),
                       received_at, size, meta.client_ip, meta.helo, meta.auth_user,
                       meta.listener, meta.session_id, bytes(prepend), data, body_size,
                       checksum, spool_name)
            queued_text = (f"from=<{sender}>, size={size}, nrcpt={len(rcpts)}"
                           + (f", client={meta.client_ip}" if meta.client_ip else ""))
            events = [(received_at, queue_id, "queued", addr, "", "", queued_text if i == 0
                       else "", sender, meta.message_id, meta.detail if i == 0 else "")
                      for i, (addr, _) in enumerate(rcpts)]
            job = _Commit(queue_id, bool(meta.queue_id), message, rcpts, events,
                          asyncio.get_running_loop().create_future())
            self._pending.append(job)
            if self._lanes < COMMIT_LANES:
                self._lanes += 1
                task = asyncio.create_task(self._lane(), name="pg-commit")
                self._lane_tasks.add(task)
                task.add_done_callback(self._lane_tasks.discard)
            queue_id = await job.future
            if spool_name:
                body.committed()  # the row names the file: it stays
        finally:
            # The row holds the body now (or nothing was committed).  A commit
            # whose outcome is unknown (the connection lost during COMMIT) may
            # leave a row naming a removed file: the client was not told 250
            # and sends again; that row is marked corrupt when read.
            body.discard()
        log.debug("queued", queue_id=queue_id, session=meta.session_id or None,
                  sender=f"<{sender}>", size=size, nrcpt=len(rcpts))
        self._run_hooks(queue_id)
        return queue_id

    async def _lane(self) -> None:
        """Commit what is pending, batch after batch, until nothing is."""
        try:
            while self._pending:
                batch, self._pending = self._pending[:BATCH_MAX], self._pending[BATCH_MAX:]
                try:
                    await self._commit_batch(batch)
                except BaseException as exc:
                    error = exc if isinstance(exc, StorageError) else StorageError(
                        f"queue commit failed: {_describe(exc)}")
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(error)
                    if not isinstance(exc, Exception):
                        raise
        finally:
            self._lanes -= 1

    async def _commit_batch(self, batch: list[_Commit]) -> None:
        async with self._acquire() as conn:
            try:
                async with conn.transaction():
                    await self._insert(conn, batch)
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self.node_id)
            except asyncpg.UniqueViolationError:
                # One commit of the batch cannot be made (its queue id is
                # taken): redo them one per savepoint.
                async with conn.transaction():
                    for job in batch:
                        await self._insert_alone(conn, job)
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self.node_id)
        self.stats.transactions += 1
        ok = [j for j in batch if j.error is None]
        self.stats.messages += len(ok)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for job in batch:
            if job.future.done():
                continue
            if job.error is not None:
                job.future.set_exception(job.error)
            else:
                job.future.set_result(job.queue_id)

    async def _insert_alone(self, conn: asyncpg.Connection, job: _Commit) -> None:
        for _ in range(1 if job.given else 8):
            try:
                async with conn.transaction():
                    await self._insert(conn, [job])
                return
            except asyncpg.UniqueViolationError:
                if job.given:
                    break
                # Collision of 80 random bits: draw again.
                job.queue_id = new_queue_id()
                job.message = (job.queue_id, *job.message[1:])
                job.events = [(e[0], job.queue_id, *e[2:]) for e in job.events]
        job.error = StorageError(f"queue id {job.queue_id} is taken")

    @staticmethod
    async def _insert(conn: asyncpg.Connection, batch: Sequence[_Commit]) -> None:
        await conn.executemany(
            "INSERT INTO messages (queue_id, sender, params, received_at, size, client_ip, "
            "helo, auth_user, listener, session_id, prepend, body, body_size, checksum, "
            "spool_name) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            [j.message for j in batch])
        await conn.executemany(
            "INSERT INTO recipients (queue_id, address, params) VALUES ($1, $2, $3)",
            [(j.queue_id, addr, params) for j in batch for addr, params in j.recipients])
        await conn.executemany(_INSERT_EVENT, [e for j in batch for e in j.events])

    # -- leases ---------------------------------------------------------------

    async def claim(self, now: float, limit: int) -> list[QueuedMessage]:
        """Due messages (their due recipients) leased to this node: no other
        node gets them until the results are recorded, the lease is
        released, or it expires (this node died)."""
        if limit <= 0:
            return []
        until = self._clock() + self.settings.lease
        async with self._acquire() as conn, conn.transaction():
            # A claim lost in a database crash only frees the message for
            # another claim (at least once): no need to wait for the flush.
            await conn.execute("SET LOCAL synchronous_commit TO off")
            rows = await conn.fetch(
                "WITH c AS (SELECT m.queue_id, m.lease_owner FROM messages m "
                "WHERE m.due_at <= $1 AND NOT m.held AND m.state = $2 AND m.lease_until <= $3 "
                "ORDER BY m.due_at, m.received_at LIMIT $4 FOR UPDATE SKIP LOCKED) "
                "UPDATE messages m SET lease_owner = $5, lease_until = $6 FROM c "
                "WHERE m.queue_id = c.queue_id RETURNING m.queue_id, c.lease_owner",
                now, STATE_ACTIVE, self._clock(), limit, self.node_id, until)
            if not rows:
                return []
            taken = [(r[0], r[1]) for r in rows if r[1] and r[1] != self.node_id]
            if taken:
                await conn.executemany(_INSERT_EVENT, [
                    (now, queue_id, "lease_expired", "", owner, "", "", "", "",
                     f"claimed by {self.node_id}") for queue_id, owner in taken])
            ids = [r[0] for r in rows]
            msgs = await self._load(conn, ids, due=now)
            idle = [m.queue_id for m in msgs if not m.recipients]
            if idle:  # due_at was ahead of its recipients: correct it, let go
                await conn.execute(
                    "UPDATE messages m SET lease_owner = '', lease_until = 0, due_at = "
                    f"(SELECT coalesce(min(next_attempt), 0) FROM recipients r "
                    f"WHERE r.queue_id = m.queue_id AND r.status IN {PENDING}) "
                    "WHERE queue_id = ANY($1::text[])", idle)
                msgs = [m for m in msgs if m.recipients]
                ids = [m.queue_id for m in msgs]
        self._counters.claimed += len(ids)
        self._counters.takeovers += len(taken)
        self._counters.in_flight.update(ids)
        for queue_id, owner in taken:
            log.warning("lease_takeover", queue_id=queue_id, previous=owner, node=self.node_id)
        return msgs

    async def release(self, queue_id: str) -> None:
        """Give up the lease without results (another node may deliver)."""
        self._counters.in_flight.discard(queue_id)
        async with self._acquire() as conn:
            await conn.execute("UPDATE messages SET lease_owner = '', lease_until = 0 "
                               "WHERE queue_id = $1 AND lease_owner = $2", queue_id,
                               self.node_id)

    # -- delivery results and the queue commands ------------------------------

    async def record_results(self, queue_id: str, results: list[RecipientResult],
                             events: Sequence[DeliveryEvent] = ()) -> None:
        """As SqliteQueueStore.record_results.  Results that arrive together
        share one transaction (one WAL flush), each in a savepoint of its own."""
        job = _Record(queue_id, list(results), list(events), self._clock(),
                      asyncio.get_running_loop().create_future())
        self._results.append(job)
        if self._result_lanes < COMMIT_LANES:
            self._result_lanes += 1
            task = asyncio.create_task(self._record_lane(), name="pg-results")
            self._lane_tasks.add(task)
            task.add_done_callback(self._lane_tasks.discard)
        try:
            removed = await job.future
        finally:
            self._counters.in_flight.discard(queue_id)
        if removed:
            log.info("removed", queue_id=queue_id, reason="delivered")

    async def _record_lane(self) -> None:
        try:
            while self._results:
                batch, self._results = self._results[:BATCH_MAX], self._results[BATCH_MAX:]
                outcome: dict[int, bool | BaseException] = {}
                try:
                    async with self._acquire() as conn, conn.transaction():
                        for i, job in enumerate(batch):
                            outcome[i] = await self._record_one(conn, job)
                except BaseException as exc:
                    error = exc if isinstance(exc, StorageError) else StorageError(
                        f"queue write failed: {_describe(exc)}")
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(error)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                # Committed: the bodies of removed messages can go.
                await self._unlink_shared([j.spool_name for i, j in enumerate(batch)
                                           if outcome[i] is True])
                for i, job in enumerate(batch):
                    value = outcome[i]
                    if job.future.done():
                        continue
                    if isinstance(value, BaseException):
                        job.future.set_exception(value)
                    else:
                        job.future.set_result(value)
        finally:
            self._result_lanes -= 1

    async def _record_one(self, conn: asyncpg.Connection, job: _Record) -> bool | StorageError:
        """One message's results in a savepoint; a deadlock (with a command
        or another node touching the same rows) is retried: the rolled-back
        savepoint released its locks."""
        for attempt in range(RECORD_RETRIES):
            try:
                async with conn.transaction():  # a savepoint
                    return await self._record(conn, job)
            except (asyncpg.DeadlockDetectedError,
                    asyncpg.SerializationError) as exc:
                if attempt + 1 == RECORD_RETRIES:
                    return StorageError(f"queue write failed: {_describe(exc)}")
                log.warning("record_retry", queue_id=job.queue_id, error=type(exc).__name__)
            except asyncpg.PostgresError as exc:
                return StorageError(f"queue write failed: {_describe(exc)}")
        raise AssertionError("unreachable")

    async def _record(self, conn: asyncpg.Connection, job: _Record) -> bool:
        queue_id, results, events, now = job.queue_id, job.results, job.events, job.now
        if await conn.fetchval("SELECT 1 FROM messages WHERE queue_id = $1 FOR UPDATE",
                               queue_id) is None:
            return False  # deleted meanwhile: nothing is written
        history: list[DeliveryEvent] = []
        for r in results:
            address = await conn.fetchval(
                "UPDATE recipients SET status = $1, attempts = attempts + 1, next_attempt = $2, "
                "last_reply = $3, relay = $4, last_attempt = $5, final_ts = $6, "
                "warned = warned OR $7 WHERE id = $8 AND queue_id = $9 RETURNING address",
                r.status.value, r.next_attempt, r.reply, r.relay, now,
                now if r.status in _FINAL else 0.0, r.warned, r.rcpt_id, queue_id)
            if address is None:
                continue
            dsn, text = split_reply(r.reply)
            history.append(DeliveryEvent(now, queue_id, r.event or r.status.value, address,
                                         r.relay, dsn, text))
        await _insert_events(conn, [*history, *events])
        due_at = await conn.fetchval(
            f"SELECT min(next_attempt) FROM recipients WHERE queue_id = $1 "
            f"AND status IN {PENDING}", queue_id)
        if due_at is not None:  # still pending: due again then; our lease ends
            await conn.execute(
                "UPDATE messages SET due_at = $2, "
                "lease_until = CASE WHEN lease_owner = $3 THEN 0 ELSE lease_until END, "
                "lease_owner = CASE WHEN lease_owner = $3 THEN '' ELSE lease_owner END "
                "WHERE queue_id = $1", queue_id, due_at, self.node_id)
            return False
        await _insert_events(conn, [DeliveryEvent(now, queue_id, "removed")])
        job.spool_name = await conn.fetchval(
            "DELETE FROM messages WHERE queue_id = $1 RETURNING spool_name", queue_id) or ""
        return True

    async def _write(self, sql: str, *args: Any, event: DeliveryEvent | None = None,
                     notify: bool = False) -> str:
        """One statement (and its event when it changed a row); the status."""
        try:
            async with self._acquire() as conn, conn.transaction():
                status: str = await conn.execute(sql, *args)
                if event is not None and not status.endswith(" 0"):
                    await _insert_events(conn, [event])
                if notify:
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self.node_id)
        except asyncpg.PostgresError as exc:
            raise StorageError(f"queue write failed: {_describe(exc)}") from exc
        return status

    async def delete(self, queue_id: str) -> bool:
        try:
            async with self._acquire() as conn, conn.transaction():
                found = await conn.fetchrow("DELETE FROM messages WHERE queue_id = $1 "
                                            "RETURNING spool_name", queue_id)
                if found is not None:
                    await _insert_events(conn, [DeliveryEvent(self._clock(), queue_id,
                                                              "deleted")])
        except asyncpg.PostgresError as exc:
            raise StorageError(f"queue write failed: {_describe(exc)}") from exc
        if found is None:
            return False
        await self._unlink_shared([found[0]])
        log.info("removed", queue_id=queue_id, reason="deleted")
        return True

    async def _unlink_shared(self, names: Sequence[str]) -> None:
        """Remove the shared spool files of removed messages (after the
        commit; one left behind by a crash is swept later)."""
        names = [n for n in names if n]
        if names and self.shared_spool is not None:
            await asyncio.to_thread(_unlink_all, self.shared_spool, names)

    async def set_held(self, queue_id: str, held: bool) -> bool:
        status = await self._write(
            "UPDATE messages SET held = $2 WHERE queue_id = $1", queue_id, held,
            event=DeliveryEvent(self._clock(), queue_id, "held" if held else "released"),
            notify=not held)
        return not status.endswith(" 0")

    async def requeue(self, queue_id: str) -> bool:
        now = self._clock()
        async with self._acquire() as conn, conn.transaction():
            status = await conn.execute("UPDATE messages SET held = FALSE, due_at = 0 "
                                        "WHERE queue_id = $1", queue_id)
            if status.endswith(" 0"):
                return False
            await conn.execute("UPDATE recipients SET attempts = 0, next_attempt = 0 "
                               f"WHERE queue_id = $1 AND status IN {PENDING}", queue_id)
            await _insert_events(conn, [DeliveryEvent(now, queue_id, "requeued")])
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self.node_id)
        return True

    async def flush(self, queue_id: str | None = None) -> int:
        now = self._clock()
        where = "NOT m.held AND m.state = $2" + (" AND m.queue_id = $3" if queue_id else "")
        args: tuple[Any, ...] = (now, STATE_ACTIVE, *((queue_id,) if queue_id else ()))
        try:
            async with self._acquire() as conn, conn.transaction():
                status = await conn.execute(
                    "UPDATE recipients SET next_attempt = LEAST(next_attempt, $1) "
                    f"WHERE status IN {PENDING} AND queue_id IN "
                    f"(SELECT m.queue_id FROM messages m WHERE {where})", *args)
                await conn.execute(f"UPDATE messages m SET due_at = LEAST(due_at, $1) "
                                   f"WHERE {where}", *args)
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self.node_id)
        except asyncpg.PostgresError as exc:
            raise StorageError(f"queue write failed: {_describe(exc)}") from exc
        return int(status.rsplit(" ", 1)[-1])

    async def prune_events(self, keep: float | None = None) -> int:
        before = self._clock() - (self.events_keep if keep is None else keep)
        status = await self._write(
            "DELETE FROM events e WHERE ts < $1 "
            "AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.queue_id = e.queue_id)", before)
        return int(status.rsplit(" ", 1)[-1])

    async def history(self, queue_id: str) -> list[DeliveryEvent]:
        async with self._acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {EVENT_COLS} FROM events WHERE queue_id = $1 ORDER BY id", queue_id)
        return [event_from_row(tuple(r)) for r in rows]

    async def add_events(self, events: Sequence[DeliveryEvent]) -> None:
        """Add lines to messages' histories, queued or not (a complaint)."""
        try:
            async with self._acquire() as conn, conn.transaction():
                await _insert_events(conn, events)
        except asyncpg.PostgresError as exc:
            raise StorageError(f"queue write failed: {_describe(exc)}") from exc

    async def find_message_id(self, message_id: str, limit: int = 10) -> list[str]:
        """The queue ids of the messages queued with this Message-ID,
        newest first (by the ``events_message_id`` index)."""
        async with self._acquire() as conn:
            rows = await conn.fetch(
                "SELECT queue_id FROM events WHERE message_id = $1 AND message_id <> '' "
                "AND event = 'queued' GROUP BY queue_id ORDER BY max(id) DESC LIMIT $2",
                message_id, limit)
        return [str(r[0]) for r in rows]

    # -- reading ------------------------------------------------------------

    async def _load(self, conn: asyncpg.Connection, ids: list[str],
                    due: float | None = None) -> list[QueuedMessage]:
        """Messages ``ids`` in that order (with their due recipients only
        when ``due`` is given)."""
        if not ids:
            return []
        rows = await conn.fetch(f"SELECT {MSG_COLS} FROM messages WHERE queue_id = ANY($1)",
                                ids)
        where = "" if due is None else f" AND status IN {PENDING} AND next_attempt <= $2"
        rrows = await conn.fetch(
            f"SELECT {RCPT_COLS} FROM recipients WHERE queue_id = ANY($1){where} ORDER BY id",
            ids, *(() if due is None else (due,)))
        rcpts: dict[str, list[QueuedRecipient]] = {i: [] for i in ids}
        for r in rrows:
            rcpts[r[1]].append(recipient_from_row(tuple(r)))
        order = {queue_id: i for i, queue_id in enumerate(ids)}
        msgs = [message_from_row(tuple(r), rcpts[r[0]]) for r in rows]
        msgs.sort(key=lambda m: order[m.queue_id])
        return msgs

    async def page(self, where: str, args: Sequence[object], order: str, limit: int,
                   offset: int) -> tuple[int, list[QueuedMessage]]:
        """(how many messages match, one page of them) for
        :func:`postwarden.storage.sqlite_queue_browse.browse`: its ``WHERE``
        clause (``?`` placeholders, values in ``args``) and ``ORDER BY``."""
        async with self._acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                             readonly=True):
            total = await conn.fetchval(pg_sql(f"SELECT count(*) FROM messages {where}"),
                                        *args)
            ids = [r[0] for r in await conn.fetch(pg_sql(
                f"SELECT queue_id FROM messages {where} ORDER BY {order} LIMIT ? OFFSET ?"),
                *args, limit, offset)]
            return int(total), await self._load(conn, ids)

    async def due(self, now: float, limit: int,
                  skip: Collection[str] = ()) -> list[QueuedMessage]:
        """Active, unheld messages with recipients due at ``now`` (only
        those), the longest-waiting first, none in ``skip``; nothing is
        claimed."""
        async with self._acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                             readonly=True):
            ids = [r[0] for r in await conn.fetch(
                "SELECT r.queue_id FROM recipients r JOIN messages m ON m.queue_id = r.queue_id "
                f"WHERE r.status IN {PENDING} AND r.next_attempt <= $1 "
                "AND NOT m.held AND m.state = $2 "
                "GROUP BY r.queue_id ORDER BY MIN(r.next_attempt), r.queue_id LIMIT $3",
                now, STATE_ACTIVE, limit + len(skip))]
            return await self._load(conn, [i for i in ids if i not in skip][:limit], due=now)

    async def get(self, queue_id: str) -> QueuedMessage | None:
        async with self._acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                             readonly=True):
            msgs = await self._load(conn, [queue_id])
        return msgs[0] if msgs else None

    async def state(self, queue_id: str) -> str | None:
        async with self._acquire() as conn:
            value = await conn.fetchval("SELECT state FROM messages WHERE queue_id = $1",
                                        queue_id)
        return None if value is None else str(value)

    async def read_message(self, queue_id: str) -> AsyncGenerator[bytes, None]:
        """Prepended headers, then the body, in chunks of at most 64 KiB,
        checked against the size and CRC-32 of the row (a mismatch marks the
        message corrupt and raises :class:`MessageCorrupt`)."""
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT prepend, body_size, checksum, state, octet_length(body), "
                "CASE WHEN body_size <= $2 THEN body END, spool_name "
                "FROM messages WHERE queue_id = $1", queue_id, WHOLE_READ)
        if row is None:
            raise StorageError(f"no message {queue_id}")
        prepend, size, checksum, state, actual, whole, spool_name = row
        if state != STATE_ACTIVE:
            raise MessageCorrupt(f"message {queue_id} is {state}")
        if spool_name:
            if self.shared_spool is None:
                raise StorageError(f"message {queue_id}: its body is in the shared spool "
                                   "and [storage] shared_spool_dir is not set on this node")
            async for chunk in read_spool_file(
                    self.shared_spool / spool_name, bytes(prepend), size, checksum,
                    functools.partial(self._corrupt, queue_id)):
                yield chunk
            return
        if actual != size:
            await self._corrupt(queue_id, f"body size {actual} != {size}")
        if prepend:
            yield bytes(prepend)
        crc = 0
        # Bodies up to WHOLE_READ come in one query, larger ones by parts
        # (memory stays bounded).
        step = size if size <= WHOLE_READ else READ_CHUNK
        for start in range(0, size, max(step, 1)):
            if whole is not None:
                part = whole
            else:
                async with self._acquire() as conn:
                    part = await conn.fetchval(
                        "SELECT substring(body FROM $2 FOR $3) FROM messages "
                        "WHERE queue_id = $1", queue_id, start + 1, step)
            if part is None:
                raise StorageError(f"message {queue_id} was deleted")
            crc = zlib.crc32(part, crc)
            for at in range(0, len(part), READ_CHUNK):
                yield bytes(part[at:at + READ_CHUNK])
        if crc != checksum:
            await self._corrupt(queue_id, "body does not match its checksum")

    async def _corrupt(self, queue_id: str, reason: str) -> NoReturn:
        found = await self._write("UPDATE messages SET state = $2 WHERE queue_id = $1",
                                  queue_id, STATE_CORRUPT,
                                  event=DeliveryEvent(self._clock(), queue_id, "corrupt",
                                                      reply=reason))
        if found.endswith(" 0"):
            raise StorageError(f"message {queue_id} was deleted")
        log.error("corrupt", queue_id=queue_id, reason=reason)
        raise MessageCorrupt(f"message {queue_id}: {reason}")

    async def nodes(self) -> list[dict[str, Any]]:
        """The nodes registered on the database (``postwarden nodes``)."""
        async with self._acquire() as conn:
            rows = await conn.fetch(
                "SELECT node_id, hostname, pid, started, heartbeat, in_flight, takeovers "
                "FROM nodes ORDER BY started, node_id")
        return [dict(r) for r in rows]

    async def forget_nodes(self, node_ids: Sequence[str]) -> None:
        """Remove the rows of nodes that are gone (``postwarden nodes --prune``)."""
        async with self._acquire() as conn:
            await conn.execute("DELETE FROM nodes WHERE node_id = ANY($1::text[])",
                               list(node_ids))

    # Last: a method named ``list`` shadows the builtin in later signatures.
    async def list(self, limit: int = 1000) -> list[QueuedMessage]:
        async with self._acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                             readonly=True):
            ids = [r[0] for r in await conn.fetch(
                "SELECT queue_id FROM messages ORDER BY received_at, queue_id LIMIT $1",
                limit)]
            return await self._load(conn, ids)


def node_gauges(store: PgQueueStore, monitor_state: Callable[[], dict[str, Any]]
                ) -> list[tuple[str, str, dict[tuple[str, ...], float], tuple[str, ...]]]:
    """Scrape-time figures (``/metrics``): the shared queue and bans (as of
    the last heartbeat), this node's leases, and the suspended accounts and
    alerts of the shared monitoring tables (``monitor_state()``, as
    :func:`postwarden.observe.health.protection_state`).  The takeovers are
    also a counter (``_total``)."""
    local = monitor_state()
    node = (store.node_id,)
    stats = store.lease_stats
    q = store.queue_state
    shared: list[tuple[str, str, dict[tuple[str, ...], float], tuple[str, ...]]] = [
        ("postwarden_queue_messages", "Messages in the shared queue by state (active, held, "
         "corrupt)", {(k,): float(v) for k, v in q.get("messages", {}).items()}, ("state",)),
        ("postwarden_queue_recipients", "Recipients waiting for delivery by status "
         "(queued: never tried; deferred: to be retried)",
         {(k,): float(v) for k, v in q.get("recipients", {}).items()}, ("status",)),
        ("postwarden_queue_oldest_message_age_seconds", "Age of the oldest message in the "
         "shared queue", {(): float(q.get("oldest_seconds", 0.0))}, ()),
        ("postwarden_bans_active", "Client networks banned now (on every node)",
         {(): float(q.get("bans_active", 0))}, ()),
        ("postwarden_accounts_suspended", "Accounts suspended from sending",
         {(): float(local["accounts_suspended"])}, ()),
        ("postwarden_alerts_firing", "Alerts firing now by severity",
         {(k,): float(v) for k, v in local["alerts_firing"].items()}, ("severity",)),
    ]
    return [*shared,
        ("postwarden_node_deliveries_in_flight", "Messages this node holds a delivery lease on",
         {node: float(store.in_flight)}, ("node",)),
        ("postwarden_node_claims", "Messages this node claimed since it started",
         {node: float(stats.claimed)}, ("node",)),
        ("postwarden_node_lease_takeovers", "Messages this node claimed after another node's "
         "lease expired (a delivery there may have been under way: possible duplicates)",
         {node: float(stats.takeovers)}, ("node",)),
        ("postwarden_lease_takeovers_total", "Deliveries this node took over after another "
         "node's lease expired since it started; each may be delivered twice (at least once)",
         {node: float(stats.takeovers)}, ("node",)),
    ]


async def _insert_events(conn: asyncpg.Connection, events: Sequence[DeliveryEvent]) -> None:
    if events:
        await conn.executemany(_INSERT_EVENT, [
            (e.ts, e.queue_id, e.event, e.rcpt, e.relay, e.dsn, e.reply, e.sender,
             e.message_id, e.detail) for e in events])


def _unlink_all(root: Path, names: Sequence[str]) -> None:
    for name in names:
        if is_spool_name(name):  # never a path from elsewhere
            with contextlib.suppress(FileNotFoundError):
                os.unlink(root / name)


def _describe(exc: BaseException) -> str:
    """The error without the DSN (it may hold a password)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
