"""The configuration file: the only module that reads it.

One TOML file (``./postwarden.toml`` by default, ``-c/--config`` or the
``POSTWARDEN_CONFIG`` environment variable) is parsed into typed, frozen
values.  Every problem is reported as a :class:`ConfigError` that names the
key and what is wrong with it; nothing is half-applied.

Relative paths in the file are relative to the directory of the file.

Security exposure: the file is trusted (written by the administrator), but
it names key material; :func:`load` refuses a TLS key that others can read.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from postwarden import limits as _limits
from postwarden.delivery.dane import DaneSettings
from postwarden.delivery.mta_sts import MtaStsSettings
from postwarden.delivery.transport import Nexthop, NexthopError, parse_nexthop
from postwarden.filter import settings as _filters
from postwarden.observe.settings import AdminSettings, AlertSettings, TraceSettings
from postwarden.onboard.settings import ClientSettings, HttpSettings, RelaySettings
from postwarden.storage.settings import StorageSettings

DEFAULT_CONFIG = "postwarden.toml"
CONFIG_ENV = "POSTWARDEN_CONFIG"

# Listener modes (RFC 6409 for submission, RFC 8314 for implicit TLS).
MODE_MX = "mx"
MODE_SUBMISSION = "submission"
MODE_SUBMISSIONS = "submissions"
MODES = (MODE_MX, MODE_SUBMISSION, MODE_SUBMISSIONS)
DEFAULT_PORTS = {MODE_MX: 25, MODE_SUBMISSION: 587, MODE_SUBMISSIONS: 465}
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
LOG_FORMATS = ("json", "logfmt")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Outbound TLS policies (like Postfix's smtp_tls_security_level).
TLS_POLICIES = ("none", "may", "encrypt", "verify")


class ConfigError(Exception):
    """A problem in the configuration, naming the key: ``key: problem``."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    mode: str
    host: str
    port: int
    enabled: bool = True
    # PROXY protocol v1/v2 (HAProxy) from these load balancers only (CIDRs).
    proxy_protocol: bool = False
    trusted_proxies: tuple[str, ...] = ()
    # Seconds to wait before the greeting, to catch clients that talk first
    # (postscreen's pregreet test); 0: only what already arrived is checked.
    pregreet_wait: float = 0.0

    @property
    def implicit_tls(self) -> bool:
        return self.mode == MODE_SUBMISSIONS

    @property
    def auth_required(self) -> bool:
        return self.mode in (MODE_SUBMISSION, MODE_SUBMISSIONS)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path | None
    key: Path | None
    min_version: str = "TLSv1.2"


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "json"
    level: str = "info"
    file: Path | None = None  # None: standard error


@dataclass(frozen=True, slots=True)
class QueueConfig:
    # Seconds between scans of the queue for due deliveries.
    scan_interval: float = 5.0
    # First retry after this many seconds; doubles up to retry_max (with
    # jitter), as Postfix's minimal/maximal_backoff_time.
    retry_min: float = 300.0
    retry_max: float = 3600.0
    # After this long in the queue a recipient bounces.
    lifetime: float = 5 * 24 * 3600.0
    # A delay warning (RFC 3464 action "delayed") after this long; 0: never.
    delay_warning: float = 4 * 3600.0
    # Concurrent delivery workers: messages in delivery at once.  Deliveries
    # wait on disks and peers rather than the CPU (Postfix allows 20 per
    # destination and 100 processes).  0 makes an accept-only node.
    workers: int = 32
    # On SIGTERM, deliveries in flight get this long to finish; the rest stay
    # queued for the next start.
    shutdown_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class ChecksConfig:
    """Sender authentication of inbound mail (the mx listener)."""

    # SPF, DKIM, ARC and DMARC on unauthenticated sessions.
    verify: bool = True
    # SPF "fail" for a domain that publishes no DMARC policy: "reject"
    # (550 5.7.23) or "accept" (recorded in Authentication-Results).
    spf_fail: str = "reject"
    # DMARC p=reject failure: "reject" (550 5.7.1) or "tag" (a spam header).
    dmarc_reject: str = "reject"
    # A DNS temporary error that could decide the outcome: "accept" (with
    # temperror in Authentication-Results) or "tempfail" (451).
    temperror: str = "accept"


@dataclass(frozen=True, slots=True)
class PasswordsConfig:
    """Account password rules (``[passwords]``), see
    :mod:`postwarden.auth.password_policy`."""

    # Passwords set with ``user add/passwd --password-stdin`` must be at
    # least this long (NIST SP 800-63B 3.1.1.2 asks for 8; we ask for more).
    min_length: int = 12
    # Days after which an account password no longer authenticates (535
    # 5.7.8 "password expired"); 0 = passwords never expire.
    max_age_days: int = 0


@dataclass(frozen=True, slots=True)
class DkimConfig:
    # Sign mail from authenticated users and local domains with the active
    # keys of <data_dir>/dkim (postwarden dkim keygen/activate).
    sign: bool = True


