"""Which stores a process opens: the ``[storage] backend`` of the config.

The composition root (:mod:`postwarden.app`), the CLI commands and the web
admin ask here for the queue store, the directory, the quarantine, the
access lists, the DKIM keys, the monitoring store (alerts, suspensions, audit log), the web
admin's store and a read connection for the figures (trace, status, alert
rules), so the choice is made in one place.  SQLite,
the default, is opened exactly as before; PostgreSQL is imported only when
configured.

Security exposure: none of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from postwarden.storage.sqlite_access import AccessStore, AccessTables
from postwarden.storage.sqlite_directory import SqliteDirectory
from postwarden.storage.sqlite_monitor import SqliteMonitorStore
from postwarden.storage.sqlite_protect import SqliteProtectStore
from postwarden.storage.sqlite_quarantine import QuarantineStore, SqliteQuarantine
from postwarden.storage.sqlite_queue import SqliteQueueStore

if TYPE_CHECKING:
    import sqlite3

    from postwarden.config import Config
    from postwarden.dkim_keys import KeyStore
    from postwarden.storage.base import Reader
    from postwarden.storage.pg_monitor import PgMonitorStore
    from postwarden.storage.pg_protect import PgBanAdmin
    from postwarden.storage.pg_queue import PgQueueStore
    from postwarden.storage.pg_sync import PgSession
    from postwarden.web.store import SqliteAdminStore

    AnyQueueStore = SqliteQueueStore | PgQueueStore
    AnyMonitorStore = SqliteMonitorStore | PgMonitorStore


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


def open_access(cfg: Config) -> AccessTables:
    """The access-list entries (``postwarden access``): the tables of
    ``postwarden.db``, or, on PostgreSQL, the shared ones (an entry added
    through any node applies on every node)."""
    if cfg.storage.postgres:
        from postwarden.storage.pg_access import PgAccessStore

        return PgAccessStore(cfg.storage)
    return AccessStore(cfg.db_path)


def ban_admin(cfg: Config, server: object = None) -> SqliteProtectStore | PgBanAdmin:
    """The bans, for an administrator's list or change (``postwarden ban``,
    the web admin, the API): on PostgreSQL the shared table (every node
    reloads it within a second); on SQLite ``server`` (a running server's
    store: its cache takes the change at once; not to be closed) or the
    file's."""
    if cfg.storage.postgres:
        from postwarden.storage.pg_protect import PgBanAdmin

        return PgBanAdmin(cfg.storage)
    if isinstance(server, SqliteProtectStore):
        return server
    cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return SqliteProtectStore(cfg.db_path)


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


def monitor_store(cfg: Config, *, server: bool = False) -> AnyMonitorStore:
    """The alerts, suspensions, baselines and audit log: the tables of
    ``postwarden.db``, or the shared ones on PostgreSQL (every node sees
    the same).  ``server``: a serving process's, which keeps its cache of
    suspended accounts fresh in the background."""
    if cfg.storage.postgres:
        from postwarden.storage.pg_monitor import PgMonitorStore

        return PgMonitorStore(cfg.storage, watch=server)
    return SqliteMonitorStore(cfg.db_path)


def admin_store(cfg: Config) -> SqliteAdminStore:
    """The web admin's accounts, sessions, API keys and webhooks: the
    tables of ``postwarden.db``, or the shared ones on PostgreSQL (a
    :class:`~postwarden.storage.pg_admin.PgAdminStore`: every node's web
    admin and API take the same logins and keys)."""
    if cfg.storage.postgres:
        from postwarden.storage.pg_admin import PgAdminStore

        return PgAdminStore(cfg.storage)
    from postwarden.web.store import SqliteAdminStore

    cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return SqliteAdminStore(cfg.db_path)


def has_state(cfg: Config) -> bool:
    """Is there state to read (a CLI command before the first start finds
    none on SQLite; the shared database is always there to ask)?"""
    return cfg.storage.postgres or cfg.db_path.exists()


def open_reader(cfg: Config) -> sqlite3.Connection | PgSession:
    """A connection for reading the queue, the events and the counters
    (``postwarden trace`` and ``status``, the alert rules, the web
    admin's figures): the SQLite file read-only, or a session on the
    shared schema.  Both take ``execute(sql, args)`` with ``?``
    placeholders; the caller closes it."""
    if cfg.storage.postgres:
        from postwarden.storage.pg_sync import PgSession

        return PgSession(cfg.storage)
    from postwarden.observe.health import read_db

    return read_db(cfg.db_path)


@contextlib.contextmanager
def reading(cfg: Config, monitor: object = None) -> Iterator[Reader]:
    """A :class:`~postwarden.storage.base.Reader` for one read: on
    PostgreSQL the session of ``monitor`` when it is a running server's
    monitoring store (shared, left open), else :func:`open_reader`'s
    (closed afterwards)."""
    if cfg.storage.postgres:
        from postwarden.storage.pg_monitor import PgMonitorStore

        if isinstance(monitor, PgMonitorStore):
            yield monitor.session
            return
    db = open_reader(cfg)
    try:
        yield db
    finally:
        db.close()
