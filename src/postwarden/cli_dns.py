"""``postwarden dkim ...`` and ``postwarden dns ...``: signing keys and the
DNS records a mail domain needs.

* ``dkim keygen|list|activate|deactivate`` manage the key store
  (:mod:`postwarden.dkim_keys`).
* ``dns records [DOMAIN]`` prints, for each local domain, the records to
  publish, as zone-file lines and as a plain table: MX, the A/AAAA of the
  host name, SPF (RFC 7208), DKIM (RFC 6376) for every active selector,
  DMARC (RFC 7489), MTA-STS (RFC 8461) with its policy file, and TLS-RPT
  (RFC 8460).
* ``dns check [DOMAIN]`` looks each of them up through the configured
  resolver and says ok / missing / wrong, with what was expected and what
  was found.  For DKIM, the published ``p=`` must be the public half of the
  key on disk.  Exit status 0 when the required records (MX, SPF, DKIM,
  DMARC) are all ok, 1 otherwise.

Security exposure: administrator only.  ``dkim keygen`` writes private keys
(0600 in a 0700 directory); nothing here prints a private key.  ``dns
check`` sends DNS queries for our own domains to the configured resolvers
and only compares the answers with text.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from postwarden import config as _config
from postwarden import dkim_keys
from postwarden.delivery.dns import DnsError, DnsPermanent, Resolver
from postwarden.dkim_keys import DkimKeyError, Key, KeyStore
from postwarden.storage import factory

Handler = Callable[[_config.Config, argparse.Namespace], int]

MX_PREFERENCE = 10
# RFC 1035 3.3.14: one character-string holds at most 255 octets.
TXT_CHUNK = 255
REQUIRED_KINDS = ("MX", "SPF", "DKIM", "DMARC")
DMARC_POLICIES = ("none", "quarantine", "reject")

OK, MISSING, WRONG, ERROR = "ok", "missing", "wrong", "error"


class DnsCommandError(Exception):
    """A dkim/dns command failed (one line, exit status 1)."""


# --- what to publish -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One record to publish.  ``rtype`` is the DNS type; ``kind`` what it
    is for (MX, A, SPF, DKIM, DMARC, MTA-STS, TLS-RPT)."""

    kind: str
    name: str  # absolute, without the final dot
    rtype: str
    value: str  # TXT: the text, unquoted; MX: "10 host."; A/AAAA: the address
    required: bool
    key: Key | None = None
    note: str = ""


def local_domains(cfg: _config.Config) -> list[str]:
    """The config's ``domains`` plus the directory's (on PostgreSQL the
    shared one), read without creating the SQLite database."""
    if not cfg.storage.postgres and not cfg.db_path.exists():
        return sorted(set(cfg.domains))
    with factory.open_directory(cfg) as directory:
        return directory.list_domains()


def _report_address(cfg: _config.Config, local: str, domain: str) -> str:
    """``local@domain`` when it is a mailbox or alias here, else postmaster
    (which RFC 5321 4.5.1 requires anyway)."""
    address = f"{local}@{domain}"
    if cfg.storage.postgres or cfg.db_path.exists():
        with factory.open_directory(cfg) as directory:
            if directory.resolve_sync(address):
                return address
    return f"postmaster@{domain}"


def public_addresses(cfg: _config.Config) -> list[str]:
    """The listeners' addresses that are public (a hint for A/AAAA)."""
    out: list[str] = []
    for lst in cfg.listeners:
        if not lst.enabled or lst.host in ("*", "localhost"):
            continue
        ip = ipaddress.ip_address(lst.host)
        if ip.is_global and str(ip) not in out:
            out.append(str(ip))
    return out


def mta_sts_policy(cfg: _config.Config) -> str:
    """The policy file (RFC 8461 3.2) to serve at
    ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``."""
    from postwarden.onboard.autoconfig import mta_sts_policy as policy

    return policy(cfg)


def host_records(cfg: _config.Config) -> list[Record]:
    """A/AAAA for the host name; empty when no listener address is public."""
    return [Record("A", cfg.hostname, "AAAA" if ":" in a else "A", a, False)
            for a in public_addresses(cfg)]


