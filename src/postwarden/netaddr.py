"""Client IP addresses as the checks compare them.

One parser for the peer address text that every stage sees (access lists,
connection limits, bans, SPF): IPv4-mapped IPv6 addresses from dual-stack
sockets are the IPv4 clients they stand for (RFC 4291 2.5.5.2, RFC 7208 5),
and the result is cached, because each message asks several times for the
same few addresses.

Security exposure: the text comes from the socket (or a trusted proxy's
PROXY header), never from the SMTP dialogue; anything that is not an IP
address gives ``None``.
"""

from __future__ import annotations

import functools
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def client_address(text: str) -> IPAddress | None:
    """The client's address; IPv4-mapped IPv6 as IPv4.  ``None`` for text
    that is not an address (``[...]`` brackets and a zone are accepted)."""
    try:
        addr = ipaddress.ip_address(text.strip().strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr
