"""``postwarden storage copy-to-postgres``: move a stopped SQLite node's
state into an empty PostgreSQL schema, so that it can restart as a node
of the shared backend.

What is copied, table for table (the PostgreSQL tables have SQLite's
columns): the directory (domains, accounts with their password hashes,
aliases, application passwords); the queue (messages with their bodies,
whether inline or in the spool directory, each recipient's state, and the
history); bans, account locks and counters; greylisting; the quarantine;
the access-list entries of ``postwarden access``; the DKIM keys of
``data_dir/dkim``.  Everything is written in one
transaction: an error leaves the target as it was.

Checks first: the SQLite file exists and has the current schema
(``postwarden migrate`` upgrades it); no server holds the node's spool
lock (a running node would keep changing what is copied); the target
holds nothing unless ``force`` (then what it holds is replaced).  Bodies
go into the rows (``bytea``), also when the target config names a shared
spool directory.

Security exposure: copies password hashes and DKIM private keys from the
private data directory into the database; the DSN is never printed.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg

from postwarden import config as _config
from postwarden.dkim_keys import DkimKeyError, KeyStore, snapshot
from postwarden.storage import migrate, pg_directory, pg_dkim
from postwarden.storage.pg_schema import PENDING, connect, run_blocking
from postwarden.storage.settings import StorageSettings
from postwarden.storage.sqlite_quarantine import SqliteQuarantine

# Tables copied column for column (SQLite name = PostgreSQL name).
SAME: dict[str, tuple[str, ...]] = {
    "protect_bans": ("network", "reason", "level", "until", "created"),
    "protect_locks": ("account", "ip", "reason", "until", "created"),
    "protect_events": ("kind", "key", "at"),
    "protect_rates": ("key", "window_start", "count"),
    "greylist_triplets": ("network", "sender", "recipient", "first_seen", "attempts"),
    "greylist_clients": ("network", "allowed_until"),
    "quarantine": (*SqliteQuarantine.COLUMNS.split(", "), "message"),
    "access_entries": ("listener", "kind", "value", "created"),
    "events": ("ts", "queue_id", "event", "rcpt", "relay", "dsn", "reply", "sender",
               "message_id", "detail"),
}
MESSAGE_COLS = ("queue_id", "sender", "params", "received_at", "size", "client_ip", "helo",
                "auth_user", "listener", "session_id", "held", "state", "prepend",
                "body_size", "checksum")
RCPT_COLS = ("address", "params", "status", "attempts", "next_attempt", "last_reply",
             "relay", "last_attempt", "final_ts", "warned")
# What makes a target "not empty" (and what --force clears).
TARGET_TABLES = ("messages", "events", "dir_domains", "dir_accounts", "dir_aliases",
                 "dir_app_passwords", "quarantine", "dkim_keys", "protect_bans",
                 "protect_locks", "protect_events", "protect_rates", "greylist_triplets",
                 "greylist_clients", "access_entries")
_SPOOL_LOCK = ".lock"


class CopyError(Exception):
    """The copy cannot be made (one line for the CLI); nothing was written."""


@contextmanager
def _stopped_node(spool_dir: Path) -> Iterator[None]:
    """Hold the node's spool lock (the one a running SQLite server holds)."""
    if not spool_dir.is_dir():
        yield
        return
    fd = os.open(spool_dir / _SPOOL_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CopyError(f"a postwarden server is running on {spool_dir.parent} "
                            "(it holds the spool lock): stop it first") from None
        yield
    finally:
        os.close(fd)


def _rows(db: sqlite3.Connection, table: str, cols: Sequence[str], where: str = ""
          ) -> list[tuple[Any, ...]]:
    exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (table,)).fetchone()
    if exists is None:
        return []
    return db.execute(f"SELECT {', '.join(cols)} FROM {table}{where}").fetchall()


class _Source:
    """Everything read from the SQLite node before the target is touched."""

    def __init__(self, cfg: _config.Config) -> None:
        self.cfg = cfg
        self.directory: pg_directory.Snapshot = {}
        self.same: dict[str, list[tuple[Any, ...]]] = {}
        self.messages: list[tuple[Any, ...]] = []
        self.recipients: dict[str, list[tuple[Any, ...]]] = {}
        self.keys = snapshot(KeyStore.for_data_dir(cfg.data_dir))
        self.missing_bodies: list[str] = []

    def read(self) -> None:
        db = sqlite3.connect(f"file:{self.cfg.db_path}?mode=ro", uri=True, timeout=30)
        try:
            self.directory = {t: _rows(db, t, cols) for t, cols in pg_directory.TABLES.items()}
            self.same = {t: _rows(db, t, cols) for t, cols in SAME.items()}
            for row in _rows(db, "messages", (*MESSAGE_COLS, "body", "spool_name"),
                             " ORDER BY received_at, queue_id"):
                *fields, body, spool_name = row
                if body is None:
                    body = self._spooled(fields[0], spool_name)
                self.messages.append((*fields, bytes(body)))
            for row in _rows(db, "recipients", ("queue_id", *RCPT_COLS), " ORDER BY id"):
                self.recipients.setdefault(row[0], []).append(row[1:])
        finally:
            db.close()

    def _spooled(self, queue_id: str, name: str) -> bytes:
        try:
            return (self.cfg.spool_dir / name).read_bytes()
        except FileNotFoundError:
            # Copied without its body: the first read marks it corrupt, as
            # on SQLite.
            self.missing_bodies.append(queue_id)
            return b""


