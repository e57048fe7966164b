"""SmtpTransport routing: MX lookups on a loopback DNS server, trying hosts
in order, per-domain TLS policy, DNS failures as delivery results."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme

from dns_server import LoopbackDns
from fixtures_outbound import ScriptedServer, delivery_config, make_job, server_tls
from postwarden.config import DnsConfig
from postwarden.delivery.dns import Resolver
from postwarden.delivery.remote import MAX_SESSIONS, SmtpTransport, strictest
from postwarden.delivery.result import DeliveryResult, DeliveryStatus
from postwarden.delivery.transport import Nexthop, parse_nexthop

T = TypeVar("T")
DELIVERED, DEFERRED, FAILED = (DeliveryStatus.DELIVERED, DeliveryStatus.DEFERRED,
                               DeliveryStatus.FAILED)

ZONES: dict[str, Any] = {
    "example.org": {"MX": [(10, "mx1.example.org"), (20, "mx2.example.org")]},
    "mx1.example.org": {"A": ["127.0.0.2"]},  # nothing listens there: refused
    "mx2.example.org": {"A": ["127.0.0.1"]},
    "implicit.example": {"A": ["127.0.0.1"]},
    "bare.example": {"TXT": ["no MX, no address"]},
    "nullmx.example": {"MX": [(0, ".")]},
    "broken.example": "SERVFAIL",
    "dangling.example": {"MX": [(10, "gone.dangling.example")]},
    "relay.example.net": {"A": ["127.0.0.1"]},
    "three.example": {"MX": [(10, "m1.three.example"), (20, "m2.three.example"),
                             (30, "m3.three.example")]},
    "m1.three.example": {"A": ["127.0.0.1"]},
    "m2.three.example": {"A": ["127.0.0.2"]},
    "m3.three.example": {"A": ["127.0.0.3"]},
}


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDns]:
    with LoopbackDns(ZONES) as server:
        yield server


def smtp_transport(dns: LoopbackDns, port: int, **kw: Any) -> SmtpTransport:
    resolver = Resolver(DnsConfig(nameservers=dns.nameservers, timeout=2.0))
    kw.setdefault("tls", "none")
    return SmtpTransport("mail.example.test", delivery_config(**kw), resolver, mx_port=port)


@asynccontextmanager
async def servers(*hosts: str) -> AsyncIterator[list[ScriptedServer]]:
    """Scripted servers on the same port at each loopback address."""
    first = await ScriptedServer(host=hosts[0]).start()
    started = [first]
    try:
        for host in hosts[1:]:
            started.append(await ScriptedServer(host=host, port=first.port).start())
        yield started
    finally:
        for s in started:
            await s.stop()


async def deliver(dns: LoopbackDns, port: int, rcpts: list[str], hop: Nexthop | None = None,
                  **kw: Any) -> list[DeliveryResult]:
    domain = rcpts[0].rpartition("@")[2]
    job = make_job(rcpts, nexthop=hop or Nexthop("mx", domain))
    return await smtp_transport(dns, port, **kw).deliver(job)


def test_first_mx_down_second_takes_it(dns: LoopbackDns) -> None:
    async def go() -> None:
        async with servers("127.0.0.1") as (srv,):
            (result,) = await deliver(dns, srv.port, ["bob@example.org"])
        assert result.status is DELIVERED
        assert result.relay == f"mx2.example.org[127.0.0.1]:{srv.port}"

    run(go())


def test_4xx_greeting_moves_to_next_mx(dns: LoopbackDns) -> None:
    async def go() -> None:
        async with servers("127.0.0.1", "127.0.0.2") as (good, busy):
            busy.greeting = "421 4.3.2 too busy"
            (result,) = await deliver(dns, good.port, ["bob@example.org"])
        assert result.status is DELIVERED and len(busy.sessions) == 1
        assert result.relay.startswith("mx2.example.org[127.0.0.1]")

    run(go())


def test_deferred_recipient_retried_at_next_mx_but_5xx_is_final(dns: LoopbackDns) -> None:
    async def go() -> None:
        async with servers("127.0.0.1", "127.0.0.2") as (second, first):
            first.rcpt = {"grey@example.org": "451 4.7.1 greylisted",
                          "gone@example.org": "550 5.1.1 no such user"}
            results = await deliver(dns, first.port, ["grey@example.org", "gone@example.org",
                                                      "ok@example.org"])
        assert [r.status for r in results] == [DELIVERED, FAILED, DELIVERED]
        assert results[0].relay.startswith("mx2.example.org")
        assert results[1].relay.startswith("mx1.example.org")
        assert results[2].relay.startswith("mx1.example.org")
        assert second.sessions[0].read_of("RCPT TO:<gone") == []

    run(go())


def test_all_hosts_deferring_reports_the_reply(dns: LoopbackDns) -> None:
    async def go() -> None:
        async with servers("127.0.0.1", "127.0.0.2", "127.0.0.3") as srvs:
            for s in srvs:
                s.rcpt = {"bob@three.example": "450 4.2.1 try later"}
            (result,) = await deliver(dns, srvs[0].port, ["bob@three.example"])
        assert result.status is DEFERRED and result.dsn == "4.2.1"
        assert "450 4.2.1 try later" in result.text
        assert sum(len(s.sessions) for s in srvs) == MAX_SESSIONS

    run(go())


@pytest.mark.parametrize(("domain", "status", "dsn", "text"), [
    ("nowhere.example", FAILED, "5.1.2", "not found"),
    ("nullmx.example", FAILED, "5.1.10", "null MX"),
    ("broken.example", DEFERRED, "4.4.3", "server failure"),
    ("dangling.example", DEFERRED, "4.4.3", "not found"),
    ("bare.example", FAILED, "5.1.2", "no MX or address records"),
])
def test_dns_outcomes(dns: LoopbackDns, domain: str, status: DeliveryStatus, dsn: str,
                      text: str) -> None:
    async def go() -> None:
        results = await deliver(dns, 25, [f"a@{domain}", f"b@{domain}"])
        assert [r.status for r in results] == [status, status]
        assert results[0].dsn == dsn and text in results[0].text

    run(go())


def test_implicit_mx(dns: LoopbackDns) -> None:
    async def go() -> None:
        async with servers("127.0.0.1") as (srv,):
            (result,) = await deliver(dns, srv.port, ["bob@implicit.example"])
        assert result.status is DELIVERED
        assert result.relay == f"implicit.example[127.0.0.1]:{srv.port}"

    run(go())


def test_configured_relay_with_mx_lookup_and_port(dns: LoopbackDns) -> None:
    async def go() -> None:
        async with servers("127.0.0.1") as (srv,):
            hop = parse_nexthop(f"smtp:example.org:{srv.port}")
            (result,) = await deliver(dns, 25, ["bob@elsewhere.example"], hop)
            missing = parse_nexthop("smtp:nowhere.example:2525")
            (nx,) = await deliver(dns, 25, ["bob@elsewhere.example"], missing)
        assert result.status is DELIVERED and result.relay.startswith("mx2.example.org")
        # A relay that does not exist is a config problem, not the recipient's.
        assert nx.status is DEFERRED and nx.dsn == "4.4.3"

    run(go())


def test_bracketed_name_uses_its_address(dns: LoopbackDns) -> None:
    async def go() -> None:
        async with servers("127.0.0.1") as (srv,):
            hop = parse_nexthop(f"smtp:[relay.example.net]:{srv.port}")
            (result,) = await deliver(dns, 25, ["bob@elsewhere.example"], hop)
        assert result.status is DELIVERED
        assert result.relay == f"relay.example.net[127.0.0.1]:{srv.port}"
        assert ("relay.example.net", "MX") not in dns.queries

    run(go())


@pytest.mark.parametrize(("cert_name", "status"), [("mx2.example.org", DELIVERED),
                                                   ("mx.other.example", DEFERRED)])
def test_verify_policy_checks_the_mx_name(dns: LoopbackDns, ca: trustme.CA, ca_file: Path,
                                          cert_name: str, status: DeliveryStatus) -> None:
    async def go() -> None:
        srv = await ScriptedServer(tls=server_tls(ca, cert_name)).start()
        try:
            (result,) = await deliver(dns, srv.port, ["bob@example.org"],
                                      tls="may", tls_policy={"example.org": "verify"},
                                      ca_file=ca_file)
        finally:
            await srv.stop()
        assert result.status is status
        if status is DEFERRED:
            assert result.dsn == "4.7.5" and "certificate" in result.text
            assert srv.messages == []
        else:
            assert srv.sessions[0].tls

    run(go())


def test_strictest_policy_of_the_recipients_domains() -> None:
    assert strictest(["may", "verify", "none"]) == "verify"
    assert strictest(["none"]) == "none"
    assert strictest(["may", "encrypt"]) == "encrypt"


def test_non_smtp_nexthop_is_deferred(dns: LoopbackDns) -> None:
    async def go() -> None:
        (result,) = await deliver(dns, 25, ["a@example.org"], Nexthop("maildir"))
        assert result.status is DEFERRED and result.dsn == "4.3.5"

    run(go())


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_ipv6_mx(dns: LoopbackDns) -> None:
    if not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) in this environment")
    dns.set("v6.example", {"MX": [(10, "mx.v6.example")]})
    dns.set("mx.v6.example", {"AAAA": ["::1"]})

    async def go() -> None:
        async with servers("::1") as (srv,):
            (result,) = await deliver(dns, srv.port, ["bob@v6.example"])
        assert result.status is DELIVERED
        assert result.relay == f"mx.v6.example[::1]:{srv.port}"

    run(go())
