"""A real server on real sockets, with real TLS, talked to by smtplib."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
from collections.abc import Callable
from email.message import EmailMessage

import pytest
from tests.conftest import (
    DOMAIN,
    PASSWORD,
    ServerThread,
    add_alias,
    maildir_messages,
    wait_for,
)

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


def message(sender: str = "sender@remote.example", to: str = ALICE, subject: str = "hi",
            body: str = "Hello.\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    return msg.as_bytes().replace(b"\n", b"\r\n")


def mx(server: ServerThread) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.port("mx"), timeout=10)
    client.ehlo("client.remote.example")
    return client


def submission(server: ServerThread, tls: ssl.SSLContext, login: bool = True) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    client.ehlo("laptop")
    client.starttls(context=tls)
    client.ehlo("laptop")
    if login:
        client.login(ALICE, PASSWORD)
    return client


def raw(server: ServerThread, listener: str = "mx") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port(listener)), timeout=10)
    assert sock.recv(1024).startswith(b"220 ")
    return sock


def read_replies(sock: socket.socket, count: int) -> list[bytes]:
    """Read until ``count`` final reply lines arrived."""
    buf = b""
    while True:
        lines = [ln for ln in buf.split(b"\r\n") if len(ln) >= 4 and ln[3:4] == b" "]
        if len(lines) >= count:
            return lines
        chunk = sock.recv(65536)
        if not chunk:
            return lines
        buf += chunk


def test_mx_ehlo_advertises_extensions_but_no_auth(server: ServerThread,
                                                    client_tls: ssl.SSLContext) -> None:
    client = mx(server)
    for ext in ("pipelining", "size", "8bitmime", "smtputf8", "enhancedstatuscodes",
                "chunking", "dsn", "starttls"):
        assert client.has_extn(ext), ext
    assert not client.has_extn("auth")
    assert client.esmtp_features["size"] == str(50 * 1024 * 1024)
    client.starttls(context=client_tls)
    client.ehlo("client.remote.example")
    assert not client.has_extn("starttls") and not client.has_extn("auth")
    client.quit()


def test_inbound_mail_lands_in_maildir(server: ServerThread) -> None:
    client = mx(server)
    client.sendmail("sender@remote.example", [ALICE], message())
    client.quit()
    msgs = wait_for(lambda: maildir_messages(server.cfg, ALICE))
    assert len(msgs) == 1
    text = msgs[0]
    # Maildir files use LF line ends.
    assert b"\r" not in text
    assert text.startswith(b"Return-Path: <sender@remote.example>\n")
    assert b"Delivered-To: alice@example.test\n" in text
    assert b"Received: from client.remote.example ([127.0.0.1])" in text
    assert b"by mail.example.test (postwarden) with ESMTP id " in text
    assert b"Subject: hi\n" in text and text.endswith(b"Hello.\n")
    # Inbound mail is not modified: no Message-ID added on mx.
    assert b"Message-ID" not in text


def test_unknown_local_user_is_rejected(server: ServerThread) -> None:
    client = mx(server)
    client.mail("sender@remote.example")
    code, text = client.rcpt(f"nobody@{DOMAIN}")
    assert (code, text[:5]) == (550, b"5.1.1")
    client.quit()


RELAY_FORMS = [
    "victim@remote.example",
    f"victim%remote.example@{DOMAIN}",
    f"remote.example!victim@{DOMAIN}",
    f'"victim@remote.example"@{DOMAIN}',
    f"@{DOMAIN}:victim@remote.example",
    f"victim@remote.example@{DOMAIN}",
    f"victim@{DOMAIN}.",
    "victim@remote.example.",
    "victim@[127.0.0.1]",
]


@pytest.mark.parametrize("rcpt", RELAY_FORMS)
def test_relay_forms_are_refused_unauthenticated(server: ServerThread, rcpt: str) -> None:
    sock = raw(server)
    sock.sendall(b"EHLO tester\r\nMAIL FROM:<t@remote.example>\r\n")
    read_replies(sock, 2)
    sock.sendall(f"RCPT TO:<{rcpt}>\r\n".encode())
    reply = read_replies(sock, 1)[0]
    assert reply[:1] == b"5", reply
    sock.sendall(b"QUIT\r\n")
    sock.close()


def test_null_sender_and_bare_postmaster(server: ServerThread) -> None:
    sock = raw(server)
    sock.sendall(b"EHLO t\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\nQUIT\r\n")
    replies = read_replies(sock, 4)
    # postmaster@example.test does not exist here: an alias makes it.
    assert replies[2].startswith(b"550 5.1.1")
    add_alias(server.cfg, f"postmaster@{DOMAIN}", ALICE)
    sock = raw(server)
    sock.sendall(b"EHLO t\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\nQUIT\r\n")
    replies = read_replies(sock, 4)
    assert replies[1].startswith(b"250 2.1.0") and replies[2].startswith(b"250 2.1.5")


def test_submission_requires_tls_before_auth_and_auth_before_mail(
        server: ServerThread, client_tls: ssl.SSLContext) -> None:
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    client.ehlo("laptop")
    assert client.has_extn("starttls") and not client.has_extn("auth")
    creds = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
    code, text = client.docmd("AUTH", f"PLAIN {creds}")
    assert (code, text[:6]) == (538, b"5.7.11")
    code, text = client.docmd("MAIL", "FROM:<alice@example.test>")
    assert (code, text[:5]) == (530, b"5.7.0")
    client.starttls(context=client_tls)
    client.ehlo("laptop")
    assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
    code, text = client.docmd("MAIL", "FROM:<alice@example.test>")
    assert (code, text[:5]) == (530, b"5.7.0")
    client.quit()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_mechanisms(server: ServerThread, client_tls: ssl.SSLContext, mechanism: str) -> None:
    client = submission(server, client_tls, login=False)
    client.user, client.password = ALICE, PASSWORD
    auth = client.auth_plain if mechanism == "PLAIN" else client.auth_login
    code, _ = client.auth(mechanism, auth)
    assert code == 235
    client.quit()


def test_bad_password_is_535(server: ServerThread, client_tls: ssl.SSLContext) -> None:
    client = submission(server, client_tls, login=False)
    with pytest.raises(smtplib.SMTPAuthenticationError) as info:
        client.login(ALICE, "wrong")
    assert info.value.smtp_code == 535 and info.value.smtp_error.startswith(b"5.7.8")
    with pytest.raises(smtplib.SMTPAuthenticationError):
        client.login("nobody@example.test", PASSWORD)
    client.quit()


def test_submission_relays_and_fixes_headers(make_server: Callable[..., ServerThread],
                                             client_tls: ssl.SSLContext) -> None:
    # Nothing listens on port 9: the remote copy is deferred and stays queued.
    server = make_server('[transports]\n"remote.example" = "smtp:[127.0.0.1]:9"\n')
    client = submission(server, client_tls)
    raw_msg = b"From: alice@example.test\r\nTo: alice@example.test\r\nSubject: s\r\n\r\nbody\r\n"
    client.sendmail(ALICE, [ALICE, "friend@remote.example"], raw_msg)
    client.quit()
    msgs = wait_for(lambda: maildir_messages(server.cfg, ALICE))
    assert len(msgs) == 1
    text = msgs[0]
    assert b"with ESMTPSA id" in text and b"(using TLSv1.3" in text
    assert b"\nMessage-ID: <" in text and b"\nDate: " in text
    # The remote copy is deferred (its relay is down) and stays queued, not lost.
    def remote_deferred() -> bool:
        queued = server.call(server.server.store.list())
        return any(r.address == "friend@remote.example" and r.status.value == "deferred"
                   for m in queued for r in m.recipients)
    assert wait_for(remote_deferred)


def test_sender_bound_to_login(server: ServerThread, client_tls: ssl.SSLContext) -> None:
    add_alias(server.cfg, f"sales@{DOMAIN}", ALICE)
    client = submission(server, client_tls)
    code, text = client.mail(BOB)
    assert (code, text[:5]) == (553, b"5.7.1")
    code, _ = client.mail("Alice@Example.Test")
    assert code == 250
    client.rset()
    code, _ = client.mail(f"sales@{DOMAIN}")
    assert code == 250
    client.quit()


def test_implicit_tls_submissions(server: ServerThread, client_tls: ssl.SSLContext) -> None:
    client = smtplib.SMTP_SSL("127.0.0.1", server.port("submissions"), timeout=10,
                              context=client_tls)
    client.ehlo("phone")
    assert not client.has_extn("starttls")
    client.login(ALICE, PASSWORD)
    client.sendmail(ALICE, [ALICE], b"Subject: via 465\r\n\r\nx\r\n")
    client.quit()
    msgs = wait_for(lambda: maildir_messages(server.cfg, ALICE))
    assert b"Subject: via 465" in msgs[0]


def test_size_limit_keeps_connection_usable(make_server: Callable[..., ServerThread]) -> None:
    server = make_server("message_size_max = 20000")
    client = mx(server)
    del client.esmtp_features["size"]  # do not declare SIZE: the limit applies to DATA
    with pytest.raises(smtplib.SMTPDataError) as info:
        client.sendmail("s@remote.example", [ALICE], message(body="x" * 70 + "\n") * 400)
    assert info.value.smtp_code == 552 and info.value.smtp_error.startswith(b"5.3.4")
    client.sendmail("s@remote.example", [ALICE], message(subject="small"))
    client.quit()
    msgs = wait_for(lambda: maildir_messages(server.cfg, ALICE))
    assert len(msgs) == 1 and b"Subject: small" in msgs[0]


def test_declared_size_too_big(make_server: Callable[..., ServerThread]) -> None:
    server = make_server("message_size_max = 20000")
    client = mx(server)
    code, text = client.mail("s@remote.example", ["SIZE=20001"])
    assert (code, text[:5]) == (552, b"5.3.4")
    client.quit()


def test_smuggling_end_to_end(server: ServerThread) -> None:
    sock = raw(server)
    sock.sendall(b"EHLO t\r\nMAIL FROM:<s@remote.example>\r\nRCPT TO:<alice@example.test>\r\n"
                 b"DATA\r\n")
    read_replies(sock, 4)
    sock.sendall(b"Subject: outer\r\n\r\nbody\n.\nMAIL FROM:<ceo@example.test>\r\n"
                 b"RCPT TO:<alice@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n")
    replies = read_replies(sock, 1)
    assert replies[0].startswith(b"250 2.0.0")
    sock.sendall(b"QUIT\r\n")
    read_replies(sock, 2)
    msgs = wait_for(lambda: maildir_messages(server.cfg, ALICE))
    assert len(msgs) == 1
    assert b"Subject: outer" in msgs[0] and b"Subject: smuggled" in msgs[0]


def test_bdat_and_pipelining(server: ServerThread) -> None:
    sock = raw(server)
    body = b"Subject: chunked\r\n\r\nline one\r\n.line two\r\n"
    sock.sendall(b"EHLO t\r\nMAIL FROM:<s@remote.example> BODY=8BITMIME\r\n"
                 b"RCPT TO:<alice@example.test>\r\nBDAT 10\r\n" + body[:10]
                 + f"BDAT {len(body) - 10} LAST\r\n".encode() + body[10:] + b"QUIT\r\n")
    replies = read_replies(sock, 6)
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"250", b"250", b"221"]
    msgs = wait_for(lambda: maildir_messages(server.cfg, ALICE))
    assert msgs[0].endswith(body.replace(b"\r\n", b"\n"))  # no dot-unstuffing in BDAT


def test_long_lines_rejected(server: ServerThread) -> None:
    client = mx(server)
    with pytest.raises(smtplib.SMTPDataError) as info:
        client.sendmail("s@remote.example", [ALICE], b"Subject: x\r\n\r\n" + b"y" * 1200)
    assert info.value.smtp_code == 550
    client.quit()


def test_too_many_errors_disconnects(server: ServerThread) -> None:
    sock = raw(server)
    sock.sendall(b"BOGUS\r\n" * 12)
    replies = read_replies(sock, 11)
    assert replies[-1].startswith(b"421 4.7.0")
    assert sock.recv(100) == b""


def test_smtputf8_address(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(users=("alice@example.test", "jörg@example.test"))
    sock = raw(server)
    sock.sendall("EHLO t\r\nMAIL FROM:<ü@remote.example> SMTPUTF8\r\n"
                 "RCPT TO:<jörg@example.test>\r\nDATA\r\n".encode())
    replies = read_replies(sock, 4)
    assert replies[3].startswith(b"354")
    sock.sendall("Subject: ä\r\n\r\nx\r\n.\r\n".encode())
    assert read_replies(sock, 1)[0].startswith(b"250")
    msgs = wait_for(lambda: maildir_messages(server.cfg, "jörg@example.test"))
    assert b"with UTF8SMTP id" in msgs[0]


def test_idle_client_times_out_with_421(make_server: Callable[..., ServerThread]) -> None:
    server = make_server("command_timeout = 0.3")
    sock = raw(server)
    sock.sendall(b"EHLO t\r\n")
    replies = read_replies(sock, 2)
    assert replies[-1].startswith(b"421 4.4.2")
    assert sock.recv(100) == b""


def test_stalled_tls_handshake_is_dropped(make_server: Callable[..., ServerThread]) -> None:
    server = make_server("tls_handshake_timeout = 0.3")
    sock = socket.create_connection(("127.0.0.1", server.port("submissions")), timeout=5)
    # Send nothing: the server gives up on the handshake and closes.
    assert sock.recv(100) == b""


def test_plaintext_pipelined_after_starttls_is_discarded(server: ServerThread,
                                                         client_tls: ssl.SSLContext) -> None:
    """RFC 3207 6 (CVE-2011-0411 class): commands sent in the clear right
    after STARTTLS must not be executed inside the TLS session."""
    sock = raw(server)
    sock.sendall(b"EHLO t\r\n")
    read_replies(sock, 1)
    sock.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@remote.example>\r\n")
    assert read_replies(sock, 1)[0].startswith(b"220")
    tls = client_tls.wrap_socket(sock, server_hostname="mail.example.test")
    tls.sendall(b"EHLO t\r\nNOOP\r\n")
    replies = read_replies(tls, 2)
    # The EHLO reply then the NOOP reply: nothing answers the injected commands.
    assert replies[0].startswith(b"250 ") and replies[1] == b"250 2.0.0 OK", replies
    tls.sendall(b"MAIL FROM:<a@remote.example>\r\n")
    assert read_replies(tls, 1)[0].startswith(b"250 2.1.0")  # no transaction was open
    tls.close()


def test_pregreet_client_is_refused(make_server: Callable[..., ServerThread]) -> None:
    """RFC 5321 4.3.1 / postscreen: a client that talks before the greeting."""
    server = make_server('[listeners.mx]\naddress = "127.0.0.1:0"\npregreet_wait = 0.3\n'
                         .replace("[listeners.mx]\n", "[listeners.early]\nmode = \"mx\"\n"))
    sock = socket.create_connection(("127.0.0.1", server.port("early")), timeout=10)
    sock.sendall(b"EHLO impatient\r\n")
    data = sock.recv(1024)
    assert data.startswith(b"554 5.5.1"), data
    # A patient client on the same listener is greeted (from another address:
    # the impatient one is now banned for a while, see test_protect.py).
    patient = socket.create_connection(("127.0.0.1", server.port("early")), timeout=10,
                                       source_address=("127.0.0.2", 0))
    assert patient.recv(1024).startswith(b"220 ")


def test_http_on_the_smtp_port_is_cut_off(server: ServerThread) -> None:
    sock = raw(server)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: mail.example.test\r\n\r\n")
    data = b""
    while chunk := sock.recv(1024):
        data += chunk
    assert data.startswith(b"554 5.5.0") and data.count(b"\r\n") == 1
