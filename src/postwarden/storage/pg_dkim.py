"""DKIM signing keys shared by the nodes through PostgreSQL.

The rules of the key store (names, algorithms, which selectors sign,
rotation) are :class:`~postwarden.dkim_keys.KeyStore`'s; as for the
directory (:mod:`postwarden.storage.pg_directory`), this module moves the
keys, not the logic:

* the ``dkim_keys`` table holds every key: domain, selector, algorithm,
  the private key (PEM, PKCS#8) and whether it signs; ``dkim_version`` is
  bumped by every change;
* a node signs with the files of a local copy (``data_dir/dkim-cache``,
  the same layout as ``data_dir/dkim``), which :class:`DkimReplica` writes
  at start and rewrites when the version changes (checked every
  :data:`REFRESH_SECONDS`): a key generated or activated through any node
  signs on every node within that time;
* a command (``postwarden dkim ...``, ``dns records``, a quarantine
  release) works on a KeyStore over a private temporary copy
  (:func:`key_copy`); a command that changed keys writes them back in one
  transaction, refused if another change came in between.

Security exposure: the table holds private keys.  Anyone who can read it
can sign mail as the domains: grant the schema to postwarden's database
role only, and protect the database's backups and replicas as the key
files themselves.  The DSN should not be readable by other local users.
On disk, the copies are written as :mod:`postwarden.dkim_keys` writes keys
(0600 files in 0700 directories); temporary copies are removed after the
command.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from postwarden.dkim_keys import DkimKeyError, KeyRow, KeyStore, mirror, snapshot
from postwarden.observe.log import get_logger
from postwarden.storage.pg_replica import VersionedReplica
from postwarden.storage.pg_schema import in_transaction
from postwarden.storage.settings import StorageSettings

log = get_logger("dkim")

REFRESH_SECONDS = 1.0
CACHE_NAME = "dkim-cache"
_COLS = "domain, selector, algorithm, pem, active"


async def pg_read(conn: Any) -> tuple[int, list[KeyRow]]:
    version = await conn.fetchval("SELECT version FROM dkim_version")
    rows = await conn.fetch(f"SELECT {_COLS} FROM dkim_keys ORDER BY domain, selector")
    return int(version), [(r[0], r[1], r[2], bytes(r[3]), bool(r[4])) for r in rows]


async def pg_write(conn: Any, rows: Sequence[KeyRow]) -> None:
    """Replace the keys with ``rows`` and bump the version (inside the
    caller's transaction)."""
    await conn.execute("DELETE FROM dkim_keys")
    if rows:
        await conn.executemany(
            f"INSERT INTO dkim_keys ({_COLS}) VALUES ($1, $2, $3, $4, $5)", list(rows))
    await conn.execute("UPDATE dkim_version SET version = version + 1")


def cache_root(data_dir: Path) -> Path:
    """Where a node keeps its copy of the shared keys."""
    return data_dir / CACHE_NAME


class DkimReplica(VersionedReplica[list[KeyRow]]):
    """Keeps a node's copy of the keys in step with PostgreSQL."""

    version_table = "dkim_version"
    name = "dkim_keys"

    def __init__(self, pool: asyncpg.Pool, store: KeyStore,
                 interval: float = REFRESH_SECONDS) -> None:
        super().__init__(pool, log, interval)
        self.store = store

    async def read(self, conn: Any) -> tuple[int, list[KeyRow]]:
        return await pg_read(conn)

    def apply(self, data: list[KeyRow]) -> dict[str, int]:
        mirror(self.store, data)
        return {"keys": len(data), "active": sum(1 for r in data if r[4])}


def _db_error(detail: str) -> DkimKeyError:
    return DkimKeyError(f"DKIM keys: {detail}")


def read_keys(settings: StorageSettings) -> tuple[int, list[KeyRow]]:
    """The shared keys and their version (synchronous: commands)."""
    return in_transaction(settings, pg_read, _db_error)


def write_keys(settings: StorageSettings, read_version: int, rows: Sequence[KeyRow]) -> None:
    """Store ``rows`` as the shared keys, unless they changed since
    ``read_version`` (then nothing is written)."""
    async def action(conn: Any) -> None:
        version = await conn.fetchval("SELECT version FROM dkim_version FOR UPDATE")
        if version != read_version:
            raise DkimKeyError("the DKIM keys were changed meanwhile (through "
                               "another node?): run the command again")
        await pg_write(conn, rows)
    in_transaction(settings, action, _db_error)


@contextlib.contextmanager
def key_copy(settings: StorageSettings, *, edit: bool = False) -> Iterator[KeyStore]:
    """A KeyStore over a private copy of the shared keys; with ``edit``,
    what the block changed is written back when it ends without an error."""
    root = Path(tempfile.mkdtemp(prefix="postwarden-dkim-"))  # 0700
    try:
        version, rows = read_keys(settings)
        store = KeyStore(root / "dkim")
        mirror(store, rows)
        yield store
        if edit:
            after = snapshot(store)
            if after != sorted(rows):
                write_keys(settings, version, after)
    finally:
        shutil.rmtree(root, ignore_errors=True)
