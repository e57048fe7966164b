"""Complaints from feedback reports (ARF, RFC 5965), end to end over real
sockets: Alice sends through submission, the message is delivered to a
loopback SMTP sink, the mailbox provider's report about it comes back to
the mx listener, and Alice's webhook receives a signed ``complained``
event; a report about mail we did not send, and a malformed one, are
delivered like any mail and reach no webhook."""

from __future__ import annotations

import hashlib
import hmac
import smtplib
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from tests.conftest import (
    DOMAIN,
    ServerThread,
    add_user,
    maildir_messages,
    wait_for,
)
from tests.fixtures_outbound import Sink, free_port
from tests.test_web_admin import base
from tests.test_web_api import call, new_key
from tests.test_web_webhooks import ALICE, BOB, Receiver, receiver, send

from postwarden.observe import trace

__all__ = ["receiver"]  # fixtures
FBL = f"fbl@{DOMAIN}"  # the address registered at the provider's feedback loop
CAROL = "carol@remote.example"


class RemoteMx(Sink):
    """The recipients' mail server: an SMTP sink on loopback."""

    def __init__(self) -> None:
        super().__init__()
        self.port = free_port()


@pytest.fixture
def sink() -> Iterator[RemoteMx]:
    handler = RemoteMx()
    controller = Controller(handler, hostname="127.0.0.1", port=handler.port,
                            server_hostname="mx.remote.example")
    controller.start()
    yield handler
    controller.stop()


@pytest.fixture
def complaints(make_server: Callable[..., ServerThread], ca_file: Path,
               sink: RemoteMx) -> ServerThread:
    st = make_server(f'[admin]\nenabled = true\naddress = "127.0.0.1:{free_port()}"\n'
                     '[alerts]\nenabled = false\n'
                     f'[delivery]\nca_file = "{ca_file}"\n'
                     f'[transports]\n"remote.example" = '
                     f'"smtp:[127.0.0.1]:{sink.port}"\n')
    add_user(st.cfg, BOB)
    add_user(st.cfg, FBL)
    return st


def arf(original: bytes, *, feedback_type: str = "abuse", rcpt: str = CAROL,
        part: str = "message/rfc822") -> bytes:
    """A feedback report as mailbox providers send them (RFC 5965 2)."""
    return (
        "From: <feedback@remote.example>\r\n"
        f"To: <{FBL}>\r\n"
        "Subject: FW: complaint\r\n"
        f"Message-ID: {make_msgid(domain='remote.example')}\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report;\r\n'
        '\tboundary="part_boundary"\r\n'
        "\r\n"
        "--part_boundary\r\n"
        "Content-Type: text/plain\r\n\r\n"
        "This is an email abuse report for an email message received from IP\r\n"
        "127.0.0.1.\r\n"
        "--part_boundary\r\n"
        "Content-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: {feedback_type}\r\n"
        "User-Agent: RemoteFBL/1.0\r\n"
        "Version: 1\r\n"
        f"Original-Rcpt-To: <{rcpt}>\r\n"
        "Arrival-Date: Thu, 26 Nov 2026 22:00:00 +0000\r\n\r\n"
        "--part_boundary\r\n"
        f"Content-Type: {part}\r\n\r\n").encode() + original + (
        b"\r\n--part_boundary--\r\n")


