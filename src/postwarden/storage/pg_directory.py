"""The directory (domains, accounts, aliases, application passwords) shared
by the nodes through PostgreSQL.

The rules of the directory (address syntax, alias expansion, which domain
an alias may point into, password hashes) are
:class:`~postwarden.storage.sqlite_directory.SqliteDirectory`'s; this module
keeps them in one place by moving the tables, not the logic:

* the ``dir_*`` tables in PostgreSQL hold the directory; ``dir_version``
  is bumped by every change;
* a node serves lookups from a SqliteDirectory in a local cache file
  (``data_dir/directory-cache.db``): lookups stay microsecond index reads,
  synchronous where the server needs them (authentication), and work while
  the database is briefly away.  :class:`DirectoryReplica` loads it at start
  and reloads it when the version changes (checked every
  :data:`REFRESH_SECONDS`), so a change made through any node or the CLI
  applies everywhere within that time;
* an administration command (``postwarden user|domain|alias ...``) runs on
  a :class:`DirectoryEdit`: a private SqliteDirectory loaded from
  PostgreSQL inside a transaction that locks ``dir_version``; the command
  runs as it does on SQLite (same checks, same errors) and, if it changed
  something, the tables are written back and the version bumped in that
  same transaction.  Two administrators' commands are serialised.

Security exposure: holds password hashes, like the SQLite directory: the
cache file is created 0600 in the 0700 data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import asyncpg

from postwarden.observe.log import get_logger
from postwarden.storage import change_stamp
from postwarden.storage.pg_replica import VersionedReplica
from postwarden.storage.pg_schema import prepare, quote_ident
from postwarden.storage.settings import StorageSettings
from postwarden.storage.sqlite_directory import SqliteDirectory

log = get_logger("directory")

REFRESH_SECONDS = 1.0
CACHE_NAME = "directory-cache.db"
# SQLite table -> its columns (the PostgreSQL table is "dir_" + name).
TABLES: dict[str, tuple[str, ...]] = {
    "domains": ("name", "created_at"),
    "accounts": ("address", "domain", "password_hash", "enabled", "created_at",
                 "updated_at", "password_changed"),
    "aliases": ("source", "target", "domain", "position"),
    "app_passwords": ("id", "address", "label", "password_hash", "created_at"),
}

Snapshot = dict[str, list[tuple[Any, ...]]]


def dump(directory: SqliteDirectory) -> Snapshot:
    """Every row of the directory tables, in a stable order."""
    return {table: [tuple(r) for r in directory._query(
                f"SELECT {', '.join(cols)} FROM {table} ORDER BY {', '.join(cols)}")]
            for table, cols in TABLES.items()}


def load(directory: SqliteDirectory, data: Snapshot) -> None:
    """Replace the directory's rows with ``data`` (one transaction)."""
    with directory._write() as db:
        for table, cols in TABLES.items():
            db.execute(f"DELETE FROM {table}")
            marks = ", ".join("?" * len(cols))
            db.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})",
                           data.get(table, []))


async def pg_read(conn: Any) -> tuple[int, Snapshot]:
    version = await conn.fetchval("SELECT version FROM dir_version")
    data = {table: [tuple(r) for r in await conn.fetch(
                f"SELECT {', '.join(cols)} FROM dir_{table}")]
            for table, cols in TABLES.items()}
    return int(version), data


async def pg_write(conn: Any, data: Snapshot) -> None:
    """Replace the tables with ``data`` and bump the version (inside the
    caller's transaction)."""
    for table, cols in TABLES.items():
        await conn.execute(f"DELETE FROM dir_{table}")
        rows = data.get(table, [])
        if rows:
            marks = ", ".join(f"${i + 1}" for i in range(len(cols)))
            await conn.executemany(
                f"INSERT INTO dir_{table} ({', '.join(cols)}) VALUES ({marks})", rows)
    await conn.execute("UPDATE dir_version SET version = version + 1")


class DirectoryReplica(VersionedReplica[Snapshot]):
    """Keeps a node's cache (a SqliteDirectory) in step with PostgreSQL."""

    version_table = "dir_version"
    name = "directory"

    def __init__(self, pool: asyncpg.Pool, directory: SqliteDirectory,
                 interval: float = REFRESH_SECONDS) -> None:
        super().__init__(pool, log, interval)
        self.directory = directory

    async def read(self, conn: Any) -> tuple[int, Snapshot]:
        return await pg_read(conn)

    def apply(self, data: Snapshot) -> dict[str, int]:
        load(self.directory, data)
        return {"accounts": len(data["accounts"]), "domains": len(data["domains"])}


def cache_directory(data_dir: Path, config_domains: Iterable[str]) -> SqliteDirectory:
    """The node's cache of the shared directory (see the module docstring)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return SqliteDirectory(data_dir / CACHE_NAME, config_domains)


class DirectoryEdit(SqliteDirectory):
    """A SqliteDirectory for one administration command on the shared
    directory: ``with DirectoryEdit(settings, domains) as d: d.add_user(...)``."""

    def __init__(self, settings: StorageSettings, config_domains: Iterable[str] = ()) -> None:
        fd, name = tempfile.mkstemp(prefix="postwarden-directory-", suffix=".db")
        os.close(fd)
        self._path = Path(name)
        self._settings = settings
        self._loop = asyncio.new_event_loop()
        self._conn: Any = None
        self._tx: Any = None
        self._before: Snapshot = {}
        try:
            super().__init__(self._path, config_domains)
            self._loop.run_until_complete(self._begin())
        except BaseException:
            self._finish(commit=False)
            raise

    async def _begin(self) -> None:
        s = self._settings
        self._conn = await asyncpg.connect(s.dsn)
        await prepare(self._conn, s.schema)
        await self._conn.execute(f"SET search_path TO {quote_ident(s.schema)}")
        self._tx = self._conn.transaction()
        await self._tx.start()
        await self._conn.execute("SELECT version FROM dir_version FOR UPDATE")
        _, data = await pg_read(self._conn)
        load(self, data)
        self._before = dump(self)

    async def _end(self, commit: bool) -> None:
        if self._tx is not None:
            if commit:
                after = dump(self)
                if after != self._before:
                    await pg_write(self._conn, after)
                await self._tx.commit()
            else:
                await self._tx.rollback()
        if self._conn is not None:
            await self._conn.close()

    def _finish(self, *, commit: bool) -> None:
        try:
            if self._conn is not None and not self._conn.is_closed():
                self._loop.run_until_complete(self._end(commit))
        finally:
            self._conn = self._tx = None
            self._loop.close()
            with contextlib.suppress(Exception):
                super().close()
            for suffix in ("", "-wal", "-shm", change_stamp.SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self._path}{suffix}")

    def __exit__(self, *exc: object) -> None:
        self._finish(commit=exc[0] is None)

    def close(self) -> None:
        """Commit what the command changed (as closing a SQLite directory)."""
        if self._conn is not None:
            self._finish(commit=True)
