"""Routing: where a queued recipient goes (local Maildir or a remote domain).

:func:`classify` is the pure decision; :class:`Router` adds the lookups (is
the domain one of ours? what mailboxes does the address expand to?).  The
queue runner picks a transport for the :class:`Route`: Maildir for
``local``; for ``remote`` nothing yet, so remote recipients are deferred
with :data:`REMOTE_NOT_CONFIGURED` and stay queued (never lost, never
bounced) until an outbound transport is plugged in.

Security exposure: addresses are untrusted envelope data; this module only
compares domains and hands mailbox names to the transports, which validate
them as paths (see :mod:`postwarden.delivery.maildir`).
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from postwarden.delivery.result import DeliveryResult
from postwarden.envelope import Address

REMOTE_NOT_CONFIGURED = DeliveryResult.deferred("4.4.1", "remote delivery is not configured")
UNKNOWN_MAILBOX = DeliveryResult.failed("5.1.1", "mailbox unavailable")

IsLocalDomain = Callable[[str], Awaitable[bool] | bool]
Resolve = Callable[[Address], Awaitable[list[str] | None]]


class RouteKind(enum.Enum):
    LOCAL = "local"
    REMOTE = "remote"


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    domain: str  # lower case, no trailing dot
    # LOCAL: the mailboxes (local@domain) to write to; empty means the
    # address does not exist (any more): a permanent failure.
    mailboxes: tuple[str, ...] = ()


def domain_of(address: str) -> str:
    """The domain of ``local@domain``, lower-cased ("" if there is none)."""
    _, sep, domain = address.rpartition("@")
    return domain.lower().rstrip(".") if sep else ""


def classify(address: str, domain_is_local: bool) -> RouteKind:
    """Local if the domain is ours.  An address without a domain (RFC 5321
    4.1.1.3 ``<postmaster>``) can only be local."""
    return RouteKind.LOCAL if domain_is_local or not domain_of(address) else RouteKind.REMOTE


class Router:
    """Looks up the route of one recipient.

    ``is_local_domain`` may be sync or async (``Directory.is_local_domain``).
    ``resolve`` expands aliases (``Directory.resolve``); without it a local
    address is its own mailbox (lower-cased).
    """

    def __init__(self, is_local_domain: IsLocalDomain, resolve: Resolve | None = None) -> None:
        self._is_local_domain = is_local_domain
        self._resolve = resolve

    async def is_local(self, domain: str) -> bool:
        answer = self._is_local_domain(domain)
        if inspect.isawaitable(answer):
            answer = await answer
        return bool(answer)

    async def route(self, address: str) -> Route:
        domain = domain_of(address)
        local = bool(domain) and await self.is_local(domain)
        kind = classify(address, local)
        if kind is RouteKind.REMOTE:
            return Route(kind, domain)
        if self._resolve is None or not domain:
            return Route(kind, domain, (address.lower(),))
        mailboxes = await self._resolve(Address.parse_simple(address))
        return Route(kind, domain, tuple(mailboxes or ()))