@dataclass(frozen=True, slots=True)
class DnsConfig:
    # (address, port) of each resolver; empty: the system's /etc/resolv.conf.
    nameservers: tuple[tuple[str, int], ...] = ()
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class SmarthostConfig:
    nexthop: Nexthop
    username: str = ""
    password: str = field(default="", repr=False)
    tls: str = "encrypt"


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """Outbound delivery: transports, smarthost, TLS policy, timeouts, caps."""

    smarthost: SmarthostConfig | None = None
    # Default outbound TLS policy; per-domain overrides in tls_policy.
    tls: str = "may"
    # Trust anchors for "verify" (PEM); None: the system's store.
    ca_file: Path | None = None
    helo_name: str = ""  # empty: the top-level hostname
    # RFC 5321 4.5.3.2 timeouts (seconds); connect as Postfix's default.
    connect_timeout: float = 30.0
    greeting_timeout: float = 300.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    max_connections: int = 100
    max_per_destination: int = 20
    # Seconds an outbound SMTP connection stays open for the next message to
    # the same server (delivery/connection_cache.py); 0: never reused.
    connection_cache_time: float = 2.0
    # RFC 3030 BDAT, with the envelope, to servers that offer CHUNKING and
    # PIPELINING (delivery/smtp_transaction.py); false: always DATA.
    chunking: bool = True
    # The port of MX hosts (RFC 5321: 25); another one builds test networks.
    mx_port: int = 25
    transports: Mapping[str, Nexthop] = field(default_factory=dict)
    tls_policy: Mapping[str, str] = field(default_factory=dict)
    # RFC 8461 MTA-STS and RFC 7672 DANE: mandatory, verified TLS for the
    # domains that publish them.
    mta_sts: MtaStsSettings = field(default_factory=MtaStsSettings)
    dane: DaneSettings = field(default_factory=DaneSettings)

    def policy_for(self, domain: str) -> str:
        return self.tls_policy.get(domain.lower(), self.tls)


@dataclass(frozen=True, slots=True)
class DnsblZone:
    """One DNS list: ``<reversed client IP>.<zone>`` has A records when the
    client is listed.  ``match``: the return codes that count (empty: any)."""

    zone: str
    weight: int
    match: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DnsblConfig:
    """Postscreen-style DNSBL/DNSWL scoring at connect (``[dnsbl]``), see
    :mod:`postwarden.policy.dnsbl`.  No zones (the default): disabled."""

    zones: tuple[DnsblZone, ...] = ()
    # DNS allow lists (DNSWL): negative weights that offset block lists.
    allow_zones: tuple[DnsblZone, ...] = ()
    # A client whose summed weight reaches this is refused (554 5.7.1).
    threshold: int = 3
    # Seconds for each lookup; a zone that does not answer in time counts 0.
    timeout: float = 3.0
    # Seconds a client's score is kept in memory.
    cache_ttl: float = 300.0


@dataclass(frozen=True, slots=True)
class GreylistConfig:
    """Greylisting at RCPT (``[greylist]``), see :mod:`postwarden.policy.greylist`."""

    enabled: bool = False
    # Seconds before a retry of a new (network, sender, recipient) is accepted.
    delay: float = 300.0
    # Seconds after which an unretried triplet is forgotten.
    expiry: float = 4 * 3600.0
    # Days a client network stays allow-listed after a successful retry.
    allow_days: float = 35.0


