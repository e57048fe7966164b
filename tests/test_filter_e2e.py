"""Content filters in a running server: what senders and the administrator see."""

from __future__ import annotations

import base64
import contextlib
import json
import smtplib
import ssl
from collections.abc import Callable

import pytest
from tests.conftest import PASSWORD, ServerThread, maildir_messages, wait_for
from tests.test_queue_cli import cli

from postwarden.filter.rules import GTUBE

ALICE = "alice@example.test"
BOB = "bob@example.test"
POSTMASTER = "postmaster@example.test"
HEAD = ("From: Carol <carol@remote.example>\r\nTo: alice@example.test\r\n"
        "Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@remote.example>\r\n"
        "Subject: {subject}\r\n")


def inbound(st: ServerThread, body: bytes, subject: str = "hello") -> tuple[int, bytes]:
    client = smtplib.SMTP("127.0.0.1", st.port("mx"), timeout=10)
    try:
        client.ehlo("mx.remote.example")
        client.mail("")
        client.rcpt(ALICE)
        return client.data(HEAD.format(subject=subject).encode() + body)
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()


def submit(st: ServerThread, tls: ssl.SSLContext, body: bytes, to: str = BOB
           ) -> tuple[int, bytes]:
    client = smtplib.SMTP("127.0.0.1", st.port("submission"), timeout=10)
    try:
        client.starttls(context=tls)
        client.login(ALICE, PASSWORD)
        client.mail(ALICE)
        client.rcpt(to)
        return client.data(b"From: alice@example.test\r\nTo: " + to.encode()
                           + b"\r\nSubject: numbers\r\n\r\n" + body)
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()


NO_VERIFY = "[checks]\nverify = false\n"


def test_gtube_is_rejected_by_the_builtin_rules(make_server: Callable[..., ServerThread]
                                                ) -> None:
    st = make_server(NO_VERIFY)
    code, text = inbound(st, b"\r\n" + GTUBE + b"\r\n")
    assert (code, text) == (554, b"5.7.1 Message rejected as spam")
    assert inbound(st, b"\r\nlunch tomorrow?\r\n")[0] == 250
    assert wait_for(lambda: maildir_messages(st.cfg, ALICE))


def test_sloppy_message_is_tagged_with_the_rules_that_fired(
        make_server: Callable[..., ServerThread]) -> None:
    st = make_server(NO_VERIFY)
    client = smtplib.SMTP("127.0.0.1", st.port("mx"), timeout=10)
    assert client.sendmail("", [ALICE], b"Subject: no from, no date\r\n\r\nhi\r\n") == {}
    client.quit()
    msgs = wait_for(lambda: maildir_messages(st.cfg, ALICE))
    assert b"X-Spam-Flag: YES" in msgs[0]
    assert b"MISSING_FROM=3" in msgs[0] and b"MISSING_DATE=1" in msgs[0]
    # The message's trace says what the filters decided, and why.
    out = cli(st, "trace", "--to", ALICE, "--json")
    assert out.returncode == 0, out.stderr
    (received,) = [e for e in json.loads(out.stdout)[0]["events"] if e["event"] == "queued"]
    assert "filters=rules:headers(5)" in received["detail"]  # tagged, score 5
    assert "MISSING_FROM" in received["detail"] and "MISSING_DATE" in received["detail"]


def test_executable_attachment_is_rejected(make_server: Callable[..., ServerThread]) -> None:
    st = make_server(NO_VERIFY)
    body = (b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
            b'--b\r\nContent-Type: application/octet-stream; name="invoice.pdf.exe"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(b"MZ\x90\x00")
            + b"\r\n--b--\r\n")
    assert inbound(st, body) == (554, b"5.7.1 Message rejected: blocked attachment type")


