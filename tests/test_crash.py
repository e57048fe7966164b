"""Crash consistency: SIGKILL under load, restart, and nothing acknowledged
is lost or corrupted (see tests/crashload.py; ``make crash`` runs 50 rounds).

The in-suite run is short (5 kills); POSTWARDEN_CRASH_ROUNDS sets more.
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import PASSWORD, PG_DSN, add_user, maildir_messages, wait_for
from tests.crashload import (
    FORWARD,
    LOCAL,
    REMOTE,
    SQLITE,
    Backend,
    CrashRun,
    Plan,
    corrupt_count,
    verify_snapshot,
)
from tests.service import ALICE, Service, kill_leftovers, log_events, setup_config

ROUNDS = int(os.environ.get("POSTWARDEN_CRASH_ROUNDS", "5"))
@pytest.fixture(autouse=True)
def _no_leftover_servers() -> Any:
    yield
    kill_leftovers()


def _postgres(schema: str) -> Backend:
    """The queue (and directory) in PostgreSQL, with a short lease so that a
    killed node's claims pass to its successor quickly."""

    def accounts(directory: Path) -> None:
        # The directory lives in PostgreSQL too: made through the CLI.
        config = str(directory / "postwarden.toml")
        for args, stdin in ((["user", "add", LOCAL, "--password-stdin"], PASSWORD + "\n"),
                            (["alias", "add", FORWARD, REMOTE], None)):
            subprocess.run([sys.executable, "-m", "postwarden", "-c", config, *args],
                           input=stdin, text=True, capture_output=True, check=True, timeout=60)

    return Backend("postgres", config=(
        f'[storage]\nbackend = "postgres"\ndsn = "{PG_DSN}"\nschema = "{schema}"\n'
        "lease = 3\nheartbeat = 1\n"), prepare=accounts)


def _pg_corrupt_count(schema: str) -> int:
    async def count() -> int:
        import asyncpg

        conn = await asyncpg.connect(PG_DSN)
        try:
            return int(await conn.fetchval(
                f'SELECT count(*) FROM "{schema}".messages WHERE state = \'corrupt\''))
        finally:
            await conn.close()

    return asyncio.run(count())


@pytest.mark.timeout(max(300, ROUNDS * 40))
@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
def test_sigkill_under_load_loses_nothing_acknowledged(
        tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any,
        backend_name: str, request: pytest.FixtureRequest) -> None:
    schema = request.getfixturevalue("pg_schema") if backend_name == "postgres" else ""
    backend = _postgres(schema) if schema else SQLITE
    # The data-directory copy (power-loss style) is SQLite's: with PostgreSQL
    # the queue is the database server's, and so is its durability.
    plan = Plan(rounds=ROUNDS, seed=int(os.environ.get("POSTWARDEN_CRASH_SEED", "1")),
                snapshot_round=-1 if schema else ROUNDS // 2)
    if ROUNDS <= 5:  # in the suite: fewer of the biggest messages
        plan.sizes = ((2_000, 60), (40_000, 20), (300_000, 12), (2_000_000, 4),
                      (10_000_000, 1))
    run = CrashRun(tmp_path, cert_files, loopback_dns.port, plan, backend)
    report = run.run()
    print("\ncrash test:", report.summary())
    assert report.rounds == ROUNDS
    assert report.acknowledged > ROUNDS, "the load did not get through"
    assert report.lost == [], f"acknowledged but never delivered: {report.lost[:10]}"
    assert report.corrupted == []
    assert (_pg_corrupt_count(schema) if schema else corrupt_count(run.cfg.db_path)) == 0

    # Power-loss style: the data directory as it was at one kill point.
    if report.snapshot is not None:
        snap = verify_snapshot(report, tmp_path, cert_files, loopback_dns.port)
        print(f"snapshot: {snap.found}/{snap.acknowledged_before} acknowledged before "
              f"the copy delivered, corrupted {len(snap.corrupted)}, "
              f"corrupt queue entries {snap.queue_corrupt}")
        assert snap.lost == [] and snap.corrupted == [] and snap.queue_corrupt == 0


def _spooled_message(tag: str) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return f"Subject: {tag}\r\n\r\n".encode() + line * 3000  # 234 KB: a spool file


def test_a_torn_spool_file_is_detected_and_never_delivered(
        tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any) -> None:
    # Accept only, so the messages stay queued; then tear one committed
    # spool file (as a disk that lied about its flush would) and leave an
    # uncommitted one (a message killed before its 250).
    path, ports, cfg = setup_config(tmp_path, cert_files, loopback_dns,
                                    "[checks]\nverify = false\n[queue]\nworkers = 0\n")
    add_user(cfg, ALICE)
    svc = Service(path, tmp_path / "serve.log")
    svc.wait_ready(ports[0])
    with smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as client:
        client.sendmail("s@remote.example", [ALICE], _spooled_message("torn"))
        client.sendmail("s@remote.example", [ALICE], _spooled_message("whole"))
    svc.stop(signal.SIGKILL)
    spool = cfg.data_dir / "spool"
    files = sorted(spool.glob("*.spool"), key=lambda p: p.stat().st_mtime)
    assert len(files) == 2
    with open(files[0], "r+b") as f:
        f.truncate(100_000)
    orphan = spool / ("ab" * 16 + ".spool")
    orphan.write_bytes(_spooled_message("never acknowledged"))
    old = time.time() - 3600  # the garbage collector spares files being written
    os.utime(orphan, (old, old))

    path.write_text(path.read_text().replace("workers = 0", "workers = 2"))
    svc = Service(path, tmp_path / "serve.log")
    svc.wait_ready(ports[0])
    try:
        msgs = wait_for(lambda: maildir_messages(cfg, ALICE), timeout=20)
        assert wait_for(lambda: corrupt_count(cfg.db_path) == 1, timeout=20)
        time.sleep(1.5)  # a scan or two: nothing more arrives
        msgs = maildir_messages(cfg, ALICE)
        assert [m.split(b"Subject: ")[1].split(b"\n")[0] for m in msgs] == [b"whole"]
        assert not orphan.exists()
        assert wait_for(lambda: log_events(tmp_path / "serve.log", "corrupt"))
    finally:
        assert svc.stop() == 0
