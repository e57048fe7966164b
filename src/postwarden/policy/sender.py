"""MAIL FROM checks: submission needs AUTH; users send only as themselves.

Security exposure: without these, a mail client's password would let its
owner send as anyone (RFC 6409 6.1 lets a submission server enforce the
sender).  An authenticated user may use their own address, or an alias that
expands to it; otherwise 553 5.7.1.
"""

from __future__ import annotations

from postwarden import reply as R
from postwarden.policy import CheckContext


async def require_auth_on_submission(ctx: CheckContext) -> R.Verdict:
    """RFC 6409 4.3 / RFC 8314: submission ports take mail only after AUTH."""
    if ctx.listener.auth_required and not ctx.conn.auth_user:
        if not ctx.conn.tls:
            return R.reject(R.TLS_REQUIRED, "MAIL before STARTTLS on submission")
        return R.reject(R.AUTH_REQUIRED, "MAIL before AUTH on submission")
    return R.NO_OPINION


async def bind_sender_to_login(ctx: CheckContext) -> R.Verdict:
    user = ctx.conn.auth_user
    if not user or ctx.path is None or ctx.path.address is None:
        return R.NO_OPINION  # unauthenticated, or the null sender <>
    if ctx.path.routing or ctx.path.source_route:
        return R.reject(R.SENDER_NOT_OWNED, f"{user} sent a routed sender address")
    if await ctx.directory.may_send_as(user, ctx.path.address):
        return R.accept(f"{user} owns {ctx.path.address}")
    return R.reject(R.SENDER_NOT_OWNED, f"{user} may not send as {ctx.path.address}")
