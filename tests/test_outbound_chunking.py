"""BDAT with the envelope (RFC 3030): to a server offering CHUNKING and
PIPELINING, a message goes in the same write as MAIL and RCPT, one round
trip instead of two; every reply still lands on the right recipient, and
DATA is used wherever BDAT is not."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from tests.conftest import DOMAIN, ServerThread, maildir_messages, wait_for

from fixtures_outbound import ScriptedServer, make_job, run, smtp_transport
from postwarden.delivery.result import DeliveryStatus
from postwarden.delivery.smtp_transaction import CHUNKING_MAX
from postwarden.delivery.transport import parse_nexthop

DELIVERED, DEFERRED, FAILED = (DeliveryStatus.DELIVERED, DeliveryStatus.DEFERRED,
                               DeliveryStatus.FAILED)
CHUNKING = ("PIPELINING", "CHUNKING", "8BITMIME", "ENHANCEDSTATUSCODES")
# A leading dot, a lone dot line, a bare LF and no final line end.
BODY = b"Subject: chunks\r\n\r\n.leading dot\r\n.\r\nbare\nend"
WIRE = b"Subject: chunks\r\n\r\n.leading dot\r\n.\r\nbare\r\nend\r\n"


transport = smtp_transport


def job(srv: ScriptedServer, rcpts: list[str], body: bytes = BODY, n: int = 1) -> Any:
    j = make_job(rcpts, body, queue_id=f"Q{n}")
    j.nexthop = parse_nexthop(f"smtp:[127.0.0.1]:{srv.port}")
    return j


def test_the_message_goes_in_the_envelope_write() -> None:
    async def go() -> None:
        async with ScriptedServer(extensions=CHUNKING) as srv:
            t = transport()
            results = await t.deliver(job(srv, ["bob@example.org", "carol@example.org"]))
            assert [r.status for r in results] == [DELIVERED, DELIVERED]
            await t.close()
            (session,) = srv.sessions
            assert session.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "BDAT", "QUIT"]
            reads = {n for n, c in session.commands if c.split()[0] in ("MAIL", "RCPT", "BDAT")}
            assert len(reads) == 1  # one write: no wait for a 354
            assert session.commands[4][1] == f"BDAT {len(WIRE)} LAST"
            # Line ends made CRLF, a final one added, and no dot-stuffing:
            # the octet count delimits the message.
            assert session.chunks == [WIRE]
            assert srv.messages == [WIRE]

    run(go())


def test_each_reply_lands_on_its_recipients() -> None:
    async def go() -> None:
        async with ScriptedServer(extensions=CHUNKING) as srv:
            srv.rcpt = {"nobody@example.org": "550 5.1.1 no such user",
                        "busy@example.org": "450 4.2.1 mailbox busy"}
            t = transport()
            mixed = await t.deliver(job(srv, ["bob@example.org", "nobody@example.org",
                                              "busy@example.org"]))
            assert [r.status for r in mixed] == [DELIVERED, FAILED, DEFERRED]
            assert "no such user" in mixed[1].text and mixed[1].dsn == "5.1.1"
            # Nobody accepted: the server refuses the BDAT too, and each
            # recipient keeps its own RCPT reply.
            refused = await t.deliver(job(srv, ["nobody@example.org", "busy@example.org"],
                                          n=2))
            assert [(r.status, r.dsn) for r in refused] == [(FAILED, "5.1.1"),
                                                            (DEFERRED, "4.2.1")]
            srv.final = "554 5.7.1 message refused as spam"
            (spam,) = await t.deliver(job(srv, ["bob@example.org"], n=3))
            assert spam.status is FAILED and spam.dsn == "5.7.1"
            assert "in reply to BDAT command" in spam.text
            srv.final = "451 4.3.0 try again later"
            (later,) = await t.deliver(job(srv, ["bob@example.org"], n=4))
            assert later.status is DEFERRED and later.dsn == "4.3.0"
            # The same connection still carries the next message.
            srv.final = "250 2.0.0 queued"
            (ok,) = await t.deliver(job(srv, ["bob@example.org"], n=5))
            assert ok.status is DELIVERED
            await t.close()
            (session,) = srv.sessions
            assert session.verbs().count("BDAT") == 5 and "DATA" not in session.verbs()
            # Read by the server whenever a recipient was accepted (it
            # refused two of them after reading).
            assert srv.messages == [WIRE] * 4

    run(go())


def test_a_server_that_offers_chunking_but_not_bdat() -> None:
    # Deferred, not bounced; the connection is dropped (the server may have
    # read the message as commands), and the next attempt uses DATA.
    async def go() -> None:
        async with ScriptedServer(extensions=CHUNKING) as srv:
            srv.bdat_known = False
            t = transport()
            (first,) = await t.deliver(job(srv, ["bob@example.org"]))
            assert first.status is DEFERRED and first.dsn == "4.5.0"
            assert "refused BDAT" in first.text
            (again,) = await t.deliver(job(srv, ["bob@example.org"], n=2))
            assert again.status is DELIVERED
            await t.close()
            broken, fresh = srv.sessions
            assert "BDAT" in broken.verbs() and "QUIT" not in broken.verbs()
            assert "DATA" in fresh.verbs() and "BDAT" not in fresh.verbs()
            assert srv.messages == [WIRE]

    run(go())


@pytest.mark.parametrize("case", ["no CHUNKING", "no PIPELINING", "switched off", "large"])
def test_data_where_bdat_does_not_apply(case: str) -> None:
    extensions = {"no CHUNKING": ("PIPELINING", "8BITMIME"),
                  "no PIPELINING": ("CHUNKING", "8BITMIME")}.get(case, CHUNKING)
    body = BODY
    if case == "large":  # past CHUNKING_MAX: streamed with DATA, never held whole
        body = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" + b".y\r\n" * (CHUNKING_MAX // 4)

    async def go() -> None:
        async with ScriptedServer(extensions=extensions) as srv:
            t = transport(chunking=case != "switched off")
            (r,) = await t.deliver(job(srv, ["bob@example.org"], body))
            assert r.status is DELIVERED
            await t.close()
            verbs = srv.sessions[0].verbs()
            assert "DATA" in verbs and "BDAT" not in verbs
            assert srv.messages == [body if case == "large" else WIRE]

    run(go())


def test_to_postwarden_itself(make_server: Callable[..., ServerThread]) -> None:
    # Its own server offers CHUNKING: a refused recipient in the same write
    # as the message costs only that recipient.
    server = make_server()
    hop = parse_nexthop(f"smtp:[127.0.0.1]:{server.port('mx')}")
    j = make_job([f"alice@{DOMAIN}", f"nobody@{DOMAIN}"], BODY, hop,
                 sender="someone@example.org")
    t = transport()

    async def go() -> list[Any]:
        try:
            return await t.deliver(j)
        finally:
            await t.close()

    results = run(go())
    assert [r.status for r in results] == [DELIVERED, FAILED]
    assert "in reply to RCPT TO command" in results[1].text
    (stored,) = wait_for(lambda: maildir_messages(server.cfg, f"alice@{DOMAIN}"))
    assert stored.endswith(WIRE.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