@dataclass(frozen=True, slots=True)
class AccessLists:
    """Allow/deny CIDRs and deny patterns (``[access]`` and
    ``[access.listeners.NAME]``).  Patterns are shell globs matched without
    regard to case (``*.example.com``, ``*@spam.test``), or Python regular
    expressions when written ``/regex/`` (searched, case-insensitive)."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    deny_helo: tuple[str, ...] = ()
    deny_sender: tuple[str, ...] = ()
    deny_recipient: tuple[str, ...] = ()


ACCESS_KINDS = ("allow", "deny", "deny_helo", "deny_sender", "deny_recipient")


@dataclass(frozen=True, slots=True)
class AccessConfig:
    lists: AccessLists = field(default_factory=AccessLists)
    listeners: Mapping[str, AccessLists] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConnectionsConfig:
    """``[connections]``: concurrent and new connections (0: no limit)."""

    max_total: int = 1000
    # Postfix's smtpd_client_connection_count_limit default.
    max_per_ip: int = 50
    # Clients are counted per network of this prefix length (32/128: per
    # address; 24/64 group a provider's neighbouring addresses).
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    # Off by default, as Postfix's smtpd_client_connection_rate_limit: big
    # senders open many connections from one address.
    max_new_per_minute: int = 0


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    hostname: str
    data_dir: Path
    domains: tuple[str, ...]
    listeners: tuple[ListenerConfig, ...]
    tls: TlsConfig
    limits: _limits.Limits = field(default_factory=_limits.Limits)
    log: LogConfig = field(default_factory=LogConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    bans: BansConfig = field(default_factory=lambda: BansConfig())
    ratelimit: RateLimitConfig = field(default_factory=lambda: RateLimitConfig())
    access: AccessConfig = field(default_factory=AccessConfig)
    connections: ConnectionsConfig = field(default_factory=ConnectionsConfig)
    dnsbl: DnsblConfig = field(default_factory=DnsblConfig)
    greylist: GreylistConfig = field(default_factory=GreylistConfig)
    passwords: PasswordsConfig = field(default_factory=PasswordsConfig)
    # Processes accepting mail (workers.py); 0: one per CPU.
    processes: int = 0
    filters: _filters.FilterSettings = field(default_factory=_filters.FilterSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    clients: ClientSettings = field(default_factory=ClientSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    trace: TraceSettings = field(default_factory=TraceSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)

    @property
    def dkim_dir(self) -> Path:
        return self.data_dir / "dkim"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "postwarden.db"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    def listener(self, name: str) -> ListenerConfig | None:
        for lst in self.listeners:
            if lst.name == name:
                return lst
        return None


def default_path() -> Path:
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else Path(DEFAULT_CONFIG)


def parse_hostport(key: str, value: object) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[IPv6]:PORT``."""
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "must be a string HOST:PORT")
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(key, f"{value!r} is not [IPv6]:PORT")
        port_s = rest[1:]
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep or not host:
            raise ConfigError(key, f"{value!r} is not HOST:PORT")
        if ":" in host:
            raise ConfigError(key, f"{value!r}: write IPv6 addresses as [ADDR]:PORT")
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(key, f"port {port_s!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port {port} is out of range 0-65535")
    if host not in ("localhost", "*"):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(key, f"{host!r} is not an IP address") from None
    return host, port


def _check_hostname(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "must be a non-empty string")
    name = value.rstrip(".").lower()
    if not name.isascii():
        # RFC 5321 2.3.5: names in SMTP are ASCII (A-labels for IDNs).
        raise ConfigError(key, f"{value!r}: write internationalised names in their "
                               "xn-- (A-label) form")
    labels = name.split(".")
    for label in labels:
        if not label or len(label) > 63 or not all(c.isalnum() or c == "-" for c in label):
            raise ConfigError(key, f"{value!r} is not a valid domain name")
        if label.startswith("-") or label.endswith("-"):
            raise ConfigError(key, f"{value!r} is not a valid domain name")
    return name


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(key, "must be a table")
    return value