def _counts(src: _Source) -> dict[str, int]:
    return {
        "domains": len(src.directory.get("domains", [])),
        "accounts": len(src.directory.get("accounts", [])),
        "aliases": len(src.directory.get("aliases", [])),
        "app passwords": len(src.directory.get("app_passwords", [])),
        "queued messages": len(src.messages),
        "recipients": sum(len(r) for r in src.recipients.values()),
        "history events": len(src.same["events"]),
        "bans": len(src.same["protect_bans"]),
        "account locks": len(src.same["protect_locks"]),
        "greylist entries": len(src.same["greylist_triplets"]) + len(
            src.same["greylist_clients"]),
        "quarantined messages": len(src.same["quarantine"]),
        "access entries": len(src.same["access_entries"]),
        "DKIM keys": len(src.keys),
    }


async def _write(conn: Any, src: _Source, force: bool) -> None:
    async with conn.transaction():
        held = {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}"))
                for t in TARGET_TABLES}
        if any(held.values()) and not force:
            what = ", ".join(f"{t} {n}" for t, n in held.items() if n)
            raise CopyError(f"the target schema is not empty ({what}): copy into an empty "
                            "schema, or use --force to replace what it holds")
        for t in TARGET_TABLES:
            await conn.execute(f"DELETE FROM {t}")  # messages: recipients by cascade
        await pg_directory.pg_write(conn, src.directory)
        await pg_dkim.pg_write(conn, src.keys)
        for table, cols in SAME.items():
            rows = src.same[table]
            if rows:
                marks = ", ".join(f"${i + 1}" for i in range(len(cols)))
                await conn.executemany(
                    f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})", rows)
        await conn.executemany(
            f"INSERT INTO messages ({', '.join(MESSAGE_COLS)}, body) VALUES "
            f"({', '.join(f'${i + 1}' for i in range(len(MESSAGE_COLS) + 1))})",
            [(*m[:10], bool(m[10]), *m[11:]) for m in src.messages])
        await conn.executemany(
            f"INSERT INTO recipients (queue_id, {', '.join(RCPT_COLS)}) VALUES "
            f"({', '.join(f'${i + 1}' for i in range(len(RCPT_COLS) + 1))})",
            [(queue_id, *r[:9], bool(r[9])) for queue_id, rcpts in src.recipients.items()
             for r in rcpts])
        # Running nodes re-read the access entries on a new version.
        await conn.execute("UPDATE access_version SET version = version + 1")
        # Each message is due at its earliest pending recipient's attempt.
        await conn.execute(
            "UPDATE messages m SET due_at = coalesce((SELECT min(next_attempt) FROM "
            f"recipients r WHERE r.queue_id = m.queue_id AND r.status IN {PENDING}), 0)")


def copy_to_postgres(cfg: _config.Config, target: StorageSettings, *, force: bool = False
                     ) -> tuple[dict[str, int], list[str]]:
    """Copy the SQLite node of ``cfg`` into ``target``; the counts copied and
    the queue ids whose spool file was missing."""
    if not cfg.db_path.exists():
        raise CopyError(f"no database at {cfg.db_path}: nothing to copy")
    try:
        versions = migrate.inspect(cfg.db_path)
    except migrate.SchemaError as exc:
        raise CopyError(str(exc)) from None
    older = [v.store for v in versions if v.older]
    newer = [v.store for v in versions if v.newer]
    if newer:
        raise CopyError(f"{cfg.db_path} was written by a newer postwarden ({', '.join(newer)})")
    if older:
        raise CopyError(f"{cfg.db_path} has an older schema ({', '.join(older)}): run "
                        "'postwarden migrate' first")
    with _stopped_node(cfg.spool_dir):
        try:
            src = _Source(cfg)
            src.read()
        except sqlite3.Error as exc:
            raise CopyError(f"{cfg.db_path}: {exc}") from None
        except (DkimKeyError, OSError) as exc:
            raise CopyError(str(exc)) from None

        async def main() -> None:
            conn = await connect(target)
            try:
                await _write(conn, src, force)
            finally:
                await conn.close()
        try:
            run_blocking(main)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise CopyError(f"PostgreSQL: {type(exc).__name__}: {exc}") from None
    return _counts(src), src.missing_bodies
