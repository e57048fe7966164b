"""Outbound connection cache: an SMTP connection stays open for a moment
after a delivery, for the next message to the same server.

As Postfix's connection cache (scache(8), ``smtp_connection_cache_on_demand``
with ``smtp_connection_cache_time_limit = 2s``): when mail for one
destination comes in a burst, each message after the first skips the TCP
connect, the greeting, EHLO, the TLS handshake and AUTH.  A connection is
kept only

* after a transaction that ended cleanly (the client is ``usable``);
* for ``idle_time`` seconds, then closed with QUIT;
* for ``reuse_limit`` transactions, ``lifetime`` seconds after it opened
  (a long-lived connection would pin one server of an MX set);
* keyed by the server (name, address, port) *and* by everything that was
  required of the connection: the TLS policy and context, the HELO name and
  the credentials.  A connection made under a weaker policy is never handed
  to a delivery that needs a stronger one.  Connections authenticated by a
  per-delivery check (DANE, ``peer_check``) are not cached.

A cached connection is checked with RSET (RFC 5321 4.1.1.5) before it is
used; one that the server closed meanwhile is dropped and a new one opened,
so reuse never turns into a deferral.

Security exposure: none beyond the connections themselves; the cache is
bounded (``max_idle``) and holds no message data.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from postwarden.delivery.smtp_client import Peer, SessionOptions, SmtpClient

CacheKey = tuple[Peer, str, str, int, tuple[str, str] | None, bool]

IDLE_TIME = 2.0
REUSE_LIMIT = 100
LIFETIME = 300.0
MAX_IDLE = 100


@dataclass(slots=True)
class _Idle:
    client: SmtpClient
    timer: asyncio.TimerHandle


class ConnectionCache:
    """Idle connections by :func:`key` (see the module docstring)."""

    def __init__(self, idle_time: float = IDLE_TIME, *, reuse_limit: int = REUSE_LIMIT,
                 lifetime: float = LIFETIME, max_idle: int = MAX_IDLE) -> None:
        self.idle_time = idle_time
        self.reuse_limit = reuse_limit
        self.lifetime = lifetime
        self.max_idle = max_idle
        self._idle: dict[CacheKey, list[_Idle]] = {}
        self._count = 0
        self._closing: set[asyncio.Task[None]] = set()
        self.reused = 0  # connections handed out again (for tests and logs)

    @staticmethod
    def key(peer: Peer, options: SessionOptions) -> CacheKey | None:
        if options.peer_check is not None:
            return None
        return (peer, options.helo_name, options.tls, id(options.tls_context),
                options.credentials, options.lmtp)

    async def take(self, key: CacheKey | None) -> SmtpClient | None:
        """A live idle connection for ``key``, or None."""
        while key is not None and (entries := self._idle.get(key)):
            idle = entries.pop()
            if not entries:
                del self._idle[key]
            self._count -= 1
            idle.timer.cancel()
            if await idle.client.reuse():
                self.reused += 1
                return idle.client
            await idle.client.close()
        return None

    def put(self, key: CacheKey | None, client: SmtpClient) -> bool:
        """Keep ``client`` for later; False when it is not kept (the caller
        closes it)."""
        if (key is None or self.idle_time <= 0 or not client.usable
                or client.transactions >= self.reuse_limit
                or time.monotonic() - client.opened_at >= self.lifetime
                or self._count >= self.max_idle):
            return False
        loop = asyncio.get_running_loop()
        idle = _Idle(client, loop.call_later(self.idle_time, self._expire, key, client))
        self._idle.setdefault(key, []).append(idle)
        self._count += 1
        return True

    def _expire(self, key: CacheKey, client: SmtpClient) -> None:
        entries = self._idle.get(key, [])
        for i, idle in enumerate(entries):
            if idle.client is client:
                del entries[i]
                self._count -= 1
                break
        else:
            return
        if not entries:
            self._idle.pop(key, None)
        task = asyncio.get_running_loop().create_task(client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every idle connection (at shutdown)."""
        entries = [idle for group in self._idle.values() for idle in group]
        self._idle.clear()
        self._count = 0
        for idle in entries:
            idle.timer.cancel()
        await asyncio.gather(*(idle.client.close() for idle in entries),
                             return_exceptions=True)
        if self._closing:
            with contextlib.suppress(Exception):
                await asyncio.wait(set(self._closing), timeout=5)
