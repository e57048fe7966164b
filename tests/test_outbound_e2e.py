"""The whole server delivering outbound: a mail network on loopback.

A loopback DNS server publishes MX records for ``remote.test`` (first MX
down, second a private Postfix with TLS); Dovecot takes ``lmtp.test`` over
LMTP.  Users submit to postwarden exactly as a mail client would, and the
tests read what arrived at the peers, and the bounces that came back.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import ssl
from collections.abc import Callable, Iterator
from email.message import EmailMessage
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
from tests.peers.dovecot import DovecotLmtpPeer
from tests.peers.postfix import PostfixPeer

ALICE = "alice@example.test"


@pytest.fixture
def mx_cert(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    return write_cert(ca, tmp_path, "mx1.remote.test", "mx2.remote.test")


@pytest.fixture
def remote_dns(loopback_dns: Any) -> Iterator[Any]:
    zones = {
        "remote.test": {"MX": [(10, "mx1.remote.test"), (20, "mx2.remote.test")]},
        # Nothing listens on 127.0.0.2: the first MX is down.
        "mx1.remote.test": {"A": ["127.0.0.2"]},
        "mx2.remote.test": {"A": ["127.0.0.1"]},
        "nullmx.test": {"MX": [(0, ".")]},
    }
    for name, data in zones.items():
        loopback_dns.set(name, data)
    yield loopback_dns
    for name in zones:
        loopback_dns.remove(name)


def start_postfix(tmp_path: Path, name: str, mx_cert: tuple[Path, Path], **kw: Any
                  ) -> PostfixPeer:
    peer = PostfixPeer(tmp_path / name, postfix=require_peer("postfix"), tls=mx_cert,
                       hostname="mx2.remote.test", reject=["nobody@remote.test"], **kw)
    return peer.start()


@pytest.fixture
def postfix(tmp_path: Path, mx_cert: tuple[Path, Path]) -> Iterator[PostfixPeer]:
    peer = start_postfix(tmp_path, "postfix", mx_cert)
    yield peer
    peer.stop()


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[DovecotLmtpPeer]:
    peer = DovecotLmtpPeer(tmp_path / "dovecot", dovecot=require_peer("dovecot"),
                           users=["dave@lmtp.test"])
    peer.start()
    yield peer
    peer.stop()


def network_config(postfix_port: int, ca_file: Path, transports: str = "") -> str:
    # Remote domains go to their MX hosts, on the peer's port instead of 25.
    return (f'[tls_policy]\n"remote.test" = "verify"\n'
            f'[delivery]\nca_file = "{ca_file}"\nconnect_timeout = 3\nmx_port = {postfix_port}\n'
            f'[transports]\n{transports}')


def send(server: ServerThread, tls: ssl.SSLContext, to: list[str], body: bytes | None = None,
         subject: str = "outbound") -> None:
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    client.starttls(context=tls)
    client.login(ALICE, PASSWORD)
    if body is None:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = ALICE, ", ".join(to), subject
        msg.set_content("Hello from postwarden.\n.leading dot\n")
        body = msg.as_bytes().replace(b"\n", b"\r\n")
    client.sendmail(ALICE, to, body)
    client.quit()


def reports(server: ServerThread) -> list[email.message.EmailMessage]:
    out = []
    for raw in maildir_messages(server.cfg, ALICE):
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        if msg.get_content_type() == "multipart/report":
            out.append(msg)  # type: ignore[arg-type]
    return out


def status_fields(report: email.message.EmailMessage) -> list[dict[str, str]]:
    """The per-recipient groups of the message/delivery-status part."""
    part = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    groups = part.get_payload()
    assert isinstance(groups, list) and len(groups) >= 2
    return [{k.lower(): str(v) for k, v in g.items()} for g in groups[1:]]


def test_mx_delivery_over_verified_tls_with_per_recipient_bounce(
        make_server: Callable[..., ServerThread], postfix: PostfixPeer, remote_dns: Any,
        ca_file: Path, client_tls: ssl.SSLContext) -> None:
    server = make_server(network_config(postfix.port, ca_file))
    send(server, client_tls, ["bob@remote.test", "nobody@remote.test"])
    (stored,) = postfix.wait_for_messages("bob@remote.test", timeout=20)
    assert b"Subject: outbound" in stored and b"with ESMTPS" in stored
    assert b"\n..leading dot" not in stored and b"\n.leading dot" in stored  # unstuffed

    got = wait_for(lambda: reports(server), timeout=20)
    assert len(got) == 1, "one bounce, for the refused recipient only"
    report = got[0]
    assert report["From"].addresses[0].username == "MAILER-DAEMON"
    assert report["To"] == ALICE
    assert report.get_param("report-type") == "delivery-status"
    (fields,) = status_fields(report)
    assert fields["final-recipient"] == "rfc822; nobody@remote.test"
    assert fields["action"] == "failed" and fields["status"] == "5.1.1"
    assert "mx2.remote.test" in fields["remote-mta"]
    assert "550" in fields["diagnostic-code"]
    # The bounce's own envelope sender is null: it cannot bounce again.
    raw = next(m for m in maildir_messages(server.cfg, ALICE) if b"multipart/report" in m)
    assert raw.startswith(b"Return-Path: <>\n")


def test_null_mx_bounces_at_once(make_server: Callable[..., ServerThread], postfix: PostfixPeer,
                                 remote_dns: Any, ca_file: Path,
                                 client_tls: ssl.SSLContext) -> None:
    server = make_server(network_config(postfix.port, ca_file))
    send(server, client_tls, ["anyone@nullmx.test"])
    (report,) = wait_for(lambda: reports(server), timeout=20)
    (fields,) = status_fields(report)
    assert fields["action"] == "failed" and fields["status"] == "5.1.10"


def test_expired_recipient_bounces_with_last_error(
        make_server: Callable[..., ServerThread], postfix: PostfixPeer, remote_dns: Any,
        ca_file: Path, client_tls: ssl.SSLContext) -> None:
    server = make_server('[queue]\nretry_min = 1\nretry_max = 1\nlifetime = 2\n' +
                         network_config(postfix.port, ca_file,
                                        '"down.test" = "smtp:[127.0.0.1]:9"\n'))
    send(server, client_tls, ["x@down.test"])
    (report,) = wait_for(lambda: reports(server), timeout=30)
    (fields,) = status_fields(report)
    assert fields["action"] == "failed" and fields["status"] == "5.4.7"
    assert "x@down.test" in fields["final-recipient"]


def test_lmtp_transport_to_dovecot(make_server: Callable[..., ServerThread],
                                   dovecot: DovecotLmtpPeer, client_tls: ssl.SSLContext) -> None:
    server = make_server(f'[transports]\n"lmtp.test" = "lmtp:[127.0.0.1]:{dovecot.port}"\n')
    send(server, client_tls, ["dave@lmtp.test", "eve@lmtp.test"], subject="via lmtp")
    (stored,) = dovecot.wait_for_messages("dave@lmtp.test", timeout=20)
    assert b"Subject: via lmtp" in stored
    (report,) = wait_for(lambda: reports(server), timeout=20)
    (fields,) = status_fields(report)
    assert fields["final-recipient"] == "rfc822; eve@lmtp.test" and fields["action"] == "failed"


def test_8bit_body_downgraded_for_a_peer_without_8bitmime(
        make_server: Callable[..., ServerThread], tmp_path: Path, mx_cert: tuple[Path, Path],
        remote_dns: Any, ca_file: Path, client_tls: ssl.SSLContext) -> None:
    peer = start_postfix(tmp_path, "postfix7", mx_cert,
                         main_cf={"smtpd_discard_ehlo_keywords": "8bitmime"})
    try:
        server = make_server(network_config(peer.port, ca_file))
        body = ("From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: 8bit\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 8bit\r\n\r\nna\u00efve caf\u00e9\r\n").encode()
        send(server, client_tls, ["bob@remote.test"], body=body)
        (stored,) = peer.wait_for_messages("bob@remote.test", timeout=20)
    finally:
        peer.stop()
    assert stored.isascii()
    msg = email.message_from_bytes(stored, policy=email.policy.default)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg.get_content() == "na\u00efve caf\u00e9\n"
