"""DMARC: From extraction, record parsing, discovery and alignment, against
records served by a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any, cast

import dns.rdata as dns_rdata
import dns.rdataclass as dns_rdataclass
import dns.rdatatype as dns_rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.dns_server import LoopbackDns

from postwarden.config import DnsConfig
from postwarden.delivery.dns import CachedAnswer, DnsPermanent, DnsTemporary, Resolver
from postwarden.message.dkim_verify import DkimResult
from postwarden.policy.dmarc import (
    DmarcResult,
    FromError,
    RecordError,
    _lexed_address_domains,
    address_domains,
    aligned,
    check_message,
    evaluate,
    from_domain,
    organizational_domain,
    parse_record,
)


class FixedDraw(random.Random):
    """An rng whose pct draw (``randrange(100)``) is always ``value``."""

    def __init__(self, value: int) -> None:
        super().__init__(0)
        self.value = value

    def randrange(self, *args: Any, **kwargs: Any) -> int:
        return self.value


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    with LoopbackDns({"example.org": {"A": ["192.0.2.1"]},
                      "mail.example.org": {"A": ["192.0.2.2"]}}) as server:
        yield server


def dmarc(dns: LoopbackDns, author: str, *, spf: tuple[str, str] = ("none", ""),
          dkim: tuple[tuple[str, str], ...] = (), rng: random.Random | None = None,
          timeout: float = 2.0) -> DmarcResult:
    resolver = Resolver(DnsConfig(nameservers=dns.nameservers, timeout=timeout))
    sigs = [DkimResult(domain=d, selector="s", result=r) for d, r in dkim]  # type: ignore[arg-type]
    return asyncio.run(evaluate(resolver, author, spf_result=spf[0], spf_domain=spf[1],
                                dkim=sigs, rng=rng or FixedDraw(0)))


def record(dns: LoopbackDns, domain: str, *texts: str) -> None:
    dns.set(f"_dmarc.{domain}", {"TXT": list(texts)})


# --- alignment ------------------------------------------------------------------

ALIGNMENT = [
    # (record tags, From domain, (spf result, spf domain), dkim results, result, spf_al, dkim_al)
    ("", "example.org", ("pass", "example.org"), (), "pass", True, False),
    ("", "example.org", ("pass", "bounce.example.org"), (), "pass", True, False),
    ("aspf=s;", "example.org", ("pass", "bounce.example.org"), (), "fail", False, False),
    ("aspf=s;", "example.org", ("pass", "EXAMPLE.org"), (), "pass", True, False),
    ("", "example.org", ("pass", "evil.example"), (), "fail", False, False),
    ("", "example.org", ("softfail", "example.org"), (), "fail", False, False),
    ("", "example.org", ("fail", "example.org"), (("example.org", "pass"),), "pass", False, True),
    ("", "example.org", ("none", ""), (("sub.example.org", "pass"),), "pass", False, True),
    ("adkim=s;", "example.org", ("none", ""), (("sub.example.org", "pass"),), "fail", False,
     False),
    ("adkim=s;", "mail.example.org", ("none", ""), (("mail.example.org", "pass"),), "pass",
     False, True),
    ("", "example.org", ("none", ""), (("example.org", "fail"),), "fail", False, False),
    ("", "example.org", ("none", ""), (("example.org", "policy"),), "fail", False, False),
    ("", "example.org", ("none", ""), (("evil.example", "pass"),), "fail", False, False),
    ("", "example.org", ("none", ""), (("evil.example", "pass"), ("example.org", "pass")),
     "pass", False, True),
    ("", "example.org", ("pass", "example.org"), (("example.org", "pass"),), "pass", True, True),
    # A temporary error of an aligned check makes a failure temporary...
    ("", "example.org", ("temperror", "example.org"), (), "temperror", False, False),
    ("", "example.org", ("none", ""), (("example.org", "temperror"),), "temperror", False,
     False),
    # ... but not of an unaligned one.
    ("", "example.org", ("temperror", "evil.example"), (), "fail", False, False),
]


@pytest.mark.parametrize(("tags", "author", "spf", "dkim", "result", "spf_al", "dkim_al"),
                         ALIGNMENT)
def test_alignment(dns: LoopbackDns, tags: str, author: str, spf: tuple[str, str],
                   dkim: tuple[tuple[str, str], ...], result: str, spf_al: bool,
                   dkim_al: bool) -> None:
    record(dns, "example.org", f"v=DMARC1; p=reject; {tags}")
    r = dmarc(dns, author, spf=spf, dkim=dkim)
    assert (r.result, r.spf_aligned, r.dkim_aligned) == (result, spf_al, dkim_al)
    assert r.disposition == ("reject" if result == "fail" else "none")
    assert r.policy == "reject"


@pytest.mark.parametrize(("author", "other", "mode", "expected"), [
    ("a.example.co.uk", "b.example.co.uk", "r", True),
    ("example.co.uk", "other.co.uk", "r", False),  # co.uk is a public suffix
    ("foo.github.io", "bar.github.io", "r", False),  # PSL private section
    ("x.example.test", "example.test", "r", True),  # unknown TLD: one label
    ("example.org", "example.org.", "s", False),
    ("bücher.example", "xn--bcher-kva.example", "s", True),
    ("example.org", "", "r", False),
])
def test_aligned(author: str, other: str, mode: str, expected: bool) -> None:
    assert aligned(author, other, mode) is expected


def test_organizational_domain() -> None:
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("co.uk") == "co.uk"
    assert organizational_domain("mail.example.org") == "example.org"


# --- policy selection -----------------------------------------------------------


@pytest.mark.parametrize(("draw", "pct", "disposition"), [
    (0, 100, "reject"), (99, 100, "reject"),
    (49, 50, "reject"), (50, 50, "quarantine"),
    (0, 0, "quarantine"),
])
def test_pct_sampling(dns: LoopbackDns, draw: int, pct: int, disposition: str) -> None:
    record(dns, "example.org", f"v=DMARC1; p=reject; pct={pct}")
    r = dmarc(dns, "example.org", rng=FixedDraw(draw))
    assert (r.result, r.policy, r.disposition) == ("fail", "reject", disposition)


def test_pct_not_sampled_quarantine_becomes_none(dns: LoopbackDns) -> None:
    record(dns, "example.org", "v=DMARC1; p=quarantine; pct=10")
    r = dmarc(dns, "example.org", rng=FixedDraw(10))
    assert (r.policy, r.disposition) == ("quarantine", "none")
    assert "not sampled" in r.reason


def test_pct_real_rng_is_roughly_fair(dns: LoopbackDns) -> None:
    record(dns, "example.org", "v=DMARC1; p=reject; pct=50")
    rng = random.Random(7)
    resolver = Resolver(DnsConfig(nameservers=dns.nameservers, timeout=2.0))

    async def run() -> list[str]:
        return [(await evaluate(resolver, "example.org", spf_result="fail", spf_domain="",
                                dkim=(), rng=rng)).disposition for _ in range(200)]

    rejects = asyncio.run(run()).count("reject")
    assert 70 < rejects < 130


@pytest.mark.parametrize(("tags", "author", "policy"), [
    ("p=reject; sp=none", "mail.example.org", "none"),
    ("p=reject; sp=quarantine", "mail.example.org", "quarantine"),
    ("p=reject", "mail.example.org", "reject"),  # sp defaults to p
    ("p=none; sp=reject", "example.org", "none"),  # sp is for subdomains only
    ("p=quarantine; sp=reject; np=none", "mail.example.org", "reject"),  # exists
    ("p=quarantine; sp=none; np=reject", "ghost.example.org", "reject"),  # NXDOMAIN
])
def test_subdomain_policy(dns: LoopbackDns, tags: str, author: str, policy: str) -> None:
    record(dns, "example.org", f"v=DMARC1; {tags}")
    r = dmarc(dns, author)
    assert (r.result, r.policy, r.disposition, r.record_domain) == (
        "fail", policy, policy, "example.org")


def test_subdomain_own_record_wins(dns: LoopbackDns) -> None:
    record(dns, "example.org", "v=DMARC1; p=reject; sp=reject")
    record(dns, "mail.example.org", "v=DMARC1; p=none; sp=reject")
    r = dmarc(dns, "mail.example.org")
    assert (r.policy, r.record_domain) == ("none", "mail.example.org")


def test_organizational_domain_fallback_queries(dns: LoopbackDns) -> None:
    record(dns, "example.org", "v=DMARC1; p=quarantine")
    dns.queries.clear()
    r = dmarc(dns, "a.b.example.org")
    assert (r.result, r.policy, r.record_domain) == ("fail", "quarantine", "example.org")
    # The From domain, then straight to the Organizational Domain (RFC 7489
    # 6.6.3 step 3), never the names in between.
    assert [q for q in dns.queries if q[1] == "TXT"] == [
        ("_dmarc.a.b.example.org", "TXT"), ("_dmarc.example.org", "TXT")]


def test_no_record(dns: LoopbackDns) -> None:
    r = dmarc(dns, "example.org", spf=("pass", "example.org"))
    assert (r.result, r.policy, r.disposition, r.record) == ("none", "none", "none", None)


# --- records --------------------------------------------------------------------


@pytest.mark.parametrize(("texts", "result", "policy"), [
    (["v=DMARC1; p=reject"], "fail", "reject"),
    (["V=DMARC1; P=Reject"], "fail", "reject"),  # ABNF strings are case-insensitive
    (["v=DMARC1;p=quarantine;"], "fail", "quarantine"),
    (["v=DMARC1; p=reject; foo=bar"], "fail", "reject"),  # unknown tags ignored
    (["v=DMARC1; p=reject", "v=spf1 -all"], "fail", "reject"),  # others discarded
    (["v=dmarc1; p=reject"], "none", "none"),  # %x44.4d.41.52.43.31 is exact
    (["p=reject; v=DMARC1"], "none", "none"),  # v= must come first
    (["v=DMARC1 p=reject"], "none", "none"),
    (["v=DMARC1; p=bogus"], "none", "none"),
    (["v=DMARC1"], "none", "none"),
    (["v=DMARC1; p=bogus; rua=mailto:d@example.org"], "fail", "none"),  # 6.6.3 step 6
    (["v=DMARC1; rua=mailto:d@example.org"], "fail", "none"),
    (["v=DMARC1; p=reject; sp=bogus"], "none", "none"),
    (["v=DMARC1; p=reject; pct=abc"], "none", "none"),
    (["v=DMARC1; p=reject; pct=101"], "none", "none"),
    (["v=DMARC1; p=reject; adkim=x"], "none", "none"),
    (["v=DMARC1; p=reject; p=none"], "none", "none"),  # duplicate tag
    (["v=DMARC1; p=reject; =x"], "none", "none"),
    (["v=DMARC1; p=reject", "v=DMARC1; p=none"], "none", "none"),  # multiple records
])
def test_records(dns: LoopbackDns, texts: list[str], result: str, policy: str) -> None:
    record(dns, "example.org", *texts)
    r = dmarc(dns, "example.org")
    assert (r.result, r.policy) == (result, policy)


def test_malformed_record_falls_back_to_organizational_domain(dns: LoopbackDns) -> None:
    record(dns, "example.org", "v=DMARC1; p=reject")
    record(dns, "mail.example.org", "v=DMARC1; p=bogus")
    r = dmarc(dns, "mail.example.org")
    assert (r.policy, r.record_domain) == ("reject", "example.org")


def test_multiple_records_at_from_domain_stop_discovery(dns: LoopbackDns) -> None:
    record(dns, "example.org", "v=DMARC1; p=reject")
    record(dns, "mail.example.org", "v=DMARC1; p=none", "v=DMARC1; p=quarantine")
    r = dmarc(dns, "mail.example.org")
    assert r.result == "none" and "multiple" in r.reason


def test_parse_record_fields() -> None:
    rec = parse_record("v=DMARC1; p=quarantine; sp=reject; np=none; adkim=s; aspf=r; "
                       "pct=20; rua=mailto:a@example.org,mailto:b@example.net!10m; "
                       "ruf=mailto:f@example.org; fo=1")
    assert (rec.p, rec.sp, rec.np, rec.adkim, rec.aspf, rec.pct, rec.fo) == (
        "quarantine", "reject", "none", "s", "r", 20, "1")
    assert rec.rua == ("mailto:a@example.org", "mailto:b@example.net!10m")
    assert rec.ruf == ("mailto:f@example.org",)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_record_fuzz(text: str) -> None:
    try:
        rec = parse_record("v=DMARC1; " + text)
    except RecordError:
        return
    assert rec.p in ("none", "quarantine", "reject") and 0 <= rec.pct <= 100


# --- temporary errors -----------------------------------------------------------


@pytest.mark.parametrize("zone", ["SERVFAIL", "DROP"])
def test_policy_lookup_temperror(dns: LoopbackDns, zone: str) -> None:
    dns.set("_dmarc.example.org", zone)
    r = dmarc(dns, "example.org", spf=("pass", "example.org"), timeout=0.5)
    assert (r.result, r.disposition) == ("temperror", "none")


def test_organizational_lookup_temperror(dns: LoopbackDns) -> None:
    dns.set("_dmarc.example.org", "SERVFAIL")
    assert dmarc(dns, "mail.example.org").result == "temperror"


# --- the From domain (RFC 7489 6.6.1) ---------------------------------------------

FROM_OK = [
    ("a@example.org", "example.org"),
    ("Alice <a@Example.ORG>", "example.org"),
    ('"Bob, <b@evil.example>" <a@example.org>', "example.org"),
    ("(x <b@evil.example>) a@example.org (y)", "example.org"),
    ("a@example.org, b@example.org", "example.org"),
    ("Friends: a@example.org, b@example.org;", "example.org"),
    ("=?utf-8?q?PayPal?= <a@example.org>", "example.org"),
    ("John Q. Doe <a@example.org>", "example.org"),
    ('"a@evil.example"@example.org', "example.org"),
    ("<@relay.example:a@example.org>", "example.org"),
    ("a@example . org", "example.org"),  # obs-domain
    ("Jörg <jörg@bücher.example>", "xn--bcher-kva.example"),
    ("root@localhost", "localhost"),
]

FROM_BAD = [
    "",
    "undisclosed-recipients:;",
    "a@example.org, b@evil.example",
    "<a@example.org> <b@evil.example>",
    "<<a@example.org>>",
    "a@[192.0.2.1]",
    "a@example.org@evil.example",
    "paypal.com",
    "a@",
    "@example.org",
    '"unterminated <a@example.org>',
    "(unterminated a@example.org",
    "a@exa mple.org",
    "a@example.org.",
    "a@-bad.example",
    "Alice a@example.org",
    "a@example.org <b@example.org>",
]


@pytest.mark.parametrize(("value", "domain"), FROM_OK)
def test_from_domain(value: str, domain: str) -> None:
    message = f"To: x@y.example\r\nFrom: {value}\r\nSubject: s\r\n\r\nbody\r\n".encode()
    assert from_domain(message) == domain


@pytest.mark.parametrize("value", FROM_BAD)
def test_from_domain_malformed(value: str) -> None:
    with pytest.raises(FromError):
        from_domain(f"From: {value}\r\n\r\n".encode())


@pytest.mark.parametrize(("message", "reason"), [
    (b"Subject: s\r\n\r\n", "no From field"),
    (b"From: a@example.org\r\nFrom: b@example.org\r\n\r\n", "multiple From fields"),
    (b"From: a@example.org\r\nfrom : b@example.org\r\n\r\n", "multiple From fields"),
    (b"From : a@evil.example\r\nFrom: b@example.org\r\n\r\n", "multiple From fields"),
    (b"From: a@example.org\r\ngarbage line\r\nFrom: b@x.example\r\n\r\n",
     "multiple From fields"),
    (b"From: a@\xff.example\r\n\r\n", "From is not valid UTF-8"),
])
def test_from_field_count(message: bytes, reason: str) -> None:
    with pytest.raises(FromError, match=reason):
        from_domain(message)


def test_from_in_body_is_ignored() -> None:
    assert from_domain(b"From: a@example.org\r\n\r\nFrom: b@evil.example\r\n") == "example.org"


def test_folded_from() -> None:
    assert from_domain(b"From: Alice\r\n <a@example.org>\r\n\r\n") == "example.org"


def test_check_message_multiple_from_is_rejected(dns: LoopbackDns) -> None:
    record(dns, "example.org", "v=DMARC1; p=none")
    resolver = Resolver(DnsConfig(nameservers=dns.nameservers, timeout=2.0))
    message = b"From: a@example.org\r\nFrom: b@evil.example\r\n\r\nhi\r\n"
    r = asyncio.run(check_message(resolver, message, spf_result="pass",
                                  spf_domain="example.org", dkim=()))
    assert (r.result, r.disposition) == ("permerror", "reject")


def test_check_message_pass(dns: LoopbackDns) -> None:
    record(dns, "example.org", "v=DMARC1; p=reject")
    resolver = Resolver(DnsConfig(nameservers=dns.nameservers, timeout=2.0))
    message = b"From: Alice <a@example.org>\r\n\r\nhi\r\n"
    r = asyncio.run(check_message(resolver, message, spf_result="pass",
                                  spf_domain="example.org", dkim=()))
    assert (r.result, r.from_domain, r.policy, r.disposition) == (
        "pass", "example.org", "reject", "none")


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('ab@.<>,;:()"\\[] \t\u00e9-')), max_size=60))
def test_address_parser_fuzz(value: str) -> None:
    try:
        domains = address_domains(value)
    except FromError:
        return
    assert all(d and d == d.lower() for d in domains)


def _outcome(fn: Any, value: str) -> object:
    try:
        return fn(value)
    except FromError as exc:
        return ("error", str(exc))


_FROM_PIECES = st.sampled_from([
    "", "bob", "Bob", "a.b", "a..b", "x+y", "@", "<", ">", " ", "\t", ",", ";", ":", ".",
    "-", "(c)", '"q"', "[1.2.3.4]", "é", "b\\c", "'", "\u00a0", "a" * 64, "@a,@b:"])
_FROM_DOMAINS = st.sampled_from([
    "example.com", "EXAMPLE.org", "ex-ample.net", "-bad.com", "a..b", "xn--bcher-kva.de",
    "b\u00fccher.de", "com", "[1.2.3.4]", "a.b.", ""])


def _pieces(n: int) -> st.SearchStrategy[str]:
    return st.lists(_FROM_PIECES, max_size=n).map("".join)


@settings(max_examples=4000, deadline=None)
@given(st.tuples(_pieces(4), _pieces(3), _FROM_DOMAINS, _pieces(3)).map(
    lambda t: f"{t[0]}{t[1]}@{t[2]}{t[3]}"))
def test_the_quick_from_path_agrees_with_the_full_parser(value: str) -> None:
    """The regular expression for the common From forms gives exactly the
    answer (domain or refusal) of the full RFC 5322 lexer."""
    assert _outcome(address_domains, value) == _outcome(_lexed_address_domains, value)


@pytest.mark.parametrize("value", [
    "bob@example.com", " Bob Smith <bob@Example.COM> ", "<a@b.c>", "a@b.c>", "<a@b.c",
    "x <a@b..c>", "Bob <a@b.c> (c)", "a@b.c, d@e.f", '"Bob" <bob@example.com>'])
def test_from_forms_agree(value: str) -> None:
    assert _outcome(address_domains, value) == _outcome(_lexed_address_domains, value)


# --- discovery from the resolver's cache -----------------------------------------

class ZoneTxt:
    """TXT records in memory (``None``: the name exists without TXT);
    names not in the zone are NXDOMAIN; ``temp`` names fail temporarily."""

    def __init__(self, zone: dict[str, list[str] | None], temp: set[str]) -> None:
        self.zone = zone
        self.temp = temp

    def _answer(self, name: str) -> tuple[bool, list[Any] | None]:
        key = name.lower().rstrip(".")
        if key not in self.zone:
            return True, None
        texts = self.zone[key]
        if texts is None:
            return False, None
        return False, [dns_rdata.from_text(dns_rdataclass.IN, dns_rdatatype.TXT, f'"{t}"')
                       for t in texts]

    async def query(self, name: str, rdtype: str) -> Any:
        if name.lower().rstrip(".") in self.temp:
            raise DnsTemporary(f"timeout on {name}")
        nxdomain, records = self._answer(name) if rdtype == "TXT" else (False, None)
        if nxdomain:
            raise DnsPermanent(f"domain {name} not found")
        return records


class CachedZoneTxt(ZoneTxt):
    """The same zone, with Resolver.cached: each name in ``cached`` (never
    the failing ones: failures are not cached) answered from the cache."""

    def __init__(self, zone: dict[str, list[str] | None], temp: set[str],
                 cached: set[str]) -> None:
        super().__init__(zone, temp)
        self.cached_names = cached - temp

    def cached(self, name: str, rdtype: str) -> CachedAnswer | None:
        key = name.lower().rstrip(".")
        if key not in self.cached_names or rdtype != "TXT":
            return None
        nxdomain, records = self._answer(name)
        return CachedAnswer(float("inf"), cast(Any, records), False, nxdomain)


DMARC_NAMES = ["_dmarc.a.example.org", "_dmarc.example.org", "_dmarc.b.example.co.uk",
               "_dmarc.example.co.uk"]
DMARC_TXT = st.sampled_from(["v=DMARC1; p=reject", "v=DMARC1; p=none; sp=quarantine",
                             "v=DMARC1; p=bogus", "v=DMARC1; p=bogus; rua=mailto:a@b.c",
                             "v=spf1 -all", "v=DMARC1;p=quarantine;pct=50;adkim=s"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(DMARC_NAMES),
                       st.one_of(st.none(), st.lists(DMARC_TXT, max_size=3))),
       st.sets(st.sampled_from(DMARC_NAMES)), st.sets(st.sampled_from(DMARC_NAMES)),
       st.sampled_from(["a.example.org", "example.org", "b.example.co.uk", "x.example.co.uk"]),
       st.sampled_from(["pass", "fail", "temperror"]))
def test_discovery_from_the_cache_equals_the_lookups(
        zone: dict[str, list[str] | None], temp: set[str], cached: set[str],
        author: str, spf_result: str) -> None:
    async def run(resolver: ZoneTxt) -> DmarcResult:
        return await evaluate(resolver, author, spf_result=spf_result,
                              spf_domain="example.org", dkim=(), rng=FixedDraw(70))
    want = asyncio.run(run(ZoneTxt(zone, temp)))
    assert asyncio.run(run(CachedZoneTxt(zone, temp, cached))) == want
