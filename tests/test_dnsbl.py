"""DNSBL/DNSWL scoring: reversal and scoring tables, the check with a fake
resolver and clock, the config section, and a real server whose client
(127.0.0.1) is listed in zones served by the loopback DNS."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from tests.conftest import ServerThread

from postwarden.config import ConfigError, DnsblConfig, DnsblZone, parse
from postwarden.delivery.dns import DnsPermanent, DnsTemporary, Resolver
from postwarden.policy.dnsbl import Dnsbl, counts, reverse_name, score

CLIENT = "1.0.0.127"  # the test server's client, reversed


@pytest.mark.parametrize(("ip", "expected"), [
    ("192.0.2.1", "1.2.0.192"),
    ("127.0.0.1", "1.0.0.127"),
    ("::ffff:192.0.2.99", "99.2.0.192"),  # IPv4-mapped: looked up as IPv4
    ("2001:db8:1:2::abcd",  # RFC 5782 2.4: nibbles, least significant first
     "d.c.b.a.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"),
    ("::1", "1" + ".0" * 31),
])
def test_reverse_name(ip: str, expected: str) -> None:
    assert reverse_name(ip) == expected


@pytest.mark.parametrize("bad", ["", "example.org", "1.2.3", "1.2.3.4.5", "::g"])
def test_reverse_name_refuses_non_addresses(bad: str) -> None:
    with pytest.raises(ValueError):
        reverse_name(bad)


ZEN = DnsblZone("zen.example", 2)
BL = DnsblZone("bl.example", 1, ("127.0.0.2",))
WL = DnsblZone("wl.example", -5)


@pytest.mark.parametrize(("zone", "codes", "listed"), [
    (ZEN, ["127.0.0.2"], True),
    (ZEN, ["127.0.0.10", "127.0.0.4"], True),
    (ZEN, [], False),
    (ZEN, ["127.0.0.1"], False),  # RFC 5782 5: the "not listed" test entry
    (ZEN, ["192.0.2.1"], False),  # outside 127/8: a broken zone
    (BL, ["127.0.0.2"], True),
    (BL, ["127.0.0.3"], False),  # not a return code that counts
    (BL, ["127.0.0.3", "127.0.0.2"], True),
])
def test_counts(zone: DnsblZone, codes: list[str], listed: bool) -> None:
    assert counts(zone, codes) is listed


@pytest.mark.parametrize(("results", "total", "complete"), [
    ([(ZEN, ["127.0.0.2"]), (BL, ["127.0.0.2"])], 3, True),
    ([(ZEN, ["127.0.0.2"]), (BL, ["127.0.0.3"])], 2, True),
    ([(ZEN, ["127.0.0.2"]), (BL, ["127.0.0.2"]), (WL, ["127.0.15.0"])], -2, True),
    ([(ZEN, None), (BL, ["127.0.0.2"])], 1, False),  # a failed zone counts 0
    ([(ZEN, []), (BL, []), (WL, [])], 0, True),
])
def test_score(results: list[tuple[DnsblZone, list[str] | None]], total: int,
               complete: bool) -> None:
    s = score(results)
    assert (s.total, s.complete) == (total, complete)


class FakeResolver:
    """Answers from a dict: a list of A records, an exception, or "hang"."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def query(self, name: str, rdtype: str) -> Any:
        self.asked.append(name)
        value = self.answers.get(name)
        if value is None:
            raise DnsPermanent(f"domain {name} not found")
        if value == "hang":
            await asyncio.sleep(60)
        if isinstance(value, Exception):
            raise value
        return [type("A", (), {"address": a})() for a in value]


def make_dnsbl(answers: dict[str, Any], clock: list[float] | None = None,
               **kw: Any) -> tuple[Dnsbl, FakeResolver]:
    fake = FakeResolver(answers)
    now = clock if clock is not None else [0.0]
    cfg = DnsblConfig(**{"zones": (ZEN, BL), "allow_zones": (WL,), "timeout": 0.2, **kw})
    return Dnsbl(cfg, cast(Resolver, fake), clock=lambda: now[0]), fake


