"""Connections to the shared database file ``postwarden.db``.

Several modules keep their own tables in the one file (directory,
protection state, greylisting, access entries, the queue).  They all open
it the same way: created private (0600) before SQLite would create it with
the umask, WAL so that the server and the CLI work on it at once, and a
busy timeout so that concurrent writers wait instead of failing.

Security exposure: the file holds password hashes; its mode matters.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from postwarden.storage.base import StorageError

BUSY_TIMEOUT_MS = 5000


def connect(db_path: Path, *, synchronous: str = "FULL") -> sqlite3.Connection:
    """An autocommit connection (writers use explicit ``BEGIN IMMEDIATE``)."""
    if not db_path.exists():
        os.close(os.open(db_path, os.O_CREAT | os.O_WRONLY, 0o600))
    db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False,
                         timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {synchronous}")
    except BaseException:
        db.close()
        raise
    return db


class SharedTables:
    """A module's own tables in the shared file: one connection behind a
    lock, created and migrated at open, refused when a newer postwarden
    wrote them.

    Subclasses set ``schema`` (the CREATE statements, ``IF NOT EXISTS``),
    ``schema_table`` (a table holding one ``version`` row), ``schema_version``
    and ``schema_error`` (the exception naming the problem), and may extend
    ``_upgrade`` for migrations between versions.
    """

    schema = ""
    schema_table = ""
    schema_version = 1
    schema_error: type[Exception] = Exception
    # Set to report SQLite failures of the server's own queries as
    # StorageError("<label>: ...") (temporary for the client).
    storage_error_label = ""

    def __init__(self, db_path: Path, *, synchronous: str = "FULL") -> None:
        self.db_path = db_path
        self._lock = threading.Lock()
        self._db = connect(db_path, synchronous=synchronous)
        try:
            with self._write() as db:
                self._migrate(db)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self, db: sqlite3.Connection) -> None:
        for statement in self.schema.split(";"):
            if statement.strip():
                db.execute(statement)
        self._upgrade(db)
        row = db.execute(f"SELECT version FROM {self.schema_table}").fetchone()
        if row is None:
            db.execute(f"INSERT INTO {self.schema_table} (version) VALUES (?)",
                       (self.schema_version,))
        elif row[0] > self.schema_version:
            raise self.schema_error(
                f"{self.db_path}: {self.schema_table} version {row[0]} is newer than "
                f"this postwarden supports ({self.schema_version})")
        elif row[0] < self.schema_version:
            db.execute(f"UPDATE {self.schema_table} SET version = ?", (self.schema_version,))

    def _upgrade(self, db: sqlite3.Connection) -> None:
        """Bring older tables up to ``schema_version`` (in the migration's
        transaction)."""

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: take the write lock up front,
        so concurrent writers wait for busy_timeout instead of failing)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                if self.storage_error_label:
                    raise StorageError(f"{self.storage_error_label}: {exc}") from exc
                raise
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                if self.storage_error_label:
                    raise StorageError(f"{self.storage_error_label}: {exc}") from exc
                raise
