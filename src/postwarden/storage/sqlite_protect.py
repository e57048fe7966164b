"""Bans, failure counters and rate counters in SQLite (the protection store).

:class:`SqliteProtectStore` shares ``postwarden.db`` with the queue and the
directory but owns only its tables (all prefixed ``protect_``):

- ``protect_bans``: one row per banned network (a single IP is a /32 or
  /128), with its reason, escalation level, expiry (``until``; NULL is
  permanent) and creation time.  Expired rows are kept for a while: their
  level is the starting point of the next, longer ban (escalation).
- ``protect_locks``: an account locked for one client IP after too many
  failed AUTH attempts for it.
- ``protect_events``: timestamped events (a failed AUTH, a 5.1.1 reject)
  counted over a sliding window; rows older than the window are pruned as
  new ones arrive.
- ``protect_rates``: fixed-window counters ``(key, window start, count)``;
  :meth:`rate` gives the sliding-window estimate (the previous window
  weighted by how much of it still overlaps the last ``window`` seconds).

Every node and the CLI use the same tables, so a ban written by any of them
applies everywhere.  The server keeps the active bans in memory for at most
:data:`BAN_CACHE_SECONDS`, so a ban or unban from ``postwarden ban`` takes
effect within that time; its own bans update the cache at once.

Security exposure: :meth:`banned` is asked for every connection by an
untrusted client; it reads the in-memory cache.  All queries are
parameterised; networks are validated with :mod:`ipaddress` before they are
stored.
"""

from __future__ import annotations

import ipaddress
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postwarden.netaddr import client_address
from postwarden.storage.sqlite_shared import SharedTables

