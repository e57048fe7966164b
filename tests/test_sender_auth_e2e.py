"""Sender authentication through the whole server: mail our users send is
DKIM-signed when it reaches a real Postfix; forged mail on the mx listener
is refused by DMARC and SPF; Authentication-Results records the verdicts."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.conftest import (
    PASSWORD,
    ServerThread,
    maildir_messages,
    require_peer,
    wait_for,
    write_cert,
)
from tests.peers.postfix import PostfixPeer

from postwarden.bootstrap import init_dkim
from postwarden.config import DnsConfig
from postwarden.delivery.dns import Resolver
from postwarden.dkim_keys import public_record
from postwarden.message.dkim_verify import verify_dkim

ALICE = "alice@example.test"

ZONES: dict[str, Any] = {
    # A bank that publishes SPF and p=reject: mail from elsewhere is forged.
    "bank.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    "_dmarc.bank.test": {"TXT": ["v=DMARC1; p=reject"]},
    # A domain with SPF -all but no DMARC record.
    "spfonly.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    # A legitimate sender: SPF allows 127.0.0.1, DMARC p=reject.
    "friend.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "_dmarc.friend.test": {"TXT": ["v=DMARC1; p=reject"]},
    # Where our users' mail goes.
    "remote.test": {"MX": [(10, "mx.remote.test")]},
    "mx.remote.test": {"A": ["127.0.0.1"]},
}


@pytest.fixture
def zones(loopback_dns: Any) -> Iterator[Any]:
    for name, data in ZONES.items():
        loopback_dns.set(name, data)
    yield loopback_dns
    for name in ZONES:
        loopback_dns.remove(name)


def mx_send(server: ServerThread, sender: str, from_header: str, extra: str = ""
            ) -> tuple[int, bytes]:
    client = smtplib.SMTP("127.0.0.1", server.port("mx"), timeout=10)
    client.ehlo("sender.example")
    client.mail(sender)
    client.rcpt(ALICE)
    code, reply = client.data(f"{extra}From: {from_header}\r\nTo: {ALICE}\r\n"
                              f"Subject: auth test\r\n\r\nHello.\r\n".encode())
    client.quit()
    return code, reply


def test_forged_sender_of_a_reject_domain_is_refused(
        make_server: Callable[..., ServerThread], zones: Any) -> None:
    server = make_server()
    code, reply = mx_send(server, "ceo@bank.test", "ceo@bank.test")
    assert (code, reply[:5]) == (550, b"5.7.1") and b"DMARC policy of bank.test" in reply


def test_spf_fail_without_dmarc_is_refused_with_5_7_23(
        make_server: Callable[..., ServerThread], zones: Any) -> None:
    server = make_server()
    code, reply = mx_send(server, "someone@spfonly.test", "someone@spfonly.test")
    assert (code, reply[:6]) == (550, b"5.7.23")


def test_legitimate_mail_gets_authentication_results_and_forged_ones_go(
        make_server: Callable[..., ServerThread], zones: Any) -> None:
    server = make_server()
    forged = "Authentication-Results: mail.example.test; dmarc=pass header.from=bank.test\r\n"
    other = "Authentication-Results: mx.elsewhere.example; spf=fail\r\n"
    code, _ = mx_send(server, "news@friend.test", "news@friend.test", extra=forged + other)
    assert code == 250
    (stored,) = wait_for(lambda: maildir_messages(server.cfg, ALICE))
    msg = email.message_from_bytes(stored, policy=email.policy.default)
    results = [str(v) for v in msg.get_all("Authentication-Results", [])]
    ours = [r for r in results if r.startswith("mail.example.test")]
    assert len(ours) == 1, results
    assert "spf=pass" in ours[0] and "dmarc=pass" in ours[0]
    assert "header.from=friend.test" in ours[0]
    assert any(r.startswith("mx.elsewhere.example") for r in results)  # kept
    assert b"header.from=bank.test" not in stored  # the forged one is gone


@pytest.fixture
def postfix(tmp_path: Path, ca: trustme.CA) -> Iterator[PostfixPeer]:
    d = tmp_path / "pf-tls"
    d.mkdir()
    peer = PostfixPeer(tmp_path / "postfix", postfix=require_peer("postfix"),
                       tls=write_cert(ca, d, "mx.remote.test"), hostname="mx.remote.test")
    peer.start()
    yield peer
    peer.stop()


def test_submitted_mail_arrives_dkim_signed(make_server: Callable[..., ServerThread],
                                            zones: Any, postfix: PostfixPeer,
                                            client_tls: ssl.SSLContext) -> None:
    server = make_server(f"[delivery]\nmx_port = {postfix.port}\n")
    keys = init_dkim(server.cfg.data_dir, "example.test")
    for key in keys:
        zones.set(key.dns_name, {"TXT": [public_record(key)]})
    try:
        client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
        client.starttls(context=client_tls)
        client.login(ALICE, PASSWORD)
        client.sendmail(ALICE, ["bob@remote.test"],
                        f"From: Alice <{ALICE}>\r\nTo: bob@remote.test\r\n"
                        "Subject: signed\r\n\r\nThis must arrive signed.\r\n".encode())
        client.quit()
        (stored,) = postfix.wait_for_messages("bob@remote.test", timeout=20)
        assert b"DKIM-Signature:" in stored
        resolver = Resolver(DnsConfig(nameservers=(("127.0.0.1", zones.port),), timeout=2))
        message = stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        report = asyncio.run(verify_dkim(message, resolver))
        assert [(r.domain, r.result) for r in report.results] == [("example.test", "pass")]
        tampered = message.replace(b"This must arrive signed.", b"This was changed.")
        report = asyncio.run(verify_dkim(tampered, resolver))
        assert [r.result for r in report.results] == ["fail"]
    finally:
        for key in keys:
            zones.remove(key.dns_name)


def test_dns_temperror_can_defer(make_server: Callable[..., ServerThread], zones: Any) -> None:
    zones.set("flaky.test", "SERVFAIL")
    zones.set("_dmarc.flaky.test", "SERVFAIL")
    try:
        server = make_server('[checks]\ntemperror = "tempfail"\n')
        code, reply = mx_send(server, "x@flaky.test", "x@flaky.test")
        assert code == 451 and reply.startswith(b"4.7.")
        second = server.cfg.path.parent / "second"
        second.mkdir()
        accepting = make_server('[checks]\ntemperror = "accept"\n', directory=second)
        code, _ = mx_send(accepting, "x@flaky.test", "x@flaky.test")
        assert code == 250
    finally:
        zones.remove("flaky.test")
        zones.remove("_dmarc.flaky.test")


def test_helo_identity_is_checked_too(make_server: Callable[..., ServerThread],
                                      zones: Any) -> None:
    zones.set("sender.example", {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]})
    try:
        server = make_server()
        code, _ = mx_send(server, "news@friend.test", "news@friend.test")
        assert code == 250
        (stored,) = wait_for(lambda: maildir_messages(server.cfg, ALICE))
        header = stored.split(b"\n\n")[0].replace(b"\n\t", b" ").replace(b"\n ", b" ")
        assert re.search(rb"spf=pass \([^)]*\)\s+smtp\.helo=sender\.example;", header), header
    finally:
        zones.remove("sender.example")


def test_the_reply_to_mail_does_not_wait_for_the_spf_check(
        make_server: Callable[..., ServerThread], zones: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SPF is evaluated after the reply to MAIL is written, even when the
    DNS answers are all cached: a slow evaluation (here 0.6 s) holds the
    client at end of data, where the verdict is needed, not at MAIL."""
    from postwarden.policy import spf as spf_mod

    real = spf_mod.check_mail_from_cached

    def slow(*args: Any, **kwargs: Any) -> spf_mod.SpfResult:
        time.sleep(0.6)
        return real(*args, **kwargs) or spf_mod.SpfResult("pass", domain="friend.test",
                                                           comment="from the test")

    monkeypatch.setattr(spf_mod, "check_mail_from_cached", slow)
    server = make_server()
    client = smtplib.SMTP("127.0.0.1", server.port("mx"), timeout=10)
    client.ehlo("sender.example")
    started = time.monotonic()
    assert client.mail("news@friend.test")[0] == 250
    assert time.monotonic() - started < 0.4
    client.rcpt(ALICE)
    code, _ = client.data(f"From: news@friend.test\r\nTo: {ALICE}\r\n"
                          "Subject: slow spf\r\n\r\nHello.\r\n".encode())
    client.quit()
    assert code == 250
    (stored,) = wait_for(lambda: maildir_messages(server.cfg, ALICE))
    msg = email.message_from_bytes(stored, policy=email.policy.default)
    ours = [str(v) for v in msg.get_all("Authentication-Results", [])
            if str(v).startswith("mail.example.test")]
    assert len(ours) == 1 and "spf=pass" in ours[0], ours