def _unknown(table: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    for k in table:
        if k not in allowed:
            raise ConfigError(f"{prefix}{k}", "unknown key")


def _path(base: Path, key: str, value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "must be a path string")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _number(key: str, value: object, *, minimum: float = 0, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, "must be a number")
    if integer and not isinstance(value, int):
        raise ConfigError(key, "must be an integer")
    if value < minimum:
        raise ConfigError(key, f"must be at least {minimum}")
    return value


def _dataclass_section(cls: Any, table: Mapping[str, Any], prefix: str) -> Any:
    values: dict[str, Any] = {}
    names = {f.name: f for f in fields(cls)}
    for k, v in table.items():
        if k not in names:
            raise ConfigError(f"{prefix}{k}", "unknown key")
        default = names[k].default
        values[k] = _number(f"{prefix}{k}", v, integer=isinstance(default, int), minimum=0)
    return cls(**values)


def parse(data: Mapping[str, Any], path: Path) -> Config:
    """Validate the parsed TOML ``data`` of the file at ``path``."""
    base = path.resolve().parent
    top = {"hostname", "data_dir", "domains", "listeners", "tls", "limits", "log", "queue",
           "delivery", "dns", "transports", "tls_policy", "checks", "dkim", "access", "connections",
           "dnsbl", "greylist",
           "passwords", "bans", "ratelimit", "processes", "filters",
           "http", "clients", "relaying", "admin", "alerts", "trace", "storage"}
    _unknown(data, top, "")

    if "hostname" not in data:
        raise ConfigError("hostname", "is required")
    hostname = _check_hostname("hostname", data["hostname"])

    data_dir = _path(base, "data_dir", data.get("data_dir", "data"))

    raw_domains = data.get("domains", [])
    if not isinstance(raw_domains, list) or not all(isinstance(d, str) for d in raw_domains):
        raise ConfigError("domains", "must be a list of domain names")
    domains = tuple(_check_hostname("domains", d) for d in raw_domains)

    listeners_t = _table(data, "listeners")
    listeners: list[ListenerConfig] = []
    for name, table in listeners_t.items():
        prefix = f"listeners.{name}."
        if not isinstance(table, dict):
            raise ConfigError(f"listeners.{name}", "must be a table")
        _unknown(table, {"address", "mode", "enabled", "proxy_protocol", "trusted_proxies",
                         "pregreet_wait"}, prefix)
        mode = table.get("mode", name)
        if mode not in MODES:
            raise ConfigError(prefix + "mode", f"must be one of {', '.join(MODES)}")
        if "address" not in table:
            raise ConfigError(prefix + "address", "is required (HOST:PORT)")
        host, port = parse_hostport(prefix + "address", table["address"])
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(prefix + "enabled", "must be true or false")
        proxy = _bool(prefix + "proxy_protocol", table.get("proxy_protocol", False))
        trusted_raw = table.get("trusted_proxies", [])
        if not isinstance(trusted_raw, list) or not all(isinstance(t, str) for t in trusted_raw):
            raise ConfigError(prefix + "trusted_proxies", "must be a list of addresses/CIDRs")
        for t in trusted_raw:
            try:
                ipaddress.ip_network(t, strict=False)
            except ValueError:
                raise ConfigError(prefix + "trusted_proxies", f"{t!r} is not an IP network"
                                  ) from None
        if proxy and mode == MODE_SUBMISSIONS:
            raise ConfigError(prefix + "proxy_protocol",
                              "is not supported with implicit TLS (the TLS handshake comes "
                              "first); terminate TLS at the load balancer or use port 587")
        if proxy and not trusted_raw:
            raise ConfigError(prefix + "trusted_proxies",
                              "is required with proxy_protocol (the load balancers' addresses)")
        wait = float(_number(prefix + "pregreet_wait", table.get("pregreet_wait", 0.0)))
        listeners.append(ListenerConfig(name, mode, host, port, enabled, proxy,
                                        tuple(trusted_raw), wait))

    tls_t = _table(data, "tls")
    _unknown(tls_t, {"cert", "key", "min_version"}, "tls.")
    cert = _path(base, "tls.cert", tls_t["cert"]) if "cert" in tls_t else None
    key = _path(base, "tls.key", tls_t["key"]) if "key" in tls_t else None
    if (cert is None) != (key is None):
        raise ConfigError("tls", "cert and key must be given together")
    min_version = tls_t.get("min_version", "TLSv1.2")
    if min_version not in TLS_VERSIONS:
        raise ConfigError("tls.min_version", f"must be one of {', '.join(TLS_VERSIONS)}")
    tls = TlsConfig(cert, key, min_version)
    for lst in listeners:
        if lst.enabled and lst.mode != MODE_MX and cert is None:
            raise ConfigError(
                f"listeners.{lst.name}",
                "needs TLS ([tls] cert and key): submission requires encryption")

    limits = _dataclass_section(_limits.Limits, _table(data, "limits"), "limits.")
    queue = _dataclass_section(QueueConfig, _table(data, "queue"), "queue.")

    log_t = _table(data, "log")
    _unknown(log_t, {"format", "level", "file"}, "log.")
    fmt = log_t.get("format", "json")
    if fmt not in LOG_FORMATS:
        raise ConfigError("log.format", f"must be one of {', '.join(LOG_FORMATS)}")
    level = log_t.get("level", "info")
    if level not in LOG_LEVELS:
        raise ConfigError("log.level", f"must be one of {', '.join(LOG_LEVELS)}")
    log_file = _path(base, "log.file", log_t["file"]) if "file" in log_t else None

    return Config(path=path, hostname=hostname, data_dir=data_dir, domains=domains,
                  listeners=tuple(listeners), tls=tls, limits=limits,
                  log=LogConfig(fmt, level, log_file), queue=queue,
                  dns=_parse_dns(_table(data, "dns")),
                  delivery=_parse_delivery(data, base),
                  checks=_parse_checks(_table(data, "checks")),
                  dnsbl=_parse_dnsbl(_table(data, "dnsbl")),
                  greylist=_parse_greylist(_table(data, "greylist")),
                  dkim=_parse_dkim(_table(data, "dkim")),
                  bans=_parse_bans(_table(data, "bans")),
                  ratelimit=_parse_ratelimit(_table(data, "ratelimit")),
                  access=parse_access(_table(data, "access"),
                                      {lst.name for lst in listeners}),
                  connections=_parse_connections(_table(data, "connections")),
                  passwords=_parse_passwords(_table(data, "passwords")),
                  processes=_parse_processes(data.get("processes", "auto")),
                  filters=_parse_filters(_table(data, "filters")),
                  **_parse_onboard(data))


def _parse_processes(value: object) -> int:
    """``processes``: "auto" (0: one per CPU) or a count (see workers.py)."""
    if value == "auto":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ConfigError("processes", 'must be "auto" or a whole number from 1 to 64')
    return value


def _parse_filters(table: Mapping[str, Any]) -> _filters.FilterSettings:
    try:
        return _filters.from_table(table)
    except ValueError as exc:
        key, _, reason = str(exc).partition(": ")
        raise ConfigError(key, reason) from None


def _parse_onboard(data: Mapping[str, Any]) -> dict[str, Any]:
    """``[http]``, ``[clients]`` and ``[relaying]`` (postwarden.onboard.settings)."""
    out: dict[str, Any] = {}
    for section, name, cls in (("http", "http", HttpSettings),
                               ("clients", "clients", ClientSettings),
                               ("relaying", "relay", RelaySettings),
                               ("admin", "admin", AdminSettings),
                               ("alerts", "alerts", AlertSettings),
                               ("trace", "trace", TraceSettings),
                               ("storage", "storage", StorageSettings)):
        try:
            out[name] = cls.from_table(_table(data, section))
        except ValueError as exc:
            key, _, reason = str(exc).partition(": ")
            raise ConfigError(f"{section}.{key}", reason) from None
    parse_hostport("http.address", out["http"].address)
    parse_hostport("admin.address", out["admin"].address)
    return out


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(key, f"must be one of {', '.join(allowed)}")
    return str(value)


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, "must be true or false")
    return value


