"""The real test peers work standalone: a private Postfix and a private Dovecot
LMTP, driven by stock clients (smtplib) over real sockets and real TLS."""

from __future__ import annotations

import contextlib
import itertools
import smtplib
import ssl
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.conftest import require_peer, write_cert
from tests.peers import accepts_connections, group_members
from tests.peers.dovecot import DovecotLmtpPeer
from tests.peers.postfix import REJECT_REPLY, TEMPFAIL_REPLY, PostfixPeer

SENDER = "alice@example.test"




def message(to: str, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(f"Hello from the peer tests: {subject}\n")
    return msg.as_bytes().replace(b"\n", b"\r\n")


@pytest.fixture
def make_postfix(tmp_path: Path) -> Iterator[Callable[..., PostfixPeer]]:
    binary = require_peer("postfix")
    with contextlib.ExitStack() as stack:  # stops every peer, even if one fails
        count = itertools.count()

        def factory(**kwargs: Any) -> PostfixPeer:
            peer = PostfixPeer(tmp_path / f"postfix{next(count)}", postfix=binary, **kwargs)
            stack.callback(peer.stop)
            return peer.start()

        yield factory


@pytest.fixture
def make_dovecot(tmp_path: Path) -> Iterator[Callable[..., DovecotLmtpPeer]]:
    binary = require_peer("dovecot")
    with contextlib.ExitStack() as stack:  # stops every peer, even if one fails
        count = itertools.count()

        def factory(**kwargs: Any) -> DovecotLmtpPeer:
            peer = DovecotLmtpPeer(tmp_path / f"dovecot{next(count)}", dovecot=binary, **kwargs)
            stack.callback(peer.stop)
            return peer.start()

        yield factory


@pytest.fixture(scope="module")
def peer_cert(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for the Postfix peer, valid for its name and 127.0.0.1."""
    return write_cert(ca, tmp_path_factory.mktemp("peer-tls"), "mx.remote.test", "127.0.0.1")


# -- Postfix ------------------------------------------------------------------

def test_postfix_delivers_each_recipient_to_the_domain_maildir(
        make_postfix: Callable[..., PostfixPeer]) -> None:
    peer = make_postfix()
    with smtplib.SMTP(peer.host, peer.port, timeout=10) as client:
        code, _ = client.ehlo("client.example.test")
        assert code == 250
        refused = client.sendmail(SENDER, ["someone@remote.test", "Other@remote.test"],
                                  message("someone@remote.test", "first"))
        assert refused == {}

    [got] = peer.wait_for_messages("someone")
    assert b"Subject: first" in got
    assert got.startswith(b"Return-Path: <alice@example.test>")
    assert peer.wait_for_messages("other@remote.test")  # addresses compare case-blind
    assert peer.messages("nobody-else") == []
    assert "status=sent (delivered to maildir)" in peer.wait_for_log("status=sent")


def test_postfix_starttls_with_a_trusted_certificate(
        make_postfix: Callable[..., PostfixPeer], peer_cert: tuple[Path, Path],
        client_tls: ssl.SSLContext) -> None:
    peer = make_postfix(tls=peer_cert)
    with smtplib.SMTP(peer.host, peer.port, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=client_tls)
        assert code == 220
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.ehlo()
        client.sendmail(SENDER, ["tls@remote.test"], message("tls@remote.test", "secret"))

    [got] = peer.wait_for_messages("tls")
    assert b"with ESMTPS" in got


def test_postfix_starttls_certificate_is_really_checked(
        make_postfix: Callable[..., PostfixPeer], peer_cert: tuple[Path, Path]) -> None:
    peer = make_postfix(tls=peer_cert)
    untrusting = ssl.create_default_context()  # system CAs only: not the test CA
    with smtplib.SMTP(peer.host, peer.port, timeout=10) as client:
        client.ehlo()
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=untrusting)


def test_postfix_without_tls_offers_no_starttls(
        make_postfix: Callable[..., PostfixPeer]) -> None:
    peer = make_postfix()
    with smtplib.SMTP(peer.host, peer.port, timeout=10) as client:
        client.ehlo()
        assert not client.has_extn("starttls")


def test_postfix_refuses_configured_recipients(
        make_postfix: Callable[..., PostfixPeer]) -> None:
    peer = make_postfix(reject=["reject@remote.test"], tempfail=["busy@remote.test"])
    with smtplib.SMTP(peer.host, peer.port, timeout=10) as client:
        client.ehlo()
        assert client.mail(SENDER)[0] == 250
        code, text = client.rcpt("reject@remote.test")
        assert (code, REJECT_REPLY[4:9]) == (550, "5.1.1")
        assert text.startswith(b"5.1.1 ")
        assert client.rcpt("busy@remote.test")[0] == int(TEMPFAIL_REPLY[:3])
        assert client.rcpt("fine@remote.test")[0] == 250
        # A domain neither local nor routed resolves to the error transport,
        # which smtpd refuses at RCPT: the peer never relays off the machine.
        code, text = client.rcpt("someone@elsewhere.test")
        assert code == 550 and b"delivers nowhere else" in text
        assert client.data(message("fine@remote.test", "partly"))[0] == 250

    peer.wait_for_messages("fine")
    assert peer.messages("reject") == []
    assert peer.messages("busy") == []


def test_postfix_routes_a_domain_to_dovecot_lmtp(
        make_postfix: Callable[..., PostfixPeer],
        make_dovecot: Callable[..., DovecotLmtpPeer]) -> None:
    dovecot = make_dovecot()
    postfix = make_postfix(routes={"lmtp.test": f"lmtp:inet:{dovecot.host}:{dovecot.port}"})
    with smtplib.SMTP(postfix.host, postfix.port, timeout=10) as client:
        client.sendmail(SENDER, ["bob@lmtp.test"], message("bob@lmtp.test", "relayed"))

    [got] = dovecot.wait_for_messages("bob@lmtp.test")
    assert b"Subject: relayed" in got
    assert b"by mx.remote.test (Postfix)" in got


def test_postfix_stop_leaves_no_process(make_postfix: Callable[..., PostfixPeer]) -> None:
    peer = make_postfix()
    pgid = peer.master_pid
    assert pgid is not None and group_members(pgid)
    peer.stop()
    assert group_members(pgid) == []
    peer.stop()  # idempotent


# -- Dovecot LMTP ---------------------------------------------------------------

@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_dovecot_lmtp_delivers_to_the_users_maildir(
        make_dovecot: Callable[..., DovecotLmtpPeer], transport: str) -> None:
    peer = make_dovecot()
    if transport == "tcp":
        client = smtplib.LMTP(peer.host, peer.port, timeout=10)
    else:
        client = smtplib.LMTP(peer.socket_path, timeout=10)
    with client:
        code, _ = client.ehlo("client.example.test")  # smtplib.LMTP sends LHLO
        assert code == 250
        assert client.sendmail(SENDER, ["Carol@remote.test"],
                               message("carol@remote.test", transport)) == {}

    [got] = peer.wait_for_messages("carol@remote.test")
    assert f"Subject: {transport}".encode() in got
    assert b"Delivered-To: Carol@remote.test" in got  # as given; the Maildir is lowercased
    assert peer.messages("dave@remote.test") == []


def test_dovecot_lmtp_refuses_unknown_users(
        make_dovecot: Callable[..., DovecotLmtpPeer]) -> None:
    peer = make_dovecot(users=["known@remote.test"])
    with smtplib.LMTP(peer.host, peer.port, timeout=10) as client:
        client.ehlo()
        assert client.mail(SENDER)[0] == 250
        code, text = client.rcpt("stranger@remote.test")
        assert code == 550 and text.startswith(b"5.1.1")
        assert client.rcpt("Known@remote.test")[0] == 250
        assert client.data(message("known@remote.test", "members only"))[0] == 250

    assert peer.wait_for_messages("known@remote.test")
    assert peer.messages("stranger@remote.test") == []


def test_dovecot_stop_leaves_no_process(make_dovecot: Callable[..., DovecotLmtpPeer]) -> None:
    peer = make_dovecot()
    pgid = peer.master_pid
    assert pgid is not None and group_members(pgid)
    peer.stop()
    assert group_members(pgid) == []
    assert not accepts_connections(peer.socket_path)
    assert not accepts_connections(peer.address)