def report_to_mx(st: ServerThread, message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", st.port("mx"), timeout=10) as c:
        c.sendmail("feedback@remote.example", [FBL], message)


def metric(st: ServerThread, result: str) -> float:
    with urllib.request.urlopen(base(st) + "/metrics", timeout=10) as r:
        text = r.read().decode()
    line = f'postwarden_feedback_reports_total{{result="{result}"}} '
    return next((float(x[len(line):]) for x in text.splitlines() if x.startswith(line)), 0.0)


def history(st: ServerThread, queue_id: str) -> list[Any]:
    (found,) = trace.search(st.cfg, trace.Query(queue_id=queue_id))
    return found.events


def test_a_report_about_our_mail_reaches_the_accounts_webhook(
        complaints: ServerThread, sink: RemoteMx, receiver: Receiver,
        client_tls: ssl.SSLContext, capsys: pytest.CaptureFixture[str]) -> None:
    admin = new_key(complaints, capsys, "admin")
    status, body = call(complaints, "POST", "/api/v1/webhooks", admin,
                        {"account": ALICE, "url": receiver.url})
    assert status == 201
    secret = body["secret"]
    send(complaints, client_tls, [CAROL])
    assert wait_for(lambda: sink.envelopes, 20)
    delivered = sink.envelopes[0].original_content
    assert wait_for(lambda: [e for e in receiver.events() if e["event"] == "delivered"], 20)
    sent = receiver.events()[0]
    queue_id = sent["queue_id"]

    # The provider sends the whole message back, inside a report.
    report_to_mx(complaints, arf(delivered))
    assert wait_for(lambda: [e for e in receiver.events() if e["event"] == "complained"], 20)
    (complaint,) = [e for e in receiver.events() if e["event"] == "complained"]
    assert complaint["account"] == ALICE and complaint["queue_id"] == queue_id
    assert complaint["recipient"] == CAROL and complaint["feedback_type"] == "abuse"
    assert complaint["message_id"] == trace.message_id_of(delivered)
    assert complaint["message_id"].startswith("<") and complaint["report_queue_id"]
    headers, raw = receiver.requests[-1]
    stamp = headers["X-Postwarden-Timestamp"]
    assert headers["X-Postwarden-Signature"] == "sha256=" + hmac.new(
        secret.encode(), stamp.encode() + b"." + raw, hashlib.sha256).hexdigest()
    # The message's history says so, the counter counts it, and the report
    # itself was delivered to the feedback address.
    events = history(complaints, queue_id)
    (line,) = [e for e in events if e.event == "complained"]
    assert line.rcpt == CAROL and "feedback_type=abuse" in line.detail
    assert metric(complaints, "matched") == 1
    assert wait_for(lambda: maildir_messages(complaints.cfg, FBL), 10)

    # Only the header (text/rfc822-headers), without our Received field:
    # matched by the Message-ID.
    head = delivered.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    head = b"\r\n".join(x for x in head.split(b"\r\n")
                        if not x.startswith((b"Received:", b"\t", b" ")))
    report_to_mx(complaints, arf(head, feedback_type="fraud", part="text/rfc822-headers"))
    assert wait_for(lambda: len([e for e in receiver.events()
                                 if e["event"] == "complained"]) == 2, 20)
    assert receiver.events()[-1]["feedback_type"] == "fraud"
    assert receiver.events()[-1]["queue_id"] == queue_id


def test_forged_and_malformed_reports_change_nothing(
        complaints: ServerThread, receiver: Receiver, client_tls: ssl.SSLContext,
        capsys: pytest.CaptureFixture[str]) -> None:
    admin = new_key(complaints, capsys, "admin")
    assert call(complaints, "POST", "/api/v1/webhooks", admin,
                {"account": ALICE, "url": receiver.url})[0] == 201
    # Mail that came in from outside (to Bob) is not mail we sent, whatever
    # Received field a report invents for it.
    inbound = (b"From: <x@remote.example>\r\nTo: <" + BOB.encode() + b">\r\n"
               b"Message-ID: <inbound.1@remote.example>\r\nSubject: hello\r\n\r\nhi\r\n")
    with smtplib.SMTP("127.0.0.1", complaints.port("mx"), timeout=10) as c:
        c.sendmail("x@remote.example", [BOB], inbound)
    assert wait_for(lambda: maildir_messages(complaints.cfg, BOB), 10)
    forged = (b"Received: from a by mail.example.test (postwarden) with ESMTPSA id "
              b"ABCDEFGHIJKLMNOP;\r\n\tThu, 26 Nov 2026 22:00:00 +0000\r\n" + inbound)
    report_to_mx(complaints, arf(forged, rcpt=BOB))
    report_to_mx(complaints, arf(b"Message-ID: <never.sent@example.test>\r\n\r\n"))
    assert wait_for(lambda: metric(complaints, "unmatched") == 2, 10)
    # Malformed: no feedback-report part; a Feedback-Type that is no token.
    broken = arf(b"Subject: x\r\n\r\n").replace(b"message/feedback-report", b"text/plain")
    report_to_mx(complaints, broken)
    report_to_mx(complaints, arf(b"Subject: x\r\n\r\n", feedback_type="a b c"))
    assert wait_for(lambda: metric(complaints, "malformed") == 2, 10)
    # Every report was delivered to the feedback address all the same.
    assert wait_for(lambda: len(maildir_messages(complaints.cfg, FBL)) == 4, 10)
    time.sleep(1.5)  # the webhook sender looks at its outbox every second
    assert receiver.requests == []
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(("detail", "ours"), [
    ("listener=submission client=127.0.0.1 helo=[127.0.0.1] tls=TLSv1.3/TLS_AES_256_GCM_SHA384"
     " user=alice@example.test session=a95955f93c", True),
    ("listener=http-api client=127.0.0.1 helo=http-api tls=no user=alice@example.test "
     "session=1", True),
    # Mail that came in, whatever its client put in the values after the prefix.
    ("listener=mx client=127.0.0.1 helo=[127.0.0.1] tls=no spf=none dkim=None "
     "filters=rules:accept(1) session=ec6dbf84b9", False),
    ("listener=mx client=127.0.0.1 helo=x\tuser=alice@example.test tls=no session=1", False),
    ("listener=mx client=127.0.0.1 helo=x tls=no dkim=d user=alice@example.test session=1",
     False),
])
def test_only_mail_an_account_sent_is_ours(detail: str, ours: bool) -> None:
    from postwarden.storage.base import DeliveryEvent
    from postwarden.web.complaints import sent_message

    events = [DeliveryEvent(1.0, "Q", "queued", rcpt=CAROL, sender=ALICE,
                            message_id="<m@x>", detail=detail)]
    sent = sent_message("Q", events, "<m@x>")
    assert (sent is not None) == ours
    if sent is not None:
        assert sent.account == ALICE and sent.recipients == (CAROL,)
        assert sent_message("Q", events, "<other@x>") is None
