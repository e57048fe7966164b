"""MX and address lookups against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from dns_server import LoopbackDns, dns_server  # noqa: F401  (fixture)
from postwarden.config import DnsConfig
from postwarden.delivery.dns import (
    DnsPermanent,
    DnsTemporary,
    NullMx,
    Resolver,
    interleave,
    order_mx,
)

ZONES = {
    "example.org": {"MX": [(20, "mx3.example.org"), (10, "mx1.example.org"),
                           (10, "mx2.example.org"), (30, "mx4.example.org")]},
    "mx1.example.org": {"A": ["127.0.0.1"]},
    "mx2.example.org": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
    "mx3.example.org": {"AAAA": ["::1", "::2"], "A": ["127.0.0.3", "127.0.0.4"]},
    "mx4.example.org": {"CNAME": "mx1.example.org"},
    "nomx.example": {"A": ["127.0.0.5"], "TXT": ["v=spf1 -all"]},
    "nullmx.example": {"MX": [(0, ".")]},
    "mixed-null.example": {"MX": [(0, "."), (10, "mx1.example.org")]},
    "broken.example": "SERVFAIL",
    "dead-mx.example": {"MX": [(10, "gone.dead-mx.example")]},
    "noaddr.example.org": {"TXT": ["no addresses here"]},
    "big.example": {"TXT": ["x" * 3000]},
}


def resolver(dns: LoopbackDns, timeout: float = 2.0, seed: int | None = None) -> Resolver:
    rng = random.Random(seed) if seed is not None else None
    return Resolver(DnsConfig(nameservers=dns.nameservers, timeout=timeout), rng=rng)


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    with LoopbackDns(ZONES) as server:
        yield server


def test_mx_sorted_by_preference(dns: LoopbackDns) -> None:
    hosts = asyncio.run(resolver(dns).mx_hosts("Example.ORG."))
    assert set(hosts[:2]) == {"mx1.example.org", "mx2.example.org"}
    assert hosts[2:] == ["mx3.example.org", "mx4.example.org"]


def test_equal_preferences_are_shuffled(dns: LoopbackDns) -> None:
    async def many() -> Counter[str]:
        r = resolver(dns)
        firsts: Counter[str] = Counter()
        for _ in range(40):
            firsts[(await r.mx_hosts("example.org"))[0]] += 1
        return firsts

    firsts = asyncio.run(many())
    # RFC 5321 5.1: both equal-preference hosts come first sometimes
    # (the chance of a false failure is 2 * 0.5**40).
    assert set(firsts) == {"mx1.example.org", "mx2.example.org"}


def test_order_mx_is_a_pure_function() -> None:
    rng = random.Random(1)
    recs = [(10, "a"), (5, "b"), (10, "c"), (5, "b")]
    out = order_mx(recs, rng)
    assert out[0] == "b" and set(out[1:]) == {"a", "c"} and len(out) == 3


def test_interleave() -> None:
    assert interleave(["6a", "6b", "6c"], ["4a"]) == ["6a", "4a", "6b", "6c"]
    assert interleave([], ["4a", "4b"]) == ["4a", "4b"]


def test_implicit_mx(dns: LoopbackDns) -> None:
    r = resolver(dns)
    answer = asyncio.run(r.lookup_mx("nomx.example"))
    assert answer.implicit and answer.hosts == ("nomx.example",)
    assert asyncio.run(r.addresses("nomx.example")) == ["127.0.0.5"]


def test_null_mx_is_permanent(dns: LoopbackDns) -> None:
    with pytest.raises(NullMx) as info:
        asyncio.run(resolver(dns).mx_hosts("nullmx.example"))
    assert info.value.dsn == "5.1.10" and info.value.permanent


def test_null_mx_among_others_is_ignored(dns: LoopbackDns) -> None:
    assert asyncio.run(resolver(dns).mx_hosts("mixed-null.example")) == ["mx1.example.org"]


def test_nxdomain_is_permanent(dns: LoopbackDns) -> None:
    with pytest.raises(DnsPermanent) as info:
        asyncio.run(resolver(dns).mx_hosts("no-such-domain.example"))
    assert info.value.dsn == "5.1.2" and "not found" in info.value.text
    assert not isinstance(info.value, NullMx)


def test_invalid_name_is_permanent(dns: LoopbackDns) -> None:
    with pytest.raises(DnsPermanent):
        asyncio.run(resolver(dns).mx_hosts("a" * 70 + ".example"))


def test_servfail_is_temporary(dns: LoopbackDns) -> None:
    with pytest.raises(DnsTemporary) as info:
        asyncio.run(resolver(dns).mx_hosts("broken.example"))
    assert info.value.dsn == "4.4.3" and not info.value.permanent


def test_timeout_is_temporary() -> None:
    # A bound UDP socket that never answers.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        r = Resolver(DnsConfig(nameservers=(("127.0.0.1", sock.getsockname()[1]),),
                               timeout=0.3))
        start = time.monotonic()
        with pytest.raises(DnsTemporary) as info:
            asyncio.run(r.mx_hosts("example.org"))
        assert time.monotonic() - start < 5
        assert "timeout" in info.value.text.lower()
    finally:
        sock.close()


def test_dropped_query_is_temporary(dns: LoopbackDns) -> None:
    dns.set("slow.example", "DROP")
    with pytest.raises(DnsTemporary):
        asyncio.run(resolver(dns, timeout=0.3).addresses("slow.example"))


def test_addresses_interleaved_ipv6_first(dns: LoopbackDns) -> None:
    r = resolver(dns)
    assert asyncio.run(r.addresses("mx3.example.org")) == ["::1", "127.0.0.3", "::2",
                                                           "127.0.0.4"]
    assert asyncio.run(r.addresses("mx1.example.org")) == ["127.0.0.1"]


def test_addresses_follow_cname(dns: LoopbackDns) -> None:
    assert asyncio.run(resolver(dns).addresses("mx4.example.org")) == ["127.0.0.1"]


def test_address_literal_needs_no_lookup(dns: LoopbackDns) -> None:
    r = resolver(dns)
    assert asyncio.run(r.addresses("127.0.0.9")) == ["127.0.0.9"]
    assert asyncio.run(r.addresses("::1")) == ["::1"]
    assert dns.queries == []


def test_nxdomain_mx_host_is_temporary(dns: LoopbackDns) -> None:
    r = resolver(dns)
    assert asyncio.run(r.mx_hosts("dead-mx.example")) == ["gone.dead-mx.example"]
    with pytest.raises(DnsTemporary) as info:
        asyncio.run(r.addresses("gone.dead-mx.example"))
    assert "not found" in info.value.text


def test_host_without_addresses(dns: LoopbackDns) -> None:
    assert asyncio.run(resolver(dns).addresses("noaddr.example.org")) == []


def test_large_answer_over_tcp(dns: LoopbackDns) -> None:
    answer = asyncio.run(resolver(dns).query("big.example", "TXT"))
    assert answer is not None
    text = b"".join(next(iter(answer)).strings)
    assert text == b"x" * 3000


def test_fixture_starts_empty(dns_server: LoopbackDns) -> None:  # noqa: F811
    dns_server.set("added.example", {"A": ["127.0.0.7"]})
    r = resolver(dns_server)
    assert asyncio.run(r.addresses("added.example")) == ["127.0.0.7"]
    dns_server.remove("added.example")
    with pytest.raises(DnsTemporary):
        asyncio.run(r.addresses("added.example"))


# -- the answer cache in front of dnspython (RFC 2308 for negative answers)


def caching(dns: LoopbackDns) -> Resolver:
    return Resolver(DnsConfig(nameservers=dns.nameservers, timeout=2.0), cache=100)


def asked(dns: LoopbackDns, name: str) -> int:
    return sum(1 for qname, _ in dns.queries if qname == name)


def test_answers_are_cached_until_their_ttl() -> None:
    with LoopbackDns({"ttl.example": {"TXT": ["v=spf1 -all"]}}) as dns:
        r = caching(dns)

        async def twice() -> list[str]:
            first = await r.query("ttl.example", "TXT")
            second = await r.query("TTL.example.", "TXT")  # same name, other spelling
            assert first is not None and second is not None
            return [rr.to_text() for rr in first] + [rr.to_text() for rr in second]

        assert asyncio.run(twice()) == ['"v=spf1 -all"'] * 2
        assert asked(dns, "ttl.example") == 1


def test_negative_answers_are_cached_for_the_soa_minimum() -> None:
    with LoopbackDns({"here.example": {"A": ["127.0.0.9"]}}) as dns:
        dns.negative_ttl = 1
        r = caching(dns)

        async def lookups() -> None:
            for _ in range(3):
                with pytest.raises(DnsPermanent):
                    await r.query("gone.example", "TXT")
                assert await r.query("here.example", "TXT") is None  # NODATA
            assert asked(dns, "gone.example") == 1
            assert asked(dns, "here.example") == 1
            await asyncio.sleep(1.1)  # the SOA's MINIMUM has passed
            with pytest.raises(DnsPermanent):
                await r.query("gone.example", "TXT")
            assert asked(dns, "gone.example") == 2

        asyncio.run(lookups())


def test_cached_reports_what_query_would_answer_without_asking() -> None:
    with LoopbackDns({"here.example": {"TXT": ["v=spf1 -all"], "A": ["127.0.0.9"]},
                      "broken.example": "SERVFAIL"}) as dns:
        dns.negative_ttl = 1
        r = caching(dns)

        async def lookups() -> None:
            assert r.cached("here.example", "TXT") is None  # not asked yet
            answer = await r.query("here.example", "TXT")
            hit = r.cached("HERE.example.", "TXT")
            assert hit is not None and hit.answer is answer and not hit.nxdomain
            assert await r.query("here.example", "MX") is None  # NODATA
            hit = r.cached("here.example", "MX")
            assert hit is not None and hit.answer is None and not hit.nxdomain
            with pytest.raises(DnsPermanent):
                await r.query("gone.example", "TXT")
            hit = r.cached("gone.example", "TXT")
            assert hit is not None and hit.answer is None and hit.nxdomain
            with pytest.raises(DnsTemporary):
                await r.query("broken.example", "TXT")
            assert r.cached("broken.example", "TXT") is None  # failures are not kept
            await asyncio.sleep(1.1)  # the negative answers expire
            assert r.cached("gone.example", "TXT") is None
            assert r.cached("here.example", "MX") is None
            assert r.cached("here.example", "TXT") is not None  # its own TTL

        asyncio.run(lookups())
        assert asked(dns, "here.example") == 2 and asked(dns, "gone.example") == 1


def test_negative_answers_without_soa_and_failures_are_not_cached() -> None:
    with LoopbackDns({"broken.example": "SERVFAIL"}) as dns:
        r = caching(dns)

        async def lookups() -> None:
            for _ in range(2):
                with pytest.raises(DnsPermanent):
                    await r.query("gone.example", "TXT")
                with pytest.raises(DnsTemporary):
                    await r.query("broken.example", "TXT")

        asyncio.run(lookups())
        assert asked(dns, "gone.example") == 2
        assert asked(dns, "broken.example") >= 2
