"""Monitoring state in SQLite: alerts, suspended accounts, sending
baselines and the audit log.

:class:`SqliteMonitorStore` shares ``postwarden.db`` with the other stores
and owns only its tables (prefixed ``monitor_`` and ``audit_``):

- ``monitor_alerts``: the alerts firing now, one row per key (the rule and
  its subject, e.g. ``account_spike:alice@example.org``), so that an alert
  is sent once however often its rule matches, and a resolved notice when
  it stops matching; kept across restarts.
- ``monitor_suspended``: accounts suspended from sending (by the spike
  detector or the administrator); every process refuses their MAIL FROM
  (reading the table at most every :data:`SUSPENDED_CACHE_SECONDS`).  A
  lifted suspension keeps its row (``lifted`` set) so that the detector
  does not suspend the account again for the burst the administrator
  just allowed.
- ``monitor_baselines``: each account's usual messages per ``[ratelimit]``
  window, a moving average of the windows it sent in.
- ``audit_log``: administrative actions (who, from where, what, on what).

Security exposure: the audit log records what administrators did, never
passwords (the commands read them from standard input, and only the names
of the arguments that are not secrets are stored).  All SQL is
parameterised.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postwarden.storage.sqlite_shared import SharedTables

SCHEMA_VERSION = 1
SUSPENDED_CACHE_SECONDS = 1.0
# The weight of the newest window in an account's baseline.
BASELINE_WEIGHT = 0.2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS monitor_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS monitor_alerts (
    key TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    severity TEXT NOT NULL,
    summary TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    since REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS monitor_suspended (
    account TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    since REAL NOT NULL,
    by TEXT NOT NULL DEFAULT '',
    lifted REAL
);
CREATE TABLE IF NOT EXISTS monitor_baselines (
    account TEXT PRIMARY KEY,
    per_window REAL NOT NULL,
    last_window INTEGER NOT NULL,
    windows INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT 'ok'
);
CREATE INDEX IF NOT EXISTS audit_log_ts ON audit_log (ts);
"""


class MonitorError(Exception):
    """The monitoring tables cannot be used (e.g. written by a newer postwarden)."""


@dataclass(frozen=True, slots=True)
class Alert:
    key: str
    rule: str
    severity: str  # "warning" or "critical"
    summary: str
    detail: str = ""
    since: float = 0.0


@dataclass(frozen=True, slots=True)
class AuditEntry:
    ts: float
    actor: str
    source: str  # "cli", "web", "server"
    action: str  # "user add", "queue delete", "config changed", ...
    target: str
    detail: str
    result: str


