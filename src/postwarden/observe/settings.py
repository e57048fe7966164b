"""The ``[admin]``, ``[alerts]`` and ``[trace]`` sections of the config file.

:mod:`postwarden.config` reads the file; these tables are validated here,
each ``from_table`` raising ``ValueError("KEY: reason")`` that the config
module turns into a :class:`~postwarden.config.ConfigError` naming the key.

* ``[admin]``: the admin HTTP listener (``/metrics``, ``/healthz``,
  ``/readyz``).  A listener of its own, not ``[http]``: ``[http]`` serves
  autoconfiguration and MTA-STS to the public through the domain's web
  server, while metrics say how much mail flows and from where, which is
  nobody's business but the operator's.  Off by default; when on it listens
  on loopback (127.0.0.1:8080) unless told otherwise.
* ``[alerts]``: the rules of :mod:`postwarden.observe.alerts` with their
  thresholds, and where alerts go (the postmaster by mail, a webhook).
* ``[trace]``: how long the history of every message is kept.

Security exposure: none of its own (validation of trusted input).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from postwarden.settings_table import boolean as _bool
from postwarden.settings_table import duration as _duration
from postwarden.settings_table import number as _number
from postwarden.settings_table import string as _str
from postwarden.settings_table import unknown as _unknown

ADMIN_ADDRESS = "127.0.0.1:8080"


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """``[admin]``: the metrics and health listener, and the web admin with
    its HTTP API (:mod:`postwarden.web`) on the same address."""

    enabled: bool = False
    address: str = ADMIN_ADDRESS  # HOST:PORT, parsed by the config module
    # The web admin and the JSON API (admin accounts: postwarden admin add).
    web: bool = True
    # HTTPS on this listener (both or neither; relative to the config file).
    tls_cert: str = ""
    tls_key: str = ""
    # How long a login lasts; failed logins (per name and per client
    # address) before the login is refused for login_window.
    session_lifetime: float = 8 * 3600.0
    login_failures: int = 5
    login_window: float = 900.0
    # Messages a send API key may submit per minute.
    send_rate: int = 60

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> AdminSettings:
        _unknown(table, {"enabled", "address", "web", "tls_cert", "tls_key",
                         "session_lifetime", "login_failures", "login_window", "send_rate"})
        d = cls()
        cert, key = _str(table, "tls_cert"), _str(table, "tls_key")
        if bool(cert) != bool(key):
            raise ValueError("tls_cert: give both tls_cert and tls_key, or neither")
        return cls(enabled=_bool(table, "enabled", False),
                   address=_str(table, "address", ADMIN_ADDRESS),
                   web=_bool(table, "web", True), tls_cert=cert, tls_key=key,
                   session_lifetime=_duration(table, "session_lifetime", d.session_lifetime),
                   login_failures=int(_number(table, "login_failures", d.login_failures,
                                              minimum=1, integer=True)),
                   login_window=_duration(table, "login_window", d.login_window),
                   send_rate=int(_number(table, "send_rate", d.send_rate, minimum=1,
                                         integer=True)))


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """``[alerts]``: rules, thresholds, destinations (observe/alerts.py)."""

    enabled: bool = True
    # How often the rules are evaluated (the main process only).
    interval: float = 30.0
    # Alerts are mailed to this address ("" : postmaster@ the first domain).
    postmaster: str = ""
    mail: bool = True
    # POSTed as JSON, signed with HMAC-SHA256 of webhook_secret ("" : none).
    webhook: str = ""
    webhook_secret: str = ""
    webhook_timeout: float = 10.0
    # An account sending spike_factor times its usual rate per [ratelimit]
    # window (and at least spike_min messages) is suspended from sending
    # when suspend is true (an alert in any case).
    spike_factor: float = 10.0
    spike_min: int = 200
    suspend: bool = True
    # More than this share of the last hour's final delivery results were
    # bounces (and at least bounce_min results).
    bounce_rate: float = 0.2
    bounce_min: int = 20
    # Messages waiting in the queue; the oldest deferred message.
    queue_max: int = 10000
    deferred_age: float = 86400.0
    # A listener's certificate expires within this many days.
    cert_days: float = 14.0
    # Our own public addresses, looked up in these blocklists.
    own_ips: tuple[str, ...] = ()
    blocklists: tuple[str, ...] = ("zen.spamhaus.org", "bl.spamcop.net", "b.barracudacentral.org")
    # Configured filter daemons (clamd, rspamd) that do not answer.
    filters: bool = True

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> AlertSettings:
        _unknown(table, {"enabled", "interval", "postmaster", "mail", "webhook",
                         "webhook_secret", "webhook_timeout", "spike_factor", "spike_min",
                         "suspend", "bounce_rate", "bounce_min", "queue_max",
                         "deferred_age", "cert_days", "own_ips", "blocklists", "filters"})
        d = cls()
        webhook = _str(table, "webhook")
        if webhook and not webhook.startswith(("http://", "https://")):
            raise ValueError("webhook: must be an http:// or https:// URL")
        secret = _str(table, "webhook_secret")
        postmaster = _str(table, "postmaster").strip()
        if postmaster and "@" not in postmaster:
            raise ValueError("postmaster: must be an address")
        rate = _number(table, "bounce_rate", d.bounce_rate)
        if rate > 1:
            raise ValueError("bounce_rate: must be a share between 0 and 1")
        own = table.get("own_ips", [])
        if not isinstance(own, list) or not all(isinstance(ip, str) for ip in own):
            raise ValueError("own_ips: must be a list of IP addresses")
        for ip in own:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(f"own_ips: {ip!r} is not an IP address") from None
        lists = table.get("blocklists", list(d.blocklists))
        if not isinstance(lists, list) or not all(isinstance(z, str) and z for z in lists):
            raise ValueError("blocklists: must be a list of DNS zones")
        return cls(
            enabled=_bool(table, "enabled", d.enabled),
            interval=_duration(table, "interval", d.interval),
            postmaster=postmaster, mail=_bool(table, "mail", d.mail),
            webhook=webhook, webhook_secret=secret,
            webhook_timeout=_duration(table, "webhook_timeout", d.webhook_timeout),
            spike_factor=_number(table, "spike_factor", d.spike_factor, minimum=1),
            spike_min=int(_number(table, "spike_min", d.spike_min, minimum=1, integer=True)),
            suspend=_bool(table, "suspend", d.suspend),
            bounce_rate=rate,
            bounce_min=int(_number(table, "bounce_min", d.bounce_min, minimum=1,
                                   integer=True)),
            queue_max=int(_number(table, "queue_max", d.queue_max, minimum=1, integer=True)),
            deferred_age=_duration(table, "deferred_age", d.deferred_age),
            cert_days=_number(table, "cert_days", d.cert_days),
            own_ips=tuple(own), blocklists=tuple(z.strip(".").lower() for z in lists),
            filters=_bool(table, "filters", d.filters))


@dataclass(frozen=True, slots=True)
class TraceSettings:
    """``[trace]``: the message history (the queue's events table)."""

    # How long a message's history is kept after its last event.
    retention: float = 30 * 86400.0

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> TraceSettings:
        _unknown(table, {"retention"})
        return cls(retention=_duration(table, "retention", 30 * 86400.0))
