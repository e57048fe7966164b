"""The greylisting state in SQLite: pending triplets and allow-listed networks.

:class:`SqliteGreylist` shares ``postwarden.db`` with the queue store and the
directory but owns only the tables ``greylist_triplets``,
``greylist_clients`` and its version table ``greylist_schema``.

A triplet (client network, sender, recipient) is *pending* from its first
attempt until a retry at least ``delay`` seconds later passes it; a pending
triplet not retried within ``expiry`` seconds of its first attempt is
forgotten (the next attempt starts over).  A pass deletes the triplet and
allow-lists the client network for ``allow`` seconds.

Times are wall-clock seconds passed in by the caller (``now``), so tests
inject a clock.  The connection uses ``synchronous = NORMAL``: a power cut
may lose the latest greylisting state, which only costs one more delay.

Security exposure: the sender and recipient come from untrusted clients;
they are only ever bound as query parameters.  The tables grow with
attempts from the whole Internet, so expired rows are pruned (at most every
:data:`PRUNE_INTERVAL` seconds).
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from postwarden.storage.sqlite_shared import SharedTables

SCHEMA_VERSION = 1
# Expired triplets and allow-list entries are deleted at most this often.
PRUNE_INTERVAL = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS greylist_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS greylist_triplets (
    network TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    first_seen REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (network, sender, recipient)
);
CREATE INDEX IF NOT EXISTS greylist_triplets_first ON greylist_triplets (first_seen);
CREATE TABLE IF NOT EXISTS greylist_clients (
    network TEXT PRIMARY KEY,
    allowed_until REAL NOT NULL
);
"""


class GreylistStoreError(Exception):
    """The greylist tables cannot be used (e.g. a newer schema)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """``wait`` seconds left before a retry is accepted (0: pass);
    ``reason`` for the log: allow-listed, new, early, passed, expired."""

    wait: int
    reason: str


class SqliteGreylist(SharedTables):
    """Greylisting decisions over ``db_path``; thread-safe (one connection
    behind a lock), meant to be called from a worker thread."""

    schema = _SCHEMA
    schema_table = "greylist_schema"
    schema_version = SCHEMA_VERSION
    schema_error = GreylistStoreError

    def __init__(self, db_path: Path, *, delay: float, expiry: float, allow: float) -> None:
        self.delay = delay
        self.expiry = expiry
        self.allow = allow
        self._last_prune = 0.0
        # NORMAL: losing the last greylist update in a power cut only makes a
        # sender retry once more.
        super().__init__(db_path, synchronous="NORMAL")

    def decide(self, network: str, sender: str, recipient: str, now: float) -> Decision:
        """Record an attempt of the triplet at ``now`` and say whether it passes."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                decision = self._decide(db, network, sender, recipient, now)
                if now - self._last_prune >= PRUNE_INTERVAL:
                    self._last_prune = now
                    db.execute("DELETE FROM greylist_triplets WHERE first_seen < ?",
                               (now - self.expiry,))
                    db.execute("DELETE FROM greylist_clients WHERE allowed_until < ?", (now,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return decision

    def _decide(self, db: sqlite3.Connection, network: str, sender: str, recipient: str,
                now: float) -> Decision:
        row = db.execute("SELECT allowed_until FROM greylist_clients WHERE network = ?",
                         (network,)).fetchone()
        if row is not None and row[0] > now:
            if row[0] - now < self.allow / 2:  # keep active senders allow-listed
                self._allow(db, network, now)
            return Decision(0, "allow-listed")
        key = (network, sender, recipient)
        row = db.execute("SELECT first_seen FROM greylist_triplets WHERE network = ? AND "
                         "sender = ? AND recipient = ?", key).fetchone()
        if row is None or now - row[0] > self.expiry or now < row[0]:
            db.execute("INSERT OR REPLACE INTO greylist_triplets "
                       "(network, sender, recipient, first_seen, attempts) "
                       "VALUES (?, ?, ?, ?, 1)", (*key, now))
            return Decision(max(1, math.ceil(self.delay)), "new" if row is None else "expired")
        elapsed = now - row[0]
        if elapsed < self.delay:
            db.execute("UPDATE greylist_triplets SET attempts = attempts + 1 WHERE "
                       "network = ? AND sender = ? AND recipient = ?", key)
            return Decision(max(1, math.ceil(self.delay - elapsed)), "early")
        db.execute("DELETE FROM greylist_triplets WHERE network = ? AND sender = ? AND "
                   "recipient = ?", key)
        self._allow(db, network, now)
        return Decision(0, "passed")

    def _allow(self, db: sqlite3.Connection, network: str, now: float) -> None:
        if self.allow > 0:
            db.execute("INSERT OR REPLACE INTO greylist_clients (network, allowed_until) "
                       "VALUES (?, ?)", (network, now + self.allow))

    def counts(self) -> tuple[int, int]:
        """(pending triplets, allow-listed networks), for tests and stats."""
        with self._lock:
            t = self._db.execute("SELECT COUNT(*) FROM greylist_triplets").fetchone()[0]
            c = self._db.execute("SELECT COUNT(*) FROM greylist_clients").fetchone()[0]
        return int(t), int(c)
