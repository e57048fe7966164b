"""Which queue store a process opens: the ``[storage] backend`` of the config.

The composition root (:mod:`postwarden.app`) and the CLI commands ask here,
so the choice is made in one place.  SQLite, the default, is opened exactly
as before; PostgreSQL is imported only when configured.

Security exposure: none of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from postwarden.storage.sqlite_directory import SqliteDirectory
from postwarden.storage.sqlite_queue import SqliteQueueStore

if TYPE_CHECKING:
    from postwarden.config import Config
    from postwarden.storage.pg_queue import PgQueueStore

    AnyQueueStore = SqliteQueueStore | PgQueueStore


def queue_store(cfg: Config, *, node: bool = True) -> AnyQueueStore:
    """The queue store of ``cfg`` (not started).  ``node``: the store of a
    delivering process (``serve``'s main process), which registers in the
    node table, LISTENs for commits and renews its leases; workers and CLI
    commands only read and write rows."""
    if cfg.storage.postgres:
        from postwarden.storage.pg_queue import PgQueueStore

        return PgQueueStore(cfg.storage, cfg.spool_dir, register=node)
    return SqliteQueueStore(cfg.db_path, cfg.spool_dir)


def open_directory(cfg: Config) -> SqliteDirectory:
    """The directory for an administration command: the SQLite file, or, on
    PostgreSQL, a :class:`~postwarden.storage.pg_directory.DirectoryEdit`
    (the shared tables, written back when the command changed them)."""
    if cfg.storage.postgres:
        from postwarden.storage.pg_directory import DirectoryEdit

        return DirectoryEdit(cfg.storage, cfg.domains)
    return SqliteDirectory(cfg.db_path, cfg.domains)
