"""The tables of the SQLite queue, their migrations, and row conversions.

The schema version is ``PRAGMA user_version``.  :func:`init_schema` runs in
the writer thread of every :class:`~postwarden.storage.sqlite_queue.SqliteQueueStore`
(the server's and the CLI's): it creates a new database at the current
version, or migrates an older one step by step, inside one ``BEGIN
IMMEDIATE`` transaction that re-reads the version, so two processes opening
the same database at once migrate it exactly once.

Version history:

1. ``messages`` and ``recipients``.
2. ``recipients`` gains ``relay``, ``last_attempt``, ``final_ts`` and
   ``warned`` (for DSNs); the ``events`` table holds each message's history
   and, having no foreign key, outlives the message (pruned by age).
3. ``events`` gains ``sender``, ``message_id`` and ``detail`` (the message
   trace: where it came from, TLS, authentication, checks); the ``queued``
   event is written once per recipient; indexes for ``postwarden trace``
   by sender, recipient and Message-ID.

Security exposure: none of its own (fixed DDL; values are parameters).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from typing import Any

from postwarden import compactjson
from postwarden.envelope import MailParams, RcptParams
from postwarden.storage.base import (
    DeliveryEvent,
    QueuedMessage,
    QueuedRecipient,
    RcptStatus,
    StorageError,
)

SCHEMA_VERSION = 3
PENDING = "('queued', 'deferred')"

_V1 = f"""
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
CREATE INDEX IF NOT EXISTS recipients_due ON recipients(next_attempt) WHERE status IN {PENDING};
CREATE INDEX IF NOT EXISTS recipients_queue ON recipients(queue_id);
"""

_V2 = """
ALTER TABLE recipients ADD COLUMN relay TEXT NOT NULL DEFAULT '';
ALTER TABLE recipients ADD COLUMN last_attempt REAL NOT NULL DEFAULT 0;
ALTER TABLE recipients ADD COLUMN final_ts REAL NOT NULL DEFAULT 0;
ALTER TABLE recipients ADD COLUMN warned INTEGER NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS events (
    id           INTEGER PRIMARY KEY,
    ts           REAL NOT NULL,
    queue_id     TEXT NOT NULL,
    event        TEXT NOT NULL,
    rcpt         TEXT NOT NULL DEFAULT '',
    relay        TEXT NOT NULL DEFAULT '',
    dsn          TEXT NOT NULL DEFAULT '',
    reply        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_queue ON events(queue_id, id);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
"""

# Partial indexes: only the rows that carry the value (the queued events
# carry sender and Message-ID; recipient results carry rcpt).
_V3 = """
ALTER TABLE events ADD COLUMN sender TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN message_id TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN detail TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS events_sender ON events(sender COLLATE NOCASE, ts)
    WHERE sender <> '';
CREATE INDEX IF NOT EXISTS events_rcpt ON events(rcpt COLLATE NOCASE, ts) WHERE rcpt <> '';
CREATE INDEX IF NOT EXISTS events_message_id ON events(message_id) WHERE message_id <> ''
"""

# MIGRATIONS[n] takes a database from version n to n + 1.
MIGRATIONS: dict[int, str] = {0: _V1, 1: _V2, 2: _V3}

MSG_COLS = ("queue_id, sender, params, received_at, size, client_ip, helo, auth_user, "
            "listener, held")
RCPT_COLS = ("id, queue_id, address, params, status, attempts, next_attempt, last_reply, "
             "relay, last_attempt, final_ts, warned")
EVENT_COLS = "ts, queue_id, event, rcpt, relay, dsn, reply, sender, message_id, detail"

_DSN = re.compile(r"\A[245]\.\d{1,3}\.\d{1,3}\Z")


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def init_schema(conn: sqlite3.Connection) -> None:
    """Create or migrate to :data:`SCHEMA_VERSION` (writer thread, autocommit
    connection).  A database newer than this code is refused."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(f"queue database schema {version} is newer than "
                               f"{SCHEMA_VERSION}: upgrade postwarden")
        while version < SCHEMA_VERSION:
            for stmt in _statements(MIGRATIONS[version]):
                conn.execute(stmt)
            version += 1
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def split_reply(reply: str) -> tuple[str, str]:
    """``"5.1.1 mailbox unavailable"`` -> ``("5.1.1", "mailbox unavailable")``."""
    head, _, rest = reply.partition(" ")
    return (head, rest) if _DSN.match(head) else ("", reply)


def insert_events(conn: sqlite3.Connection, events: Sequence[DeliveryEvent]) -> None:
    conn.executemany(
        f"INSERT INTO events ({EVENT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(e.ts, e.queue_id, e.event, e.rcpt, e.relay, e.dsn, e.reply, e.sender, e.message_id,
          e.detail) for e in events])


def event_from_row(row: Sequence[Any]) -> DeliveryEvent:
    return DeliveryEvent(ts=row[0], queue_id=row[1], event=row[2], rcpt=row[3], relay=row[4],
                         dsn=row[5], reply=row[6], sender=row[7], message_id=row[8],
                         detail=row[9])


def message_from_row(row: Sequence[Any], rcpts: list[QueuedRecipient]) -> QueuedMessage:
    p = compactjson.loads(row[2])
    return QueuedMessage(
        queue_id=row[0], sender=row[1], params=MailParams(**p), recipients=rcpts,
        received_at=row[3], size=row[4], client_ip=row[5], helo=row[6], auth_user=row[7],
        listener=row[8], held=bool(row[9]))


def recipient_from_row(row: Sequence[Any]) -> QueuedRecipient:
    p = compactjson.loads(row[3])
    notify = tuple(p["notify"]) if p.get("notify") is not None else None
    return QueuedRecipient(
        id=row[0], address=row[2], params=RcptParams(notify=notify, orcpt=p.get("orcpt")),
        status=RcptStatus(row[4]), attempts=row[5], next_attempt=row[6], last_reply=row[7],
        relay=row[8], last_attempt=row[9], final_ts=row[10], warned=bool(row[11]))


def rcpt_params_json(params: RcptParams) -> str:
    notify = list(params.notify) if params.notify is not None else None
    return compactjson.dumps({"notify": notify, "orcpt": params.orcpt})