def _parse_checks(table: Mapping[str, Any]) -> ChecksConfig:
    _unknown(table, {"verify", "spf_fail", "dmarc_reject", "temperror"}, "checks.")
    d = ChecksConfig()
    return ChecksConfig(
        verify=_bool("checks.verify", table.get("verify", d.verify)),
        spf_fail=_choice("checks.spf_fail", table.get("spf_fail", d.spf_fail),
                         ("reject", "accept")),
        dmarc_reject=_choice("checks.dmarc_reject", table.get("dmarc_reject", d.dmarc_reject),
                             ("reject", "tag")),
        temperror=_choice("checks.temperror", table.get("temperror", d.temperror),
                          ("accept", "tempfail")))


def _dnsbl_zones(key: str, value: object, *, allow: bool) -> tuple[DnsblZone, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, 'must be a list of { zone = "...", weight = N }')
    zones = []
    for i, item in enumerate(value):
        k = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(k, 'must be a table { zone = "...", weight = N }')
        _unknown(item, {"zone", "weight", "match"}, k + ".")
        if "zone" not in item:
            raise ConfigError(k + ".zone", "is required")
        zone = _check_hostname(k + ".zone", item["zone"])
        weight = item.get("weight", -1 if allow else 1)
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ConfigError(k + ".weight", "must be an integer")
        if allow and weight >= 0:
            raise ConfigError(k + ".weight", "must be negative for an allow list")
        raw = item.get("match", [])
        raw = [raw] if isinstance(raw, str) else raw
        if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
            raise ConfigError(k + ".match", "must be an IPv4 address or a list of them")
        try:
            match = tuple(str(ipaddress.IPv4Address(m)) for m in raw)
        except ValueError:
            raise ConfigError(k + ".match", "must hold IPv4 addresses such as 127.0.0.2"
                              ) from None
        zones.append(DnsblZone(zone, weight, match))
    return tuple(zones)


def _parse_dnsbl(table: Mapping[str, Any]) -> DnsblConfig:
    _unknown(table, {"zones", "allow_zones", "threshold", "timeout", "cache_ttl"}, "dnsbl.")
    d = DnsblConfig()
    return DnsblConfig(
        zones=_dnsbl_zones("dnsbl.zones", table.get("zones", []), allow=False),
        allow_zones=_dnsbl_zones("dnsbl.allow_zones", table.get("allow_zones", []),
                                 allow=True),
        threshold=_number("dnsbl.threshold", table.get("threshold", d.threshold),
                          minimum=1, integer=True),
        timeout=float(_number("dnsbl.timeout", table.get("timeout", d.timeout),
                              minimum=0.1)),
        cache_ttl=float(_number("dnsbl.cache_ttl", table.get("cache_ttl", d.cache_ttl))))


def _parse_greylist(table: Mapping[str, Any]) -> GreylistConfig:
    _unknown(table, {"enabled", "delay", "expiry", "allow_days"}, "greylist.")
    d = GreylistConfig()
    delay = float(_number("greylist.delay", table.get("delay", d.delay)))
    expiry = float(_number("greylist.expiry", table.get("expiry", d.expiry)))
    if expiry <= delay:
        raise ConfigError("greylist.expiry", "must be longer than greylist.delay")
    return GreylistConfig(
        enabled=_bool("greylist.enabled", table.get("enabled", d.enabled)),
        delay=delay, expiry=expiry,
        allow_days=float(_number("greylist.allow_days",
                                 table.get("allow_days", d.allow_days))))


def check_cidr(key: str, value: object) -> str:
    """A network (or single address) in canonical form."""
    if not isinstance(value, str):
        raise ConfigError(key, "must be a list of addresses/CIDRs")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ConfigError(key, f"{value!r} is not an IP network") from None


def check_pattern(key: str, value: object) -> str:
    """A glob, or a ``/regex/`` that compiles."""
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "must be a list of non-empty patterns")
    if len(value) >= 2 and value.startswith("/") and value.endswith("/"):
        try:
            re.compile(value[1:-1])
        except re.error as exc:
            raise ConfigError(key, f"{value!r}: bad regular expression: {exc}") from None
    return value