SCHEMA_VERSION = 1
# The server reloads the active bans at most this often (CLI bans apply within it).
BAN_CACHE_SECONDS = 1.0
# Expired bans and stale counters are deleted after this long.
HISTORY_SECONDS = 30 * 86400
# Prune old rows at most this often.
PRUNE_INTERVAL = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS protect_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS protect_bans (
    network TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    level INTEGER NOT NULL DEFAULT 0,
    until REAL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS protect_locks (
    account TEXT NOT NULL,
    ip TEXT NOT NULL,
    reason TEXT NOT NULL,
    until REAL NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (account, ip)
);
CREATE TABLE IF NOT EXISTS protect_events (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS protect_events_key ON protect_events (kind, key, at);
CREATE TABLE IF NOT EXISTS protect_rates (
    key TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (key, window_start)
);
"""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProtectError(Exception):
    """An administration request that cannot be done (one line)."""


@dataclass(frozen=True, slots=True)
class Ban:
    network: str  # canonical CIDR, e.g. 192.0.2.7/32
    reason: str
    level: int
    until: float | None  # None: permanent
    created: float

    def active(self, now: float) -> bool:
        return self.until is None or self.until > now

    @property
    def shown(self) -> str:
        """The network, without the prefix length for a single address."""
        net = ipaddress.ip_network(self.network)
        return str(net.network_address) if net.num_addresses == 1 else self.network


def parse_network(text: str) -> Network:
    """An IP address or CIDR network; host bits are cleared (192.0.2.7/24 -> /24)."""
    try:
        net = ipaddress.ip_network(text.strip().strip("[]"), strict=False)
    except ValueError:
        raise ProtectError(f"{text!r} is not an IP address or network") from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped:
        mapped = net.network_address.ipv4_mapped
        net = ipaddress.ip_network(f"{mapped}/{max(0, net.prefixlen - 96)}")
    return net


class SqliteProtectStore(SharedTables):
    """The protection tables in ``db_path`` (see module docstring).

    One connection guarded by a lock; the async methods run their short
    queries inline on the event loop (index reads and single-row writes).
    ``clock`` is injectable for tests.
    """

    schema = _SCHEMA
    schema_table = "protect_schema"
    schema_version = SCHEMA_VERSION
    schema_error = ProtectError
    storage_error_label = "protection store"

    def __init__(self, db_path: Path, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._bans: list[tuple[Network, Ban]] = []
        self._loaded = float("-inf")  # time.monotonic() of the last load
        self._pruned = 0.0
        super().__init__(db_path)

    # -- bans (sync: the CLI; the server uses the async methods below)

    def list_bans(self, *, include_expired: bool = False) -> list[Ban]:
        now = self.clock()
        rows = self._query("SELECT network, reason, level, until, created FROM protect_bans"
                           " ORDER BY created")
        bans = [ban_from_row(r) for r in rows]
        return bans if include_expired else [b for b in bans if b.active(now)]

    def add_ban(self, network: str, reason: str, seconds: float | None, level: int = 0) -> Ban:
        """Ban ``network`` for ``seconds`` (None: until deleted), replacing any
        ban of the same network."""
        net = parse_network(network)
        now = self.clock()
        ban = Ban(str(net), reason, level, None if seconds is None else now + seconds, now)
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO protect_bans (network, reason, level, until,"
                       " created) VALUES (?, ?, ?, ?, ?)",
                       (ban.network, ban.reason, ban.level, ban.until, ban.created))
        self._cache_put(net, ban)
        return ban

    def del_ban(self, network: str) -> bool:
        """Lift the ban of ``network`` and forget its failures and account
        locks (a fresh start).  False: there was no such ban."""
        net = parse_network(network)
        with self._write() as db:
            cur = db.execute("DELETE FROM protect_bans WHERE network = ?", (str(net),))
            found = cur.rowcount > 0
            if net.num_addresses == 1:
                ip = str(net.network_address)
                n = db.execute("DELETE FROM protect_locks WHERE ip = ?", (ip,)).rowcount
                db.execute("DELETE FROM protect_events WHERE key = ? OR key LIKE ?",
                           (ip, f"%|{ip}"))
                found = found or n > 0
        self._bans = [(n_, b) for n_, b in self._bans if n_ != net]
        return found

    def get_ban(self, network: str) -> Ban | None:
        net = parse_network(network)
        rows = self._query("SELECT network, reason, level, until, created FROM protect_bans"
                           " WHERE network = ?", (str(net),))
        return ban_from_row(rows[0]) if rows else None

    def _cache_put(self, net: Network, ban: Ban) -> None:
        self._bans = [(n, b) for n, b in self._bans if n != net] + [(net, ban)]

    def _reload(self) -> None:
        now = self.clock()
        rows = self._query("SELECT network, reason, level, until, created FROM protect_bans"
                           " WHERE until IS NULL OR until > ?", (now,))
        self._bans = active_bans(rows)
        self._loaded = time.monotonic()

    def banned_sync(self, ip: str) -> Ban | None:
        if time.monotonic() - self._loaded >= BAN_CACHE_SECONDS:
            self._reload()
        addr = client_address(ip)
        if addr is None:
            return None
        now = self.clock()
        for net, ban in self._bans:
            if net.version == addr.version and addr in net and ban.active(now):
                return ban
        return None

    # -- the server's API (async; short queries run inline)

    async def banned(self, ip: str) -> Ban | None:
        """The active ban covering ``ip`` (from the cache), or None."""
        return self.banned_sync(ip)

    async def ban(self, ip: str, reason: str, durations: tuple[float, ...],
                  memory: float) -> Ban:
        """An automatic, escalating ban: the level goes up by one when the
        previous ban of this address ended less than ``memory`` seconds ago;
        the duration is ``durations[level]`` (the last one repeats)."""
        net = parse_network(ip)
        now = self.clock()
        level = 0
        with self._write() as db:
            row = db.execute("SELECT level, until FROM protect_bans WHERE network = ?",
                             (str(net),)).fetchone()
            if row is not None:
                until = row[1]
                if until is None:  # a permanent ban stays permanent
                    return ban_from_row(db.execute(
                        "SELECT network, reason, level, until, created FROM protect_bans"
                        " WHERE network = ?", (str(net),)).fetchone())
                if float(until) > now - memory:
                    level = int(row[0]) + 1
            seconds = durations[min(level, len(durations) - 1)]
            ban = Ban(str(net), reason, level, now + seconds, now)
            db.execute("INSERT OR REPLACE INTO protect_bans (network, reason, level, until,"
                       " created) VALUES (?, ?, ?, ?, ?)",
                       (ban.network, ban.reason, ban.level, ban.until, ban.created))
        self._cache_put(net, ban)
        return ban

    async def ban_for(self, ip: str, reason: str, seconds: float) -> Ban:
        """A fixed-length ban (never shortens a longer one already in place)."""
        current = self.banned_sync(ip)
        now = self.clock()
        if current is not None and (current.until is None or current.until >= now + seconds):
            return current
        return self.add_ban(ip, reason, seconds)

    async def lock(self, account: str, ip: str, reason: str, seconds: float) -> None:
        now = self.clock()
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO protect_locks (account, ip, reason, until,"
                       " created) VALUES (?, ?, ?, ?, ?)",
                       (account.lower(), ip, reason, now + seconds, now))

    async def locked(self, account: str, ip: str) -> bool:
        rows = self._query("SELECT 1 FROM protect_locks WHERE account = ? AND ip = ?"
                           " AND until > ?", (account.lower(), ip, self.clock()))
        return bool(rows)

    async def record(self, kind: str, key: str, window: float) -> int:
        """Record one ``kind`` event for ``key``; the number of them in the
        last ``window`` seconds, this one included."""
        now = self.clock()
        with self._write() as db:
            db.execute("DELETE FROM protect_events WHERE kind = ? AND key = ? AND at <= ?",
                       (kind, key, now - window))
            db.execute("INSERT INTO protect_events (kind, key, at) VALUES (?, ?, ?)",
                       (kind, key, now))
            (count,) = db.execute("SELECT count(*) FROM protect_events WHERE kind = ?"
                                  " AND key = ?", (kind, key)).fetchone()
            self._maybe_prune(db, now)
        return int(count)

    async def clear(self, kind: str, key: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM protect_events WHERE kind = ? AND key = ?", (kind, key))

    # -- rate counters

    async def rate(self, key: str, window: int) -> float:
        """The sliding-window estimate of ``key``'s count over the last
        ``window`` seconds."""
        now = self.clock()
        start = int(now // window) * window
        rows = self._query("SELECT window_start, count FROM protect_rates WHERE key = ?"
                           " AND window_start >= ?", (key, start - window))
        return window_estimate(rows, now, window)

    async def add_rate(self, key: str, window: int, amount: int = 1) -> None:
        await self.add_rates([(key, amount)], window)

    async def add_rates(self, amounts: list[tuple[str, int]], window: int) -> None:
        """Add to several counters in one transaction (one commit)."""
        now = self.clock()
        start = int(now // window) * window
        with self._write() as db:
            for key, amount in amounts:
                db.execute("INSERT INTO protect_rates (key, window_start, count) "
                           "VALUES (?, ?, ?) ON CONFLICT (key, window_start) "
                           "DO UPDATE SET count = count + ?", (key, start, amount, amount))
                db.execute("DELETE FROM protect_rates WHERE key = ? AND window_start < ?",
                           (key, start - window))

    def _maybe_prune(self, db: sqlite3.Connection, now: float) -> None:
        if now - self._pruned < PRUNE_INTERVAL:
            return
        self._pruned = now
        old = now - HISTORY_SECONDS
        db.execute("DELETE FROM protect_bans WHERE until IS NOT NULL AND until < ?", (old,))
        db.execute("DELETE FROM protect_locks WHERE until < ?", (now,))
        db.execute("DELETE FROM protect_events WHERE at < ?", (now - 86400,))
        db.execute("DELETE FROM protect_rates WHERE window_start < ?", (now - 2 * 86400,))


def window_estimate(rows: Iterable[Any], now: float, window: int) -> float:
    """A rate counter's sliding-window estimate from its (window_start,
    count) rows: the current window's count plus the previous one's,
    weighted by how much of it still overlaps the last ``window`` seconds."""
    start = int(now // window) * window
    current = previous = 0
    for window_start, count in rows:
        if window_start == start:
            current += int(count)
        elif window_start == start - window:
            previous += int(count)
    return current + previous * (1.0 - (now - start) / window)


def active_bans(rows: Iterable[Any]) -> list[tuple[Network, Ban]]:
    """Ban rows with their parsed networks, for the in-memory check (shared
    with the PostgreSQL store)."""
    bans: list[tuple[Network, Ban]] = []
    for row in rows:
        ban = ban_from_row(row)
        try:
            bans.append((ipaddress.ip_network(ban.network), ban))
        except ValueError:  # written by hand into the table: ignore it
            continue
    return bans


def ban_from_row(row: Any) -> Ban:
    network, reason, level, until, created = row
    return Ban(str(network), str(reason), int(str(level)),
               None if until is None else float(str(until)), float(str(created)))
