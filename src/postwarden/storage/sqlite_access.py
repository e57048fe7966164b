"""Access-list entries kept in the database (``postwarden access add``).

Two tables: ``access_entries`` (listener, kind, value; listener '' is
global) and ``access_version``, a single counter that every change
increments, so a running server can notice a change with one cheap query
(:meth:`AccessTables.version`) and re-read the entries only then.

:class:`AccessTables` holds the operations, in the SQL both backends
accept; :class:`AccessStore` runs them on the main database file, and
:class:`~postwarden.storage.pg_access.PgAccessStore` on the shared
PostgreSQL schema (an entry added through any node applies on every node).

Security exposure: none of its own; all values are SQL parameters, and the
values were validated (CIDR, pattern) by the caller.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from postwarden.storage.sqlite_shared import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS access_entries (
    listener TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (listener, kind, value)
);
CREATE TABLE IF NOT EXISTS access_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT OR IGNORE INTO access_version (id, version) VALUES (1, 0);
"""


@dataclass(frozen=True, slots=True)
class AccessEntry:
    listener: str  # '' for every listener
    kind: str  # one of config.ACCESS_KINDS
    value: str
    created: float


class AccessTables:
    """The access-list operations, on the connection of the store that
    inherits them (``_write``: a transaction; ``_query``: one read)."""

    def _write(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> Sequence[Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def version(self) -> int:
        rows = self._query("SELECT version FROM access_version")
        return int(rows[0][0]) if rows else 0

    def _change(self, sql: str, params: tuple[object, ...]) -> bool:
        with self._write() as db:  # one transaction: the change and the counter
            changed = int(db.execute(sql, params).rowcount) > 0
            if changed:
                db.execute("UPDATE access_version SET version = version + 1")
        return changed

    def add(self, kind: str, value: str, listener: str = "") -> bool:
        """False when the entry was already there."""
        return self._change("INSERT INTO access_entries (listener, kind, value, created)"
                            " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                            (listener, kind, value, time.time()))

    def delete(self, kind: str, value: str, listener: str = "") -> bool:
        """False when there was no such entry."""
        return self._change("DELETE FROM access_entries WHERE listener = ? AND kind = ? "
                            "AND value = ?", (listener, kind, value))

    def entries(self, listener: str | None = None) -> list[AccessEntry]:
        """All entries, or those of one listener ('' for the global ones)."""
        sql = "SELECT listener, kind, value, created FROM access_entries"
        params: tuple[object, ...] = ()
        if listener is not None:
            sql += " WHERE listener = ?"
            params = (listener,)
        rows = self._query(sql + " ORDER BY listener, kind, value", params)
        return [AccessEntry(str(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows]


class AccessStore(AccessTables):
    """The access tables in the main database file (short queries only)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The same file as the password hashes: created 0600, WAL.
        self.conn = connect(path)
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _write(self) -> Iterator[Any]:
        with self.conn:  # commits, or rolls back on an exception
            self.conn.execute("BEGIN IMMEDIATE")
            yield self.conn

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> Sequence[Any]:
        return self.conn.execute(sql, args).fetchall()
