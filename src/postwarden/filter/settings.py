"""``[filters]``: which content filters run, in which direction, and how.

Example (the defaults, plus clamd and rspamd)::

    [filters]
    inbound = ["rules", "attachments", "clamav", "rspamd"]   # mx traffic
    outbound = ["attachments", "dlp"]     # authenticated submission
    timeout = "60s"                       # per external filter
    fail_open = ["rspamd"]                # down: deliver with a warning header
    large_message = 10485760              # above this size ...
    skip_large = ["rspamd"]               # ... these filters are skipped
    quarantine_retention = "30d"
    postmaster = "postmaster@example.org" # outbound review notices

    [filters.rules]         # thresholds (0: off) and custom rules
    tag = 5.0
    quarantine = 0
    reject = 15.0
    dnsbl_points = 2.0
    scores = { MISSING_DATE = 0.5 }
    [[filters.rules.custom]]
    name = "LOTTERY"
    where = "Subject"       # a header field, "headers" or "body"
    pattern = "(?i)lottery|jackpot"
    score = 4.0

    [filters.attachments]
    extensions = ["exe", "js", ...]     # replaces the default list
    kinds = ["executable", "script", "office-macro"]
    encrypted = "quarantine"            # allow | quarantine | reject
    action = "reject"                   # reject | quarantine

    [filters.dlp]
    detectors = ["card", "cn-id", "iban", "private-key"]
    action = "quarantine"               # quarantine | reject | notify
    [[filters.dlp.patterns]]
    name = "project-x"
    pattern = "(?i)project x"

    [filters.clamav]
    address = "unix:/run/clamav/clamd.ctl"     # or "127.0.0.1:3310"
    [filters.rspamd]
    url = "http://127.0.0.1:11333"

Problems raise ``ValueError("key: problem")``; :mod:`postwarden.config`
reports them as config errors naming the key.

Security exposure: none (trusted administrator input); regular expressions
are compiled here so that a bad one stops the server from starting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from postwarden.filter import attachments, dlp
from postwarden.filter.attachments import AttachmentSettings
from postwarden.filter.clamav import ClamavSettings
from postwarden.filter.dlp import DlpPattern, DlpSettings
from postwarden.filter.rspamd import RspamdSettings
from postwarden.filter.rules import DEFAULT_SCORES, CustomRule, RulesSettings

FILTERS = ("rules", "attachments", "dlp", "clamav", "rspamd")
DEFAULT_TIMEOUT = 60.0
LARGE_MESSAGE = 10 * 1024 * 1024
RETENTION = 30 * 86400.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True, slots=True)
class FilterSettings:
    inbound: tuple[str, ...] = ("rules", "attachments")
    outbound: tuple[str, ...] = ("attachments", "dlp")
    timeout: float = DEFAULT_TIMEOUT
    fail_open: tuple[str, ...] = ()
    large_message: int = LARGE_MESSAGE
    skip_large: tuple[str, ...] = ("rspamd",)
    quarantine_retention: float = RETENTION
    postmaster: str = ""
    rules: RulesSettings = field(default_factory=RulesSettings)
    attachments: AttachmentSettings = field(default_factory=AttachmentSettings)
    dlp: DlpSettings = field(default_factory=DlpSettings)
    clamav: ClamavSettings = field(default_factory=ClamavSettings)
    rspamd: RspamdSettings = field(default_factory=RspamdSettings)


def _fail(key: str, problem: str) -> ValueError:
    return ValueError(f"{key}: {problem}")


def _unknown(table: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    for k in table:
        if k not in allowed:
            raise _fail(prefix + k, "unknown key")


def _sub(table: Mapping[str, Any], key: str, prefix: str) -> Mapping[str, Any]:
    value = table.get(key, {})
    if not isinstance(value, dict):
        raise _fail(prefix + key, "must be a table")
    return value


def _names(key: str, value: object, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(key, f"must be a list of names from: {', '.join(allowed)}")
    for v in value:
        if v not in allowed:
            raise _fail(key, f"{v!r} is not one of {', '.join(allowed)}")
    if len(set(value)) != len(value):
        raise _fail(key, "names a filter twice")
    return tuple(value)


def _number(key: str, value: object, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(key, "must be a number")
    if integer and not isinstance(value, int):
        raise _fail(key, "must be an integer")
    if value < 0:
        raise _fail(key, "must be at least 0")
    return value


def _duration(key: str, value: object) -> float:
    if isinstance(value, str):
        text = value.strip().lower()
        unit = _UNITS.get(text[-1:]) if text else None
        try:
            seconds = float(text[:-1] if unit else text) * (unit or 1)
        except ValueError:
            raise _fail(key, f"{value!r} is not a duration (e.g. 30, \"90s\", \"30d\")"
                        ) from None
    else:
        seconds = float(_number(key, value))
    if not 0 < seconds < float("inf"):
        raise _fail(key, "must be a positive duration")
    return seconds


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _fail(key, f"must be one of {', '.join(allowed)}")
    return str(value)


def _regex(key: str, value: object, flags: int = 0) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(key, "must be a regular expression string")
    try:
        re.compile(value, flags)
    except re.error as exc:
        raise _fail(key, f"{value!r}: bad regular expression: {exc}") from None
    return value


def _string(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise _fail(key, "must be a string")
    return value


def _rules(table: Mapping[str, Any]) -> RulesSettings:
    p = "filters.rules."
    _unknown(table, {"tag", "quarantine", "reject", "dnsbl_points", "scores", "custom"}, p)
    d = RulesSettings()
    scores = []
    for name, value in _sub(table, "scores", p).items():
        if name not in DEFAULT_SCORES:
            raise _fail(f"{p}scores.{name}", f"no such rule (rules: {', '.join(DEFAULT_SCORES)})")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(f"{p}scores.{name}", "must be a number")
        scores.append((name, float(value)))
    custom = []
    raw = table.get("custom", [])
    if not isinstance(raw, list):
        raise _fail(p + "custom", "must be a list of tables ([[filters.rules.custom]])")
    for i, rule in enumerate(raw):
        key = f"{p}custom[{i}]."
        if not isinstance(rule, dict):
            raise _fail(key[:-1], "must be a table")
        _unknown(rule, {"name", "pattern", "score", "where"}, key)
        name = _string(key + "name", rule.get("name", ""))
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise _fail(key + "name", "is required: letters, digits, _ . - (at most 64)")
        where = _string(key + "where", rule.get("where", "body"))
        if not re.fullmatch(r"[!-9;-~]+", where):
            raise _fail(key + "where", "must be \"body\", \"headers\" or a header field name")
        pattern = _regex(key + "pattern", rule.get("pattern"))
        score = rule.get("score", 1.0)
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise _fail(key + "score", "must be a number")
        custom.append(CustomRule(name, re.compile(pattern.encode("utf-8")), float(score),
                                 where if where in ("body", "headers") else where.lower()))
    return RulesSettings(
        tag=float(_number(p + "tag", table.get("tag", d.tag))),
        quarantine=float(_number(p + "quarantine", table.get("quarantine", d.quarantine))),
        reject=float(_number(p + "reject", table.get("reject", d.reject))),
        dnsbl_points=float(_number(p + "dnsbl_points",
                                   table.get("dnsbl_points", d.dnsbl_points))),
        scores=tuple(scores), custom=tuple(custom))


def _attachments(table: Mapping[str, Any]) -> AttachmentSettings:
    p = "filters.attachments."
    _unknown(table, {"extensions", "kinds", "encrypted", "action"}, p)
    d = AttachmentSettings()
    exts = table.get("extensions", list(d.extensions))
    if not isinstance(exts, list) or not all(isinstance(e, str) and e for e in exts):
        raise _fail(p + "extensions", "must be a list of extensions such as \"exe\"")
    return AttachmentSettings(
        extensions=tuple(e.lower().lstrip(".") for e in exts),
        kinds=_names(p + "kinds", table.get("kinds", list(d.kinds)), attachments.KINDS),
        encrypted=_choice(p + "encrypted", table.get("encrypted", d.encrypted),
                          attachments.ENCRYPTED_ACTIONS),
        action=_choice(p + "action", table.get("action", d.action), attachments.ACTIONS))


def _dlp(table: Mapping[str, Any]) -> DlpSettings:
    p = "filters.dlp."
    _unknown(table, {"detectors", "patterns", "action"}, p)
    d = DlpSettings()
    patterns = []
    raw = table.get("patterns", [])
    if not isinstance(raw, list):
        raise _fail(p + "patterns", "must be a list of tables ([[filters.dlp.patterns]])")
    for i, item in enumerate(raw):
        key = f"{p}patterns[{i}]."
        if not isinstance(item, dict):
            raise _fail(key[:-1], "must be a table")
        _unknown(item, {"name", "pattern"}, key)
        name = _string(key + "name", item.get("name", ""))
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise _fail(key + "name", "is required: letters, digits, _ . - (at most 64)")
        patterns.append(DlpPattern(name, re.compile(_regex(key + "pattern",
                                                           item.get("pattern")))))
    return DlpSettings(
        detectors=_names(p + "detectors", table.get("detectors", list(d.detectors)),
                         dlp.DETECTORS),
        patterns=tuple(patterns),
        action=_choice(p + "action", table.get("action", d.action), dlp.ACTIONS))


def _address(key: str, value: object) -> str:
    text = _string(key, value)
    if text.startswith("unix:") or text.startswith("/"):
        if len(text.removeprefix("unix:")) < 2:
            raise _fail(key, "needs a socket path")
        return text
    host, sep, port = text.removeprefix("http://").rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _fail(key, f"{text!r} is not HOST:PORT or unix:/path")
    return text


def from_table(table: Mapping[str, Any]) -> FilterSettings:
    """``[filters]`` of the config file."""
    p = "filters."
    _unknown(table, {"inbound", "outbound", "timeout", "fail_open", "large_message",
                     "skip_large", "quarantine_retention", "postmaster", "rules",
                     "attachments", "dlp", "clamav", "rspamd"}, p)
    d = FilterSettings()
    clamav_t = _sub(table, "clamav", p)
    _unknown(clamav_t, {"address", "chunk_size"}, p + "clamav.")
    rspamd_t = _sub(table, "rspamd", p)
    _unknown(rspamd_t, {"url", "password"}, p + "rspamd.")
    chunk = int(_number(p + "clamav.chunk_size", clamav_t.get("chunk_size", 65536),
                        integer=True))
    if chunk < 1024:
        raise _fail(p + "clamav.chunk_size", "must be at least 1024")
    postmaster = _string(p + "postmaster", table.get("postmaster", ""))
    if postmaster and "@" not in postmaster:
        raise _fail(p + "postmaster", "must be an address")
    return FilterSettings(
        inbound=_names(p + "inbound", table.get("inbound", list(d.inbound)), FILTERS),
        outbound=_names(p + "outbound", table.get("outbound", list(d.outbound)), FILTERS),
        timeout=_duration(p + "timeout", table.get("timeout", d.timeout)),
        fail_open=_names(p + "fail_open", table.get("fail_open", []), FILTERS),
        large_message=int(_number(p + "large_message",
                                  table.get("large_message", d.large_message), integer=True)),
        skip_large=_names(p + "skip_large", table.get("skip_large", list(d.skip_large)),
                          FILTERS),
        quarantine_retention=_duration(p + "quarantine_retention",
                                       table.get("quarantine_retention",
                                                 d.quarantine_retention)),
        postmaster=postmaster,
        rules=_rules(_sub(table, "rules", p)),
        attachments=_attachments(_sub(table, "attachments", p)),
        dlp=_dlp(_sub(table, "dlp", p)),
        clamav=ClamavSettings(_address(p + "clamav.address", clamav_t.get(
            "address", d.clamav.address)), chunk),
        rspamd=RspamdSettings(_address(p + "rspamd.url", rspamd_t.get("url", d.rspamd.url)),
                              _string(p + "rspamd.password", rspamd_t.get("password", ""))))
