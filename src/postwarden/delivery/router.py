"""Routing: the next hop of a queued recipient.

:class:`Router` answers a :class:`Route` whose :class:`Nexthop` names the
transport (``Nexthop.kind``) and where it sends.  The rules, first match
wins (as Postfix's ``transport_maps``, then local, then ``relayhost``):

1. ``[transports]``: the recipient domain exactly (``"example.org" =
   "lmtp:unix:/run/dovecot/lmtp"``); then, walking up the domain, a key
   written with a leading dot (``".example.org"``) matches every subdomain
   of ``example.org`` but not ``example.org`` itself.  (``config.py``
   accepts only plain domain keys today, so only exact matches happen.)
   ``mx`` as a value means "this domain's own MX hosts".
2. One of our domains (or an address without a domain, RFC 5321 4.1.1.3
   ``<postmaster>``): ``maildir``, with the mailboxes the address expands
   to (aliases), empty if it does not exist (a permanent failure).
3. ``[delivery] smarthost``: every other domain goes there.
4. Otherwise ``Nexthop("mx", host=domain)``: the domain's MX hosts.

Security exposure: addresses are untrusted envelope data; this module only
compares domains and hands names on.  Transports validate mailbox names as
paths (:mod:`postwarden.delivery.maildir`) and use domains only as DNS names.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from postwarden.config import DeliveryConfig
from postwarden.delivery.transport import Nexthop
from postwarden.envelope import Address

IsLocalDomain = Callable[[str], Awaitable[bool] | bool]
Resolve = Callable[[Address], Awaitable[list[str] | None]]
MAILDIR = Nexthop("maildir")


@dataclass(frozen=True, slots=True)
class Route:
    nexthop: Nexthop
    domain: str  # lower case, no trailing dot
    # maildir: the mailboxes (local@domain) to write to; empty means the
    # address does not exist (any more): a permanent failure.
    mailboxes: tuple[str, ...] = ()

    @property
    def local(self) -> bool:
        return self.nexthop.kind == "maildir"


def domain_of(address: str) -> str:
    """The domain of ``local@domain``, lower-cased ("" if there is none)."""
    _, sep, domain = address.rpartition("@")
    return domain.lower().rstrip(".") if sep else ""


def transport_for(domain: str, transports: Mapping[str, Nexthop]) -> Nexthop | None:
    """The ``[transports]`` entry for ``domain``: exact, then ``.parent`` keys."""
    if not domain:
        return None
    hop = transports.get(domain)
    if hop is not None:
        return hop
    labels = domain.split(".")
    for i in range(1, len(labels)):
        hop = transports.get("." + ".".join(labels[i:]))
        if hop is not None:
            return hop
    return None


class Router:
    """Looks up the route of one recipient.

    ``is_local_domain`` may be sync or async (``Directory.is_local_domain``).
    ``resolve`` expands aliases (``Directory.resolve``); without it a local
    address is its own mailbox (lower-cased).  ``delivery`` supplies
    ``transports`` and ``smarthost``; without it every remote domain goes to
    its MX hosts.
    """

    def __init__(self, is_local_domain: IsLocalDomain, resolve: Resolve | None = None,
                 delivery: DeliveryConfig | None = None) -> None:
        self._is_local_domain = is_local_domain
        self._resolve = resolve
        self.delivery = delivery or DeliveryConfig()

    async def is_local(self, domain: str) -> bool:
        answer = self._is_local_domain(domain)
        if inspect.isawaitable(answer):
            answer = await answer
        return bool(answer)

    async def route(self, address: str) -> Route:
        domain = domain_of(address)
        hop = transport_for(domain, self.delivery.transports)
        if hop is not None:
            if hop.kind == "mx" and not hop.host:
                hop = Nexthop("mx", host=domain)
            if hop.kind == "maildir":
                return Route(hop, domain, await self.mailboxes(address))
            return Route(hop, domain)
        if not domain or await self.is_local(domain):
            return Route(MAILDIR, domain, await self.mailboxes(address))
        if self.delivery.smarthost is not None:
            return Route(self.delivery.smarthost.nexthop, domain)
        return Route(Nexthop("mx", host=domain), domain)

    async def mailboxes(self, address: str) -> tuple[str, ...]:
        """The Maildir mailboxes of ``address``: its alias expansion if the
        domain is ours, else the address itself (a ``maildir`` transport
        for a domain that is not ours); empty if it does not exist."""
        domain = domain_of(address)
        if self._resolve is None or not domain or not await self.is_local(domain):
            return (address.lower(),)
        found = await self._resolve(Address.parse_simple(address))
        return tuple(found or ())
