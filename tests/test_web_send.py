"""The HTTP send API (POST /api/v1/messages) against a running server:
mail from an application arrives in the local Maildir with a valid DKIM
signature, as SMTP submission would deliver it; sender binding, Bcc,
attachments, raw messages, header injection, scopes and the per-key rate
limit."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import DOMAIN, ServerThread, add_user, maildir_messages, wait_for
from tests.test_service import free_ports
from tests.test_web_admin import base
from tests.test_web_api import new_key

from postwarden.bootstrap import init_dkim
from postwarden.config import DnsConfig
from postwarden.delivery.dns import Resolver
from postwarden.dkim_keys import public_record
from postwarden.message.dkim_verify import verify_dkim

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


@pytest.fixture
def sender(make_server: Callable[..., ServerThread], loopback_dns: Any) -> Iterator[ServerThread]:
    ports = free_ports(4)
    st = make_server(f'[admin]\nenabled = true\naddress = "127.0.0.1:{ports[3]}"\n'
                     'send_rate = 5\n[alerts]\nenabled = false\n',
                     ports=(ports[0], ports[1], ports[2]))
    add_user(st.cfg, BOB)
    keys = init_dkim(st.cfg.data_dir, DOMAIN)
    for key in keys:
        loopback_dns.set(key.dns_name, {"TXT": [public_record(key)]})
    yield st
    for key in keys:
        loopback_dns.remove(key.dns_name)


def post(st: ServerThread, key: str, body: Any, content_type: str = "application/json"
         ) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base(st) + "/api/v1/messages", data=data, method="POST",
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def dkim_results(message: bytes, dns_port: int) -> list[tuple[str, str]]:
    resolver = Resolver(DnsConfig(nameservers=(("127.0.0.1", dns_port),), timeout=2))
    report = asyncio.run(verify_dkim(message, resolver))
    return [(r.domain, r.result) for r in report.results]


def test_json_message_delivered_signed(sender: ServerThread, loopback_dns: Any,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    key = new_key(sender, capsys, "send", ALICE)
    status, body = post(sender, key, {
        "from": f"Alice Example <{ALICE}>", "to": [BOB], "bcc": ALICE,
        "subject": "Your invoice", "text": "Hello Bob,\nyour invoice is attached.\n",
        "html": "<p>Hello Bob,</p><p>your invoice is attached.</p>",
        "headers": {"X-Campaign": "nov-2026"},
        "attachments": [{"filename": "invoice.pdf", "content_type": "application/pdf",
                         "content": base64.b64encode(b"%PDF-1.4 fake").decode()}]})
    assert status == 202, body
    queue_id = body["queue_id"]
    assert sorted(body["recipients"]) == [ALICE, BOB]
    (raw,) = wait_for(lambda: maildir_messages(sender.cfg, BOB), 15)
    assert queue_id.encode() in raw  # in the Received field
    assert dkim_results(raw, loopback_dns.port) == [(DOMAIN, "pass")]
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == "Your invoice" and msg["X-Campaign"] == "nov-2026"
    assert msg["Message-ID"] and msg["Date"] and msg["Bcc"] is None
    assert ALICE not in str(msg["To"])  # the Bcc recipient is not shown
    html = msg.get_body(("html",))
    assert html is not None and "<p>Hello Bob,</p>" in html.get_content()
    (attachment,) = list(msg.iter_attachments())
    assert attachment.get_filename() == "invoice.pdf"
    assert attachment.get_content() == b"%PDF-1.4 fake"
    # The Bcc recipient got it too; tampering breaks the signature.
    assert wait_for(lambda: maildir_messages(sender.cfg, ALICE), 15)
    tampered = raw.replace(b"your invoice is attached", b"pay to account 1234 instead")
    assert dkim_results(tampered, loopback_dns.port) == [(DOMAIN, "fail")]


def test_raw_message(sender: ServerThread, loopback_dns: Any,
                     capsys: pytest.CaptureFixture[str]) -> None:
    key = new_key(sender, capsys, "send", ALICE)
    raw = (f"From: {ALICE}\nTo: {BOB}\nBcc: {ALICE}\nSubject: raw one\n\nraw body\n").encode()
    status, body = post(sender, key, raw, "message/rfc822")
    assert status == 202, body
    assert sorted(body["recipients"]) == [BOB]  # from To; Bcc was dropped with its field
    (got,) = wait_for(lambda: maildir_messages(sender.cfg, BOB), 15)
    assert b"raw body\r\n" in got.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert b"Bcc:" not in got and b"Message-ID:" in got
    assert dkim_results(got.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"),
                        loopback_dns.port) == [(DOMAIN, "pass")]
    status, body = post(sender, key, {"raw": f"From: {ALICE}\r\nTo: {BOB}\r\n"
                                             "Subject: raw in json\r\n\r\nhi\r\n"})
    assert status == 202, body


def test_refusals(sender: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    send = new_key(sender, capsys, "send", ALICE)
    read = new_key(sender, capsys, "read")
    message = {"from": ALICE, "to": BOB, "subject": "s", "text": "t"}
    assert post(sender, read, message)[0] == 403
    assert post(sender, "pwk_nope_nope", message)[0] == 401
    # Sender binding: alice's key cannot send as bob.
    status, body = post(sender, send, {**message, "from": BOB})
    assert status == 403 and body["smtp_code"] == 553, body
    # Relaying to the world needs no less than SMTP: refused for an unknown local user.
    status, body = post(sender, send, {**message, "to": f"nobody@{DOMAIN}"})
    assert status == 422 and body["smtp_code"] == 550, body
    # Header injection and malformed fields.
    status, body = post(sender, send, {**message, "subject": "hi\r\nBcc: x@evil.example"})
    assert status == 422
    status, _ = post(sender, send, {**message, "headers": {"X-A": "1\r\nBcc: x@evil.example"}})
    assert status == 422
    assert post(sender, send, {**message, "headers": {"From": "x@y.example"}})[0] == 422
    assert post(sender, send, {**message, "attachments": [{"filename": "a",
                                                           "content": "!!"}]})[0] == 422
    assert post(sender, send, {**message, "to": "not an address"})[0] == 422
    assert post(sender, send, b"{not json")[0] == 400
    assert sender.call(sender.server.store.list()) == []
    # The per-key rate limit ([admin] send_rate = 5 a minute; every well-formed
    # request counts, accepted or not).
    fresh = new_key(sender, capsys, "send", ALICE)
    codes = [post(sender, fresh, message)[0] for _ in range(6)]
    assert codes == [202] * 5 + [429]


def test_schemathesis_send_api(sender: ServerThread, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    st_cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st_cli is not None, "schemathesis (the test extra) is not installed"
    key = new_key(sender, capsys, "send", ALICE)
    r = subprocess.run([st_cli, "run", base(sender) + "/api/v1/openapi.json",
                        "--include-path", "/api/v1/messages",
                        "--checks", "not_a_server_error", "--max-examples", "40",
                        "-H", f"Authorization: Bearer {key}", "--request-timeout", "20",
                        "--no-color"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(sender.cfg.data_dir)})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "passed" in r.stdout
