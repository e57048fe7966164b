"""The outbound connection cache: a burst of messages to one server rides
one connection; an idle one is closed with QUIT; one the server dropped is
replaced without a deferral; a stricter TLS policy never gets a connection
made under a weaker one."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from fixtures_outbound import ScriptedServer, make_job, run, smtp_transport
from postwarden.delivery import smtp_transaction
from postwarden.delivery.connection_cache import ConnectionCache
from postwarden.delivery.result import DeliveryStatus
from postwarden.delivery.smtp_client import Peer, SessionOptions
from postwarden.delivery.transport import parse_nexthop

DELIVERED = DeliveryStatus.DELIVERED


transport = smtp_transport


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
            # ... in the same write as the envelope (RFC 2920 3.1), not a
            # round trip of its own.
            commands = srv.sessions[0].commands
            for i, (read, verb) in enumerate(commands):
                if verb == "RSET":
                    assert commands[i + 1][1].startswith("MAIL FROM:")
                    assert commands[i + 1][0] == read
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


def test_without_pipelining_the_check_is_a_round_trip_of_its_own() -> None:
    async def go() -> None:
        async with ScriptedServer(extensions=("8BITMIME", "ENHANCEDSTATUSCODES")) as srv:
            t = transport()
            for n in range(3):
                (r,) = await t.deliver(job_for(srv, n))
                assert r.status is DELIVERED
            assert len(srv.sessions) == 1
            commands = srv.sessions[0].commands
            rsets = [i for i, (_, verb) in enumerate(commands) if verb == "RSET"]
            assert len(rsets) == 2
            for i in rsets:  # MAIL was sent only after RSET's reply
                assert commands[i + 1][1].startswith("MAIL FROM:")
                assert commands[i + 1][0] > commands[i][0]
            await t.close()

    run(go())


def test_a_cached_connection_refusing_rset_is_replaced_without_deferral() -> None:
    """A server that says 421 to the RSET leading the envelope (shutting
    down) takes nothing of the pipelined group: the message goes on a new
    connection, once."""
    async def go() -> None:
        async with ScriptedServer() as srv:
            t = transport()
            (r,) = await t.deliver(job_for(srv, 1))
            assert r.status is DELIVERED
            srv.rset_reply = "421 4.3.2 shutting down"
            (r,) = await t.deliver(job_for(srv, 2))
            assert r.status is DELIVERED, r
            assert len(srv.sessions) == 2
            assert srv.sessions[0].verbs().count("DATA") == 1
            assert [m.split(b"\r\n\r\n")[1] for m in srv.messages] == [
                b"message 1\r\n", b"message 2\r\n"]
            await t.close()

    run(go())


def test_a_cached_connection_that_does_not_answer_is_replaced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No reply to the RSET within RESET_TIMEOUT (not the 5 minutes of a
    command): a new connection carries the message."""
    monkeypatch.setattr(smtp_transaction, "RESET_TIMEOUT", 0.3)

    async def go() -> None:
        async with ScriptedServer() as srv:
            t = transport()
            (r,) = await t.deliver(job_for(srv, 1))
            assert r.status is DELIVERED
            srv.rset_reply = None
            started = time.monotonic()
            (r,) = await t.deliver(job_for(srv, 2))
            assert r.status is DELIVERED, r
            assert time.monotonic() - started < 5
            assert len(srv.sessions) == 2 and len(srv.messages) == 2
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
