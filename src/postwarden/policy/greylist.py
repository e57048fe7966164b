"""Greylisting at RCPT (optional, ``[greylist] enabled = true``).

The first attempt of a triplet (client network, sender, recipient) is
answered 451 4.7.1 "Greylisted, please try again in N seconds"; a real MTA
retries (RFC 5321 4.5.4.1), most spam engines do not.  A retry after
``delay`` seconds passes and allow-lists the client network for
``allow_days`` days, so that its later mail is not delayed again.  The
network is the client's /24 (IPv4) or /64 (IPv6): large senders retry from
another address of the same pool.  State lives in
:mod:`postwarden.storage.sqlite_greylist`.

Not greylisted: other listeners than mx, authenticated sessions, clients
the access lists mark ``trusted``, and recipients this server would refuse
anyway (unknown or not local: the recipient check answers those with a 5xx
and no triplet is stored).  The check runs just before the recipient check.

Security exposure: a store failure is a temporary failure (451) through
the policy runner, never an accept; the sender and recipient are untrusted
text, bound as SQL parameters only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from postwarden import reply as R
from postwarden.config import Config
from postwarden.observe.log import get_logger
from postwarden.policy import CheckContext, Policy, Stage, relay
from postwarden.storage.sqlite_greylist import SqliteGreylist

if TYPE_CHECKING:
    from postwarden.storage.pg_protect import PgGreylist

    # One node's triplets (SQLite) or every node's (PostgreSQL).
    GreylistStore = SqliteGreylist | PgGreylist

log = get_logger("greylist")

IPV4_PREFIX = 24
IPV6_PREFIX = 64


def client_network(ip: str) -> str:
    """The network a client is greylisted as: ``192.0.2.0/24``, ``2001:db8::/64``."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = IPV4_PREFIX if addr.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def greylisted_reply(wait: int) -> R.Reply:
    return R.Reply(451, "4.7.1", f"Greylisted, please try again in {wait} seconds")


class Greylist:
    """The RCPT check; ``clock`` gives wall-clock seconds (injectable)."""

    def __init__(self, store: GreylistStore, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    async def _would_accept(self, ctx: CheckContext) -> bool:
        """The recipient is local and exists (what the recipient check accepts
        for an unauthenticated client)."""
        path = ctx.path
        if path is None or path.address is None or path.routing or path.source_route:
            return False
        address = path.address
        if not address.domain or not await ctx.directory.is_local_domain(address.domain):
            return False
        return bool(await ctx.directory.resolve(address))

    async def check(self, ctx: CheckContext) -> R.Verdict:
        conn = ctx.conn
        if (ctx.listener.mode != "mx" or conn.auth_user or getattr(conn, "trusted", False)
                or not await self._would_accept(ctx)):
            return R.NO_OPINION
        try:
            network = client_network(conn.peer_ip)
        except ValueError:
            return R.NO_OPINION  # not an IP client (no network to key on)
        assert ctx.path is not None and ctx.path.address is not None
        sender = ctx.envelope.sender.key if ctx.envelope and ctx.envelope.sender else ""
        recipient = ctx.path.address.key
        if isinstance(self.store, SqliteGreylist):
            decision = await asyncio.to_thread(self.store.decide, network, sender, recipient,
                                               self.clock())
        else:
            decision = await self.store.decide(network, sender, recipient, self.clock())
        if decision.wait == 0:
            if decision.reason == "passed":
                log.info("greylist_passed", session=conn.session_id, client=conn.peer_ip,
                         network=network)
            return R.NO_OPINION
        log.info("greylisted", session=conn.session_id, client=conn.peer_ip,
                 network=network, sender=sender, rcpt=recipient, wait=decision.wait,
                 why=decision.reason)
        return R.Verdict(R.Outcome.TEMPFAIL, greylisted_reply(decision.wait),
                         f"greylisted ({decision.reason})")


def install(policy: Policy, config: Config, pg_pool: object = None) -> GreylistStore | None:
    """When enabled: open the store (in PostgreSQL over ``pg_pool`` when
    given, an asyncpg pool) and register the check just before the
    recipient check.  Returns the store (the caller closes it)."""
    gl = config.greylist
    if not gl.enabled:
        return None
    store: GreylistStore
    if pg_pool is not None:
        from postwarden.storage.pg_protect import PgGreylist

        store = PgGreylist(pg_pool, delay=gl.delay, expiry=gl.expiry,
                           allow=gl.allow_days * 86400)
    else:
        store = SqliteGreylist(config.db_path, delay=gl.delay, expiry=gl.expiry,
                               allow=gl.allow_days * 86400)
    checks = policy.checks[Stage.RCPT]
    greylist = Greylist(store)
    try:
        at = checks.index(relay.check_recipient)
    except ValueError:
        at = len(checks)
    checks.insert(at, greylist.check)
    return store
