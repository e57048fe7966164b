"""Schema versions: an older database is backed up and upgraded at start
or by ``postwarden migrate``; a newer one is refused with a clear message."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import ServerThread, write_config

from postwarden import cli
from postwarden import config as config_mod
from postwarden.storage import migrate, sqlite_schema
from postwarden.storage.sqlite_directory import SqliteDirectory


def old_queue_db(db_path: Path) -> None:
    """A database as the first release wrote it: queue schema 1."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(db_path)
    db.executescript(sqlite_schema.MIGRATIONS[0])
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def test_start_backs_up_then_upgrades_an_older_schema(
        tmp_path: Path, make_server: Callable[..., ServerThread]) -> None:
    db_path = tmp_path / "data" / "postwarden.db"
    old_queue_db(db_path)
    make_server()
    assert user_version(db_path) == sqlite_schema.SCHEMA_VERSION
    (saved,) = (tmp_path / "data" / migrate.BACKUP_DIR).iterdir()
    assert user_version(saved) == 1  # the copy is of the database before the upgrade
    assert saved.stat().st_mode & 0o777 == 0o600
    assert all(not v.older and not v.newer for v in migrate.inspect(db_path))


def test_migrate_command(tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any,
                         capsys: Any) -> None:
    path = write_config(tmp_path, cert_files, dns_port=loopback_dns.port)
    old_queue_db(tmp_path / "data" / "postwarden.db")
    assert cli.main(["-c", str(path), "migrate", "--check"]) == 1
    assert "queue" in capsys.readouterr().out
    assert cli.main(["-c", str(path), "migrate"]) == 0
    out = capsys.readouterr().out
    assert "backup: " in out
    assert f"upgraded queue: schema 1 -> {sqlite_schema.SCHEMA_VERSION}" in out
    assert cli.main(["-c", str(path), "migrate"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli.main(["-c", str(path), "migrate", "--check"]) == 0


def test_a_newer_schema_is_refused(tmp_path: Path, cert_files: tuple[Path, Path],
                                   loopback_dns: Any) -> None:
    path = write_config(tmp_path, cert_files, dns_port=loopback_dns.port)
    cfg = config_mod.load(path)
    cfg.data_dir.mkdir()
    SqliteDirectory(cfg.db_path, cfg.domains).close()
    db = sqlite3.connect(cfg.db_path)
    db.execute("UPDATE directory_schema SET version = 99")
    db.commit()
    db.close()
    proc = subprocess.run([sys.executable, "-m", "postwarden", "-c", str(path), "serve"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "newer postwarden" in proc.stderr and "directory schema 99" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "postwarden", "-c", str(path), "migrate"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "newer postwarden" in proc.stderr
    assert not (cfg.data_dir / migrate.BACKUP_DIR).exists()
