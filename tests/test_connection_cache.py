"""The outbound connection cache: a burst of messages to one server rides
one connection; an idle one is closed with QUIT; one the server dropped is
replaced without a deferral; a stricter TLS policy never gets a connection
made under a weaker one."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from fixtures_outbound import ScriptedServer, delivery_config, make_job
from postwarden.config import DnsConfig
from postwarden.delivery.connection_cache import ConnectionCache
from postwarden.delivery.remote import SmtpTransport
from postwarden.delivery.result import DeliveryStatus
from postwarden.delivery.smtp_client import Peer, SessionOptions
from postwarden.delivery.transport import parse_nexthop

T = TypeVar("T")
DELIVERED = DeliveryStatus.DELIVERED


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(bounded())


def transport(**kw: Any) -> SmtpTransport:
    from postwarden.delivery.dns import Resolver

    resolver = Resolver(DnsConfig(nameservers=(("127.0.0.1", 9),), timeout=0.5))
    return SmtpTransport("client.example.test", delivery_config(**kw), resolver)


def job_for(srv: ScriptedServer, n: int) -> Any:
    job = make_job(["bob@example.org"], f"Subject: {n}\r\n\r\nmessage {n}\r\n".encode(),
                   queue_id=f"Q{n}")
    job.nexthop = parse_nexthop(f"smtp:[127.0.0.1]:{srv.port}")
    return job


def test_a_burst_to_one_server_uses_one_connection() -> None:
    async def go() -> None:
        async with ScriptedServer() as srv:
            t = transport()
            for n in range(5):
                (r,) = await t.deliver(job_for(srv, n))
                assert r.status is DELIVERED
            assert len(srv.sessions) == 1
            verbs = srv.sessions[0].verbs()
            assert verbs.count("EHLO") == 1 and verbs.count("DATA") == 5
            assert verbs.count("RSET") == 4  # each reuse checks the connection first
            assert [m.split(b"\r\n\r\n")[1] for m in srv.messages] == [
                f"message {n}\r\n".encode() for n in range(5)]
            await t.close()
            assert srv.sessions[0].verbs()[-1] == "QUIT"

    run(go())


def test_an_idle_connection_is_closed_with_quit() -> None:
    async def go() -> None:
        async with ScriptedServer() as srv:
            t = transport(connection_cache_time=0.2)
            (r,) = await t.deliver(job_for(srv, 1))
            assert r.status is DELIVERED
            assert srv.active == 1  # kept open
            await asyncio.sleep(0.6)
            assert srv.active == 0
            assert srv.sessions[0].verbs()[-1] == "QUIT"
            (r,) = await t.deliver(job_for(srv, 2))  # a new connection
            assert r.status is DELIVERED and len(srv.sessions) == 2
            await t.close()

    run(go())


def test_a_connection_the_server_dropped_is_replaced_without_deferral() -> None:
    async def go() -> None:
        async with ScriptedServer() as srv:
            t = transport()
            (r,) = await t.deliver(job_for(srv, 1))
            assert r.status is DELIVERED
            # The server drops its idle clients: the cached connection is dead.
            srv.drop_sessions()
            await asyncio.sleep(0.1)
            (r,) = await t.deliver(job_for(srv, 2))
            assert r.status is DELIVERED, r
            assert len(srv.sessions) == 2  # a new connection carried it
            assert len(srv.messages) == 2
            await t.close()

    run(go())


def test_connections_are_not_shared_between_tls_policies() -> None:
    cache = ConnectionCache()
    peer = Peer("mx.example.org", "127.0.0.1", 25)
    may = SessionOptions("client.example.test", "may", None)
    verify = SessionOptions("client.example.test", "verify", None)
    authed = SessionOptions("client.example.test", "may", None, ("user", "pw"))
    keys = {cache.key(peer, may), cache.key(peer, verify), cache.key(peer, authed)}
    assert len(keys) == 3
    dane = SessionOptions("client.example.test", "verify", None,
                          peer_check=lambda _obj: None)
    assert cache.key(peer, dane) is None  # per-delivery checks: never cached
