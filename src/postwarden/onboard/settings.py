"""The ``[http]``, ``[clients]`` and ``[relaying]`` sections of the config file.

:mod:`postwarden.config` reads the file; the tables of these sections are
validated here, each ``from_table`` raising ``ValueError("KEY: reason")``
that the config module turns into a :class:`~postwarden.config.ConfigError`.

* ``[http]``: the HTTP listener serving mail-client autoconfiguration and
  the MTA-STS policy.  Off by default; when switched on it listens on
  loopback (127.0.0.1:8081) unless told otherwise, so that the domain's web
  server (which holds the HTTPS certificates of ``autoconfig.DOMAIN``,
  ``autodiscover.DOMAIN`` and ``mta-sts.DOMAIN``) proxies to it.
* ``[clients]``: what mail clients are told: the server name, the public
  submission ports (when a NAT or proxy maps them) and the IMAP server
  (for example Dovecot) when there is one.
* ``[relaying] networks``: networks whose clients may relay without
  authentication (Postfix's ``mynetworks``).  Empty by default; a public range here makes
  an open relay, which ``postwarden doctor`` reports.

Security exposure: none of its own (validation of trusted input).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from postwarden.netaddr import client_address
from postwarden.settings_table import boolean as _bool
from postwarden.settings_table import port as _port
from postwarden.settings_table import unknown as _unknown

HTTP_ADDRESS = "127.0.0.1:8081"
MTA_STS_MODES = ("testing", "enforce", "none")
IMAP_SECURITY = ("ssl", "starttls")
IMAP_PORTS = {"ssl": 993, "starttls": 143}


def _name(table: Mapping[str, Any], key: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key}: must be a host name")
    name = value.strip().rstrip(".").lower()
    if name and not all(part and all(c.isalnum() or c == "-" for c in part)
                        for part in name.split(".")):
        try:
            ipaddress.ip_address(name)
        except ValueError:
            raise ValueError(f"{key}: {value!r} is not a host name") from None
    return name


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """``[http]``: the autoconfiguration / MTA-STS web listener."""

    enabled: bool = False
    address: str = HTTP_ADDRESS  # HOST:PORT, parsed by the config module
    # Serve mail-client autoconfiguration (Thunderbird, Outlook, Apple).
    autoconfig: bool = True
    # The MTA-STS policy (RFC 8461 5): "testing" reports, "enforce" requires
    # verified TLS from senders, "none" withdraws a policy.
    mta_sts_mode: str = "testing"

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> HttpSettings:
        _unknown(table, {"enabled", "address", "autoconfig", "mta_sts_mode"})
        address = table.get("address", HTTP_ADDRESS)
        if not isinstance(address, str):
            raise ValueError("address: must be a string HOST:PORT")
        mode = table.get("mta_sts_mode", "testing")
        if mode not in MTA_STS_MODES:
            raise ValueError(f"mta_sts_mode: must be one of {', '.join(MTA_STS_MODES)}")
        return cls(enabled=_bool(table, "enabled", False), address=address,
                   autoconfig=_bool(table, "autoconfig", True), mta_sts_mode=mode)


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """``[clients]``: what mail clients are told to use."""

    # The name clients connect to; empty: the top-level hostname.
    server: str = ""
    # The ports clients use; 0: the port of the listener of that mode.
    submission_port: int = 0
    submissions_port: int = 0
    # Incoming mail (an IMAP server beside postwarden, e.g. Dovecot);
    # empty: none configured, and no incoming settings are given.
    imap_server: str = ""
    imap_security: str = "ssl"  # ssl (993, RFC 8314) or starttls (143)
    imap_port: int = 0  # 0: 993 for ssl, 143 for starttls

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> ClientSettings:
        _unknown(table, {"server", "submission_port", "submissions_port", "imap_server",
                         "imap_security", "imap_port"})
        security = table.get("imap_security", "ssl")
        if security not in IMAP_SECURITY:
            raise ValueError(f"imap_security: must be one of {', '.join(IMAP_SECURITY)}")
        return cls(server=_name(table, "server"),
                   submission_port=_port(table, "submission_port", 0),
                   submissions_port=_port(table, "submissions_port", 0),
                   imap_server=_name(table, "imap_server"), imap_security=security,
                   imap_port=_port(table, "imap_port", 0))


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """``[relaying]``: clients that may relay without authentication."""

    networks: tuple[str, ...] = ()
    # Public ranges make an open relay: refused unless this says so.
    allow_public: bool = False

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> RelaySettings:
        _unknown(table, {"networks", "allow_public"})
        raw = table.get("networks", [])
        if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
            raise ValueError("networks: must be a list of CIDRs")
        nets = []
        for n in raw:
            try:
                nets.append(str(ipaddress.ip_network(n, strict=False)))
            except ValueError:
                raise ValueError(f"networks: {n!r} is not an IP network") from None
        settings = cls(tuple(nets), _bool(table, "allow_public", False))
        public = settings.public()
        if public and not settings.allow_public:
            raise ValueError(
                f"networks: {', '.join(public)} reaches beyond private and loopback "
                "addresses: anyone there could relay mail through this server (an open "
                "relay); list only your own networks, or set allow_public = true")
        return settings

    def contains(self, ip: str) -> bool:
        addr = client_address(ip)  # IPv4-mapped IPv6 as IPv4
        return addr is not None and any(
            addr in ipaddress.ip_network(n) for n in self.networks)

    def public(self) -> list[str]:
        """The networks that reach beyond private and loopback addresses."""
        out = []
        for n in self.networks:
            net = ipaddress.ip_network(n)
            if not (net.is_private or net.is_loopback):
                out.append(n)
        return out
