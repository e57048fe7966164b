"""The delivery seam: next hops and the one interface every transport has.

A :class:`Nexthop` says how to reach a destination, in the syntax of the
``[transports]`` table and ``[delivery] smarthost``:

* ``smtp:[host]:port`` - SMTP to exactly that host (brackets: no MX lookup);
* ``smtp:host:port`` / ``smtp:host`` - SMTP to the MX hosts of ``host``;
* ``lmtp:unix:/path`` / ``lmtp:[host]:port`` - LMTP (RFC 2033);
* ``maildir`` - local Maildir delivery;
* ``mx`` - (implicit default for remote domains) SMTP to the MX hosts of the
  recipient's domain.

A :class:`Transport` gets a :class:`DeliveryJob` - one message and the
recipients of it that share one next hop - and answers one
:class:`~postwarden.delivery.result.DeliveryResult` per recipient, in order.
It never raises for a delivery problem: temporary unless proven permanent.

Security exposure: next hops come from the trusted config file only; the
recipient domain used for ``mx`` comes from the envelope and is only ever
used as a DNS name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from postwarden.delivery.result import DeliveryResult
from postwarden.storage.base import QueuedMessage, QueuedRecipient

SMTP_PORT = 25
LMTP_PORT = 24


class NexthopError(ValueError):
    """A next-hop string that cannot be parsed (a config error)."""


@dataclass(frozen=True, slots=True)
class Nexthop:
    """Where to send.  ``kind`` is ``smtp``, ``lmtp``, ``maildir`` or ``mx``.

    For ``smtp``: ``host`` with ``mx_lookup`` (no brackets) or without.
    For ``lmtp``: ``host``/``port`` or ``unix_path``.  For ``mx`` the host is
    the recipient domain, filled in per destination by the router.
    """

    kind: str
    host: str = ""
    port: int = 0
    mx_lookup: bool = False
    unix_path: str = ""

    @property
    def key(self) -> str:
        """Recipients with equal keys can share one connection."""
        if self.kind == "lmtp" and self.unix_path:
            return f"lmtp:unix:{self.unix_path}"
        if self.kind in ("smtp", "lmtp"):
            host = self.host if self.mx_lookup else f"[{self.host}]"
            return f"{self.kind}:{host}:{self.port}"
        if self.kind == "mx":
            return f"mx:{self.host}"
        return self.kind

    def __str__(self) -> str:
        return self.key


def _split_host_port(text: str, default_port: int, what: str) -> tuple[str, int, bool]:
    """``[host]:port``, ``[host]``, ``host:port`` or ``host`` -> (host, port, mx_lookup)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host:
            raise NexthopError(f"{what}: unbalanced brackets in {text!r}")
        if rest and not rest.startswith(":"):
            raise NexthopError(f"{what}: junk after ']' in {text!r}")
        port_s = rest[1:] if rest else ""
        mx_lookup = False
    else:
        if text.count(":") > 1:
            raise NexthopError(f"{what}: write IPv6 addresses in brackets: {text!r}")
        host, _, port_s = text.partition(":")
        mx_lookup = True
        try:
            ipaddress.ip_address(host)
            mx_lookup = False  # an IP address has no MX records
        except ValueError:
            pass
    if not host:
        raise NexthopError(f"{what}: no host in {text!r}")
    port = default_port
    if port_s:
        if not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise NexthopError(f"{what}: bad port in {text!r}")
        port = int(port_s)
    return host.lower().rstrip("."), port, mx_lookup


def parse_nexthop(text: str, what: str = "transport") -> Nexthop:
    """Parse a ``[transports]`` value; raises :class:`NexthopError`."""
    if text == "maildir":
        return Nexthop("maildir")
    if text == "mx":
        return Nexthop("mx")
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("smtp", "lmtp") or not rest:
        raise NexthopError(f"{what}: {text!r} is not smtp:HOST[:PORT], smtp:[HOST]:PORT, "
                           "lmtp:unix:/PATH, lmtp:[HOST]:PORT or maildir")
    if kind == "lmtp" and rest.startswith("unix:"):
        path = rest[5:]
        if not path.startswith("/"):
            raise NexthopError(f"{what}: LMTP socket path must be absolute: {text!r}")
        return Nexthop("lmtp", unix_path=path)
    host, port, mx_lookup = _split_host_port(rest, SMTP_PORT if kind == "smtp" else LMTP_PORT,
                                             what)
    if kind == "lmtp" and mx_lookup:
        mx_lookup = False  # LMTP never uses MX records
    return Nexthop(kind, host, port, mx_lookup)


@dataclass(slots=True)
class DeliveryJob:
    """One message and the recipients of it that go to one next hop."""

    message: QueuedMessage
    recipients: list[QueuedRecipient]
    nexthop: Nexthop
    # A fresh iterator over the full message (prepend + body) per call.
    open_message: Callable[[], AsyncIterator[bytes]]


class Transport(Protocol):
    async def deliver(self, job: DeliveryJob) -> list[DeliveryResult]:
        """One result per ``job.recipients`` entry, in the same order."""