def test_scorer_sums_listing_zones_and_caches() -> None:
    clock = [100.0]
    dnsbl, fake = make_dnsbl({f"{CLIENT}.zen.example": ["127.0.0.2"],
                              f"{CLIENT}.bl.example": ["127.0.0.2"]}, clock)
    assert asyncio.run(dnsbl.score("127.0.0.1")).total == 3
    assert len(fake.asked) == 3
    assert asyncio.run(dnsbl.score("127.0.0.1")).total == 3
    assert len(fake.asked) == 3  # from the cache
    clock[0] += 301
    asyncio.run(dnsbl.score("127.0.0.1"))
    assert len(fake.asked) == 6  # the cache entry expired


def test_failed_and_slow_zones_count_zero_and_are_not_cached() -> None:
    dnsbl, fake = make_dnsbl({f"{CLIENT}.zen.example": "hang",
                              f"{CLIENT}.bl.example": DnsTemporary("SERVFAIL")})
    loop = asyncio.new_event_loop()
    try:
        start = loop.time()
        s = loop.run_until_complete(dnsbl.score("127.0.0.1"))
        assert loop.time() - start < 1.0  # each zone bounded by its timeout
    finally:
        loop.close()
    assert (s.total, s.complete) == (0, False)
    asyncio.run(dnsbl.score("127.0.0.1"))
    assert len(fake.asked) == 6


def test_zones_are_asked_in_parallel() -> None:
    dnsbl, _ = make_dnsbl({f"{CLIENT}.zen.example": "hang", f"{CLIENT}.bl.example": "hang",
                           f"{CLIENT}.wl.example": "hang"}, timeout=0.3)
    loop = asyncio.new_event_loop()
    try:
        start = loop.time()
        loop.run_until_complete(dnsbl.score("127.0.0.1"))
        assert loop.time() - start < 0.8  # not 3 x 0.3
    finally:
        loop.close()


def test_concurrent_connections_share_the_lookups() -> None:
    dnsbl, fake = make_dnsbl({f"{CLIENT}.zen.example": ["127.0.0.2"]})

    async def main() -> list[int]:
        scores = await asyncio.gather(*(dnsbl.score("127.0.0.1") for _ in range(5)))
        return [s.total for s in scores]

    assert asyncio.run(main()) == [2] * 5
    assert len(fake.asked) == 3


def test_unexpected_resolver_error_counts_zero() -> None:
    dnsbl, _ = make_dnsbl({f"{CLIENT}.zen.example": RuntimeError("bug"),
                           f"{CLIENT}.bl.example": ["127.0.0.2"]})
    s = asyncio.run(dnsbl.score("127.0.0.1"))
    assert (s.total, s.complete) == (1, False)


# ---- config ---------------------------------------------------------------

def _parse(extra: dict[str, Any]) -> Any:
    return parse({"hostname": "mail.example.test", **extra}, Path("/tmp/postwarden.toml"))


def test_config_defaults_disable_dnsbl() -> None:
    cfg = _parse({})
    assert cfg.dnsbl.zones == () and cfg.dnsbl.threshold == 3


def test_config_parses_zones() -> None:
    cfg = _parse({"dnsbl": {
        "zones": [{"zone": "zen.example", "weight": 2},
                  {"zone": "bl.example", "weight": 1, "match": "127.0.0.2"}],
        "allow_zones": [{"zone": "wl.example", "weight": -5,
                         "match": ["127.0.15.0", "127.0.15.1"]}],
        "threshold": 4, "timeout": 1.5}})
    assert cfg.dnsbl.zones == (ZEN, BL)
    assert cfg.dnsbl.allow_zones == (DnsblZone("wl.example", -5,
                                               ("127.0.15.0", "127.0.15.1")),)
    assert (cfg.dnsbl.threshold, cfg.dnsbl.timeout) == (4, 1.5)


