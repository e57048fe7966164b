"""The OpenSPF test suite for RFC 7208 (release 2014.04, 203 tests), end to end.

Each scenario's zone data is served by a real DNS server on loopback
(``LoopbackDns``), and :func:`postwarden.policy.spf.check_mail_from` asks it
through the real :class:`postwarden.delivery.dns.Resolver`.  The zone data
is translated as ``../shared/testdata/README.md`` requires:

* an ``SPF`` record is served as type SPF (99) and also as TXT, unless the
  name has TXT records of its own (``TXT: NONE`` counts: then it has none);
* ``TIMEOUT`` makes every query for a type the name has no records of go
  unanswered (``"OTHER": "DROP"``), so that it times out;
* a TXT/SPF value given as a list is one record of several strings (an
  empty list, "null text", is illegal on the wire and sent as one empty
  string);
* ``\\xNN`` escapes in the YAML stand for octets: strings are sent as Latin-1.

One server serves the whole module; the zones are swapped when a test of
another scenario runs.  The resolver's timeout is short, so that the
``TIMEOUT`` cases take half a second each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import REQUIRE_ALL
from tests.dns_server import LoopbackDns

from postwarden.config import DnsConfig
from postwarden.delivery.dns import Resolver
from postwarden.policy import spf

SUITE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "spf"
SUITE = SUITE_DIR / "rfc7208-tests.yml"
DNS_TIMEOUT = 0.5


def _octets(value: Any) -> bytes:
    text = str(value)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


def _txt_record(value: Any) -> bytes | list[bytes]:
    if isinstance(value, list):
        return [_octets(piece) for piece in value]
    return _octets(value)


def zone_from_suite(zonedata: dict[str, list[Any]]) -> dict[str, Any]:
    """The suite's ``zonedata`` as ``LoopbackDns`` zones."""
    zones: dict[str, Any] = {}
    for name, entries in zonedata.items():
        data: dict[str, Any] = {}
        spf_records: list[Any] = []
        has_txt = timeout = False
        for entry in entries:
            if entry == "TIMEOUT":
                timeout = True
                continue
            ((rtype, value),) = entry.items()
            if rtype == "TXT":
                has_txt = True
                if value != "NONE":
                    data.setdefault("TXT", []).append(_txt_record(value))
            elif rtype == "SPF":
                if value != "NONE":
                    spf_records.append(_txt_record(value))
            elif rtype == "MX":
                pref, host = value
                data.setdefault("MX", []).append((int(pref), str(host) or "."))
            elif rtype == "CNAME":
                data["CNAME"] = str(value)
            else:  # A, AAAA, PTR
                data.setdefault(rtype, []).append(str(value))
        if spf_records:
            data["SPF"] = spf_records
            if not has_txt:
                data["TXT"] = list(spf_records)
        if timeout:
            if data:
                data["OTHER"] = "DROP"
            else:
                data = "DROP"  # type: ignore[assignment]
        zones[str(name)] = data
    return zones


def _load() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(scenario description, zones, test)`` for every test of the suite."""
    if not SUITE.exists():
        return []
    cases = []
    with SUITE.open(encoding="utf-8") as f:
        for scenario in yaml.safe_load_all(f):
            zones = zone_from_suite(scenario.get("zonedata") or {})
            for name, test in scenario["tests"].items():
                cases.append((scenario["description"], zones, {"name": name, **test}))
    return cases


CASES = _load()


def _params() -> list[Any]:
    if not CASES:
        return [pytest.param(None, id="suite-missing")]
    return [pytest.param(case, id=f"{case[0]}/{case[2]['name']}") for case in CASES]


class _Server:
    """One loopback DNS server; ``serve`` swaps in a scenario's zones."""

    def __init__(self) -> None:
        self.dns = LoopbackDns().start()
        self.current: str | None = None

    def serve(self, scenario: str, zones: dict[str, Any]) -> None:
        if self.current == scenario:
            return
        for name in list(self.dns.zones):
            self.dns.remove(name)
        for name, data in zones.items():
            self.dns.set(name, data)
        self.current = scenario


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv = _Server()
    try:
        yield srv
    finally:
        srv.dns.stop()


def _missing() -> None:
    msg = f"the OpenSPF suite is not at {SUITE}"
    if REQUIRE_ALL:
        pytest.fail(msg + " and POSTWARDEN_REQUIRE_ALL=1")
    pytest.skip(msg)


def test_suite_is_complete() -> None:
    if not CASES:
        _missing()
    assert len(CASES) == 203


@pytest.mark.parametrize("case", _params())
def test_rfc7208_suite(case: tuple[str, dict[str, Any], dict[str, Any]] | None,
                       server: _Server) -> None:
    if case is None:
        _missing()
        return
    description, zones, test = case
    server.serve(description, zones)
    resolver = Resolver(DnsConfig(nameservers=server.dns.nameservers, timeout=DNS_TIMEOUT))
    result = asyncio.run(spf.check_mail_from(str(test["host"]), str(test["mailfrom"]),
                                             str(test["helo"]), resolver))
    expected = test["result"] if isinstance(test["result"], list) else [test["result"]]
    assert result.result in expected, result
    if "explanation" in test and result.result == "fail":
        want = test["explanation"]
        if want == "DEFAULT":
            domain = str(test["mailfrom"]).rpartition("@")[2] or str(test["helo"])
            want = spf.default_explanation(domain, str(test["host"]))
        assert result.explanation == want, result


@pytest.mark.parametrize("case", _params())
def test_rfc7208_suite_from_the_cache(case: tuple[str, dict[str, Any], dict[str, Any]] | None,
                                      server: _Server) -> None:
    """Each case again through a caching resolver: the first check fills
    the cache, the second is answered from it (no lookup waits) and must
    give exactly the same result."""
    if case is None:
        _missing()
        return
    description, zones, test = case
    server.serve(description, zones)
    server.dns.negative_ttl = 300  # negative answers cacheable too (RFC 2308 5)
    try:
        resolver = Resolver(DnsConfig(nameservers=server.dns.nameservers,
                                      timeout=DNS_TIMEOUT), cache=1000)

        async def twice() -> tuple[spf.SpfResult, spf.SpfResult]:
            args = (str(test["host"]), str(test["mailfrom"]), str(test["helo"]), resolver)
            first = await spf.check_mail_from(*args, clock=lambda: 1.0e9)
            second = await spf.check_mail_from(*args, clock=lambda: 1.0e9)
            return first, second
        first, second = asyncio.run(twice())
    finally:
        server.dns.negative_ttl = None
    assert second == first
    expected = test["result"] if isinstance(test["result"], list) else [test["result"]]
    assert second.result in expected, second