def _access_lists(table: Mapping[str, Any], prefix: str, *, nested: bool) -> AccessLists:
    _unknown(table, set(ACCESS_KINDS) | ({"listeners"} if nested else set()), prefix)
    values: dict[str, tuple[str, ...]] = {}
    for kind in ACCESS_KINDS:
        raw = table.get(kind, [])
        if not isinstance(raw, list):
            raise ConfigError(prefix + kind, "must be a list")
        check = check_cidr if kind in ("allow", "deny") else check_pattern
        values[kind] = tuple(check(prefix + kind, v) for v in raw)
    return AccessLists(**values)


def parse_access(table: Mapping[str, Any], listener_names: set[str]) -> AccessConfig:
    lists = _access_lists(table, "access.", nested=True)
    per: dict[str, AccessLists] = {}
    for name, sub in _table(table, "listeners").items():
        if name not in listener_names:
            raise ConfigError(f"access.listeners.{name}", "no such listener")
        if not isinstance(sub, dict):
            raise ConfigError(f"access.listeners.{name}", "must be a table")
        per[name] = _access_lists(sub, f"access.listeners.{name}.", nested=False)
    return AccessConfig(lists, per)


def _parse_connections(table: Mapping[str, Any]) -> ConnectionsConfig:
    d = ConnectionsConfig()
    _unknown(table, {f.name for f in fields(ConnectionsConfig)}, "connections.")
    values = {f.name: _number(f"connections.{f.name}", table.get(f.name, getattr(d, f.name)),
                              integer=True) for f in fields(ConnectionsConfig)}
    if values["ipv4_prefix"] > 32:
        raise ConfigError("connections.ipv4_prefix", "must be 0-32")
    if values["ipv6_prefix"] > 128:
        raise ConfigError("connections.ipv6_prefix", "must be 0-128")
    return ConnectionsConfig(**values)


def _parse_dkim(table: Mapping[str, Any]) -> DkimConfig:
    _unknown(table, {"sign"}, "dkim.")
    return DkimConfig(sign=_bool("dkim.sign", table.get("sign", True)))


def _parse_passwords(table: Mapping[str, Any]) -> PasswordsConfig:
    _unknown(table, {"min_length", "max_age_days"}, "passwords.")
    d = PasswordsConfig()
    min_length = _number("passwords.min_length", table.get("min_length", d.min_length),
                         minimum=1, integer=True)
    if min_length > 1024:
        raise ConfigError("passwords.min_length", "must be at most 1024")
    return PasswordsConfig(
        min_length=min_length,
        max_age_days=_number("passwords.max_age_days",
                             table.get("max_age_days", d.max_age_days), integer=True))


def _parse_dns(table: Mapping[str, Any]) -> DnsConfig:
    _unknown(table, {"nameservers", "timeout"}, "dns.")
    raw = table.get("nameservers", [])
    if not isinstance(raw, list):
        raise ConfigError("dns.nameservers", "must be a list of \"IP\" or \"IP:PORT\"")
    servers = []
    for item in raw:
        if not isinstance(item, str):
            raise ConfigError("dns.nameservers", "must be a list of strings")
        try:
            servers.append((str(ipaddress.ip_address(item)), 53))  # a bare address
        except ValueError:
            servers.append(parse_hostport("dns.nameservers", item))
    timeout = _number("dns.timeout", table.get("timeout", 5.0), minimum=0.1)
    return DnsConfig(tuple(servers), float(timeout))


def _tls_policy(key: str, value: object) -> str:
    if value not in TLS_POLICIES:
        raise ConfigError(key, f"must be one of {', '.join(TLS_POLICIES)}")
    return str(value)


def _nexthop(key: str, value: object) -> Nexthop:
    if not isinstance(value, str):
        raise ConfigError(key, "must be a string such as \"smtp:[host]:port\"")
    try:
        return parse_nexthop(value, key)
    except NexthopError as exc:
        raise ConfigError(key, str(exc).split(": ", 1)[-1]) from None


