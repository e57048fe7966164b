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
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from postwarden import limits as _limits
from postwarden.delivery.dane import DaneSettings
from postwarden.delivery.mta_sts import MtaStsSettings
from postwarden.delivery.transport import Nexthop, NexthopError, parse_nexthop

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
    # Concurrent delivery workers (messages in delivery at once); 0 makes an
    # accept-only node.
    workers: int = 8
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
           "delivery", "dns", "transports", "tls_policy", "checks", "dkim"}
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
                  dkim=_parse_dkim(_table(data, "dkim")))


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


def _parse_dkim(table: Mapping[str, Any]) -> DkimConfig:
    _unknown(table, {"sign"}, "dkim.")
    return DkimConfig(sign=_bool("dkim.sign", table.get("sign", True)))


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
                               "dane", "dnssec_trust_ad"}, "delivery.")
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
    return cfg


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