def expected_records(cfg: _config.Config, domain: str, store: KeyStore,
                     now: datetime.datetime | None = None) -> list[Record]:
    """Every record ``domain`` needs (the host's A/AAAA are separate)."""
    when = now or datetime.datetime.now(datetime.UTC)
    records = [Record("MX", domain, "MX", f"{MX_PREFERENCE} {cfg.hostname}.", True),
               Record("SPF", domain, "TXT", "v=spf1 mx -all", True,
                      note=f"if the MX of {domain} is not {cfg.hostname}, "
                           f"use \"v=spf1 a:{cfg.hostname} mx -all\"")]
    for key in store.active(domain):
        records.append(Record("DKIM", key.dns_name, "TXT", dkim_keys.public_record(key),
                              True, key=key))
    dmarc = _report_address(cfg, "dmarc-reports", domain)
    tlsrpt = _report_address(cfg, "tls-reports", domain)
    records += [
        Record("DMARC", f"_dmarc.{domain}", "TXT", f"v=DMARC1; p=none; rua=mailto:{dmarc}",
               True, note="start with p=none; move to quarantine, then reject, "
                          "once the reports show only your own mail"),
        Record("MTA-STS", f"_mta-sts.{domain}", "TXT",
               f"v=STSv1; id={when.strftime('%Y%m%d%H%M%S')}", False,
               note=f"also serve the policy at https://mta-sts.{domain}/.well-known/"
                    f"mta-sts.txt (needs mta-sts.{domain} with a valid certificate); "
                    "change id= whenever the policy changes"),
        Record("TLS-RPT", f"_smtp._tls.{domain}", "TXT", f"v=TLSRPTv1; rua=mailto:{tlsrpt}",
               False),
    ]
    return records + client_records(cfg, domain)


# RFC 6186 3: the SRV service names of mail submission and access.
SRV_SERVICES = {("smtp", True): "_submissions", ("smtp", False): "_submission",
                ("imap", True): "_imaps", ("imap", False): "_imap"}


def client_records(cfg: _config.Config, domain: str) -> list[Record]:
    """RFC 6186 SRV records (how mail clients find the servers) and, when
    the [http] listener is on, the host names that autoconfiguration and
    MTA-STS are fetched from."""
    from postwarden.onboard.clientconfig import client_settings

    settings = client_settings(cfg)
    out: list[Record] = []
    offered = set()
    for ep in settings.endpoints:
        service = SRV_SERVICES[(ep.protocol, ep.implicit_tls)]
        offered.add(service)
        # Priority 0 for implicit TLS, preferred by RFC 8314 3.3 / RFC 6186 3.4.
        out.append(Record("SRV", f"{service}._tcp.{domain}", "SRV",
                          f"{0 if ep.implicit_tls else 10} 1 {ep.port} {ep.server}.", False))
    for service in SRV_SERVICES.values():
        if service not in offered:
            # RFC 6186 3.4 / RFC 2782: target "." says the service is not offered.
            out.append(Record("SRV", f"{service}._tcp.{domain}", "SRV", "0 0 0 .", False))
    if cfg.http.enabled:
        for label in (("autoconfig", "autodiscover") if cfg.http.autoconfig else ()) + (
                "mta-sts",):
            note = "" if any(r.kind == "WEB" for r in out) else (
                "web server names with valid certificates, proxied to the [http] "
                "listener (docs/deploy.md)")
            out.append(Record("WEB", f"{label}.{domain}", "CNAME", f"{cfg.hostname}.", False,
                              note=note))
    return out


def _quote_txt(value: str) -> str:
    """Zone-file text: quoted strings of at most 255 octets."""
    raw = value.replace("\\", "\\\\").replace('"', '\\"')
    chunks = [raw[i:i + TXT_CHUNK] for i in range(0, len(raw), TXT_CHUNK)] or [""]
    quoted = " ".join(f'"{c}"' for c in chunks)
    return quoted if len(chunks) == 1 else f"( {quoted} )"


def zone_line(rec: Record) -> str:
    value = _quote_txt(rec.value) if rec.rtype == "TXT" else rec.value
    return f"{rec.name}. {rec.rtype} {value}"


