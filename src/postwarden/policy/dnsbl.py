"""DNSBL and DNSWL scoring at connect, after Postfix's postscreen.

Every configured zone is asked, in parallel and each with its own timeout,
for the A records of ``<reversed client IP>.<zone>`` (RFC 5782 2.1 for IPv4:
octets reversed; 2.4 for IPv6: nibbles reversed).  A zone that lists the
client (with one of its ``match`` return codes, when given) adds its weight;
allow lists (DNSWL) carry negative weights.  A client whose sum reaches
``threshold`` is refused before the greeting with 554 5.7.1.

The reply is Postfix's text without the zone name ("Service unavailable;
client [IP] blocked using DNSBL"): the client sees generic text, the log
line ``dnsbl_listed`` names the zones and their answers.

Only the mx listener is screened: submission clients authenticate, and
block lists such as Spamhaus PBL list the dynamic addresses our own users
send from.  Clients marked ``trusted`` by the access lists are not screened.

Scores are kept in memory per client address for ``cache_ttl`` seconds
(the shared resolver also caches the answers by their TTL); a score with a
failed lookup is not kept.

Security exposure: the client address is untrusted but only ever becomes a
DNS query name built from its parsed form.  A DNS failure or timeout never
blocks mail (the zone counts 0): a broken list must not stop the server.
RFC 5782 5: 127.0.0.1 is the usual "not listed" test entry and answers
outside 127.0.0.0/8 are errors (a zone that answers everything); both
count 0.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from postwarden import reply as R
from postwarden.config import DnsblConfig, DnsblZone
from postwarden.delivery.dns import DnsError, Resolver
from postwarden.observe.log import get_logger
from postwarden.policy import CheckContext, Policy, Stage

log = get_logger("dnsbl")

# Client scores kept in memory (each entry is small; oldest evicted first).
CACHE_ENTRIES = 10000
# RFC 5782 2.3: return codes are in 127.0.0.0/8.
_LOOPBACK_NET = ipaddress.IPv4Network("127.0.0.0/8")


def reverse_name(ip: str) -> str:
    """The query label sequence for ``ip``: ``1.2.3.4`` -> ``4.3.2.1``;
    IPv6 as 32 nibbles, least significant first (RFC 5782 2.4).  An
    IPv4-mapped IPv6 address is looked up as its IPv4 address.
    Raises ValueError for anything that is not an IP address."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


@dataclass(frozen=True, slots=True)
class Hit:
    zone: str
    weight: int
    codes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Score:
    """The sum of the weights of the zones that list a client."""

    total: int
    hits: tuple[Hit, ...] = ()
    complete: bool = True  # False: a lookup failed (the score is not cached)


def counts(zone: DnsblZone, codes: Sequence[str]) -> bool:
    """Whether the answer ``codes`` of ``zone`` lists the client."""
    valid = [c for c in codes if _is_listing(c)]
    if zone.match:
        return any(c in zone.match for c in valid)
    return bool(valid)


def _is_listing(code: str) -> bool:
    try:
        addr = ipaddress.IPv4Address(code)
    except ValueError:
        return False
    # 127.0.0.1 is "not listed" by convention (RFC 5782 5); an answer outside
    # 127/8 means the zone is gone or a resolver rewrites NXDOMAIN.
    return addr in _LOOPBACK_NET and code != "127.0.0.1"


def score(results: Sequence[tuple[DnsblZone, list[str] | None]]) -> Score:
    """Sum the weights of the zones whose answer lists the client; ``None``
    is a failed lookup (counts 0 and marks the score incomplete)."""
    total = 0
    hits = []
    complete = True
    for zone, codes in results:
        if codes is None:
            complete = False
            continue
        if counts(zone, codes):
            total += zone.weight
            hits.append(Hit(zone.zone, zone.weight, tuple(codes)))
    return Score(total, tuple(hits), complete)


class Dnsbl:
    """The connect-stage check; one per server (it owns the score cache)."""

    def __init__(self, config: DnsblConfig, resolver: Resolver, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.resolver = resolver
        self.clock = clock
        self._cache: OrderedDict[str, tuple[float, Score]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Score]] = {}

    @property
    def zones(self) -> tuple[DnsblZone, ...]:
        return self.config.zones + self.config.allow_zones

    async def _lookup(self, zone: DnsblZone, reversed_ip: str) -> list[str] | None:
        """The A records listing the client ([] when not listed); None when
        the lookup failed or timed out."""
        name = f"{reversed_ip}.{zone.zone}"
        try:
            async with asyncio.timeout(self.config.timeout):
                answer = await self.resolver.query(name, "A")
        except DnsError as exc:
            if not exc.permanent:
                log.info("dnsbl_lookup_failed", zone=zone.zone, error=exc.text)
                return None
            return []  # NXDOMAIN: not listed
        except TimeoutError:
            log.info("dnsbl_lookup_failed", zone=zone.zone, error="timeout")
            return None
        except Exception as exc:  # a broken list or resolver must not stop mail
            log.warning("dnsbl_lookup_failed", zone=zone.zone,
                        error=f"{type(exc).__name__}: {exc}")
            return None
        if answer is None:
            return []
        return sorted(str(rr.address) for rr in answer)

    async def score(self, ip: str) -> Score:
        """The client's score, from the cache or asked of every zone at once."""
        now = self.clock()
        cached = self._cache.get(ip)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            reversed_ip = reverse_name(ip)
        except ValueError:
            return Score(0)
        # Connections from one client at once share one set of lookups; the
        # shield keeps a session that goes away from cancelling the others'.
        task = self._inflight.get(ip)
        if task is None:
            task = asyncio.ensure_future(self._fetch(ip, reversed_ip))
            self._inflight[ip] = task
            task.add_done_callback(lambda _: self._inflight.pop(ip, None))
        return await asyncio.shield(task)

    async def _fetch(self, ip: str, reversed_ip: str) -> Score:
        zones = self.zones
        answers = await asyncio.gather(*(self._lookup(z, reversed_ip) for z in zones))
        result = score(list(zip(zones, answers, strict=True)))
        now = self.clock()
        if result.complete and self.config.cache_ttl > 0:
            self._cache[ip] = (now + self.config.cache_ttl, result)
            self._cache.move_to_end(ip)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return result

    async def check(self, ctx: CheckContext) -> R.Verdict:
        if ctx.listener.mode != "mx" or getattr(ctx.conn, "trusted", False):
            return R.NO_OPINION
        ip = ctx.conn.peer_ip
        result = await self.score(ip)
        if result.hits:
            log.info("dnsbl_listed", session=ctx.conn.session_id, client=ip,
                     score=result.total, threshold=self.config.threshold,
                     zones=[f"{h.zone}={','.join(h.codes)}:{h.weight:+d}" for h in result.hits])
        if result.total >= self.config.threshold:
            zones = ",".join(h.zone for h in result.hits if h.weight > 0)
            return R.reject(blocked_reply(ip), f"DNSBL score {result.total} "
                                                f">= {self.config.threshold} ({zones})")
        return R.NO_OPINION


def blocked_reply(ip: str) -> R.Reply:
    return R.Reply(554, "5.7.1", f"Service unavailable; client [{ip}] blocked using DNSBL")


def install(policy: Policy, config: DnsblConfig, resolver: Resolver | None) -> Dnsbl | None:
    """Register the connect check when zones are configured."""
    if not config.zones or resolver is None:
        return None
    dnsbl = Dnsbl(config, resolver)
    policy.register(Stage.CONNECT, dnsbl.check)
    return dnsbl
