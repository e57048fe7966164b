"""Connection limits (``[connections]``): concurrent connections in total
and per client network, and new connections per client network a minute
(like Postfix's anvil: smtpd_client_connection_count_limit and
smtpd_client_connection_rate_limit).

A client is counted per network of ``ipv4_prefix``/``ipv6_prefix`` bits, so
that one host cannot dodge the limit by hopping through its /64.  Over a
limit the client gets 421 4.7.0 before the greeting and the connection is
closed; a session counted at CONNECT is uncounted on ``Event.DISCONNECT``.
Allow-listed clients (``conn.trusted``) are not counted.  Every attempt
counts towards the rate, refused ones too (a client that hammers stays out).

Security exposure: bounds what one client can take; the bookkeeping itself
is bounded (windows of idle clients are dropped by a periodic sweep).
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import math
import mmap
import time
import zlib
from collections.abc import Callable

from postwarden import reply as R
from postwarden.config import ConnectionsConfig
from postwarden.netaddr import client_address
from postwarden.observe.log import get_logger
from postwarden.policy import CheckContext, Event, Policy, Stage

log = get_logger("connlimit")

TOO_MANY_TOTAL = R.Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_YOU = R.Reply(421, "4.7.0", "Too many connections from your network")
TOO_FAST = R.Reply(421, "4.7.0", "Too many new connections from your network, slow down")
RATE_WINDOW = 60.0
SWEEP_INTERVAL = 60.0


def client_key(peer_ip: str, settings: ConnectionsConfig) -> str:
    """The network a client is counted in, e.g. ``192.0.2.0/24``."""
    return _network(peer_ip, settings.ipv4_prefix, settings.ipv6_prefix)


@functools.lru_cache(maxsize=4096)
def _network(peer_ip: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    # Cached: parsing a network costs more than the rest of the check, and
    # the same clients keep connecting.
    addr = client_address(peer_ip)
    if addr is None:
        return peer_ip
    prefix = ipv4_prefix if addr.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class ConnectionTable:
    """Concurrent connections in total and per client network, counted by
    every process that accepts (see :mod:`postwarden.workers`).

    A block of shared memory with one row per process: a total, then
    SLOTS counters indexed by a hash of the client network.  A process
    writes only its own row and a check adds up the rows, so no lock is
    needed; another process's count may be read a moment late, as with one
    process's own accept queue.  Two networks whose hashes collide share a
    counter: a client may be refused a little early, never let through.
    When a worker dies, the main process clears its row (``clear``).
    """

    SLOTS = 1 << 16
    ROW = (1 + SLOTS) * 4  # bytes: uint32 total, then the slots

    def __init__(self, buffer: mmap.mmap | bytearray | None = None, rows: int = 1,
                 row: int = 0) -> None:
        if buffer is None:
            buffer = bytearray(self.ROW * rows)
        self._mem = memoryview(buffer).cast("I")
        self.rows = rows
        self.row = row
        self._mine = row * (1 + self.SLOTS)

    @classmethod
    def size(cls, rows: int) -> int:
        return cls.ROW * rows

    @staticmethod
    def slot(key: str) -> int:
        return zlib.crc32(key.encode()) & (ConnectionTable.SLOTS - 1)

    def total(self) -> int:
        mem, step = self._mem, 1 + self.SLOTS
        return sum(mem[r * step] for r in range(self.rows))

    def count(self, slot: int) -> int:
        mem, step = self._mem, 1 + self.SLOTS
        return sum(mem[r * step + 1 + slot] for r in range(self.rows))

    def add(self, slot: int, n: int) -> None:
        mem, base = self._mem, self._mine
        mem[base] += n
        mem[base + 1 + slot] += n

    def clear(self, row: int) -> None:
        step = 1 + self.SLOTS
        self._mem[row * step:(row + 1) * step] = memoryview(
            bytearray(step * 4)).cast("I")


class ConnectionLimiter:
    def __init__(self, settings: ConnectionsConfig,
                 clock: Callable[[], float] = time.monotonic,
                 table: ConnectionTable | None = None, processes: int = 1) -> None:
        self.settings = settings
        self.clock = clock
        self.table = table or ConnectionTable()
        # The rate of new connections is counted per process: its limit is
        # shared out (rounded up).
        self.processes = processes
        self.recent: dict[str, collections.deque[float]] = {}
        self.sessions: dict[str, int] = {}  # session id -> slot, while counted
        self._swept = 0.0

    def _now(self) -> float:
        return self.clock()

    def _sweep(self, now: float) -> None:
        self._swept = now
        for key in [k for k, q in self.recent.items() if not q or q[-1] <= now - RATE_WINDOW]:
            del self.recent[key]

    async def check(self, ctx: CheckContext) -> R.Verdict:
        if ctx.conn.trusted:
            return R.NO_OPINION
        s = self.settings
        now = self._now()
        if now - self._swept > SWEEP_INTERVAL:
            self._sweep(now)
        key = client_key(ctx.conn.peer_ip, s)
        window = self.recent.setdefault(key, collections.deque())
        while window and window[0] <= now - RATE_WINDOW:
            window.popleft()
        window.append(now)
        rate = s.max_new_per_minute
        if rate and self.processes > 1:
            rate = math.ceil(rate / self.processes)
        if rate and len(window) > rate:
            return R.tempfail(f"more than {s.max_new_per_minute} new connections a minute "
                              f"from {key}", TOO_FAST)
        table = self.table
        if s.max_total and (total := table.total()) >= s.max_total:
            return R.tempfail(f"{total} connections in total", TOO_MANY_TOTAL)
        slot = table.slot(key)
        if s.max_per_ip and (count := table.count(slot)) >= s.max_per_ip:
            return R.tempfail(f"{count} connections from {key}", TOO_MANY_FROM_YOU)
        table.add(slot, 1)
        self.sessions[ctx.conn.session_id] = slot
        return R.NO_OPINION

    async def on_disconnect(self, ctx: CheckContext, **_: object) -> None:
        slot = self.sessions.pop(ctx.conn.session_id, None)
        if slot is not None:
            self.table.add(slot, -1)


def install(policy: Policy, settings: ConnectionsConfig, table: ConnectionTable | None = None,
            processes: int = 1) -> ConnectionLimiter:
    """Register after the access check (allowed clients are not counted)."""
    limiter = ConnectionLimiter(settings, table=table, processes=processes)
    policy.register(Stage.CONNECT, limiter.check)
    policy.on(Event.DISCONNECT, limiter.on_disconnect)
    return limiter
