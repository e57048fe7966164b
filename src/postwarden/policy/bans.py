"""Brute-force protection and automatic bans (``[bans]``).

What bans a client IP (each ban is logged as ``ban`` with its reason):

- ``auth_failures`` failed AUTH (bad credentials) from the IP within
  ``auth_window``, for any accounts: an escalating ban (``durations``: 15 min,
  1 h, 24 h, 7 d by default; the next step applies when the previous ban
  ended less than ``memory`` ago).  The session that reached the threshold
  is ended with the ban reply.
- ``account_failures`` failed AUTH for one account from the IP within
  ``auth_window``: that account is locked *for that IP* for the same
  escalating duration; AUTH with the correct password is then refused with
  535 5.7.8 (Stage.AUTH).  Other IPs can still log in to the account.
- ``harvest_rejects`` recipients refused with 5.1.1 (unknown user) within
  ``harvest_window``: directory harvesting, an escalating ban.
- Talking before the greeting (PREGREET) or speaking HTTP to the SMTP port:
  a short fixed ban (``protocol_ban``); the usual sources are spam bots and
  web scanners, never MTAs (RFC 5321 4.3.1).

A banned client is refused at CONNECT with **421 4.7.0** and the connection
is closed.  421 rather than 554: every ban ends on its own, and a legitimate
MTA that was caught (a misconfigured relay, a user with an old password on a
shared NAT address) queues and retries instead of bouncing mail.

Clients marked ``trusted`` by the access lists (``ConnectionInfo.trusted``,
optional) are never banned and never refused here.

Security exposure: counts what untrusted clients do; all state is in the
shared database (:class:`~postwarden.storage.sqlite_protect.SqliteProtectStore`),
so bans apply on every node and survive restarts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from postwarden import reply as R
from postwarden.config import BansConfig
from postwarden.observe.log import get_logger
from postwarden.policy import CheckContext, Event, Policy, Stage
from postwarden.storage.sqlite_protect import Ban, SqliteProtectStore

if TYPE_CHECKING:
    from postwarden.storage.pg_protect import PgProtectStore

    # The bans and counters of one node (SQLite) or of all (PostgreSQL).
    ProtectStore = SqliteProtectStore | PgProtectStore

log = get_logger("bans")

BANNED = R.Reply(421, "4.7.0", "Too many errors from your address; try again later")
ACCOUNT_LOCKED = R.Reply(535, "5.7.8", "Authentication refused: too many failed attempts "
                                       "for this account from your address; try again later")

# Event kinds counted in the store.
AUTH_IP = "auth_ip"
AUTH_ACCOUNT = "auth_account"
HARVEST = "harvest"


def trusted(ctx: CheckContext) -> bool:
    return bool(getattr(ctx.conn, "trusted", False))


def _until(ban: Ban) -> str:
    return "permanent" if ban.until is None else f"{ban.until:.0f}"


class Bans:
    """The checks and event handlers; :func:`install` registers them."""

    def __init__(self, store: ProtectStore, config: BansConfig) -> None:
        self.store = store
        self.config = config

    # -- checks

    async def check_banned(self, ctx: CheckContext) -> R.Verdict:
        """Stage.CONNECT: refuse a banned client before the greeting."""
        if trusted(ctx):
            return R.NO_OPINION
        ban = await self.store.banned(ctx.conn.peer_ip)
        if ban is None:
            return R.NO_OPINION
        return R.tempfail(f"banned ({ban.shown}: {ban.reason}, until {_until(ban)})", BANNED)

    async def check_account_lock(self, ctx: CheckContext) -> R.Verdict:
        """Stage.AUTH: a correct password for an account locked for this IP."""
        if trusted(ctx) or not ctx.username:
            return R.NO_OPINION
        if await self.store.locked(ctx.username, ctx.conn.peer_ip):
            return R.reject(ACCOUNT_LOCKED, f"account {ctx.username} locked for "
                                            f"{ctx.conn.peer_ip}")
        return R.NO_OPINION

    # -- event handlers

    async def on_auth_failed(self, ctx: CheckContext, username: str = "", **_: object
                             ) -> R.Reply | None:
        if trusted(ctx):
            return None
        cfg = self.config
        ip = ctx.conn.peer_ip
        per_ip = await self.store.record(AUTH_IP, ip, cfg.auth_window)
        per_account = 0
        if username:
            per_account = await self.store.record(AUTH_ACCOUNT, f"{username.lower()}|{ip}",
                                                  cfg.auth_window)
        reply: R.Reply | None = None
        seconds = cfg.durations[0]
        if per_ip >= cfg.auth_failures:
            await self.store.clear(AUTH_IP, ip)
            ban = await self._ban(ctx, f"{per_ip} failed AUTH in {cfg.auth_window:.0f}s")
            reply = BANNED
            if ban.until is not None:
                seconds = ban.until - ban.created
        if username and per_account >= cfg.account_failures:
            # As long as the IP's ban when there is one (`ban del IP` lifts both).
            await self.store.lock(username, ip, "failed AUTH", seconds)
            await self.store.clear(AUTH_ACCOUNT, f"{username.lower()}|{ip}")
            log.warning("account_locked", user=username, client=ip,
                        session=ctx.conn.session_id, failures=per_account,
                        seconds=round(seconds))
        return reply

    async def on_rcpt_rejected(self, ctx: CheckContext, reply: object = None, **_: object
                               ) -> R.Reply | None:
        if trusted(ctx) or not isinstance(reply, R.Reply) or reply.enhanced != "5.1.1":
            return None
        cfg = self.config
        ip = ctx.conn.peer_ip
        count = await self.store.record(HARVEST, ip, cfg.harvest_window)
        if count >= cfg.harvest_rejects:
            await self.store.clear(HARVEST, ip)
            await self._ban(ctx, f"directory harvest: {count} unknown recipients in "
                                 f"{cfg.harvest_window:.0f}s")
            return BANNED
        return None

    async def on_pregreet(self, ctx: CheckContext, **_: object) -> R.Reply | None:
        await self._protocol_ban(ctx, "talked before the greeting")
        return None  # the session answers with its own 554 5.5.1

    async def on_http(self, ctx: CheckContext, **_: object) -> R.Reply | None:
        await self._protocol_ban(ctx, "HTTP request on the SMTP port")
        return None

    # -- helpers

    async def _ban(self, ctx: CheckContext, reason: str) -> Ban:
        cfg = self.config
        ban = await self.store.ban(ctx.conn.peer_ip, reason, cfg.durations, cfg.memory)
        log.warning("ban", client=ctx.conn.peer_ip, network=ban.network, reason=reason,
                    step=ban.level, until=_until(ban),
                    seconds=None if ban.until is None else round(ban.until - ban.created),
                    session=ctx.conn.session_id)
        return ban

    async def _protocol_ban(self, ctx: CheckContext, reason: str) -> None:
        if trusted(ctx):
            return
        ban = await self.store.ban_for(ctx.conn.peer_ip, reason, self.config.protocol_ban)
        log.warning("ban", client=ctx.conn.peer_ip, network=ban.network, reason=ban.reason,
                    step=ban.level, until=_until(ban),
                    seconds=None if ban.until is None else round(ban.until - ban.created),
                    session=ctx.conn.session_id)


def install(policy: Policy, store: ProtectStore, config: BansConfig) -> Bans | None:
    """Register the ban checks and counters (nothing when ``[bans] enabled``
    is false; bans written by the CLI are then not enforced either)."""
    if not config.enabled:
        return None
    bans = Bans(store, config)
    policy.register(Stage.CONNECT, bans.check_banned)
    policy.register(Stage.AUTH, bans.check_account_lock)
    policy.on(Event.AUTH_FAILED, bans.on_auth_failed)
    policy.on(Event.RCPT_REJECTED, bans.on_rcpt_rejected)
    policy.on(Event.PREGREET, bans.on_pregreet)
    policy.on(Event.HTTP, bans.on_http)
    return bans
