"""SmtpTransport against a real Postfix and LmtpTransport against a real
Dovecot (private instances on loopback, see tests/peers)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.conftest import require_peer, write_cert
from tests.peers.dovecot import DovecotLmtpPeer
from tests.peers.postfix import PostfixPeer

from fixtures_outbound import delivery_config, make_job, smtp_transport
from postwarden.delivery.remote import LmtpTransport
from postwarden.delivery.result import DeliveryStatus
from postwarden.delivery.transport import parse_nexthop
from postwarden.envelope import MailParams, RcptParams

DELIVERED, DEFERRED, FAILED = (DeliveryStatus.DELIVERED, DeliveryStatus.DEFERRED,
                               DeliveryStatus.FAILED)
BODY = (b"From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: outbound peer\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        b".a line with a leading dot\r\n..two\r\n.\r\nna\xc3\xafve\r\nlast\r\n")




@pytest.fixture(scope="module")
def peer_cert(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for the Postfix peer, valid for its name and 127.0.0.1."""
    return write_cert(ca, tmp_path_factory.mktemp("peer-tls"), "mx.remote.test", "127.0.0.1")


@pytest.fixture
def postfix(tmp_path: Path, peer_cert: tuple[Path, Path]) -> Iterator[PostfixPeer]:
    peer = PostfixPeer(tmp_path / "postfix", postfix=require_peer("postfix"), tls=peer_cert,
                       reject=["nobody@remote.test"], tempfail=["busy@remote.test"])
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[DovecotLmtpPeer]:
    peer = DovecotLmtpPeer(tmp_path / "dovecot", dovecot=require_peer("dovecot"),
                           users=["bob@remote.test", "carol@remote.test"])
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_smtp_to_postfix_with_verified_tls(postfix: PostfixPeer, ca_file: Path) -> None:
    hop = parse_nexthop(f"smtp:[127.0.0.1]:{postfix.port}")
    transport = smtp_transport(tls="verify", ca_file=ca_file)
    job = make_job(["bob@remote.test", ("nobody@remote.test", RcptParams(("FAILURE",), None)),
                    "busy@remote.test"], BODY, hop, params=MailParams(body="8BITMIME",
                                                                      envid="E1"))
    results = run(transport.deliver(job))
    assert [r.status for r in results] == [DELIVERED, FAILED, DEFERRED]
    assert results[0].peer_dsn  # Postfix offers DSN
    assert "no such user here" in results[1].text and results[1].dsn == "5.1.1"
    (stored,) = postfix.wait_for_messages("bob@remote.test")
    body = stored.replace(b"\r\n", b"\n")
    assert body.endswith(BODY.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
    assert b"with ESMTPS" in stored  # Postfix saw TLS
    # Postfix offers CHUNKING: the message went with BDAT, in the envelope's
    # write (smtpd counts the commands of a session when it ends).
    run(transport.close())
    log = postfix.wait_for_log(" mail=1 ")
    (counts,) = [line for line in log.splitlines() if " mail=1 " in line]
    assert " bdat=1 " in counts and " data=" not in counts, counts


def test_bdat_to_postfix_is_not_held_by_a_delayed_ack(postfix: PostfixPeer,
                                                      ca_file: Path) -> None:
    # Postfix answers MAIL and RCPT while it reads the BDAT data and BDAT
    # after it, with Nagle's algorithm on: unless the client acknowledges
    # at once, that last reply waits for Linux's delayed ACK (40 ms), every
    # message.  A functional check with a wide margin (the stall is a
    # fixed timer), not a speed measurement.
    hop = parse_nexthop(f"smtp:[127.0.0.1]:{postfix.port}")
    transport = smtp_transport(tls="verify", ca_file=ca_file)
    big = BODY + (b"z" * 998 + b"\r\n") * 64  # 64 KB

    async def go() -> list[float]:
        took = []
        for _ in range(7):
            start = time.monotonic()
            (r,) = await transport.deliver(make_job(["bob@remote.test"], big, hop))
            took.append(time.monotonic() - start)
            assert r.status is DELIVERED
        await transport.close()
        return took

    took = run(go())
    assert statistics.median(took[1:]) < 0.025, took  # one connection, reused
    postfix.wait_for_log(" bdat=7 ")  # all seven went with BDAT, on one connection


@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_lmtp_to_dovecot(dovecot: DovecotLmtpPeer, via: str) -> None:
    hop = parse_nexthop(f"lmtp:[127.0.0.1]:{dovecot.port}" if via == "tcp"
                        else f"lmtp:unix:{dovecot.socket_path}")
    transport = LmtpTransport("mail.example.test", delivery_config())
    job = make_job(["bob@remote.test", "stranger@remote.test", "carol@remote.test"], BODY, hop)
    results = run(transport.deliver(job))
    assert [r.status for r in results] == [DELIVERED, FAILED, DELIVERED]
    for rcpt in ("bob@remote.test", "carol@remote.test"):
        (stored,) = dovecot.wait_for_messages(rcpt)
        assert stored.replace(b"\r\n", b"\n").endswith(
            BODY.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))


