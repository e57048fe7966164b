"""Schema versions of the database file, and upgrades between them.

The one SQLite file ``postwarden.db`` holds the tables of several stores,
each with its own schema version: the queue in ``PRAGMA user_version``
(:mod:`postwarden.storage.sqlite_schema`), the directory, the protection
state and greylisting in a one-row ``*_schema`` table
(:class:`~postwarden.storage.sqlite_shared.SharedTables`).  This module reads
them all without changing anything (:func:`inspect`), and upgrades them
(:func:`upgrade`): first an online copy of the file (SQLite's backup API,
consistent even while the server writes) into ``DATA_DIR/backups/``, then
each store's own migration, which runs in one transaction.

:func:`prepare` is what ``serve`` runs before opening the stores: refuse a
database written by a newer postwarden (whose tables this one would
misread), back up and upgrade an older one, and do nothing otherwise.

Security exposure: the backup holds password hashes, like the database:
it is written 0600 in a 0700 directory.
"""

from __future__ import annotations

import datetime
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from postwarden import config as _config
from postwarden.observe.log import get_logger
from postwarden.storage import (
    sqlite_directory,
    sqlite_greylist,
    sqlite_monitor,
    sqlite_protect,
    sqlite_schema,
)
from postwarden.storage.sqlite_shared import connect
from postwarden.web import store as web_store

log = get_logger("migrate")

BACKUP_DIR = "backups"
# Store name -> (table holding its version, "" for PRAGMA user_version; the
# version this postwarden writes).
STORES: dict[str, tuple[str, int]] = {
    "queue": ("", sqlite_schema.SCHEMA_VERSION),
    "directory": ("directory_schema", sqlite_directory.SCHEMA_VERSION),
    "protection": ("protect_schema", sqlite_protect.SCHEMA_VERSION),
    "greylist": ("greylist_schema", sqlite_greylist.SCHEMA_VERSION),
    "monitor": ("monitor_schema", sqlite_monitor.SCHEMA_VERSION),
    "webadmin": ("webadmin_schema", web_store.SCHEMA_VERSION),
}


class SchemaError(Exception):
    """The database cannot be used by this postwarden (too new, unreadable)."""


@dataclass(frozen=True, slots=True)
class StoreVersion:
    store: str
    found: int | None  # None: the store's tables do not exist yet
    known: int

    @property
    def older(self) -> bool:
        return self.found is not None and self.found < self.known

    @property
    def newer(self) -> bool:
        return self.found is not None and self.found > self.known


def inspect(db_path: Path) -> list[StoreVersion]:
    """The schema version of each store in ``db_path`` (read only)."""
    if not db_path.exists():
        return [StoreVersion(name, None, known) for name, (_t, known) in STORES.items()]
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as exc:
        raise SchemaError(f"{db_path}: cannot open: {exc}") from None
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        out = []
        for name, (table, known) in STORES.items():
            found: int | None
            if not table:
                version = int(db.execute("PRAGMA user_version").fetchone()[0])
                found = version if version or "messages" in tables else None
            elif table in tables:
                row = db.execute(f"SELECT version FROM {table}").fetchone()
                found = int(row[0]) if row else None
            else:
                found = None
            out.append(StoreVersion(name, found, known))
        return out
    except sqlite3.Error as exc:
        raise SchemaError(f"{db_path}: cannot read the schema versions: {exc}") from None
    finally:
        db.close()


def _refuse_newer(db_path: Path, versions: list[StoreVersion]) -> None:
    newer = [v for v in versions if v.newer]
    if newer:
        what = ", ".join(f"{v.store} schema {v.found} (this postwarden knows {v.known})"
                         for v in newer)
        raise SchemaError(f"{db_path} was written by a newer postwarden: {what}; install "
                          "that version again, or restore a backup from "
                          f"{db_path.parent / BACKUP_DIR}")


def backup(db_path: Path) -> Path:
    """A consistent copy of the database (0600) in ``backups/`` beside it."""
    directory = db_path.parent / BACKUP_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = directory / f"{db_path.name}.{stamp}"
    os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    source = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    dest = sqlite3.connect(target)
    try:
        source.backup(dest)
    finally:
        dest.close()
        source.close()
    return target


def _migrate_all(cfg: _config.Config, versions: list[StoreVersion]) -> None:
    """Each older store runs its own migration (opening it migrates it)."""
    for v in versions:
        if not v.older:
            continue
        if v.store == "queue":
            db = connect(cfg.db_path)
            try:
                sqlite_schema.init_schema(db)
            finally:
                db.close()
        elif v.store == "directory":
            sqlite_directory.SqliteDirectory(cfg.db_path, cfg.domains).close()
        elif v.store == "protection":
            sqlite_protect.SqliteProtectStore(cfg.db_path).close()
        elif v.store == "monitor":
            sqlite_monitor.SqliteMonitorStore(cfg.db_path).close()
        elif v.store == "webadmin":
            web_store.SqliteAdminStore(cfg.db_path).close()
        elif v.store == "greylist":
            gl = cfg.greylist
            sqlite_greylist.SqliteGreylist(cfg.db_path, delay=gl.delay, expiry=gl.expiry,
                                           allow=gl.allow_days * 86400).close()


def upgrade(cfg: _config.Config, *, make_backup: bool = True
            ) -> tuple[list[StoreVersion], Path | None]:
    """Upgrade every older store; returns what was older and the backup."""
    versions = inspect(cfg.db_path)
    _refuse_newer(cfg.db_path, versions)
    older = [v for v in versions if v.older]
    if not older:
        return [], None
    saved = backup(cfg.db_path) if make_backup else None
    _migrate_all(cfg, versions)
    after = {v.store: v for v in inspect(cfg.db_path)}
    still = [v.store for v in older if after[v.store].older]
    if still:
        raise SchemaError(f"{cfg.db_path}: the upgrade of {', '.join(still)} did not "
                          "complete")
    return older, saved


def prepare(cfg: _config.Config) -> None:
    """At start: refuse a newer schema; back up and upgrade an older one."""
    older, saved = upgrade(cfg)
    if older:
        log.info("schema_upgraded", backup=str(saved),
                 stores={v.store: f"{v.found}->{v.known}" for v in older})


def cli(cfg: _config.Config, *, check_only: bool, backup: bool) -> int:
    """``postwarden migrate [--check] [--no-backup]``."""
    import sys

    try:
        versions = inspect(cfg.db_path)
        for v in versions:
            found = "-" if v.found is None else str(v.found)
            state = ("newer than this postwarden" if v.newer else
                     "needs upgrade" if v.older else
                     "not created yet" if v.found is None else "current")
            print(f"{v.store:<12} schema {found:>3} (this postwarden: {v.known})  {state}")
        _refuse_newer(cfg.db_path, versions)
        if check_only:
            return 1 if any(v.older for v in versions) else 0
        older, saved = upgrade(cfg, make_backup=backup)
    except SchemaError as exc:
        print(f"postwarden: {exc}", file=sys.stderr)
        return 1
    if not older:
        print("the database is up to date")
        return 0
    if saved is not None:
        print(f"backup: {saved}")
    for v in older:
        print(f"upgraded {v.store}: schema {v.found} -> {v.known}")
    return 0