def _parse_delivery(data: Mapping[str, Any], base: Path) -> DeliveryConfig:
    table = _table(data, "delivery")
    numbers = {"connect_timeout", "greeting_timeout", "command_timeout", "data_timeout",
               "max_connections", "max_per_destination", "mx_port"}
    _unknown(table, numbers | {"smarthost", "smarthost_username", "smarthost_password",
                               "smarthost_password_file", "smarthost_tls", "tls", "ca_file",
                               "helo_name", "mta_sts", "mta_sts_timeout", "mta_sts_cache",
                               "dane", "dnssec_trust_ad", "connection_cache_time",
                               "chunking"},
             "delivery.")
    values: dict[str, Any] = {}
    try:
        values["mta_sts"] = MtaStsSettings.from_table(table)
        values["dane"] = DaneSettings.from_table(table)
    except ValueError as exc:
        key, _, reason = str(exc).partition(": ")
        raise ConfigError(f"delivery.{key}", reason) from None
    for k in numbers & set(table):
        integer = k.startswith("max_") or k == "mx_port"
        values[k] = _number(f"delivery.{k}", table[k], minimum=1 if integer else 0.1,
                            integer=integer)
    if "connection_cache_time" in table:
        values["connection_cache_time"] = _number("delivery.connection_cache_time",
                                                  table["connection_cache_time"])
    if "chunking" in table:
        values["chunking"] = _bool("delivery.chunking", table["chunking"])
    smarthost = None
    if "smarthost" in table:
        hop = _nexthop("delivery.smarthost", table["smarthost"])
        if hop.kind != "smtp":
            raise ConfigError("delivery.smarthost", "must be smtp:HOST[:PORT] or smtp:[HOST]:PORT")
        user = table.get("smarthost_username", "")
        password = table.get("smarthost_password", "")
        if "smarthost_password_file" in table:
            pw_path = _path(base, "delivery.smarthost_password_file",
                            table["smarthost_password_file"])
            try:
                password = pw_path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError("delivery.smarthost_password_file",
                                  f"cannot read {pw_path}: {exc.strerror}") from None
        if not isinstance(user, str) or not isinstance(password, str):
            raise ConfigError("delivery.smarthost_username", "must be a string")
        if bool(user) != bool(password):
            raise ConfigError("delivery.smarthost_username",
                              "username and password must be given together")
        tls_default = "encrypt" if user else "may"
        smarthost_tls = _tls_policy("delivery.smarthost_tls",
                                    table.get("smarthost_tls", tls_default))
        if user and smarthost_tls in ("none", "may"):
            raise ConfigError("delivery.smarthost_tls",
                              "must be encrypt or verify when AUTH credentials are set")
        smarthost = SmarthostConfig(hop, user, password, smarthost_tls)
    for k in ("helo_name",):
        if k in table:
            values[k] = _check_hostname(f"delivery.{k}", table[k])
    if "ca_file" in table:
        values["ca_file"] = _path(base, "delivery.ca_file", table["ca_file"])
    tls = _tls_policy("delivery.tls", table.get("tls", "may"))

    transports: dict[str, Nexthop] = {}
    for domain, value in _table(data, "transports").items():
        key = f"transports.{domain}"
        # ".example.org" matches every subdomain of example.org (as Postfix).
        dot = "." if domain.startswith(".") else ""
        transports[dot + _check_hostname(key, domain[len(dot):])] = _nexthop(key, value)
    policies: dict[str, str] = {}
    for domain, value in _table(data, "tls_policy").items():
        key = f"tls_policy.{domain}"
        policies[_check_hostname(key, domain)] = _tls_policy(key, value)
    return DeliveryConfig(smarthost=smarthost, tls=tls, transports=transports,
                          tls_policy=policies, **values)


def load(path: Path | None = None, *, check_files: bool = True) -> Config:
    """Read and validate the config file; raise :class:`ConfigError`."""
    path = path or default_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("", f"config file {path} not found (run 'postwarden init')") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from None
    cfg = parse(data, path)
    if check_files:
        check_tls_files(cfg)
        check_shared_spool(cfg)
    return cfg


