"""``postwarden doctor``: check an installation as a careful administrator
would, and say what to fix.

The checklist, each with ok / warn / FAIL and a fix:

1. the config is valid (else the command stops there) and the database
   schema is one this postwarden knows;
2. every enabled listener accepts a connection on its configured address
   and greets with 220 (TLS first on implicit-TLS listeners);
3. the certificate: not expired or about to, issued for the hostname, not
   self-signed, and the one the running server presents;
4. the DNS records of every local domain (``dns check``);
5. forward-confirmed reverse DNS of the outbound address (the PTR names the
   hostname, whose A/AAAA give the address back);
6. the server is not an open relay: the configuration, then the relay
   tester's forms sent to our own mx listener;
7. the outbound address on the configured DNS block lists;
8. the queue: messages waiting long, held, or too many.

Exit status 1 when something FAILs, else 0 (warnings are advice).

Security exposure: administrator only.  It connects to our own listeners
and queries the configured resolvers; the relay test never sends DATA.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

from postwarden import cli_dns
from postwarden import config as _config
from postwarden.delivery.dns import DnsError, DnsPermanent, Resolver
from postwarden.dkim_keys import KeyStore
from postwarden.onboard.relaytest import try_relay
from postwarden.storage import migrate

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
# Certificates: FAIL below this many days left, warn below the second.
CERT_FAIL_DAYS = 7
CERT_WARN_DAYS = 21
# Queue: a recipient still waiting after this long is a warning; after
# [queue] delay_warning, a failure; more messages than this, a warning.
QUEUE_WARN_AGE = 3600.0
QUEUE_WARN_SIZE = 1000


@dataclass(slots=True)
class Item:
    status: str
    name: str
    detail: str
    fix: str = ""


class Doctor:
    def __init__(self, cfg: _config.Config, *, outbound_ip: str | None, timeout: float
                 ) -> None:
        self.cfg = cfg
        self.timeout = timeout
        self.items: list[Item] = []
        self._outbound_ip = outbound_ip

    def add(self, status: str, name: str, detail: str, fix: str = "") -> None:
        self.items.append(Item(status, name, detail, fix))

    # -- 1. config and schema ------------------------------------------------

    def check_config(self) -> None:
        cfg = self.cfg
        enabled = [lst for lst in cfg.listeners if lst.enabled]
        self.add(OK, "config", f"{cfg.path} is valid (hostname {cfg.hostname}, "
                 f"{len(enabled)} listener(s))")
        try:
            versions = migrate.inspect(cfg.db_path)
        except migrate.SchemaError as exc:
            self.add(FAIL, "database", str(exc), "check the file and its permissions")
            return
        if any(v.newer for v in versions):
            self.add(FAIL, "database", "written by a newer postwarden",
                     "install that version again, or restore a backup")
        elif any(v.older for v in versions):
            self.add(WARN, "database", "the schema is older than this postwarden",
                     "postwarden migrate (or restart: the server upgrades at start)")
        else:
            self.add(OK, "database", f"schema current ({cfg.db_path})")

    # -- 2. listeners ----------------------------------------------------------

    @staticmethod
    def _connect_host(host: str) -> str:
        return {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1",
                "localhost": "127.0.0.1"}.get(host, host)

    def _greeting(self, lst: _config.ListenerConfig) -> tuple[str, bytes | None]:
        """The first reply line and, for implicit TLS, the server's certificate."""
        host = self._connect_host(lst.host)
        with socket.create_connection((host, lst.port), timeout=self.timeout) as raw:
            if lst.implicit_tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE  # the certificate is checked below
                with ctx.wrap_socket(raw, server_hostname=self.cfg.hostname) as tls:
                    line = tls.makefile("rb").readline(512)
                    cert = tls.getpeercert(binary_form=True)
                    tls.sendall(b"QUIT\r\n")
                    return line.decode("ascii", "replace").strip(), cert
            line = raw.makefile("rb").readline(512)
            raw.sendall(b"QUIT\r\n")
            return line.decode("ascii", "replace").strip(), None

    def check_listeners(self) -> bytes | None:
        served: bytes | None = None
        for lst in self.cfg.listeners:
            if not lst.enabled:
                continue
            where = f"{self._connect_host(lst.host)}:{lst.port}"
            name = f"listener {lst.name}"
            try:
                line, cert = self._greeting(lst)
            except (OSError, ssl.SSLError) as exc:
                self.add(FAIL, name, f"no connection to {where}: {exc}",
                         "start the server (systemctl start postwarden) and read its log "
                         "(journalctl -u postwarden)")
                continue
            if not line.startswith("220"):
                self.add(FAIL, name, f"{where} greets with {line[:80]!r}",
                         "is another program on this port, or is this address banned?")
                continue
            served = served or cert
            mode = "implicit TLS" if lst.implicit_tls else lst.mode
            self.add(OK, name, f"{where} answers ({mode})")
        return served

    # -- 3. certificate ---------------------------------------------------------

    def check_certificate(self, served: bytes | None) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        cfg = self.cfg
        if cfg.tls.cert is None:
            self.add(WARN, "certificate", "no [tls]: STARTTLS is not offered",
                     "get a certificate (certbot) and set [tls] cert and key")
            return
        try:
            cert = x509.load_pem_x509_certificate(cfg.tls.cert.read_bytes())
        except (OSError, ValueError) as exc:
            self.add(FAIL, "certificate", f"cannot read {cfg.tls.cert}: {exc}",
                     "point [tls] cert at a PEM certificate chain")
            return
        now = datetime.datetime.now(datetime.UTC)
        expires = cert.not_valid_after_utc
        days = (expires - now).total_seconds() / 86400
        renew = "renew it (certbot renew), then systemctl reload postwarden"
        if days < 0:
            self.add(FAIL, "certificate", f"{cfg.tls.cert} expired on {expires:%Y-%m-%d}",
                     renew)
        elif days < CERT_FAIL_DAYS:
            self.add(FAIL, "certificate", f"expires in {days:.0f} day(s) ({expires:%Y-%m-%d})",
                     renew)
        elif days < CERT_WARN_DAYS:
            self.add(WARN, "certificate", f"expires in {days:.0f} days ({expires:%Y-%m-%d})",
                     renew)
        else:
            self.add(OK, "certificate", f"valid until {expires:%Y-%m-%d}")
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
        except x509.ExtensionNotFound:
            names = []
        if not any(_name_matches(n, cfg.hostname) for n in names):
            self.add(FAIL, "certificate name",
                     f"not issued for {cfg.hostname} (names: {', '.join(names) or 'none'})",
                     f"get a certificate for {cfg.hostname}")
        else:
            self.add(OK, "certificate name", f"issued for {cfg.hostname}")
        if cert.issuer == cert.subject:
            self.add(WARN, "certificate issuer", "self-signed: mail clients will warn, and "
                     "senders that verify (MTA-STS enforce, DANE) will not deliver",
                     f"certbot certonly -d {cfg.hostname}, then point [tls] at it")
        if served is not None and served != cert.public_bytes(Encoding.DER):
            self.add(WARN, "certificate served",
                     "the running server presents another certificate than the file",
                     "systemctl reload postwarden (SIGHUP reloads the certificate)")

    # -- 4, 5, 7. DNS --------------------------------------------------------------

    async def check_dns(self) -> None:
        cfg = self.cfg
        try:
            look = cli_dns._Lookup(cfg)
        except cli_dns.DnsCommandError as exc:
            self.add(FAIL, "dns", str(exc), "set [dns] nameservers")
            return
        store = KeyStore.for_data_dir(cfg.data_dir)
        domains = cli_dns.local_domains(cfg)
        if not domains:
            self.add(FAIL, "dns", "no local domains", "postwarden domain add DOMAIN")
        for domain in domains:
            results = await cli_dns.check_domain(cfg, domain, store, look)
            bad = [r for r in results if r.status != cli_dns.OK]
            for r in bad:
                label = "DKIM (inactive key)" if r.kind == "DKIM" and not r.required else r.kind
                detail = f"{r.name}. {r.status}" + (f": {r.detail}" if r.detail else "")
                fix = (f"publish {r.expected}" if r.expected and r.status != cli_dns.ERROR
                       else "") + f" (postwarden dns records {domain})"
                self.add(FAIL if r.required else WARN, f"dns {label}", detail, fix.strip())
            if not any(r.required for r in bad):
                self.add(OK, f"dns {domain}", "MX, SPF, DKIM and DMARC are published")
        ip = self.outbound_ip()
        if ip is None:
            self.add(WARN, "reverse dns", "cannot tell the outbound address",
                     "give it: postwarden doctor --outbound-ip IP")
            return
        await self.check_fcrdns(look.resolver, ip)
        await self.check_blocklists(look.resolver, ip)

    def outbound_ip(self) -> str | None:
        if self._outbound_ip:
            return self._outbound_ip
        publics = cli_dns.public_addresses(self.cfg)
        if publics:
            return publics[0]
        mx = self.cfg.listener("mx")
        if mx is not None and mx.host not in ("*", "localhost"):
            ip = ipaddress.ip_address(mx.host)
            if not ip.is_unspecified:
                return str(ip)
        # The source address of the default route (a UDP connect sends nothing).
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect(("192.0.2.1", 25))
                return str(s.getsockname()[0])
        except OSError:
            return None

    async def check_fcrdns(self, resolver: Resolver, ip: str) -> None:
        cfg = self.cfg
        expected = cfg.delivery.helo_name or cfg.hostname
        rev = ipaddress.ip_address(ip).reverse_pointer
        fix = (f"ask whoever runs {ip} (the hosting provider) to set its PTR record to "
               f"{expected}, and publish {expected} A/AAAA {ip}")
        try:
            answer = await resolver.query(rev, "PTR")
        except DnsPermanent:
            answer = None
        except DnsError as exc:
            self.add(WARN, "reverse dns", f"PTR lookup of {ip} failed: {exc.text}", fix)
            return
        names = [] if answer is None else [
            rr.target.to_text(omit_final_dot=True).lower() for rr in answer]
        if not names:
            self.add(FAIL, "reverse dns", f"{ip} has no PTR record (receivers distrust it)",
                     fix)
            return
        confirmed = []
        for name in names:
            try:
                addrs = await resolver.addresses(name)
            except DnsError:
                addrs = []
            if ip in addrs:
                confirmed.append(name)
        if expected in confirmed:
            self.add(OK, "reverse dns", f"{ip} -> {expected} -> {ip} (forward-confirmed)")
        elif confirmed:
            self.add(WARN, "reverse dns", f"{ip} -> {confirmed[0]}, not {expected}",
                     f"set the PTR of {ip} to {expected}, or [delivery] helo_name = "
                     f"\"{confirmed[0]}\"")
        else:
            self.add(FAIL, "reverse dns", f"{ip} -> {', '.join(names)}, whose addresses do "
                     f"not include {ip}", fix)

    async def check_blocklists(self, resolver: Resolver, ip: str) -> None:
        zones = self.cfg.dnsbl.zones
        if not zones:
            self.add(SKIP, "blocklists", "no [dnsbl] zones configured to look the outbound "
                     "address up in")
            return
        rev = ipaddress.ip_address(ip).reverse_pointer.removesuffix(
            ".in-addr.arpa").removesuffix(".ip6.arpa")
        listed = []
        for zone in zones:
            try:
                answer = await resolver.query(f"{rev}.{zone.zone}", "A")
            except DnsPermanent:
                continue
            except DnsError as exc:
                self.add(WARN, "blocklists", f"{zone.zone} did not answer: {exc.text}")
                continue
            if answer:
                listed.append(f"{zone.zone} ({', '.join(str(rr) for rr in answer)})")
        if listed:
            self.add(FAIL, "blocklists", f"{ip} is listed on {'; '.join(listed)}",
                     "find out why (an open relay, a compromised account), fix it, then "
                     "ask each list for removal")
        else:
            self.add(OK, "blocklists", f"{ip} is on none of {len(zones)} list(s)")

    # -- 6. open relay ---------------------------------------------------------------

    def check_relay(self) -> None:
        cfg = self.cfg
        public = cfg.relay.public()
        if public:
            self.add(FAIL, "open relay", f"[relaying] networks lets {', '.join(public)} relay "
                     "without authentication: anyone there can send spam through this "
                     "server", "remove public ranges from [relaying] networks; users "
                     "authenticate on 587/465 instead")
        mx = next((lst for lst in cfg.listeners if lst.enabled and lst.mode == "mx"), None)
        if mx is None:
            self.add(SKIP, "relay test", "no mx listener")
            return
        domain = (cli_dns.local_domains(cfg) or [cfg.hostname])[0]
        host = self._connect_host(mx.host)
        try:
            accepted = try_relay(host, mx.port, domain, timeout=self.timeout)
        except (OSError, smtplib.SMTPException) as exc:
            self.add(WARN, "relay test", f"could not run against {host}:{mx.port}: {exc}")
            return
        if not accepted:
            self.add(OK, "relay test", f"{host}:{mx.port} refuses every relay tester's form")
            return
        forms = ", ".join(f"<{rcpt}>" for rcpt, _c, _t in accepted)
        if not public and cfg.relay.contains(host):
            self.add(WARN, "relay test", f"relays for {host}, which is in [relaying] networks "
                     f"(accepted {forms})", "fine for local applications; make sure "
                     "nothing there is reachable by strangers")
        else:
            self.add(FAIL, "relay test", f"OPEN RELAY: {host}:{mx.port} accepted {forms}",
                     "fix [relaying] networks; only authenticated users may relay")

    # -- 8. queue --------------------------------------------------------------------

    def check_queue(self) -> None:
        from postwarden.cli_queue import _run

        async def listing(store: Any) -> Any:
            return await store.list(limit=100000)

        try:
            messages = _run(self.cfg, listing)
        except Exception as exc:  # the queue cannot be read: say so, go on
            self.add(FAIL, "queue", f"cannot read the queue: {exc}", "postwarden queue list")
            return
        now = time.time()
        held = [m for m in messages if m.held]
        waiting = [m for m in messages if not m.held]
        oldest = max((now - m.received_at for m in waiting), default=0.0)
        deferred = sum(1 for m in waiting for r in m.recipients if r.attempts > 0)
        detail = (f"{len(messages)} message(s), {deferred} recipient(s) deferred, "
                  f"{len(held)} held" + (f", oldest {oldest / 3600:.1f} h" if waiting else ""))
        fix = "postwarden queue list; postwarden queue show ID (the last reply says why)"
        delay = self.cfg.queue.delay_warning or self.cfg.queue.lifetime
        if waiting and oldest > delay:
            self.add(FAIL, "queue", detail, fix)
        elif (waiting and oldest > QUEUE_WARN_AGE) or held or len(messages) > QUEUE_WARN_SIZE:
            self.add(WARN, "queue", detail, fix)
        else:
            self.add(OK, "queue", detail)

    # -- all -------------------------------------------------------------------------

    async def run(self) -> None:
        self.check_config()
        served = await asyncio.to_thread(self.check_listeners)
        self.check_certificate(served)
        await self.check_dns()
        await asyncio.to_thread(self.check_relay)
        await asyncio.to_thread(self.check_queue)


def _name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 6.4.3: a wildcard stands for exactly one left-most label."""
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def render(items: list[Item]) -> str:
    lines = []
    for it in items:
        lines.append(f"  {it.status:<5} {it.name:<20} {it.detail}")
        if it.fix and it.status in (WARN, FAIL):
            lines.append(f"  {'':<5} {'':<20} fix: {it.fix}")
    return "\n".join(lines) + "\n"


def run(cfg: _config.Config, args: argparse.Namespace) -> int:
    doctor = Doctor(cfg, outbound_ip=args.outbound_ip, timeout=args.timeout)
    asyncio.run(doctor.run())
    print(f"postwarden doctor: {cfg.path}")
    print(render(doctor.items), end="")
    fails = sum(1 for it in doctor.items if it.status == FAIL)
    warns = sum(1 for it in doctor.items if it.status == WARN)
    if fails:
        print(f"\n{fails} problem(s) to fix, {warns} warning(s)")
        return 1
    print(f"\nall checks passed ({warns} warning(s))" if warns else "\nall checks passed")
    return 0
