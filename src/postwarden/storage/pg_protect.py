"""Bans, account locks, failure and rate counters, and greylisting in
PostgreSQL: the protection state every node shares.

:class:`PgProtectStore` offers the server API of
:class:`~postwarden.storage.sqlite_protect.SqliteProtectStore` (what
:mod:`postwarden.policy.bans` and :mod:`postwarden.policy.ratelimit` call)
on the same tables, in the PostgreSQL schema, over the pool of the node's
queue store.  A ban written by one node (an automatic ban, or ``postwarden
ban add``) is seen by every other within :data:`BAN_CACHE_SECONDS`: each
node reloads the active bans at most that often, and its own bans update
its cache at once.  Counters are rows, so a rate limit or a brute-force
threshold counts what the client did on every node.

:class:`PgGreylist` decides greylisting as
:class:`~postwarden.storage.sqlite_greylist.SqliteGreylist` does, in one
transaction holding the triplet's row lock, so a retry passes whichever
node it reaches.

:class:`PgBanAdmin` is the synchronous face of the ban table for the CLI.

Security exposure: keys come from untrusted clients (IP addresses,
account names, envelope addresses); they are bound as query parameters.
Networks are validated with :mod:`ipaddress` before they are stored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Coroutine
from typing import Any, Self, TypeVar

import asyncpg

from postwarden.netaddr import client_address
from postwarden.storage.pg_schema import in_transaction
from postwarden.storage.settings import StorageSettings
from postwarden.storage.sqlite_greylist import Decision
from postwarden.storage.sqlite_protect import (
    BAN_CACHE_SECONDS,
    HISTORY_SECONDS,
    PRUNE_INTERVAL,
    Ban,
    Network,
    ProtectError,
    active_bans,
    ban_from_row,
    parse_network,
    window_estimate,
)

T = TypeVar("T")
_BAN_COLS = "network, reason, level, until, created"
_UPSERT_BAN = (f"INSERT INTO protect_bans ({_BAN_COLS}) VALUES ($1, $2, $3, $4, $5) "
               "ON CONFLICT (network) DO UPDATE SET reason = EXCLUDED.reason, "
               "level = EXCLUDED.level, until = EXCLUDED.until, created = EXCLUDED.created")


async def _add_ban(conn: Any, network: str, reason: str, seconds: float | None, level: int,
                   now: float) -> tuple[Network, Ban]:
    net = parse_network(network)
    ban = Ban(str(net), reason, level, None if seconds is None else now + seconds, now)
    await conn.execute(_UPSERT_BAN, ban.network, ban.reason, ban.level, ban.until, ban.created)
    return net, ban


class PgProtectStore:
    """The protection tables over ``pool`` (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool, clock: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.clock = clock
        self._bans: list[tuple[Network, Ban]] = []
        self._loaded = float("-inf")  # time.monotonic() of the last load
        self._pruned = 0.0

    def close(self) -> None:
        """Nothing to do: the pool belongs to the queue store."""

    def _cache_put(self, net: Network, ban: Ban) -> None:
        self._bans = [(n, b) for n, b in self._bans if n != net] + [(net, ban)]

    async def _reload(self) -> None:
        rows = await self.pool.fetch(f"SELECT {_BAN_COLS} FROM protect_bans "
                                     "WHERE until IS NULL OR until > $1", self.clock())
        self._bans = active_bans(rows)
        self._loaded = time.monotonic()

    async def banned(self, ip: str) -> Ban | None:
        """The active ban covering ``ip`` (bans reloaded at most every
        :data:`BAN_CACHE_SECONDS`), or None."""
        if time.monotonic() - self._loaded >= BAN_CACHE_SECONDS:
            await self._reload()
        addr = client_address(ip)
        if addr is None:
            return None
        now = self.clock()
        for net, ban in self._bans:
            if net.version == addr.version and addr in net and ban.active(now):
                return ban
        return None

    async def ban(self, ip: str, reason: str, durations: tuple[float, ...],
                  memory: float) -> Ban:
        """An automatic, escalating ban (as SqliteProtectStore.ban)."""
        net = parse_network(ip)
        now = self.clock()
        level = 0
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"SELECT {_BAN_COLS} FROM protect_bans "
                                      "WHERE network = $1 FOR UPDATE", str(net))
            if row is not None:
                if row["until"] is None:  # a permanent ban stays permanent
                    return ban_from_row(row)
                if float(row["until"]) > now - memory:
                    level = int(row["level"]) + 1
            seconds = durations[min(level, len(durations) - 1)]
            net, ban = await _add_ban(conn, ip, reason, seconds, level, now)
        self._cache_put(net, ban)
        return ban

    async def ban_for(self, ip: str, reason: str, seconds: float) -> Ban:
        """A fixed-length ban (never shortens a longer one already in place)."""
        current = await self.banned(ip)
        now = self.clock()
        if current is not None and (current.until is None or current.until >= now + seconds):
            return current
        async with self.pool.acquire() as conn:
            net, ban = await _add_ban(conn, ip, reason, seconds, 0, now)
        self._cache_put(net, ban)
        return ban

    async def lock(self, account: str, ip: str, reason: str, seconds: float) -> None:
        now = self.clock()
        await self.pool.execute(
            "INSERT INTO protect_locks (account, ip, reason, until, created) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account, ip) DO UPDATE SET "
            "reason = EXCLUDED.reason, until = EXCLUDED.until, created = EXCLUDED.created",
            account.lower(), ip, reason, now + seconds, now)

    async def locked(self, account: str, ip: str) -> bool:
        found = await self.pool.fetchval(
            "SELECT 1 FROM protect_locks WHERE account = $1 AND ip = $2 AND until > $3",
            account.lower(), ip, self.clock())
        return found is not None

    async def record(self, kind: str, key: str, window: float) -> int:
        """Record one ``kind`` event for ``key``; how many in the last
        ``window`` seconds on all nodes, this one included."""
        now = self.clock()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM protect_events WHERE kind = $1 AND key = $2 "
                               "AND at <= $3", kind, key, now - window)
            await conn.execute("INSERT INTO protect_events (kind, key, at) "
                               "VALUES ($1, $2, $3)", kind, key, now)
            count = await conn.fetchval("SELECT count(*) FROM protect_events "
                                        "WHERE kind = $1 AND key = $2", kind, key)
            await self._maybe_prune(conn, now)
        return int(count)

    async def clear(self, kind: str, key: str) -> None:
        await self.pool.execute("DELETE FROM protect_events WHERE kind = $1 AND key = $2",
                                kind, key)

    async def rate(self, key: str, window: int) -> float:
        """The sliding-window estimate of ``key``'s count over the last
        ``window`` seconds (all nodes)."""
        now = self.clock()
        start = int(now // window) * window
        rows = await self.pool.fetch("SELECT window_start, count FROM protect_rates "
                                     "WHERE key = $1 AND window_start >= $2",
                                     key, start - window)
        return window_estimate(rows, now, window)

    async def add_rate(self, key: str, window: int, amount: int = 1) -> None:
        await self.add_rates([(key, amount)], window)

    async def add_rates(self, amounts: list[tuple[str, int]], window: int) -> None:
        now = self.clock()
        start = int(now // window) * window
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO protect_rates (key, window_start, count) VALUES ($1, $2, $3) "
                "ON CONFLICT (key, window_start) DO UPDATE "
                "SET count = protect_rates.count + EXCLUDED.count",
                [(key, start, amount) for key, amount in amounts])
            await conn.execute("DELETE FROM protect_rates WHERE key = ANY($1::text[]) "
                               "AND window_start < $2", [k for k, _ in amounts],
                               start - window)

    async def _maybe_prune(self, conn: Any, now: float) -> None:
        if now - self._pruned < PRUNE_INTERVAL:
            return
        self._pruned = now
        await conn.execute("DELETE FROM protect_bans WHERE until IS NOT NULL AND until < $1",
                           now - HISTORY_SECONDS)
        await conn.execute("DELETE FROM protect_locks WHERE until < $1", now)
        await conn.execute("DELETE FROM protect_events WHERE at < $1", now - 86400)
        await conn.execute("DELETE FROM protect_rates WHERE window_start < $1",
                           int(now - 2 * 86400))


class PgGreylist:
    """Greylisting decisions over ``pool`` (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool, *, delay: float, expiry: float,
                 allow: float) -> None:
        self.pool = pool
        self.delay = delay
        self.expiry = expiry
        self.allow = allow
        self._last_prune = 0.0

    def close(self) -> None:
        """Nothing to do: the pool belongs to the queue store."""

    async def decide(self, network: str, sender: str, recipient: str, now: float) -> Decision:
        """Record an attempt of the triplet at ``now`` and say whether it passes."""
        async with self.pool.acquire() as conn, conn.transaction():
            decision = await self._decide(conn, network, sender, recipient, now)
            if now - self._last_prune >= PRUNE_INTERVAL:
                self._last_prune = now
                await conn.execute("DELETE FROM greylist_triplets WHERE first_seen < $1",
                                   now - self.expiry)
                await conn.execute("DELETE FROM greylist_clients WHERE allowed_until < $1",
                                   now)
        return decision

    async def _decide(self, conn: Any, network: str, sender: str, recipient: str,
                      now: float) -> Decision:
        allowed = await conn.fetchval(
            "SELECT allowed_until FROM greylist_clients WHERE network = $1", network)
        if allowed is not None and allowed > now:
            if allowed - now < self.allow / 2:  # keep active senders allow-listed
                await self._allow(conn, network, now)
            return Decision(0, "allow-listed")
        key = (network, sender, recipient)
        # Create the triplet if it is new, then lock it: two nodes seeing
        # the same retry decide one after the other.
        await conn.execute("INSERT INTO greylist_triplets (network, sender, recipient, "
                           "first_seen, attempts) VALUES ($1, $2, $3, $4, 0) "
                           "ON CONFLICT DO NOTHING", *key, now)
        first, attempts = await conn.fetchrow(
            "SELECT first_seen, attempts FROM greylist_triplets WHERE network = $1 AND "
            "sender = $2 AND recipient = $3 FOR UPDATE", *key)
        if attempts == 0 or now - first > self.expiry or now < first:
            await conn.execute("UPDATE greylist_triplets SET first_seen = $4, attempts = 1 "
                               "WHERE network = $1 AND sender = $2 AND recipient = $3",
                               *key, now)
            return Decision(max(1, math.ceil(self.delay)), "new" if attempts == 0
                            else "expired")
        elapsed = now - first
        if elapsed < self.delay:
            await conn.execute("UPDATE greylist_triplets SET attempts = attempts + 1 WHERE "
                               "network = $1 AND sender = $2 AND recipient = $3", *key)
            return Decision(max(1, math.ceil(self.delay - elapsed)), "early")
        await conn.execute("DELETE FROM greylist_triplets WHERE network = $1 AND "
                           "sender = $2 AND recipient = $3", *key)
        await self._allow(conn, network, now)
        return Decision(0, "passed")

    async def _allow(self, conn: Any, network: str, now: float) -> None:
        if self.allow > 0:
            await conn.execute(
                "INSERT INTO greylist_clients (network, allowed_until) VALUES ($1, $2) "
                "ON CONFLICT (network) DO UPDATE SET allowed_until = EXCLUDED.allowed_until",
                network, now + self.allow)

    async def counts(self) -> tuple[int, int]:
        """(pending triplets, allow-listed networks), for tests and stats."""
        t = await self.pool.fetchval("SELECT count(*) FROM greylist_triplets")
        c = await self.pool.fetchval("SELECT count(*) FROM greylist_clients")
        return int(t), int(c)


class PgBanAdmin:
    """``postwarden ban list|add|del`` on the shared ban table (synchronous,
    one short connection per call), as SqliteProtectStore's admin methods."""

    def __init__(self, settings: StorageSettings,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _run(self, action: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        return in_transaction(self.settings, action, ProtectError)

    def list_bans(self, *, include_expired: bool = False) -> list[Ban]:
        async def action(conn: Any) -> list[Ban]:
            rows = await conn.fetch(f"SELECT {_BAN_COLS} FROM protect_bans ORDER BY created")
            return [ban_from_row(r) for r in rows]
        now = self.clock()
        bans = self._run(action)
        return bans if include_expired else [b for b in bans if b.active(now)]

    def add_ban(self, network: str, reason: str, seconds: float | None, level: int = 0) -> Ban:
        parse_network(network)  # a bad address fails before connecting

        async def action(conn: Any) -> Ban:
            return (await _add_ban(conn, network, reason, seconds, level, self.clock()))[1]
        return self._run(action)

    def del_ban(self, network: str) -> bool:
        net = parse_network(network)

        async def action(conn: Any) -> bool:
            status = await conn.execute("DELETE FROM protect_bans WHERE network = $1",
                                        str(net))
            found = not status.endswith(" 0")
            if net.num_addresses == 1:
                ip = str(net.network_address)
                status = await conn.execute("DELETE FROM protect_locks WHERE ip = $1", ip)
                await conn.execute("DELETE FROM protect_events WHERE key = $1 OR key LIKE $2",
                                   ip, f"%|{ip}")
                found = found or not status.endswith(" 0")
            return found
        return self._run(action)

    def get_ban(self, network: str) -> Ban | None:
        net = parse_network(network)

        async def action(conn: Any) -> Ban | None:
            row = await conn.fetchrow(f"SELECT {_BAN_COLS} FROM protect_bans "
                                      "WHERE network = $1", str(net))
            return None if row is None else ban_from_row(row)
        return self._run(action)