def render_records(cfg: _config.Config, domain: str, records: Sequence[Record]) -> str:
    hosts = host_records(cfg)
    lines = [f"== {domain} (mail host {cfg.hostname}) ==", "", "; zone file"]
    for rec in records:
        if rec.kind == "MX":
            lines.append(zone_line(rec))
            lines += [zone_line(h) for h in hosts] or [
                f"; {cfg.hostname}. A <the public IPv4 address of this server>",
                f"; {cfg.hostname}. AAAA <its public IPv6 address, if it has one>"]
            continue
        if rec.note:
            lines.append(f"; {rec.kind}: {rec.note}")
        lines.append(zone_line(rec))
    if not any(r.kind == "DKIM" for r in records):
        lines.append(f"; DKIM: no active key; create one with "
                     f"'postwarden dkim keygen {domain} --activate'")
    lines += ["", "; table", f"{'TYPE':<6} {'NAME':<40} VALUE"]
    for rec in [*records[:1], *hosts, *records[1:]]:
        lines.append(f"{rec.rtype:<6} {rec.name + '.':<40} {rec.value}")
    lines += ["", f"; MTA-STS policy file for https://mta-sts.{domain}/.well-known/mta-sts.txt"]
    lines += mta_sts_policy(cfg).splitlines()
    return "\n".join(lines) + "\n"


# --- checking what is published --------------------------------------------


@dataclass(slots=True)
class CheckResult:
    kind: str
    name: str
    status: str
    required: bool
    expected: str = ""
    found: list[str] = field(default_factory=list)
    detail: str = ""


