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
from pathlib import Path

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
