"""SPF (RFC 7208) beyond the OpenSPF suite: the macro examples of section
7.4, the processing limits of 4.6.4, timeouts, IPv6 clients, the HELO and
null-sender identities, and a fuzz test of the record parser.

The tables run against a real DNS server on loopback; the fuzz test uses an
in-memory resolver (the ``DnsQuery`` seam) so that it can run many cases.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from typing import Any, cast

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.dns_server import LoopbackDns

from postwarden.config import DnsConfig
from postwarden.delivery.dns import CachedAnswer, DnsPermanent, Resolver
from postwarden.policy import spf
from postwarden.policy.spf import SpfLimits, check_helo, check_host, check_mail_from

V4 = "192.0.2.3"
V6 = "2001:db8::cb01"
SENDER = "strong-bad@email.example.com"

ZONES: dict[str, Any] = {
    # RFC 7208 7.4: the record under test puts the macro string in exp=.
    "email.example.com": {"TXT": ["v=spf1 -all exp=explain.example.net"]},
    "v6.example.com": {"TXT": ["v=spf1 exists:%{ir}.%{v}._spf.%{d2} -all"]},
    "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com":
        {"A": ["127.0.0.2"]},
    # Limits.
    "host.limits.test": {"A": ["198.51.100.1"], "AAAA": ["2001:db8:ffff::1"]},
    "voids2.limits.test": {"TXT": ["v=spf1 a:nx1.limits.test a:nx2.limits.test +all"]},
    "voids3.limits.test": {
        "TXT": ["v=spf1 a:nx1.limits.test a:nx2.limits.test a:nx3.limits.test +all"]},
    "voidexp.limits.test": {
        "TXT": ["v=spf1 a:nx1.limits.test a:nx2.limits.test -all exp=nx3.limits.test"]},
    "many.limits.test": {"TXT": ["v=spf1 " + " ".join(["a:host.limits.test"] * 30)
                                 + " +all"]},
    "mx10.limits.test": {"TXT": ["v=spf1 mx -all"],
                         "MX": [(i, f"h{i}.mx.limits.test") for i in range(10)]},
    "mx11.limits.test": {"TXT": ["v=spf1 mx -all"],
                         "MX": [(i, f"h{i}.mx.limits.test") for i in range(11)]},
    "ptr.limits.test": {"TXT": ["v=spf1 ptr -all"]},
    # Failing DNS.
    "slow.test": "DROP",
    "broken.test": "SERVFAIL",
    "include-slow.test": {"TXT": ["v=spf1 include:slow.test -all"]},
    "servfail.test": {"TXT": ["v=spf1 a:broken.test -all"]},
    # IPv6 clients.
    "v6net.test": {"TXT": ["v=spf1 ip6:2001:db8:1::/48 -ip6:2001:db8::/32 ip4:192.0.2.0/24"
                           " ~all"]},
    "v6a.test": {"TXT": ["v=spf1 a:host.v6a.test//64 mx/24//56 -all"],
                 "MX": [(10, "mx.v6a.test")]},
    "host.v6a.test": {"AAAA": ["2001:db8:5::1"]},
    "mx.v6a.test": {"AAAA": ["2001:db8:6:ff00::1"], "A": ["198.51.100.7"]},
    # Identities.
    "mail.example.com": {"TXT": ["v=spf1 a -all exp=who.example.com"], "A": [V4]},
    "who.example.com": {"TXT": ["%{s} via %{h} (%{o})"]},
    "spf99only.test": {"SPF": ["v=spf1 -all"]},
}
for _i in range(11):
    ZONES[f"h{_i}.mx.limits.test"] = {"A": [f"198.51.100.{100 + _i}"]}
for _i in range(1, 13):
    nxt = f"include:chain{_i + 1}.limits.test" if _i < 12 else "+all"
    ZONES[f"chain{_i}.limits.test"] = {"TXT": [f"v=spf1 {nxt}"]}
# The address 203.0.113.9 maps back to 11 names; each is valid (maps to it),
# but only the 11th, which must be ignored, is in ptr.limits.test.
ZONES["9.113.0.203.in-addr.arpa"] = {
    "PTR": [f"n{i}.other.test" for i in range(10)] + ["n10.ptr.limits.test"]}
for _i in range(10):
    ZONES[f"n{_i}.other.test"] = {"A": ["203.0.113.9"]}
ZONES["n10.ptr.limits.test"] = {"A": ["203.0.113.9", "203.0.113.10"]}
ZONES["10.113.0.203.in-addr.arpa"] = {"PTR": ["n10.ptr.limits.test"]}


@pytest.fixture(scope="module")
def server() -> Iterator[LoopbackDns]:
    with LoopbackDns(ZONES) as dns_server:
        yield dns_server


def resolver(server: LoopbackDns, timeout: float = 2.0) -> Resolver:
    return Resolver(DnsConfig(nameservers=server.nameservers, timeout=timeout))


def run_check(server: LoopbackDns, ip: str, domain: str, sender: str = SENDER,
              helo: str = "mail.example.com", **kw: Any) -> spf.SpfResult:
    return asyncio.run(check_host(ip, domain, sender, helo, resolver(server), **kw))


# --- RFC 7208 7.4: macro expansion examples ------------------------------------------

RFC_7_4 = [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
    # Beyond 7.4: the escapes, URL-escaping upper-case letters, c/r/t (exp only).
    ("100%%%_sure%-ok", "100% sure%20ok"),
    ("%{L}|%{O}", "strong-bad|email.example.com"),
    ("%{c} %{r} %{t}", "192.0.2.3 mx.example.org 1700000000"),
    ("%{h} %{H}", "mail.example.com mail.example.com"),
]


@pytest.mark.parametrize(("macro", "expected"), RFC_7_4, ids=[m for m, _ in RFC_7_4])
def test_rfc7208_7_4_macro_examples(server: LoopbackDns, macro: str, expected: str) -> None:
    # The macro string is the explanation of a "fail": expanded exactly as written.
    server.set("explain.example.net", {"TXT": [macro]})
    result = run_check(server, V4, "email.example.com", receiver="mx.example.org",
                       clock=lambda: 1_700_000_000.5)
    assert result.result == "fail"
    assert result.explanation == expected


def test_url_escaping_of_upper_case_macros(server: LoopbackDns) -> None:
    server.set("explain.example.net", {"TXT": ["%{L}"]})
    result = run_check(server, V4, "email.example.com", sender="a b/c~d@email.example.com")
    assert result.explanation == "a%20b%2Fc~d"


def test_rfc7208_7_4_ipv6_example(server: LoopbackDns) -> None:
    # "%{ir}.%{v}._spf.%{d2}" for 2001:db8::cb01 is
    # 1.0.b.c.0.0....8.b.d.0.1.0.0.2.ip6._spf.example.com: the exists: lookup
    # of that name is what makes it pass.
    result = run_check(server, V6, "v6.example.com")
    assert (result.result, result.mechanism) == ("pass", "exists:%{ir}.%{v}._spf.%{d2}")
    assert result.dns_terms == 1


def test_ipv6_c_macro_is_rfc5952(server: LoopbackDns) -> None:
    server.set("explain.example.net", {"TXT": ["%{c} %{v}"]})
    result = run_check(server, "2001:DB8:0:0::CB01", "email.example.com")
    assert result.explanation == "2001:db8::cb01 ip6"


# --- RFC 7208 4.6.4: processing limits --------------------------------------------------

@pytest.mark.parametrize(("start", "result", "terms"), [
    (2, "pass", 10),        # chain2 .. chain11 include: ten terms, at the limit
    (1, "permerror", 11),   # from chain1: the eleventh is refused
])
def test_ten_dns_terms(server: LoopbackDns, start: int, result: str, terms: int) -> None:
    got = run_check(server, V4, f"chain{start}.limits.test")
    assert got.result == result
    assert got.dns_terms == terms
    assert "4.6.4" in got.comment or result == "pass"


def test_dns_term_limit_is_configurable(server: LoopbackDns) -> None:
    got = run_check(server, V4, "chain9.limits.test", limits=SpfLimits(dns_terms=2))
    assert got.result == "permerror"


def test_dns_term_limit_bounds_queries(server: LoopbackDns) -> None:
    # 30 "a" terms naming a host that exists: ten lookups, then permerror.
    before = len(server.queries)
    got = run_check(server, V4, "many.limits.test")
    asked = server.queries[before:]
    assert got.result == "permerror"
    assert asked.count(("host.limits.test", "A")) == 10


@pytest.mark.parametrize(("domain", "result"), [
    ("voids2.limits.test", "pass"),        # two void lookups: allowed
    ("voids3.limits.test", "permerror"),   # the third is one too many
    ("voidexp.limits.test", "fail"),       # an exp= to nowhere is not a void lookup
])
def test_void_lookup_limit(server: LoopbackDns, domain: str, result: str) -> None:
    got = run_check(server, V4, domain)
    assert got.result == result, got
    if result == "fail":
        assert got.explanation == spf.default_explanation(domain, V4)


@pytest.mark.parametrize(("domain", "ip", "result"), [
    ("mx10.limits.test", "198.51.100.109", "pass"),
    ("mx11.limits.test", "198.51.100.109", "permerror"),  # 11 MX names: over the limit
])
def test_mx_name_limit(server: LoopbackDns, domain: str, ip: str, result: str) -> None:
    assert run_check(server, ip, domain).result == result


def test_ptr_names_beyond_ten_are_ignored(server: LoopbackDns) -> None:
    # 203.0.113.9 has 11 PTR names; the one in the domain is the 11th.
    assert run_check(server, "203.0.113.9", "ptr.limits.test").result == "fail"
    # 203.0.113.10 has just that name: it matches.
    assert run_check(server, "203.0.113.10", "ptr.limits.test").result == "pass"


# --- Failing DNS: temperror, bounded in time ---------------------------------------

def test_overall_timeout_gives_temperror_in_time(server: LoopbackDns) -> None:
    # The resolver would wait 5 s; the evaluation is cut at 0.3 s.
    start = time.monotonic()
    got = asyncio.run(check_host(V4, "include-slow.test", SENDER, "mail.example.com",
                                 resolver(server, timeout=5.0), timeout=0.3))
    elapsed = time.monotonic() - start
    assert got.result == "temperror"
    assert "0.3 s" in got.comment
    assert elapsed < 2.0


def test_dns_timeout_gives_temperror(server: LoopbackDns) -> None:
    got = asyncio.run(check_host(V4, "include-slow.test", SENDER, "mail.example.com",
                                 resolver(server, timeout=0.3)))
    assert got.result == "temperror"


def test_servfail_gives_temperror(server: LoopbackDns) -> None:
    assert run_check(server, V4, "servfail.test").result == "temperror"


# --- IPv6 clients ----------------------------------------------------------------------

@pytest.mark.parametrize(("ip", "result", "mechanism"), [
    ("2001:db8:1::25", "pass", "ip6:2001:db8:1::/48"),
    ("2001:db8:2::25", "fail", "-ip6:2001:db8::/32"),
    ("2001:db9::25", "softfail", "~all"),
    ("192.0.2.77", "pass", "ip4:192.0.2.0/24"),
    # RFC 7208 5: an IPv4-mapped address is an IPv4 client; ip6 never matches it.
    ("::ffff:192.0.2.77", "pass", "ip4:192.0.2.0/24"),
    ("::ffff:198.51.100.1", "softfail", "~all"),
])
def test_ipv6_client_with_ip6_mechanisms(server: LoopbackDns, ip: str, result: str,
                                         mechanism: str) -> None:
    got = run_check(server, ip, "v6net.test")
    assert (got.result, got.mechanism) == (result, mechanism)


@pytest.mark.parametrize(("ip", "result", "mechanism"), [
    ("2001:db8:5::abcd", "pass", "a:host.v6a.test//64"),   # AAAA, /64
    ("2001:db8:6:ff01::9", "pass", "mx/24//56"),            # the MX's AAAA, /56
    ("2001:db8:7::1", "fail", "-all"),
    ("198.51.100.200", "pass", "mx/24//56"),                 # the MX's A, /24
])
def test_ipv6_dual_cidr(server: LoopbackDns, ip: str, result: str, mechanism: str) -> None:
    got = run_check(server, ip, "v6a.test")
    assert (got.result, got.mechanism) == (result, mechanism)


# --- Identities (RFC 7208 2.3, 2.4) ----------------------------------------------------

def test_helo_identity(server: LoopbackDns) -> None:
    r = resolver(server)
    got = asyncio.run(check_helo(V4, "mail.example.com", r))
    assert (got.result, got.domain) == ("pass", "mail.example.com")
    got = asyncio.run(check_helo("198.51.100.1", "mail.example.com", r))
    assert got.result == "fail"
    assert got.explanation == "postmaster@mail.example.com via mail.example.com " \
                              "(mail.example.com)"


@pytest.mark.parametrize("helo", ["[192.0.2.3]", "localhost", "a..b.example"])
def test_helo_that_is_no_domain_gives_none(server: LoopbackDns, helo: str) -> None:
    assert asyncio.run(check_helo(V4, helo, resolver(server))).result == "none"


def test_null_sender_checks_postmaster_at_helo(server: LoopbackDns) -> None:
    got = asyncio.run(check_mail_from("198.51.100.1", "", "mail.example.com",
                                      resolver(server)))
    assert got.result == "fail"
    assert got.explanation.startswith("postmaster@mail.example.com via ")


def test_mail_from_uses_its_domain(server: LoopbackDns) -> None:
    got = asyncio.run(check_mail_from(V4, "someone@mail.example.com", "other.example",
                                      resolver(server)))
    assert (got.result, got.mechanism, got.domain) == ("pass", "a", "mail.example.com")


def test_spf_rr_type_is_not_consulted(server: LoopbackDns) -> None:
    # RFC 7208 3.1: only TXT; a name with a type 99 record alone has no policy.
    assert run_check(server, V4, "spf99only.test").result == "none"


def test_invalid_client_address_is_an_error(server: LoopbackDns) -> None:
    with pytest.raises(ValueError):
        run_check(server, "not-an-ip", "mail.example.com")


def test_explanation_is_shortened(server: LoopbackDns) -> None:
    server.set("explain.example.net", {"TXT": ["why " * 200]})
    got = run_check(server, V4, "email.example.com")
    assert len(got.explanation) <= spf.MAX_EXPLANATION
    assert got.explanation.startswith("why why")


# --- Fuzzing the parser and evaluator ---------------------------------------------------

class MemoryDns:
    """The ``DnsQuery`` seam in memory: one TXT record; every other name
    exists without records."""

    def __init__(self, record: bytes) -> None:
        self.record = record

    async def query(self, name: str, rdtype: str) -> Iterable[dns.rdata.Rdata] | None:
        if rdtype == "TXT" and name.lower().rstrip(".") == "fuzz.test":
            pieces = [self.record[i:i + 255] for i in range(0, len(self.record), 255)]
            return [dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT,
                                            pieces or [b""])]
        return None


TERMS = st.sampled_from([
    "all", "-all", "~all", "?all", "+all", "a", "a/24", "a//64", "a:%{d}", "mx", "mx:%{o}/8",
    "ptr", "ptr:%{d2}", "ip4:192.0.2.0/24", "ip6:2001:db8::/32", "exists:%{ir}.%{v}.x.test",
    "include:fuzz.test", "redirect=fuzz.test", "exp=%{l}.x.test", "foo=%{s}", "%", "%{",
    "a:%{x}", "ip4:", "ip6::", "a:x..y", "/", "//", ":", "=", "v=spf1", "\x00", "\xe9",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(TERMS, st.text(max_size=12)), max_size=12),
       st.sampled_from(["192.0.2.1", "2001:db8::1", "::ffff:10.0.0.1"]))
def test_fuzz_any_record_gives_a_result(terms: list[str], ip: str) -> None:
    record = ("v=spf1 " + " ".join(terms)).encode("utf-8", "surrogatepass")
    got = asyncio.run(check_host(ip, "fuzz.test", "u@fuzz.test", "h.test",
                                 MemoryDns(record), timeout=5.0))
    assert got.result in ("pass", "fail", "softfail", "neutral", "none", "permerror",
                          "temperror")
    assert all(" " <= ch <= "~" for ch in got.comment + got.explanation)
    # Every include/redirect of itself ends at the limit, never in recursion.
    assert got.dns_terms <= spf.MAX_DNS_TERMS + 1


# --- Cached-only evaluation (answers from the resolver's cache) ----------------------

class ZoneDns:
    """The ``DnsQuery`` seam over a small zone: ``{(name, type): records}``,
    ``None`` for NODATA; names not in it are NXDOMAIN (a name with any
    records exists).  With ``cached``, the names (all when None) whose
    answers the ``cached`` method (Resolver.cached) reports as cached."""

    def __init__(self, zone: dict[tuple[str, str], list[dns.rdata.Rdata] | None]) -> None:
        self.zone = zone
        self.names = {name for name, _ in zone}
        self.queries: list[tuple[str, str]] = []

    def _answer(self, name: str, rdtype: str) -> tuple[bool, list[dns.rdata.Rdata] | None]:
        key = name.lower().rstrip(".")
        if key not in self.names:
            return True, None
        return False, self.zone.get((key, rdtype))

    async def query(self, name: str, rdtype: str) -> Iterable[dns.rdata.Rdata] | None:
        self.queries.append((name.lower().rstrip("."), rdtype))
        nxdomain, records = self._answer(name, rdtype)
        if nxdomain:
            raise DnsPermanent(f"domain {name} not found")
        return records


class CachedZoneDns(ZoneDns):
    def __init__(self, zone: dict[tuple[str, str], list[dns.rdata.Rdata] | None],
                 cached: set[tuple[str, str]] | None = None) -> None:
        super().__init__(zone)
        self.cached_keys = cached

    def cached(self, name: str, rdtype: str) -> CachedAnswer | None:
        key = (name.lower().rstrip("."), rdtype)
        if self.cached_keys is not None and key not in self.cached_keys:
            return None
        nxdomain, records = self._answer(name, rdtype)
        return CachedAnswer(float("inf"), cast(Any, records), False, nxdomain)


def _rr(rdtype: str, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text)


NAMES = ["fuzz.test", "a.test", "b.test", "mx1.test", "mx2.test", "e.test", "nx.test",
         "1.2.0.192.in-addr.arpa", "1.2.0.192.c.test"]
ZONE_TERMS = st.sampled_from([
    "all", "-all", "~all", "?all", "include:a.test", "include:b.test", "include:nx.test",
    "a", "a:a.test", "a:mx1.test/24", "a:nx.test", "mx", "mx:a.test", "mx:b.test//64",
    "ptr", "ptr:a.test", "ptr:%{d}", "exists:%{i}.c.test", "exists:%{ir}.%{v}.arpa",
    "exists:%{p}.c.test", "ip4:192.0.2.0/24", "ip4:198.51.100.1", "ip6:2001:db8::/32",
    "redirect=a.test", "redirect=b.test", "redirect=nx.test", "exp=e.test", "exp=nx.test",
    "a:%{l}.%{o}", "%{x}", "a:x..y",
])
SPF_RECORDS = st.lists(ZONE_TERMS, max_size=6).map(lambda terms: "v=spf1 " + " ".join(terms))


@st.composite
def zones(draw: st.DrawFn) -> dict[tuple[str, str], list[dns.rdata.Rdata] | None]:
    zone: dict[tuple[str, str], list[dns.rdata.Rdata] | None] = {}
    for name in ("fuzz.test", "a.test", "b.test"):
        if draw(st.booleans()) or name == "fuzz.test":
            zone[(name, "TXT")] = [_rr("TXT", f'"{draw(SPF_RECORDS)}"')]
        if draw(st.booleans()):
            zone[(name, "A")] = [_rr("A", draw(st.sampled_from(
                ["192.0.2.1", "198.51.100.1", "192.0.2.200"])))]
        if draw(st.booleans()):
            zone[(name, "MX")] = [_rr("MX", f"{i} {h}") for i, h in enumerate(
                draw(st.lists(st.sampled_from(["mx1.test.", "mx2.test.", "nx.test.", "."]),
                              max_size=3)))]
        if draw(st.booleans()):
            zone[(name, "AAAA")] = None  # exists, no such records
    for host in ("mx1.test", "mx2.test"):
        zone[(host, "A")] = [_rr("A", draw(st.sampled_from(["192.0.2.1", "198.51.100.9"])))]
    zone[("e.test", "TXT")] = [_rr("TXT", draw(st.sampled_from(
        ['"denied %{s} from %{i}"', '"bad %{"', '"one" "two"'])))]
    if draw(st.booleans()):
        zone[("1.2.0.192.in-addr.arpa", "PTR")] = [_rr("PTR", draw(st.sampled_from(
            ["a.test.", "mx1.test.", "b.test."])))]
    if draw(st.booleans()):
        zone[("1.2.0.192.c.test", "A")] = [_rr("A", "127.0.0.2")]
    return zone


@settings(max_examples=400, deadline=None)
@given(zones(), st.sets(st.tuples(st.sampled_from(NAMES),
                                  st.sampled_from(["TXT", "A", "AAAA", "MX", "PTR"]))),
       st.booleans(), st.sampled_from(["192.0.2.1", "2001:db8::1"]))
def test_cached_only_evaluation_equals_the_full_one(
        zone: dict[tuple[str, str], list[dns.rdata.Rdata] | None],
        some_cached: set[tuple[str, str]], all_cached: bool, ip: str) -> None:
    """An evaluation answered from the resolver's cache (all of it, or in
    part: then the full evaluation takes over) gives exactly the result of
    the evaluation that queries."""
    async def run(dns_query: ZoneDns) -> spf.SpfResult:
        return await check_host(ip, "fuzz.test", "u@fuzz.test", "h.test", dns_query,
                                receiver="mx.test", clock=lambda: 1234567890.0)
    want = asyncio.run(run(ZoneDns(zone)))
    cached = CachedZoneDns(zone, None if all_cached else some_cached)
    got = asyncio.run(run(cached))
    assert got == want
    if all_cached:
        assert cached.queries == []  # nothing was asked that was cached


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=400), st.text(alphabet=" ~a\x1f\x7f\x80é\t", max_size=20)),
       st.integers(min_value=3, max_value=400))
def test_printable_equals_the_substitution(text: str, limit: int) -> None:
    clean = spf._NOT_PRINTABLE.sub("?", text)
    want = clean if len(clean) <= limit else clean[:limit - 3] + "..."
    assert spf._printable(text, limit) == want


def test_the_at_once_entry_points_answer_only_from_the_cache() -> None:
    """check_mail_from_cached / check_helo_cached (the session's way to
    skip a task when the answers are cached): the result of the querying
    check when every answer is cached, None (and no query) otherwise."""
    zone: dict[tuple[str, str], list[dns.rdata.Rdata] | None] = {
        ("fuzz.test", "TXT"): [_rr("TXT", '"v=spf1 ip4:192.0.2.0/24 -all"')],
        ("h.test", "TXT"): [_rr("TXT", '"v=spf1 -all"')]}

    async def full(kind: str) -> spf.SpfResult:
        if kind == "mail":
            return await spf.check_mail_from("192.0.2.1", "u@fuzz.test", "h.test",
                                             ZoneDns(zone), receiver="mx.test")
        if kind == "null":
            return await spf.check_mail_from("192.0.2.1", "", "h.test", ZoneDns(zone),
                                             receiver="mx.test")
        return await spf.check_helo("192.0.2.1", "h.test", ZoneDns(zone), receiver="mx.test")

    def at_once(kind: str, dns_query: ZoneDns) -> spf.SpfResult | None:
        if kind == "mail":
            return spf.check_mail_from_cached("192.0.2.1", "u@fuzz.test", "h.test",
                                              dns_query, receiver="mx.test")
        if kind == "null":
            return spf.check_mail_from_cached("192.0.2.1", "", "h.test", dns_query,
                                              receiver="mx.test")
        return spf.check_helo_cached("192.0.2.1", "h.test", dns_query, receiver="mx.test")

    for kind, want in (("mail", "pass"), ("null", "fail"), ("helo", "fail")):
        expected = asyncio.run(full(kind))
        assert expected.result == want
        warm = CachedZoneDns(zone)
        assert at_once(kind, warm) == expected and warm.queries == []
        cold = CachedZoneDns(zone, cached=set())
        assert at_once(kind, cold) is None and cold.queries == []
    # After a None, the session asks with cached_first=False: straight to
    # the lookups (even a warm cache is not consulted again), same result.
    warm = CachedZoneDns(zone)
    again = asyncio.run(spf.check_mail_from("192.0.2.1", "u@fuzz.test", "h.test", warm,
                                            receiver="mx.test", cached_first=False))
    assert again == asyncio.run(full("mail")) and warm.queries == [("fuzz.test", "TXT")]
    # Not a domain: answered at once whatever is cached (RFC 7208 4.3).
    got = spf.check_helo_cached("192.0.2.1", "[192.0.2.1]", ZoneDns(zone))
    assert got is not None and got.result == "none"
    with pytest.raises(ValueError):
        spf.check_helo_cached("not-an-ip", "h.test", CachedZoneDns(zone))


class ExpiringDns(CachedZoneDns):
    """Every answer cached, until ``expires`` (monotonic time) per name; the
    lookups of the cache are counted."""

    def __init__(self, zone: dict[tuple[str, str], list[dns.rdata.Rdata] | None],
                 expires: dict[str, float]) -> None:
        super().__init__(zone)
        self.expires = expires
        self.looked_up = 0

    def cached(self, name: str, rdtype: str) -> CachedAnswer | None:
        self.looked_up += 1
        hit = super().cached(name, rdtype)
        assert hit is not None
        return CachedAnswer(self.expires.get(name.lower().rstrip("."), time.monotonic() + 600),
                            hit.answer, hit.secure, hit.nxdomain)


def test_an_answer_from_the_cache_is_kept_while_its_dns_answers_live() -> None:
    """The same sender from the same address is evaluated once while every
    DNS answer it read lives; then again, with what the DNS says now."""
    zone: dict[tuple[str, str], list[dns.rdata.Rdata] | None] = {
        ("keep.test", "TXT"): [_rr("TXT", '"v=spf1 include:inc.test ~all"')],
        ("inc.test", "TXT"): [_rr("TXT", '"v=spf1 ip4:192.0.2.0/24 -all"')]}
    dns_query = ExpiringDns(zone, {"inc.test": time.monotonic() + 0.3})

    def check(ip: str = "192.0.2.1", sender: str = "u@keep.test") -> spf.SpfResult | None:
        return spf.check_mail_from_cached(ip, sender, "h.test", dns_query, receiver="mx.test")

    first = check()
    assert first is not None and first.result == "pass"
    read = dns_query.looked_up
    assert read >= 2
    assert check() == first and dns_query.looked_up == read  # kept
    other = check(ip="198.51.100.7")  # another client: its own evaluation
    assert other is not None and other.result == "softfail"
    assert dns_query.looked_up > read

    zone[("inc.test", "TXT")] = [_rr("TXT", '"v=spf1 ip4:198.51.100.0/24 -all"')]
    assert check() == first  # the old answer of inc.test still lives
    time.sleep(0.35)
    again = check()
    assert again is not None and again.result == "softfail"  # read afresh


def test_a_fail_is_evaluated_every_time() -> None:
    """A "fail" carries an explanation, which may hold the time (%{t})."""
    zone: dict[tuple[str, str], list[dns.rdata.Rdata] | None] = {
        ("deny.test", "TXT"): [_rr("TXT", '"v=spf1 -all"')]}
    dns_query = ExpiringDns(zone, {})
    for _ in range(2):
        before = dns_query.looked_up
        result = spf.check_mail_from_cached("192.0.2.1", "u@deny.test", "h.test", dns_query)
        assert result is not None and result.result == "fail"
        assert dns_query.looked_up > before