class MonitorTables:
    """The monitoring operations, on the connection of the store that
    inherits them: :class:`SqliteMonitorStore` here,
    :class:`~postwarden.storage.pg_monitor.PgMonitorStore` on PostgreSQL
    (the same SQL, in the dialect both accept)."""

    clock: Callable[[], float]
    _suspended: frozenset[str]
    _suspended_at: float

    def _write(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> Sequence[Any]:
        raise NotImplementedError

    # -- alerts ---------------------------------------------------------------

    def firing(self) -> dict[str, Alert]:
        rows = self._query("SELECT key, rule, severity, summary, detail, since"
                           " FROM monitor_alerts")
        return {str(r[0]): Alert(str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]),
                                 float(str(r[5]))) for r in rows}

    def fire(self, alert: Alert) -> bool:
        """Record ``alert`` as firing.  True when it was not firing yet: the
        caller tells the postmaster.  False when it was (since an earlier
        round, or because another node fired it first): nobody is told twice."""
        now = self.clock()
        with self._write() as db:
            cur = db.execute("INSERT INTO monitor_alerts (key, rule, severity, summary, detail,"
                             " since, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?)"
                             " ON CONFLICT (key) DO NOTHING",
                             (alert.key, alert.rule, alert.severity, alert.summary,
                              alert.detail, alert.since or now, now))
            if int(cur.rowcount) > 0:
                return True
            db.execute("UPDATE monitor_alerts SET summary = ?, detail = ?, last_seen = ?"
                       " WHERE key = ?", (alert.summary, alert.detail, now, alert.key))
        return False

    def resolve(self, key: str) -> bool:
        """The alert stopped; True when this call ended it (the caller sends
        the resolved notice), False when it was not firing any more."""
        with self._write() as db:
            cur = db.execute("DELETE FROM monitor_alerts WHERE key = ?", (key,))
        return bool(cur.rowcount > 0)

    # -- suspended accounts ---------------------------------------------------

    def suspend(self, account: str, reason: str, by: str = "", *,
                unless_lifted_within: float = 0.0) -> bool:
        """False if it was suspended already, or lifted less than
        ``unless_lifted_within`` seconds ago."""
        now = self.clock()
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO monitor_suspended (account, reason, since, by) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (account) DO UPDATE SET reason = excluded.reason,"
                " since = excluded.since, by = excluded.by, lifted = NULL"
                " WHERE monitor_suspended.lifted IS NOT NULL"
                " AND monitor_suspended.lifted <= ?",
                (account.lower(), reason, now, by, now - unless_lifted_within))
        self._suspended_at = -1e9
        return bool(cur.rowcount > 0)

    def unsuspend(self, account: str) -> bool:
        with self._write() as db:
            cur = db.execute("UPDATE monitor_suspended SET lifted = ? WHERE account = ?"
                             " AND lifted IS NULL", (self.clock(), account.lower()))
        self._suspended_at = -1e9
        return bool(cur.rowcount > 0)

    def suspensions(self) -> list[tuple[str, str, float, str]]:
        rows = self._query("SELECT account, reason, since, by FROM monitor_suspended"
                           " WHERE lifted IS NULL ORDER BY since")
        return [(str(a), str(r), float(str(s)), str(b)) for a, r, s, b in rows]

    def suspended(self, account: str) -> bool:
        """Is ``account`` suspended (from a cache at most a second old)?"""
        now = time.monotonic()
        if now - self._suspended_at > SUSPENDED_CACHE_SECONDS:
            rows = self._query("SELECT account FROM monitor_suspended WHERE lifted IS NULL")
            self._suspended = frozenset(str(r[0]) for r in rows)
            self._suspended_at = now
        return account.lower() in self._suspended

    # -- baselines --------------------------------------------------------------

    def baselines(self) -> dict[str, tuple[float, int, int]]:
        """account -> (messages per window, last window folded in, windows seen)."""
        rows = self._query("SELECT account, per_window, last_window, windows"
                           " FROM monitor_baselines")
        return {str(a): (float(str(p)), int(str(w)), int(str(n))) for a, p, w, n in rows}

    def fold(self, account: str, window_start: int, count: float) -> None:
        """Fold a finished window's count into the account's baseline."""
        with self._write() as db:
            row = db.execute("SELECT per_window, last_window, windows FROM monitor_baselines"
                             " WHERE account = ?", (account,)).fetchone()
            if row is None:
                db.execute("INSERT INTO monitor_baselines (account, per_window, last_window,"
                           " windows) VALUES (?, ?, ?, 1)", (account, count, window_start))
            elif row[1] < window_start:
                value = (1 - BASELINE_WEIGHT) * row[0] + BASELINE_WEIGHT * count
                db.execute("UPDATE monitor_baselines SET per_window = ?, last_window = ?,"
                           " windows = windows + 1 WHERE account = ?",
                           (value, window_start, account))

    def set_baseline(self, account: str, per_window: float, window_start: int = 0) -> None:
        with self._write() as db:
            db.execute("INSERT INTO monitor_baselines (account, per_window, last_window,"
                       " windows) VALUES (?, ?, ?, 1) ON CONFLICT (account) DO UPDATE SET"
                       " per_window = excluded.per_window, last_window ="
                       " excluded.last_window, windows = 1",
                       (account.lower(), per_window, window_start))

    # -- audit ----------------------------------------------------------------------

    def audit(self, actor: str, source: str, action: str, target: str = "",
              detail: dict[str, object] | None = None, result: str = "ok") -> None:
        with self._write() as db:
            db.execute("INSERT INTO audit_log (ts, actor, source, action, target, detail,"
                       " result) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (self.clock(), actor, source, action, target,
                        json.dumps(detail, sort_keys=True) if detail else "", result))

    def audit_entries(self, since: float | None = None, limit: int = 200) -> list[AuditEntry]:
        rows = self._query("SELECT ts, actor, source, action, target, detail, result"
                           " FROM audit_log WHERE ts >= ? ORDER BY id DESC LIMIT ?",
                           (since or 0.0, limit))
        return [AuditEntry(float(str(r[0])), *(str(v) for v in r[1:])) for r in rows][::-1]

    def last_audit(self, action: str, target: str | None = None) -> AuditEntry | None:
        """The newest entry of ``action`` (on ``target`` when given)."""
        rows = self._query("SELECT ts, actor, source, action, target, detail, result"
                           " FROM audit_log WHERE action = ? AND (? OR target = ?)"
                           " ORDER BY id DESC LIMIT 1", (action, target is None, target or ""))
        return AuditEntry(float(str(rows[0][0])), *(str(v) for v in rows[0][1:])) if rows \
            else None


class SqliteMonitorStore(SharedTables, MonitorTables):
    """The monitoring tables in ``postwarden.db``."""

    schema = _SCHEMA
    schema_table = "monitor_schema"
    schema_version = SCHEMA_VERSION
    schema_error = MonitorError

    def __init__(self, db_path: Path, clock: Callable[[], float] = time.time) -> None:
        super().__init__(db_path)
        self.clock = clock
        self._suspended = frozenset()
        self._suspended_at = -1e9