def _tags(text: str) -> dict[str, str]:
    """A tag-value list (RFC 6376 3.2), keys lower-cased, values stripped."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            out.setdefault(k.strip().lower(), v.strip())
    return out


class _Lookup:
    """The resolver, returning TXT texts / None for "no such records"."""

    def __init__(self, cfg: _config.Config) -> None:
        try:
            self.resolver = Resolver(cfg.dns)
        except RuntimeError as exc:
            raise DnsCommandError(str(exc)) from None

    async def answer(self, name: str, rdtype: str) -> Any:
        try:
            return await self.resolver.query(name, rdtype)
        except DnsPermanent:  # NXDOMAIN: nothing published
            return None

    async def txt(self, name: str) -> list[str]:
        answer = await self.answer(name, "TXT")
        if answer is None:
            return []
        return [b"".join(rr.strings).decode("utf-8", errors="replace") for rr in answer]


def _with_prefix(texts: list[str], prefix: str) -> list[str]:
    p = prefix.lower()
    return [t for t in texts if t.strip().lower() == p or t.strip().lower().startswith(p + ";")
            or t.strip().lower().startswith(p + " ")]


async def _check_mx(look: _Lookup, cfg: _config.Config, rec: Record) -> CheckResult:
    res = CheckResult("MX", rec.name, OK, True, expected=rec.value)
    answer = await look.answer(rec.name, "MX")
    hosts = [] if answer is None else [
        (int(rr.preference), rr.exchange.to_text(omit_final_dot=True).lower()) for rr in answer]
    res.found = [f"{p} {h}." for p, h in sorted(hosts)]
    if not hosts:
        res.status = MISSING
    elif cfg.hostname not in {h for _p, h in hosts}:
        res.status, res.detail = WRONG, f"no MX record points at {cfg.hostname}"
    return res


def _spf_authorises(record: str, cfg: _config.Config, domain: str,
                    mx_ok: bool) -> tuple[str, str]:
    terms = record.split()[1:]
    publics = [ipaddress.ip_address(a) for a in public_addresses(cfg)]
    unverified = []
    for term in terms:
        low = term.lower()
        if low in ("all", "+all"):
            return WRONG, "+all lets every host on the internet send as this domain"
        if low[:1] in "-~?":
            continue  # fail, softfail and neutral authorise nothing
        low = low.removeprefix("+")
        if low in ("mx", f"mx:{domain}") and mx_ok:
            return OK, ""
        if low in (f"a:{cfg.hostname}",) or (low == "a" and domain == cfg.hostname):
            return OK, ""
        if low.startswith(("ip4:", "ip6:")):
            try:
                net = ipaddress.ip_network(low[4:], strict=False)
            except ValueError:
                continue
            if any(ip in net for ip in publics):
                return OK, ""
            if not publics:  # our public address is unknown here
                unverified.append(term)
        if low.startswith("include:") or low.startswith("redirect="):
            unverified.append(term)
    if unverified:
        return OK, f"not verified: {' '.join(unverified)} may or may not cover {cfg.hostname}"
    return WRONG, f"does not authorise {cfg.hostname} (expected mx or a:{cfg.hostname})"


async def _check_spf(look: _Lookup, cfg: _config.Config, rec: Record,
                     mx_ok: bool) -> CheckResult:
    res = CheckResult("SPF", rec.name, OK, True, expected=rec.value)
    res.found = _with_prefix(await look.txt(rec.name), "v=spf1")
    if not res.found:
        res.status = MISSING
    elif len(res.found) > 1:
        # RFC 7208 4.5: more than one record is a permerror.
        res.status, res.detail = WRONG, "several SPF records (RFC 7208 4.5: permerror)"
    else:
        res.status, res.detail = _spf_authorises(res.found[0], cfg, rec.name, mx_ok)
    return res


async def _check_dkim(look: _Lookup, rec: Record, key: Key) -> CheckResult:
    res = CheckResult("DKIM", rec.name, OK, rec.required, expected=rec.value)
    texts = await look.txt(rec.name)
    res.found = [t for t in texts if "p=" in t.replace(" ", "")]
    if not res.found:
        res.status = MISSING
        return res
    if len(res.found) > 1:
        res.status, res.detail = WRONG, "several key records at one selector"
        return res
    tags = _tags(res.found[0])
    published = "".join(tags.get("p", "").split())
    k = tags.get("k", "rsa").lower()
    if not published:
        res.status, res.detail = WRONG, "the key is revoked (empty p=)"
    elif k != key.algorithm:
        res.status, res.detail = WRONG, f"k={k} but the key on disk is {key.algorithm}"
    elif published != key.public_key_b64():
        res.status = WRONG
        res.detail = f"the published key is not the public half of {key.path.name}"
    return res


async def _check_txt(look: _Lookup, rec: Record, prefix: str,
                     validate: Callable[[dict[str, str]], str]) -> CheckResult:
    res = CheckResult(rec.kind, rec.name, OK, rec.required, expected=rec.value)
    res.found = _with_prefix(await look.txt(rec.name), prefix)
    if not res.found:
        res.status = MISSING
    elif len(res.found) > 1:
        res.status, res.detail = WRONG, f"several {rec.kind} records"
    else:
        problem = validate(_tags(res.found[0]))
        if problem:
            res.status, res.detail = WRONG, problem
    return res


def _dmarc_problem(tags: dict[str, str]) -> str:
    if tags.get("p", "").lower() not in DMARC_POLICIES:
        return f"p= must be one of {', '.join(DMARC_POLICIES)}"
    return ""


def _sts_problem(tags: dict[str, str]) -> str:
    ident = tags.get("id", "")
    if not (1 <= len(ident) <= 32 and ident.isascii() and ident.isalnum()):
        return "id= must be 1 to 32 letters and digits (RFC 8461 3.1)"
    return ""


def _tlsrpt_problem(tags: dict[str, str]) -> str:
    return "" if tags.get("rua") else "rua= is missing (RFC 8460 3)"


async def _check_host(look: _Lookup, cfg: _config.Config) -> CheckResult:
    publics = public_addresses(cfg)
    res = CheckResult("A", cfg.hostname, OK, False,
                      expected=" ".join(publics) or "a public address of this server")
    found: list[str] = []
    for rdtype in ("A", "AAAA"):
        answer = await look.answer(cfg.hostname, rdtype)
        found += [] if answer is None else [str(rr.address) for rr in answer]
    res.found = found
    if not found:
        res.status = MISSING
    elif publics and not set(publics) <= set(found):
        res.status, res.detail = WRONG, "the listeners' public addresses are not all published"
    return res


async def _guard(kind: str, name: str, required: bool,
                 check: Awaitable[CheckResult]) -> CheckResult:
    """A lookup that failed (timeout, SERVFAIL) is an error, not "missing"."""
    try:
        return await check
    except DnsError as exc:
        return CheckResult(kind, name, ERROR, required, detail=exc.text)


async def check_domain(cfg: _config.Config, domain: str, store: KeyStore,
                       look: _Lookup) -> list[CheckResult]:
    """Look up every record of ``domain``; the required ones first."""
    # In a thread: on PostgreSQL the directory is read with a loop of its own.
    records = await asyncio.to_thread(expected_records, cfg, domain, store)
    by_kind = {r.kind: r for r in records}
    # SPF's "mx" covers us only if the MX does: the MX answer comes first.
    mx = await _guard("MX", domain, True, _check_mx(look, cfg, by_kind["MX"]))
    checks = [
        _guard("SPF", domain, True, _check_spf(look, cfg, by_kind["SPF"], mx.status == OK)),
        _guard("DMARC", f"_dmarc.{domain}", True,
               _check_txt(look, by_kind["DMARC"], "v=DMARC1", _dmarc_problem)),
        _guard("MTA-STS", f"_mta-sts.{domain}", False,
               _check_txt(look, by_kind["MTA-STS"], "v=STSv1", _sts_problem)),
        _guard("TLS-RPT", f"_smtp._tls.{domain}", False,
               _check_txt(look, by_kind["TLS-RPT"], "v=TLSRPTv1", _tlsrpt_problem)),
        _guard("A", cfg.hostname, False, _check_host(look, cfg)),
    ]
    for key in store.list_keys(domain):
        # Inactive keys are checked too (optional): a new selector must be
        # published before it is activated.
        rec = Record("DKIM", key.dns_name, "TXT", dkim_keys.public_record(key), key.active)
        checks.append(_guard("DKIM", key.dns_name, key.active, _check_dkim(look, rec, key)))
    results = [mx, *await asyncio.gather(*checks)]
    if not store.active(domain):
        results.append(CheckResult("DKIM", f"*._domainkey.{domain}", MISSING, True,
                                   detail=f"no active DKIM key (postwarden dkim keygen "
                                          f"{domain} --activate)"))
    return sorted(results, key=lambda r: (not r.required, _KIND_ORDER.index(r.kind)))


_KIND_ORDER = ("MX", "SPF", "DKIM", "DMARC", "A", "MTA-STS", "TLS-RPT")


def render_check(domain: str, results: Sequence[CheckResult]) -> str:
    lines = [f"{domain}:"]
    for r in results:
        label = r.kind if r.required else f"{r.kind} (optional)"
        if r.kind == "DKIM" and not r.required:
            label = "DKIM (inactive key)"
        line = f"  {r.status:<8} {label:<20} {r.name}."
        if r.detail:
            line += f"  {r.detail}"
        lines.append(line)
        if r.status != OK:
            if r.expected:
                lines.append(f"           expected: {r.expected}")
            if r.status != ERROR:
                lines.append("           found:    " + (" | ".join(r.found) or "(nothing)"))
    return "\n".join(lines) + "\n"


# --- commands --------------------------------------------------------------


def _store(cfg: _config.Config, *, edit: bool = False) -> AbstractContextManager[KeyStore]:
    """The keys: ``data_dir/dkim``, or the shared keys on PostgreSQL."""
    return factory.dkim_keys(cfg, edit=edit)


def _domains_arg(cfg: _config.Config, domain: str | None) -> list[str]:
    local = local_domains(cfg)
    if domain is None:
        if not local:
            raise DnsCommandError("no local domains (set domains in the config, or "
                                  "postwarden domain add DOMAIN)")
        return local
    name = dkim_keys.check_domain(domain)
    if name not in local:
        raise DnsCommandError(f"{name} is not a local domain (postwarden domain list)")
    return [name]


def cmd_dkim_keygen(cfg: _config.Config, args: argparse.Namespace) -> int:
    domain = dkim_keys.check_domain(args.domain)
    if domain not in local_domains(cfg):
        print(f"postwarden: warning: {domain} is not a local domain", file=sys.stderr)
    with _store(cfg, edit=True) as store:
        key = store.generate(domain, args.selector, args.algorithm, activate=args.activate)
        record = Record("DKIM", key.dns_name, "TXT", dkim_keys.public_record(key), True)
    state = "active: it signs outgoing mail now" if key.active else "inactive"
    where = ("in PostgreSQL, for every node" if cfg.storage.postgres else str(key.path))
    print(f"generated {key.algorithm} key {key.selector} for {domain} ({state}): {where}")
    print("publish this record:")
    print(f"  {zone_line(record)}")
    if not key.active:
        print(f"then, once 'postwarden dns check {domain}' sees it: "
              f"postwarden dkim activate {domain} {key.selector}")
    return 0


def cmd_dkim_list(cfg: _config.Config, args: argparse.Namespace) -> int:
    with _store(cfg) as store:
        domains = [dkim_keys.check_domain(args.domain)] if args.domain else store.domains()
        print(f"{'DOMAIN':<30} {'SELECTOR':<16} {'ALGORITHM':<9} {'STATE':<8} DNS NAME")
        for domain in domains:
            for key in store.list_keys(domain):
                state = "active" if key.active else "inactive"
                print(f"{domain:<30} {key.selector:<16} {key.algorithm:<9} {state:<8} "
                      f"{key.dns_name}")
                if args.records:
                    print(f"  {dkim_keys.public_record(key)}")
    return 0


def cmd_dkim_activate(cfg: _config.Config, args: argparse.Namespace) -> int:
    with _store(cfg, edit=True) as store:
        key = store.activate(args.domain, args.selector)
    print(f"{key.domain}: {key.selector} ({key.algorithm}) is active")
    return 0


def cmd_dkim_deactivate(cfg: _config.Config, args: argparse.Namespace) -> int:
    with _store(cfg, edit=True) as store:
        key = store.deactivate(args.domain, args.selector)
        signing = bool(store.active(key.domain))
    print(f"{key.domain}: {key.selector} ({key.algorithm}) is inactive; keep its DNS record "
          "published a few days more for mail still in transit")
    if not signing:
        print(f"postwarden: warning: {key.domain} has no active DKIM key: its mail goes out "
              "unsigned", file=sys.stderr)
    return 0


def cmd_dns_records(cfg: _config.Config, args: argparse.Namespace) -> int:
    domains = _domains_arg(cfg, args.domain)
    with _store(cfg) as store:
        out = [render_records(cfg, d, expected_records(cfg, d, store)) for d in domains]
    print("\n".join(out), end="")
    return 0


def cmd_dns_check(cfg: _config.Config, args: argparse.Namespace) -> int:
    domains = _domains_arg(cfg, args.domain)
    look = _Lookup(cfg)

    async def run(store: KeyStore) -> list[list[CheckResult]]:
        return [await check_domain(cfg, d, store, look) for d in domains]

    with _store(cfg) as store:
        checked = asyncio.run(run(store))
    failed: list[str] = []
    for domain, results in zip(domains, checked, strict=True):
        print(render_check(domain, results), end="")
        failed += [f"{r.kind} {r.name} ({r.status})" for r in results
                   if r.required and r.status != OK]
    if failed:
        print(f"\n{len(failed)} required record(s) not ok: {', '.join(failed)}")
        return 1
    print("\nall required records (MX, SPF, DKIM, DMARC) are published")
    return 0


def _guarded(handler: Handler) -> Handler:
    """Errors of this module become one line on stderr and exit status 1."""
    def run(cfg: _config.Config, args: argparse.Namespace) -> int:
        try:
            return handler(cfg, args)
        except (DkimKeyError, DnsCommandError) as exc:
            print(f"postwarden: {exc}", file=sys.stderr)
            return 1
    return run


def add_parsers(sub: Any, wrap: Callable[[Handler], Callable[[argparse.Namespace], int]]
                ) -> None:
    """Register ``dkim`` and ``dns`` under the main parser; ``wrap`` loads
    the config."""
    def w(handler: Handler) -> Callable[[argparse.Namespace], int]:
        return wrap(_guarded(handler))

    dkim = sub.add_parser("dkim", help="manage DKIM signing keys").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    sp = dkim.add_parser("keygen", help="create a signing key (inactive unless --activate)")
    sp.add_argument("domain")
    sp.add_argument("--selector", default=None,
                    help="selector name (default: pwYYYYMM, pwYYYYMMe for ed25519)")
    sp.add_argument("--algorithm", choices=dkim_keys.ALGORITHMS, default="rsa",
                    help="rsa (2048 bits, default) or ed25519 (RFC 8463)")
    sp.add_argument("--activate", action="store_true", help="sign with it at once")
    sp.set_defaults(func=w(cmd_dkim_keygen))
    sp = dkim.add_parser("list", help="list keys and which ones sign")
    sp.add_argument("domain", nargs="?")
    sp.add_argument("--records", action="store_true", help="also print each DNS record")
    sp.set_defaults(func=w(cmd_dkim_list))
    for name, func, what in (("activate", cmd_dkim_activate, "start signing with a key"),
                             ("deactivate", cmd_dkim_deactivate, "stop signing with a key")):
        sp = dkim.add_parser(name, help=what)
        sp.add_argument("domain")
        sp.add_argument("selector")
        sp.set_defaults(func=w(func))

    dns = sub.add_parser("dns", help="the DNS records of the local domains").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    sp = dns.add_parser("records", help="print the records to publish")
    sp.add_argument("domain", nargs="?")
    sp.set_defaults(func=w(cmd_dns_records))
    sp = dns.add_parser("check", help="look the records up and compare (exit 1 unless ok)")
    sp.add_argument("domain", nargs="?")
    sp.set_defaults(func=w(cmd_dns_check))