def test_filter_down_tempfails_unless_fail_open(make_server: Callable[..., ServerThread],
                                                tmp_path_factory: pytest.TempPathFactory
                                                ) -> None:
    gone = tmp_path_factory.mktemp("gone") / "clamd.sock"
    filters = (f'[filters]\ninbound = ["rules", "clamav"]\ntimeout = 2\n'
               f'[filters.clamav]\naddress = "unix:{gone}"\n')
    st = make_server(NO_VERIFY + filters)
    code, text = inbound(st, b"\r\nhello\r\n")
    assert code == 451 and text.startswith(b"4.3.0")

    st = make_server(NO_VERIFY + filters.replace("timeout = 2\n",
                                                 'timeout = 2\nfail_open = ["clamav"]\n'),
                     directory=tmp_path_factory.mktemp("open"))
    assert inbound(st, b"\r\nhello\r\n")[0] == 250
    msgs = wait_for(lambda: maildir_messages(st.cfg, ALICE))
    assert b"X-Postwarden-Filter: clamav unavailable; message not checked" in msgs[0]


def test_outgoing_review_holds_then_release_delivers(
        make_server: Callable[..., ServerThread], client_tls: ssl.SSLContext) -> None:
    st = make_server(users=(ALICE, BOB))
    code, text = submit(st, client_tls, b"my card is 4111 1111 1111 1111\r\n")
    assert code == 250 and b"queued as Q" in text
    held_id = text.decode().rsplit(" ", 1)[1]

    listing = cli(st, "quarantine", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    [held] = json.loads(listing.stdout)
    assert held["id"] == held_id and held["direction"] == "outbound"
    assert held["filters"] == ["dlp"] and held["rules"] == ["DLP_CARD"]
    assert held["reasons"] == ["dlp: outgoing content review: card x1"]
    shown = cli(st, "quarantine", "show", held_id)
    assert shown.returncode == 0 and "Subject: numbers" in shown.stdout
    assert "4111" not in shown.stdout  # headers and reasons only
    assert not maildir_messages(st.cfg, BOB)

    released = cli(st, "quarantine", "release", held_id)
    assert released.returncode == 0, released.stderr
    assert f"{held_id}: released as " in released.stdout
    msgs = wait_for(lambda: maildir_messages(st.cfg, BOB))
    assert b"4111 1111 1111 1111" in msgs[0] and b"Received: from" in msgs[0]
    assert b"Message-ID:" in msgs[0]
    again = cli(st, "quarantine", "release", held_id)
    assert again.returncode == 1 and f"no message {held_id}" in again.stderr

    code, text = submit(st, client_tls, b"-----BEGIN RSA PRIVATE KEY-----\r\n")
    held_id = text.decode().rsplit(" ", 1)[1]
    assert cli(st, "quarantine", "delete", held_id).returncode == 0
    assert "quarantine is empty" in cli(st, "quarantine", "list").stdout


def test_outgoing_review_reject_and_notify(make_server: Callable[..., ServerThread],
                                           client_tls: ssl.SSLContext,
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    st = make_server('[filters.dlp]\naction = "reject"\n', users=(ALICE, BOB))
    assert submit(st, client_tls, b"IBAN DE89 3704 0044 0532 0130 00\r\n") == (
        554, b"5.7.1 Message rejected by content policy")
    assert submit(st, client_tls, b"nothing to see\r\n")[0] == 250

    st = make_server('[filters.dlp]\naction = "notify"\n', users=(ALICE, BOB, POSTMASTER),
                     directory=tmp_path_factory.mktemp("notify"))
    assert submit(st, client_tls, b"ID 11010519491231002X\r\n")[0] == 250
    assert wait_for(lambda: maildir_messages(st.cfg, BOB))
    notices = wait_for(lambda: maildir_messages(st.cfg, POSTMASTER))
    assert b"Outgoing content review: message from alice@example.test" in notices[0]
    assert b"cn-id x1" in notices[0] and b"11010519491231002X" not in notices[0]


def test_config_errors_name_the_key(make_server: Callable[..., ServerThread]) -> None:
    from postwarden import config

    with pytest.raises(config.ConfigError) as info:
        make_server('[filters]\ninbound = ["virus"]\n')
    assert info.value.key == "filters.inbound"