@pytest.mark.parametrize(("table", "key"), [
    ({"zones": "zen.example"}, "dnsbl.zones"),
    ({"zones": [{"weight": 1}]}, "dnsbl.zones[0].zone"),
    ({"zones": [{"zone": "zen.example", "weight": "2"}]}, "dnsbl.zones[0].weight"),
    ({"zones": [{"zone": "zen.example", "match": "127.0.0"}]}, "dnsbl.zones[0].match"),
    ({"zones": [{"zone": "zen.example", "colour": 1}]}, "dnsbl.zones[0].colour"),
    ({"allow_zones": [{"zone": "wl.example", "weight": 5}]}, "dnsbl.allow_zones[0].weight"),
    ({"threshold": 0}, "dnsbl.threshold"),
    ({"timeout": 0}, "dnsbl.timeout"),
    ({"zone": []}, "dnsbl.zone"),
])
def test_config_errors_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        _parse({"dnsbl": table})
    assert err.value.key == key


# ---- a real server, zones on the loopback DNS ------------------------------

SERVER_ZONES = """
[dnsbl]
zones = [{ zone = "zen.test", weight = 2 }, { zone = "bl.test", weight = 1, match = "127.0.0.2" },
         { zone = "broken.test", weight = 5 }, { zone = "slow.test", weight = 5 }]
allow_zones = [{ zone = "wl.test", weight = -5 }]
threshold = 3
timeout = 0.5
"""


@pytest.fixture
def zones(loopback_dns: Any) -> Iterator[Any]:
    names = [f"{CLIENT}.{z}" for z in ("zen.test", "bl.test", "broken.test", "slow.test",
                                        "wl.test")]
    loopback_dns.set(f"{CLIENT}.broken.test", "SERVFAIL")
    loopback_dns.set(f"{CLIENT}.slow.test", "DROP")
    yield loopback_dns
    for name in names:
        loopback_dns.remove(name)


def _greets(server: ServerThread) -> bool:
    client = smtplib.SMTP("127.0.0.1", server.port("mx"), timeout=10)
    code, _ = client.ehlo("client.example")
    client.quit()
    return code == 250


def test_listed_client_is_refused_at_connect(make_server: Callable[..., ServerThread],
                                             zones: Any) -> None:
    zones.set(f"{CLIENT}.zen.test", {"A": ["127.0.0.2"]})
    zones.set(f"{CLIENT}.bl.test", {"A": ["127.0.0.2"]})
    server = make_server(SERVER_ZONES)
    with pytest.raises(smtplib.SMTPConnectError) as err:
        smtplib.SMTP("127.0.0.1", server.port("mx"), timeout=10)
    assert err.value.smtp_code == 554
    assert err.value.smtp_error == (b"5.7.1 Service unavailable; client [127.0.0.1] "
                                    b"blocked using DNSBL")


def test_score_below_threshold_is_accepted(make_server: Callable[..., ServerThread],
                                           zones: Any) -> None:
    zones.set(f"{CLIENT}.zen.test", {"A": ["127.0.0.2"]})
    zones.set(f"{CLIENT}.bl.test", {"A": ["127.0.0.3"]})  # bl.test counts only .2
    server = make_server(SERVER_ZONES)
    assert _greets(server)


def test_dnswl_offsets_a_listing(make_server: Callable[..., ServerThread],
                                 zones: Any) -> None:
    zones.set(f"{CLIENT}.zen.test", {"A": ["127.0.0.2"]})
    zones.set(f"{CLIENT}.bl.test", {"A": ["127.0.0.2"]})
    zones.set(f"{CLIENT}.wl.test", {"A": ["127.0.15.0"]})
    server = make_server(SERVER_ZONES)
    assert _greets(server)


def test_servfail_and_timeout_zones_do_not_block(make_server: Callable[..., ServerThread],
                                                 zones: Any) -> None:
    # broken.test (SERVFAIL) and slow.test (no answer) weigh 5 each: were a
    # failure counted as a listing, the client would be refused.
    server = make_server(SERVER_ZONES)
    assert _greets(server)


def test_submission_is_not_screened(make_server: Callable[..., ServerThread],
                                    zones: Any) -> None:
    zones.set(f"{CLIENT}.zen.test", {"A": ["127.0.0.2"]})
    zones.set(f"{CLIENT}.bl.test", {"A": ["127.0.0.2"]})
    server = make_server(SERVER_ZONES)
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    assert client.ehlo("client.example")[0] == 250
    client.quit()
