"""RCPT TO: who may be a recipient.  No open relay, ever.

A recipient is accepted when it is in a local domain and exists (after
alias expansion), or when the session is authenticated (relaying for our
own users), or when the client is in ``[relaying] networks`` (Postfix's
mynetworks; empty by default).  Everything else is refused: this check is the last word for
recipients and the stage default is *reject*.

Security exposure: the classic relay-tester forms are refused for
unauthenticated clients whatever the domain: the percent hack
``u%ext@host``, bang paths ``ext!u@host``, a quoted ``"u@ext"@host`` (all
flagged as ``routing`` by the parser) and source routes ``@host:u@ext``
(RFC 5321 C says to ignore the route; the mailbox is then remote).
``u@ext@host`` and a trailing dot never parse.
"""

from __future__ import annotations

from postwarden import reply as R
from postwarden.envelope import Address
from postwarden.policy import CheckContext


async def check_recipient(ctx: CheckContext) -> R.Verdict:
    path = ctx.path
    if path is None or path.address is None:
        return R.reject(R.ADDRESS_SYNTAX, "no recipient address")
    address = path.address
    if address.domain == "":
        # RFC 5321 4.5.1: <Postmaster> without a domain must be accepted.
        if not ctx.config.domains:
            return R.reject(R.UNKNOWN_USER, "bare postmaster with no local domain")
        address = Address("postmaster", ctx.config.domains[0])
    authenticated = bool(ctx.conn.auth_user)
    if (path.routing or path.source_route) and not authenticated:
        return R.reject(R.RELAY_DENIED, f"sender-specified routing in <{address}>")
    if await ctx.directory.is_local_domain(address.domain):
        targets = await ctx.directory.resolve(address)
        if not targets:
            return R.reject(R.UNKNOWN_USER, f"no such local recipient <{address}>")
        ctx.targets = targets
        return R.accept(f"local recipient <{address}>")
    if authenticated:
        ctx.targets = [str(address)]
        return R.accept(f"relay for authenticated {ctx.conn.auth_user}")
    if ctx.config.relay.networks and ctx.config.relay.contains(ctx.conn.peer_ip):
        ctx.targets = [str(address)]
        return R.accept(f"relay for {ctx.conn.peer_ip} in [relaying] networks")
    return R.reject(R.RELAY_DENIED, f"relay to <{address}> denied")
