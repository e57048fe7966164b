"""Which queue store a process opens: the ``[storage] backend`` of the config.

The composition root (:mod:`postwarden.app`) and the CLI commands ask here,
so the choice is made in one place.  SQLite, the default, is opened exactly
as before; PostgreSQL is imported only when configured.

Security exposure: none of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from postwarden.storage.sqlite_directory import SqliteDirectory
from postwarden.storage.sqlite_quarantine import QuarantineStore, SqliteQuarantine
from postwarden.storage.sqlite_queue import SqliteQueueStore

if TYPE_CHECKING:
    from postwarden.config import Config
    from postwarden.dkim_keys import KeyStore
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


def open_quarantine(cfg: Config) -> QuarantineStore:
    """The quarantine: the table in the SQLite file, or, on PostgreSQL, the
    shared one (a message held by any node, reviewed from any node)."""
    if cfg.storage.postgres:
        from postwarden.storage.pg_quarantine import PgQuarantine

        return PgQuarantine(cfg.storage)
    return SqliteQuarantine(cfg.db_path)


@contextlib.contextmanager
def dkim_keys(cfg: Config, *, edit: bool = False) -> Iterator[KeyStore]:
    """The DKIM keys for a command: ``data_dir/dkim``, or, on PostgreSQL, a
    copy of the shared keys (written back at the end with ``edit``; see
    :mod:`postwarden.storage.pg_dkim`)."""
    from postwarden.dkim_keys import KeyStore  # cryptography: imported when needed

    if cfg.storage.postgres:
        from postwarden.storage.pg_dkim import key_copy

        with key_copy(cfg.storage, edit=edit) as store:
            yield store
    else:
        yield KeyStore.for_data_dir(cfg.data_dir)


def signing_keys(cfg: Config) -> KeyStore:
    """The keys a server signs with: ``data_dir/dkim``, or on PostgreSQL
    the node's copy of the shared keys (kept current by
    :class:`~postwarden.storage.pg_dkim.DkimReplica`)."""
    from postwarden.dkim_keys import KeyStore

    if cfg.storage.postgres:
        from postwarden.storage.pg_dkim import cache_root

        return KeyStore(cache_root(cfg.data_dir))
    return KeyStore.for_data_dir(cfg.data_dir)
