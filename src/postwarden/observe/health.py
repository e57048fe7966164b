"""Health and state: readiness of a running server, and the figures read
from the database (queue by state, delivery rates, bans, suspended
accounts, alerts) for ``/metrics``, ``/readyz`` and ``postwarden status``.

The figures are read through a :class:`~postwarden.storage.base.Reader`:
the SQLite file, or the shared schema on PostgreSQL (same tables, same
queries), so ``postwarden status`` on any node shows the shared queue.

Security exposure: read-only queries of the shared database; one write
probe (``BEGIN IMMEDIATE`` then ``ROLLBACK``: nothing is written) to prove
that the database can be written.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from postwarden.storage.base import Reader, is_sqlite

Gauge = tuple[str, str, dict[tuple[str, ...], float], tuple[str, ...]]


def read_db(db_path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    db.execute("PRAGMA busy_timeout = 5000")
    return db


def _table_exists(db: Reader, name: str) -> bool:
    """(On PostgreSQL the schema has every table from the start.)"""
    if not is_sqlite(db):
        return True
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                      (name,)).fetchone() is not None


def queue_state(db: Reader, now: float) -> dict[str, Any]:
    """Messages by state, recipients by status, the oldest message's age."""
    messages = {"active": 0, "held": 0, "corrupt": 0}
    for state, held, count in db.execute(
            "SELECT state, held, count(*) FROM messages GROUP BY state, held"):
        key = "held" if held and state == "active" else str(state)
        messages[key] = messages.get(key, 0) + int(count)
    recipients = {"queued": 0, "deferred": 0}
    for status, count in db.execute(
            "SELECT status, count(*) FROM recipients WHERE status IN ('queued', 'deferred')"
            " GROUP BY status"):
        recipients[str(status)] = int(count)
    (oldest,) = db.execute("SELECT min(received_at) FROM messages").fetchone()
    return {"messages": messages, "recipients": recipients,
            "oldest_seconds": round(now - oldest, 1) if oldest is not None else 0.0}


def delivery_rates(db: Reader, since: float) -> dict[str, int]:
    """Since ``since``: messages received, and delivery attempts per
    recipient by result (from the trace)."""
    out = {"received": 0, "delivered": 0, "deferred": 0, "bounced": 0}
    names = {"delivered": "delivered", "deferred": "deferred", "failed": "bounced",
             "expired": "bounced"}
    for event, count in db.execute(
            "SELECT event, count(*) FROM events WHERE ts >= ? AND event IN "
            "('delivered', 'deferred', 'failed', 'expired') GROUP BY event", (since,)):
        out[names[str(event)]] += int(count)
    (out["received"],) = db.execute(
        "SELECT count(DISTINCT queue_id) FROM events WHERE ts >= ? AND event = 'queued'",
        (since,)).fetchone()
    return out


def protection_state(db: Reader, now: float) -> dict[str, Any]:
    bans = suspended = 0
    alerts: dict[str, int] = {"warning": 0, "critical": 0}
    if _table_exists(db, "protect_bans"):
        (bans,) = db.execute("SELECT count(*) FROM protect_bans WHERE until IS NULL OR"
                             " until > ?", (now,)).fetchone()
    if _table_exists(db, "monitor_suspended"):
        (suspended,) = db.execute("SELECT count(*) FROM monitor_suspended"
                                  " WHERE lifted IS NULL").fetchone()
        for severity, count in db.execute("SELECT severity, count(*) FROM monitor_alerts"
                                          " GROUP BY severity"):
            alerts[str(severity)] = int(count)
    return {"bans_active": int(bans), "accounts_suspended": int(suspended),
            "alerts_firing": alerts}


def state_gauges(db_path: Path) -> Iterable[Gauge]:
    """The scrape-time gauges of ``/metrics``."""
    now = time.time()
    db = read_db(db_path)
    try:
        q = queue_state(db, now)
        p = protection_state(db, now)
    finally:
        db.close()
    return [
        ("postwarden_queue_messages", "Messages in the queue by state (active, held, "
         "corrupt)", {(k,): float(v) for k, v in q["messages"].items()}, ("state",)),
        ("postwarden_queue_recipients", "Recipients waiting for delivery by status "
         "(queued: never tried; deferred: to be retried)",
         {(k,): float(v) for k, v in q["recipients"].items()}, ("status",)),
        ("postwarden_queue_oldest_message_age_seconds", "Age of the oldest message in the "
         "queue", {(): float(q["oldest_seconds"])}, ()),
        ("postwarden_bans_active", "Client networks banned now", {(): float(p["bans_active"])},
         ()),
        ("postwarden_accounts_suspended", "Accounts suspended from sending",
         {(): float(p["accounts_suspended"])}, ()),
        ("postwarden_alerts_firing", "Alerts firing now by severity",
         {(k,): float(v) for k, v in p["alerts_firing"].items()}, ("severity",)),
    ]


def storage_writable(db_path: Path, spool_dir: Path) -> str:
    """"" when the database takes a write lock and the spool is writable."""
    try:
        db = sqlite3.connect(db_path, timeout=2)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
        finally:
            db.close()
    except sqlite3.Error as exc:
        return f"database: {exc}"
    if not os.access(spool_dir, os.W_OK):
        return f"spool directory {spool_dir} is not writable"
    return ""


def shared_writable(monitor: Any, spool_dir: Path) -> str:
    """"" when the shared PostgreSQL database answers on the node's
    monitoring connection and is the primary (a replica in recovery takes
    no writes), and the spool is writable."""
    if monitor is None:
        return "database: not connected"
    try:
        (recovering,) = monitor.session.execute("SELECT pg_is_in_recovery()").fetchone()
    except Exception as exc:  # MonitorError: the database does not answer
        return str(exc)
    if recovering:
        return "database: a read-only replica (point [storage] dsn at the primary)"
    if not os.access(spool_dir, os.W_OK):
        return f"spool directory {spool_dir} is not writable"
    return ""


def readiness(server: Any) -> tuple[bool, dict[str, str]]:
    """``/readyz`` of a running :class:`postwarden.app.Server` (blocking:
    the storage probe).  Each check is "ok" or what is wrong."""
    cfg = server.config
    checks: dict[str, str] = {}
    bound = {lst.config.name for lst in server.listeners}
    wanted = {lc.name for lc in cfg.listeners if lc.enabled}
    missing = sorted(wanted - bound)
    checks["listeners"] = "ok" if not missing else f"not listening: {', '.join(missing)}"
    if cfg.storage.postgres:
        problem = shared_writable(server.monitor, cfg.spool_dir)
    else:
        problem = storage_writable(cfg.db_path, cfg.spool_dir)
    checks["storage"] = problem or "ok"
    runner = server.runner
    if cfg.queue.workers <= 0:
        checks["queue_runner"] = "ok (delivery off: [queue] workers = 0)"
    elif runner is None or runner._task is None or runner._task.done():
        checks["queue_runner"] = "not running"
    else:
        checks["queue_runner"] = "ok"
    ready = all(v.startswith("ok") for v in checks.values())
    return ready, checks
