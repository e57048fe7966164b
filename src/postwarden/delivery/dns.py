"""DNS lookups for outbound delivery: MX hosts of a domain, addresses of a host.

:class:`Resolver` wraps dnspython's asynchronous stub resolver, pointed at the
nameservers of ``[dns]`` (or the system's ``/etc/resolv.conf`` when none are
configured), and turns DNS outcomes into delivery decisions:

* MX records are ordered by preference, equal preferences shuffled
  (RFC 5321 5.1); a domain without MX records is its own mail host (the
  "implicit MX", RFC 5321 5.1);
* a null MX (RFC 7505) raises :class:`NullMx` (permanent, 5.1.10);
* a domain that does not exist raises :class:`DnsPermanent` (5.1.2);
* timeouts, SERVFAIL and unreachable nameservers raise :class:`DnsTemporary`
  (4.4.3): temporary unless proven permanent.

Answers (and, for their RFC 2308 time, NXDOMAIN and NODATA) are cached in
front of dnspython; :meth:`Resolver.cached` tells a caller synchronously
what :meth:`Resolver.query` would answer from that cache.

Errors::

    DnsError                  dsn, text
     +-- DnsTemporary         4.4.3: retry later (or the next MX host)
     +-- DnsPermanent         5.1.2: the recipient bounces
          +-- NullMx          5.1.10: the domain accepts no mail

Security exposure: the names looked up come from envelopes (untrusted).  They
are only ever used as DNS query names (made absolute, never searched in the
local search list), and the answers are only used as host names and
addresses to connect to.  Answers are not DNSSEC-validated here: a forged MX
can divert mail, which is why the ``verify`` TLS policy exists for domains
that need it.  With ``dnssec=True`` the queries ask the configured resolver
to validate (AD and DO flags) and :meth:`Resolver.query_secure`,
:attr:`MxAnswer.authenticated` and :meth:`Resolver.addresses_secure` report
its AD bit; that bit is only as trustworthy as the path to the resolver
(RFC 6698 4.1, RFC 7672 2.1.1), so only DANE (:mod:`postwarden.delivery.dane`)
uses it, and only when the administrator says the resolver is trusted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from postwarden.observe.log import get_logger

if TYPE_CHECKING:  # not at run time: config.py may import the TLS policy modules
    from postwarden.config import DnsConfig

log = get_logger("dns")

# No answer is kept longer than this, whatever its TTL (as Postfix's and
# most resolvers' caps).
MAX_CACHE_TTL = 3600.0

# Cap on MX records used (a hostile domain could publish thousands).
MAX_MX_HOSTS = 20
# Cap on addresses returned for one host.
MAX_ADDRESSES = 16


class DnsError(Exception):
    """A lookup failed; ``dsn`` is the RFC 3463 code for the recipient."""

    dsn = "4.4.3"

    def __init__(self, text: str, dsn: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        if dsn is not None:
            self.dsn = dsn

    @property
    def permanent(self) -> bool:
        return self.dsn.startswith("5")


class DnsTemporary(DnsError):
    """Timeout, SERVFAIL, no nameserver reachable: try again later."""

    dsn = "4.4.3"


class DnsPermanent(DnsError):
    """The domain does not exist (NXDOMAIN): the recipient bounces."""

    dsn = "5.1.2"


class NullMx(DnsPermanent):
    """RFC 7505: the domain publishes a null MX, it accepts no mail."""

    dsn = "5.1.10"


@dataclass(frozen=True, slots=True)
class MxAnswer:
    """The mail hosts of a domain, best first; ``implicit``: no MX records,
    the domain itself is the host (RFC 5321 5.1); ``authenticated``: the
    answer (or the denial of MX records) carried the AD bit of a resolver
    asked to validate (always ``False`` without ``dnssec``)."""

    hosts: tuple[str, ...]
    implicit: bool = False
    authenticated: bool = False


def _absolute(name: str) -> dns.name.Name:
    try:
        return dns.name.from_text(name.rstrip(".") + ".")
    except (dns.exception.DNSException, ValueError) as exc:
        # Empty labels, labels over 63 octets, names over 255: no such domain.
        raise DnsPermanent(f"invalid domain name {name!r}: {exc}") from None


def _host_text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def order_mx(records: list[tuple[int, str]], rng: random.Random) -> list[str]:
    """Sort by preference; shuffle hosts of equal preference (RFC 5321 5.1:
    "the sender-SMTP MUST randomize them to spread the load").  A host listed
    twice keeps its best position."""
    by_pref: dict[int, list[str]] = {}
    for pref, host in records:
        by_pref.setdefault(pref, []).append(host)
    ordered: list[str] = []
    seen: set[str] = set()
    for pref in sorted(by_pref):
        group = by_pref[pref]
        rng.shuffle(group)
        for host in group:
            if host not in seen:
                seen.add(host)
                ordered.append(host)
    return ordered


def interleave(first: list[str], second: list[str]) -> list[str]:
    """``[a1, b1, a2, b2, ...]``: a host whose IPv6 is broken still gets an
    IPv4 attempt early (in the spirit of RFC 8305)."""
    out: list[str] = []
    for i in range(max(len(first), len(second))):
        out.extend(lst[i] for lst in (first, second) if i < len(lst))
    return out


@dataclass(slots=True)
class CachedAnswer:
    """One cached outcome of a lookup: ``answer`` (None for NODATA and
    NXDOMAIN), its AD bit (``secure``), and whether it was NXDOMAIN."""

    expires: float  # time.monotonic()
    answer: dns.resolver.Answer | None  # None: NODATA or NXDOMAIN
    secure: bool
    nxdomain: bool


def _from_cache(hit: CachedAnswer, name: str) -> tuple[dns.resolver.Answer | None, bool]:
    """What a lookup answers from a live cache entry: the answer (None for
    NODATA) and its AD bit, or the cached NXDOMAIN raised again."""
    if hit.nxdomain:
        raise DnsPermanent(f"domain {name} not found")
    return hit.answer, hit.secure


def _negative_ttl(response: object) -> float:
    """RFC 2308 5: a negative answer is cached for the smaller of the SOA's
    TTL and its MINIMUM field; without a SOA it is not cached."""
    for rrset in getattr(response, "authority", ()):
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return 0.0


class Resolver:
    """Asynchronous MX and address lookups for outbound delivery."""

    def __init__(self, config: DnsConfig, *, rng: random.Random | None = None,
                 dnssec: bool = False, cache: int = 0) -> None:
        self.config = config
        # ``dnssec``: ask the resolver to validate and report it (AD bit).
        self.dnssec = dnssec
        self._rng = rng or random.SystemRandom()
        if config.nameservers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [dns.nameserver.Do53Nameserver(addr, port)
                             for addr, port in config.nameservers]
        else:
            try:
                r = dns.asyncresolver.Resolver()  # /etc/resolv.conf
            except dns.resolver.NoResolverConfiguration:
                raise RuntimeError("no DNS resolver: set [dns] nameservers or fix "
                                   "/etc/resolv.conf") from None
        # ``timeout`` is per nameserver try, ``lifetime`` the whole lookup.
        r.timeout = config.timeout
        r.lifetime = config.timeout
        if dnssec:
            # RFC 6840 5.7: AD in a query asks a validating resolver to set
            # AD in its answer; DO (RFC 3225) for resolvers that want it.
            r.flags = dns.flags.RD | dns.flags.AD
            r.use_edns(0, dns.flags.DO, 1232)
        # Answers, NODATA and NXDOMAIN, kept for their TTL (RFC 2308 5 for
        # the negative ones) in front of dnspython: SPF and DMARC look up the
        # same records for every message from a sender, and a hit here costs
        # a dict lookup instead of dnspython's query machinery.
        self._cache: dict[tuple[str, str], CachedAnswer] = {}
        self._cache_max = cache
        self._resolver = r
        # Told (type, outcome, seconds) of every lookup sent (the metrics).
        self.observe: Callable[[str, str, float], None] | None = None

    async def query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """One lookup; ``None`` when the name exists without such records.

        Raises :class:`DnsPermanent` for NXDOMAIN and :class:`DnsTemporary`
        for everything that may heal.  Public so that policy checks (SPF,
        DMARC) can share the resolver.
        """
        # A cached answer without the extra coroutine of query_secure: SPF
        # and DMARC ask for the same few records for every message.
        hit = self.cached(name, rdtype)
        if hit is None:
            return (await self.query_secure(name, rdtype))[0]
        return _from_cache(hit, name)[0]

    def cached(self, name: str, rdtype: str) -> CachedAnswer | None:
        """The unexpired cache entry that :meth:`query` would answer from
        without sending anything, or None (then only :meth:`query` knows).
        Synchronous, for callers that can skip their own asynchronous
        machinery when every answer they need is already known.  An expired
        entry is left for :meth:`query_secure` to drop."""
        hit = self._cache.get((name.lower().rstrip("."), rdtype))
        if hit is not None and hit.expires > time.monotonic():
            return hit
        return None

    def _authenticated(self, response: object) -> bool:
        flags = getattr(response, "flags", 0)
        return self.dnssec and isinstance(flags, int) and bool(flags & dns.flags.AD)

    async def query_secure(self, name: str, rdtype: str
                           ) -> tuple[dns.resolver.Answer | None, bool]:
        """:meth:`query`, and whether the answer (or the proof that there
        are no such records) was DNSSEC-validated by the resolver: its AD
        bit, when this resolver was made with ``dnssec=True``."""
        hit = self.cached(name, rdtype)
        if hit is not None:
            return _from_cache(hit, name)
        key = (name.lower().rstrip("."), rdtype)
        self._cache.pop(key, None)  # expired, if there at all
        qname = _absolute(name)
        start = time.monotonic()
        outcome = "ok"
        try:
            answer = await self._resolver.resolve(qname, rdtype, search=False)
            secure = self._authenticated(answer.response)
            self._remember(key, answer.expiration - time.time(), answer, secure)
            return answer, secure
        except dns.resolver.NoAnswer as exc:
            outcome = "noanswer"
            response = exc.kwargs.get("response")
            secure = self._authenticated(response)
            self._remember(key, _negative_ttl(response), None, secure)
            return None, secure
        except dns.resolver.NXDOMAIN as exc:
            outcome = "nxdomain"
            responses = list(exc.responses().values())  # type: ignore[no-untyped-call]
            ttl = _negative_ttl(responses[0]) if responses else 0.0
            self._remember(key, ttl, None, False, nxdomain=True)
            raise DnsPermanent(f"domain {name} not found") from None
        except dns.resolver.NoNameservers:
            # Every nameserver answered SERVFAIL/REFUSED or could not be used.
            outcome = "servfail"
            raise DnsTemporary(f"DNS server failure looking up {rdtype} of {name}") from None
        except dns.exception.Timeout:
            outcome = "timeout"
            raise DnsTemporary(f"DNS timeout looking up {rdtype} of {name}") from None
        except dns.exception.DNSException as exc:
            outcome = "error"
            raise DnsTemporary(f"DNS error looking up {rdtype} of {name}: "
                               f"{type(exc).__name__}") from None
        except OSError as exc:
            outcome = "error"
            raise DnsTemporary(f"DNS error looking up {rdtype} of {name}: "
                               f"{exc.strerror or exc}") from None
        finally:
            seconds = time.monotonic() - start
            log.debug("dns_lookup", name=name, type=rdtype, outcome=outcome,
                      ms=round(seconds * 1000, 1))
            if self.observe is not None:
                self.observe(rdtype, outcome, seconds)

    def _remember(self, key: tuple[str, str], ttl: float, answer: dns.resolver.Answer | None,
                  secure: bool, nxdomain: bool = False) -> None:
        if self._cache_max <= 0 or ttl <= 0:
            return
        if len(self._cache) >= self._cache_max:
            now = time.monotonic()
            for k in [k for k, v in self._cache.items() if v.expires <= now]:
                del self._cache[k]
            while len(self._cache) >= self._cache_max:  # the oldest entries go
                del self._cache[next(iter(self._cache))]
        self._cache[key] = CachedAnswer(time.monotonic() + min(ttl, MAX_CACHE_TTL), answer,
                                   secure, nxdomain)

    async def lookup_mx(self, domain: str) -> MxAnswer:
        """The mail hosts of ``domain`` (see the module docstring)."""
        domain = domain.lower().rstrip(".")
        answer, secure = await self.query_secure(domain, "MX")
        if answer is None:
            return MxAnswer((domain,), implicit=True, authenticated=secure)
        records: list[tuple[int, str]] = []
        null = False
        for rr in answer:
            exchange = getattr(rr, "exchange", None)
            preference = getattr(rr, "preference", None)
            if not isinstance(exchange, dns.name.Name) or not isinstance(preference, int):
                continue
            if exchange == dns.name.root:
                # RFC 7505 3: "." as exchange is a null MX.  It must be the
                # only record; when others are present, use those.
                null = True
                continue
            records.append((preference, _host_text(exchange)))
        if not records:
            if null:
                raise NullMx(f"domain {domain} does not accept mail (null MX)")
            return MxAnswer((domain,), implicit=True, authenticated=secure)
        return MxAnswer(tuple(order_mx(records, self._rng)[:MAX_MX_HOSTS]),
                        authenticated=secure)

    async def mx_hosts(self, domain: str) -> list[str]:
        """MX host names of ``domain`` best first, or ``[domain]`` (implicit MX)."""
        return list((await self.lookup_mx(domain)).hosts)

    async def addresses(self, host: str) -> list[str]:
        """IPv6 and IPv4 addresses of ``host``, interleaved, IPv6 first.

        An IP address is returned as is.  A host that does not exist raises
        :class:`DnsTemporary` (for an MX host that is the MX's problem, not a
        proof that the recipient domain is gone); ``[]`` when it has no
        address records.  If one family fails but the other answers, the
        answer is used.
        """
        return (await self.addresses_secure(host))[0]

    async def addresses_secure(self, host: str) -> tuple[list[str], bool]:
        """:meth:`addresses`, and whether both families were DNSSEC-validated
        (answers or proofs of no records).  An IP address is never
        "secure": it has no name to find TLSA records under."""
        if is_ip(host):
            return [str(ipaddress.ip_address(host))], False
        results = await asyncio.gather(self.query_secure(host, "AAAA"),
                                       self.query_secure(host, "A"), return_exceptions=True)
        families: list[list[str]] = []
        errors: list[DnsError] = []
        secure = True
        for res in results:
            if isinstance(res, BaseException):
                if not isinstance(res, DnsError):
                    raise res
                errors.append(res)
                families.append([])
                secure = False
            else:
                answer, authenticated = res
                secure = secure and authenticated
                families.append([] if answer is None else
                                [str(getattr(rr, "address", "")) for rr in answer])
        v6, v4 = families
        found = [a for a in interleave(v6, v4) if a]
        if found:
            return found[:MAX_ADDRESSES], secure
        if errors:
            err = errors[0]
            if isinstance(err, DnsPermanent):
                raise DnsTemporary(f"host {host} not found") from None
            raise DnsTemporary(err.text) from None
        return [], secure
