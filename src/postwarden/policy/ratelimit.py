"""Rate limits: messages and recipients per window (``[ratelimit]``).

Who is counted: an authenticated session counts against its account (with
the per-account quota of ``[ratelimit.accounts]`` when there is one, e.g.
for an application that sends a lot); an unauthenticated session against
its client IP.  Clients marked ``trusted`` by the access lists are not
limited by IP.

When: MAIL is refused when the messages counter has reached its limit, RCPT
when the recipients counter plus the recipients already given in this
transaction has; both counters grow on Event.ACCEPTED (a message that was
not accepted costs nothing).  Counters are in the shared database
(:class:`~postwarden.storage.sqlite_protect.SqliteProtectStore`), counted in
fixed windows and read as a sliding window.

Over the limit: 451 4.7.1 (temporary: the client's queue retries later).
The reply only says "rate limit exceeded"; the log line ``rate_limited``
names the limit, its value and the counter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from postwarden import reply as R
from postwarden.config import RateLimitConfig
from postwarden.observe.log import get_logger
from postwarden.policy import CheckContext, Event, Policy, Stage
from postwarden.storage.sqlite_protect import SqliteProtectStore

if TYPE_CHECKING:
    from postwarden.storage.pg_protect import PgProtectStore

    # The bans and counters of one node (SQLite) or of all (PostgreSQL).
    ProtectStore = SqliteProtectStore | PgProtectStore

log = get_logger("ratelimit")

RATE_LIMITED = R.Reply(451, "4.7.1", "Rate limit exceeded, try again later")


class RateLimits:
    """The checks and the counter; :func:`install` registers them."""

    def __init__(self, store: ProtectStore, config: RateLimitConfig) -> None:
        self.store = store
        self.config = config
        # Recipients that passed the RCPT check in the open transaction, by
        # session (not yet counted in the store: that happens on ACCEPTED).
        self.pending: dict[str, int] = {}

    def _subject(self, ctx: CheckContext) -> tuple[str, int, int] | None:
        """(counter key prefix, message limit, recipient limit), or None."""
        c = self.config
        if ctx.conn.auth_user:
            quota = c.account_quota(ctx.conn.auth_user)
            return f"acct:{ctx.conn.auth_user.lower()}", quota.messages, quota.recipients
        if getattr(ctx.conn, "trusted", False):
            return None
        return f"ip:{ctx.conn.peer_ip}", c.ip_messages, c.ip_recipients

    async def check_mail(self, ctx: CheckContext) -> R.Verdict:
        self.pending[ctx.conn.session_id] = 0  # a new transaction
        subject = self._subject(ctx)
        if subject is None or subject[1] <= 0:
            return R.NO_OPINION
        key, limit, _ = subject
        used = await self.store.rate(f"msg:{key}", self.config.window)
        if used + 1 > limit:
            return self._limited(ctx, "messages", key, limit, used)
        return R.NO_OPINION

    async def check_rcpt(self, ctx: CheckContext) -> R.Verdict:
        subject = self._subject(ctx)
        sid = ctx.conn.session_id
        if subject is None or subject[2] <= 0:
            return R.NO_OPINION
        key, _, limit = subject
        pending = self.pending.get(sid, 0)
        used = await self.store.rate(f"rcpt:{key}", self.config.window)
        if used + pending + 1 > limit:
            return self._limited(ctx, "recipients", key, limit, used + pending)
        self.pending[sid] = pending + 1
        return R.NO_OPINION

    def _limited(self, ctx: CheckContext, what: str, key: str, limit: int, used: float
                 ) -> R.Verdict:
        log.info("rate_limited", session=ctx.conn.session_id, client=ctx.conn.peer_ip,
                 limit=what, subject=key, per_seconds=self.config.window, max=limit,
                 count=round(used, 1))
        return R.tempfail(f"{what} rate limit {limit}/{self.config.window}s of {key}",
                          RATE_LIMITED)

    async def on_rcpt_rejected(self, ctx: CheckContext, reply: object = None, **_: object
                               ) -> R.Reply | None:
        # A recipient refused after it passed our check (unknown user...):
        # it is not part of the transaction.
        sid = ctx.conn.session_id
        if reply != RATE_LIMITED and self.pending.get(sid, 0) > 0:
            self.pending[sid] -= 1
        return None

    async def on_accepted(self, ctx: CheckContext, recipients: object = 0, **_: object
                          ) -> R.Reply | None:
        self.pending[ctx.conn.session_id] = 0
        subject = self._subject(ctx)
        if subject is None:
            return None
        key, message_limit, recipient_limit = subject
        # Count only what some limit reads: with the per-IP limits off (the
        # default) mail from other servers costs no database write.
        amounts = []
        if message_limit > 0:
            amounts.append((f"msg:{key}", 1))
        count = recipients if isinstance(recipients, int) else 0
        if recipient_limit > 0 and count > 0:
            amounts.append((f"rcpt:{key}", count))
        if amounts:
            await self.store.add_rates(amounts, self.config.window)
        return None

    async def on_disconnect(self, ctx: CheckContext, **_: object) -> R.Reply | None:
        self.pending.pop(ctx.conn.session_id, None)
        return None


def install(policy: Policy, store: ProtectStore, config: RateLimitConfig
            ) -> RateLimits | None:
    """Register the limits.  The checks go first in their stage: the relay
    check accepts (a final verdict) and later checks would not run."""
    if not config.enabled:
        return None
    limits = RateLimits(store, config)
    policy.checks[Stage.MAIL].insert(0, limits.check_mail)
    policy.checks[Stage.RCPT].insert(0, limits.check_rcpt)
    policy.on(Event.RCPT_REJECTED, limits.on_rcpt_rejected)
    policy.on(Event.ACCEPTED, limits.on_accepted)
    policy.on(Event.DISCONNECT, limits.on_disconnect)
    return limits
