"""Access-list entries kept in the database (``postwarden access add``).

Two tables in the main database file: ``access_entries`` (listener, kind,
value; listener '' is global) and ``access_version``, a single counter that
every change increments, so a running server can notice a change with one
cheap query (:meth:`AccessStore.version`) and re-read the entries only then.

Security exposure: none of its own; all values are SQL parameters, and the
values were validated (CIDR, pattern) by the caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

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


class AccessStore:
    """A synchronous handle on the access tables (short queries only)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The same file as the password hashes: created 0600, WAL.
        self.conn = connect(path)
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def version(self) -> int:
        row = self.conn.execute("SELECT version FROM access_version WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    def _change(self, sql: str, params: tuple[object, ...]) -> bool:
        with self.conn:  # one transaction: the change and the counter
            self.conn.execute("BEGIN IMMEDIATE")
            changed = self.conn.execute(sql, params).rowcount > 0
            if changed:
                self.conn.execute("UPDATE access_version SET version = version + 1 WHERE id = 1")
        return changed

    def add(self, kind: str, value: str, listener: str = "") -> bool:
        """False when the entry was already there."""
        return self._change("INSERT OR IGNORE INTO access_entries (listener, kind, value, "
                            "created) VALUES (?, ?, ?, ?)", (listener, kind, value, time.time()))

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
        rows = self.conn.execute(sql + " ORDER BY listener, kind, value", params).fetchall()
        return [AccessEntry(str(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows]