def check_shared_spool(cfg: Config) -> None:
    """``[storage] shared_spool_dir`` is a directory this user can write
    (the shared file system is mounted)."""
    spool = cfg.storage.shared_spool_dir
    if not spool:
        return
    p = Path(spool)
    if not p.exists():
        raise ConfigError("storage.shared_spool_dir",
                          f"{p} does not exist (is the shared file system mounted?)")
    if not p.is_dir():
        raise ConfigError("storage.shared_spool_dir", f"{p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError("storage.shared_spool_dir", f"{p} is not writable by this user")


def check_tls_files(cfg: Config) -> None:
    """The certificate and key exist, are readable, and the key is private."""
    if cfg.tls.cert is None or cfg.tls.key is None:
        return
    for key, p in (("tls.cert", cfg.tls.cert), ("tls.key", cfg.tls.key)):
        if not p.is_file():
            raise ConfigError(key, f"file {p} does not exist")
        if not os.access(p, os.R_OK):
            raise ConfigError(key, f"file {p} is not readable")
    mode = cfg.tls.key.stat().st_mode
    if mode & 0o077:
        raise ConfigError("tls.key", f"file {cfg.tls.key} is readable by others (chmod 600 it)")


# --- [bans] and [ratelimit] (see postwarden.policy.bans / .ratelimit) -------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(key: str, value: object) -> float:
    """Seconds, as a number or a string like ``"90s"``, ``"15m"``, ``"1h"``,
    ``"7d"``; must be positive."""
    if isinstance(value, str):
        text = value.strip().lower()
        unit = _UNITS.get(text[-1:]) if text else None
        number = text[:-1] if unit else text
        try:
            seconds = float(number) * (unit or 1)
        except ValueError:
            raise ConfigError(key, f"{value!r} is not a duration (e.g. 900, \"15m\", "
                                   "\"1h\", \"7d\")") from None
    else:
        seconds = float(_number(key, value))
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ConfigError(key, "must be a positive duration")
    return seconds


@dataclass(frozen=True, slots=True)
class BansConfig:
    """Brute-force protection and automatic bans (``[bans]``)."""

    enabled: bool = True
    # Failed AUTH from one IP (any accounts) within auth_window: ban the IP.
    auth_failures: int = 5
    # Failed AUTH for one account from one IP within auth_window: lock that
    # account for that IP (AUTH refused with 535 5.7.8) for the ban duration.
    account_failures: int = 5
    auth_window: float = 900.0
    # Escalating ban durations: the first ban, the second within `memory`, ...
    durations: tuple[float, ...] = (900.0, 3600.0, 86400.0, 7 * 86400.0)
    # A ban that ended less than this long ago makes the next one longer.
    memory: float = 7 * 86400.0
    # Directory harvest: this many 5.1.1 rejects within harvest_window: ban.
    harvest_rejects: int = 10
    harvest_window: float = 600.0
    # Talking before the greeting or speaking HTTP: a short fixed ban.
    protocol_ban: float = 300.0


@dataclass(frozen=True, slots=True)
class RateQuota:
    messages: int  # 0: unlimited
    recipients: int


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Messages and recipients per window (``[ratelimit]``); 0 = unlimited.
    Authenticated sessions count against their account, others against
    their client IP."""

    enabled: bool = True
    window: int = 3600
    account_messages: int = 1000
    account_recipients: int = 5000
    # Unauthenticated clients (other mail servers): off by default, since
    # one address of a large provider legitimately sends a lot.
    ip_messages: int = 0
    ip_recipients: int = 0
    # Per-account quotas (e.g. applications), lower-cased address -> quota.
    accounts: Mapping[str, RateQuota] = field(default_factory=dict)

    def account_quota(self, account: str) -> RateQuota:
        return self.accounts.get(account.lower(),
                                 RateQuota(self.account_messages, self.account_recipients))


def _parse_bans(table: Mapping[str, Any]) -> BansConfig:
    p = "bans."
    _unknown(table, {"enabled", "auth_failures", "account_failures", "auth_window",
                     "durations", "memory", "harvest_rejects", "harvest_window",
                     "protocol_ban"}, p)
    d = BansConfig()
    durations = d.durations
    if "durations" in table:
        raw = table["durations"]
        if not isinstance(raw, list) or not raw:
            raise ConfigError(p + "durations", "must be a non-empty list of durations")
        durations = tuple(parse_duration(f"{p}durations", v) for v in raw)

    def count(key: str, default: int) -> int:
        return int(_number(p + key, table.get(key, default), minimum=1, integer=True))

    def seconds(key: str, default: float) -> float:
        return parse_duration(p + key, table[key]) if key in table else default

    return BansConfig(
        enabled=_bool(p + "enabled", table.get("enabled", d.enabled)),
        auth_failures=count("auth_failures", d.auth_failures),
        account_failures=count("account_failures", d.account_failures),
        auth_window=seconds("auth_window", d.auth_window),
        durations=durations, memory=seconds("memory", d.memory),
        harvest_rejects=count("harvest_rejects", d.harvest_rejects),
        harvest_window=seconds("harvest_window", d.harvest_window),
        protocol_ban=seconds("protocol_ban", d.protocol_ban))


def _parse_ratelimit(table: Mapping[str, Any]) -> RateLimitConfig:
    p = "ratelimit."
    numbers = {"account_messages", "account_recipients", "ip_messages", "ip_recipients"}
    _unknown(table, numbers | {"enabled", "window", "accounts"}, p)
    d = RateLimitConfig()
    values = {k: int(_number(p + k, table.get(k, getattr(d, k)), integer=True))
              for k in numbers}
    window = int(parse_duration(p + "window", table.get("window", d.window)))
    if window < 1:
        raise ConfigError(p + "window", "must be at least 1 second")
    accounts: dict[str, RateQuota] = {}
    accounts_t = table.get("accounts", {})
    if not isinstance(accounts_t, dict):
        raise ConfigError(p + "accounts", "must be a table of address = { messages, "
                                          "recipients }")
    for address, quota in accounts_t.items():
        key = f"{p}accounts.{address}"
        if "@" not in address:
            raise ConfigError(key, "must be an account address")
        if not isinstance(quota, dict):
            raise ConfigError(key, "must be a table { messages = N, recipients = N }")
        _unknown(quota, {"messages", "recipients"}, key + ".")
        accounts[address.lower()] = RateQuota(
            int(_number(key + ".messages", quota.get("messages", values["account_messages"]),
                        integer=True)),
            int(_number(key + ".recipients",
                        quota.get("recipients", values["account_recipients"]), integer=True)))
    return RateLimitConfig(enabled=_bool(p + "enabled", table.get("enabled", d.enabled)),
                           window=window, accounts=accounts, **values)
