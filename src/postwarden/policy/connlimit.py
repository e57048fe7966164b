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
import ipaddress
import time
from collections.abc import Callable

from postwarden import reply as R
from postwarden.config import Config, ConnectionsConfig
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
    try:
        addr = ipaddress.ip_address(peer_ip)
    except ValueError:
        return peer_ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = settings.ipv4_prefix if addr.version == 4 else settings.ipv6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class ConnectionLimiter:
    def __init__(self, settings: ConnectionsConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.total = 0
        self.per_key: collections.Counter[str] = collections.Counter()
        self.recent: dict[str, collections.deque[float]] = {}
        self.sessions: dict[str, str] = {}  # session id -> key, while counted
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
        if s.max_new_per_minute and len(window) > s.max_new_per_minute:
            return R.tempfail(f"more than {s.max_new_per_minute} new connections a minute "
                              f"from {key}", TOO_FAST)
        if s.max_total and self.total >= s.max_total:
            return R.tempfail(f"{self.total} connections in total", TOO_MANY_TOTAL)
        if s.max_per_ip and self.per_key[key] >= s.max_per_ip:
            return R.tempfail(f"{self.per_key[key]} connections from {key}", TOO_MANY_FROM_YOU)
        self.total += 1
        self.per_key[key] += 1
        self.sessions[ctx.conn.session_id] = key
        return R.NO_OPINION

    async def on_disconnect(self, ctx: CheckContext, **_: object) -> None:
        key = self.sessions.pop(ctx.conn.session_id, None)
        if key is None:
            return
        self.total -= 1
        self.per_key[key] -= 1
        if self.per_key[key] <= 0:
            del self.per_key[key]


def install(policy: Policy, config: Config) -> ConnectionLimiter:
    """Register after the access check (allowed clients are not counted)."""
    limiter = ConnectionLimiter(config.connections)
    policy.register(Stage.CONNECT, limiter.check)
    policy.on(Event.DISCONNECT, limiter.on_disconnect)
    return limiter
