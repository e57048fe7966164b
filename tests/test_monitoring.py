"""Monitoring after real traffic: Prometheus metrics on the admin listener
(values, and promtool's validation), health and readiness, the message
trace of a message deferred then delivered, the spike detector suspending
an account with a signed webhook alert, and the audit log."""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import (
    DOMAIN,
    PASSWORD,
    ServerThread,
    maildir_messages,
    require_tool,
    wait_for,
)
from tests.fixtures_outbound import ScriptedServer, free_port

from postwarden import cli
from postwarden.storage.sqlite_monitor import SqliteMonitorStore

ALICE = f"alice@{DOMAIN}"
ADMIN = '[admin]\nenabled = true\naddress = "127.0.0.1:0"\n'
QUIET_ALERTS = "[alerts]\nfilters = false\nmail = false\n"


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def submit(port: int, tls: ssl.SSLContext, rcpts: list[str], count: int = 1,
           user: str = ALICE, password: str = PASSWORD) -> list[Any]:
    """``count`` messages in one authenticated session; the replies."""
    replies = []
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.starttls(context=tls)
        c.login(user, password)
        for i in range(count):
            try:
                c.sendmail(user, rcpts, f"Subject: m{i}\r\nMessage-ID: <m{i}.{time.time()}"
                                        f"@client.test>\r\n\r\nbody {i}\r\n".encode())
                replies.append(250)
            except smtplib.SMTPSenderRefused as exc:
                replies.append(exc.smtp_code)
                c.rset()
    return replies


def test_metrics_after_real_traffic(make_server: Callable[..., ServerThread],
                                    client_tls: ssl.SSLContext) -> None:
    st = make_server(ADMIN + QUIET_ALERTS + "[queue]\nscan_interval = 0.2\n")
    admin = st.server.admin.port
    mx = st.port("mx")
    for i in range(2):
        with smtplib.SMTP("127.0.0.1", mx, timeout=10) as c:
            c.sendmail("s@remote.example", [ALICE], f"Subject: {i}\r\n\r\nhello\r\n".encode())
    with (smtplib.SMTP("127.0.0.1", mx, timeout=10) as c,  # an unknown recipient
          pytest.raises(smtplib.SMTPRecipientsRefused)):
        c.sendmail("s@remote.example", [f"nobody@{DOMAIN}"], b"Subject: x\r\n\r\nx\r\n")
    with smtplib.SMTP("127.0.0.1", st.port("submission"), timeout=10) as c:
        c.starttls(context=client_tls)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login(ALICE, "wrong password")
    submit(st.port("submission"), client_tls, [ALICE])
    assert wait_for(lambda: len(maildir_messages(st.cfg, ALICE)) == 3)

    def scraped() -> dict[Any, float] | None:
        status, body = get(admin, "/metrics")
        assert status == 200
        found = samples(body.decode())
        # Both are counted once the results are recorded (the deliveries
        # run concurrently, so one may still be recording).
        done = (value(found, "postwarden_deliveries_total", result="delivered",
                      destination="local") == 3
                and value(found, "postwarden_queue_residence_seconds_count",
                          result="delivered") == 3)
        return found if done else None

    found = wait_for(scraped)
    assert found, "the three deliveries were not counted"
    mx_l = {"listener": "mx"}
    assert value(found, "postwarden_smtp_connections_total", result="accepted", **mx_l) == 3
    assert value(found, "postwarden_messages_accepted_total", **mx_l) == 2
    assert value(found, "postwarden_recipients_accepted_total", **mx_l) == 2
    assert value(found, "postwarden_received_bytes_total", **mx_l) > 2 * len("hello")
    assert value(found, "postwarden_messages_rejected_total", reason="rcpt",
                 kind="permanent", **mx_l) == 1
    sub = {"listener": "submission"}
    # smtplib tried PLAIN, then LOGIN: two failures.
    assert value(found, "postwarden_smtp_auth_total", result="failure", **sub) == 2
    assert value(found, "postwarden_smtp_auth_total", result="success", **sub) == 1
    assert value(found, "postwarden_smtp_tls_sessions_total", **sub) == 2
    assert value(found, "postwarden_messages_accepted_total", **sub) == 1
    assert value(found, "postwarden_delivery_duration_seconds_count",
                 destination="local") == 3
    assert value(found, "postwarden_queue_residence_seconds_count", result="delivered") == 3
    assert value(found, "postwarden_queue_messages", state="active") == 0
    assert value(found, "postwarden_bans_active") == 0
    assert (("postwarden_queue_recipients", (("status", "deferred"),)) in found)

    promtool = require_tool("promtool")
    _, body = get(admin, "/metrics")
    check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                           timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    assert get(admin, "/healthz") == (200, b"ok\n")
    status, body = get(admin, "/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["ready"] is True
    assert set(ready["checks"]) == {"listeners", "storage", "queue_runner"}


def test_readyz_says_what_is_wrong(make_server: Callable[..., ServerThread]) -> None:
    st = make_server(ADMIN + QUIET_ALERTS)
    st.call(st.server.runner.stop())  # the queue runner is gone
    status, body = get(st.server.admin.port, "/readyz")
    assert status == 503
    assert json.loads(body)["checks"]["queue_runner"] == "not running"


def test_trace_of_a_message_deferred_then_delivered(
        make_server: Callable[..., ServerThread], client_tls: ssl.SSLContext,
        capsys: Any) -> None:
    peer = ScriptedServer(port=free_port())
    bob = "bob@remote.test"
    peer.rcpt[bob] = "451 4.3.0 come back later"
    st = make_server(QUIET_ALERTS + "[dkim]\nsign = false\n"
                     "[queue]\nscan_interval = 0.1\nretry_min = 0.3\nretry_max = 0.3\n"
                     f'[transports]\n"remote.test" = "smtp:[127.0.0.1]:{peer.port}"\n')
    st.call(peer.start())
    try:
        submit(st.port("submission"), client_tls, [bob])
        queue_id = wait_for(lambda: _deferred(st))
        assert queue_id
        peer.rcpt[bob] = "250 2.1.5 ok"
        assert wait_for(lambda: peer.sessions and any(s.messages for s in peer.sessions))
    finally:
        st.call(peer.stop())
    path = str(st.cfg.path)

    def trace(*args: str) -> list[dict[str, Any]]:
        capsys.readouterr()
        assert cli.main(["-c", path, "trace", *args, "--json"]) == 0
        result: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
        return result

    assert wait_for(lambda: [e["event"] for e in trace("--id", queue_id)[0]["events"]]
                    [-1:] == ["removed"])
    (msg,) = trace("--to", "BOB@remote.test", "--since", "1h")
    assert msg["queue_id"] == queue_id and msg["sender"] == ALICE
    events = msg["events"]
    assert [e["event"] for e in events] == ["queued", "deferred", "delivered", "removed"]
    received, deferred, delivered = events[0], events[1], events[2]
    assert f"user={ALICE}" in received["detail"] and "tls=TLSv1.3/" in received["detail"]
    assert "listener=submission" in received["detail"]
    assert PASSWORD not in json.dumps(msg)
    assert deferred["dsn"] == "4.3.0" and "come back later" in deferred["reply"]
    assert deferred["relay"].startswith("127.0.0.1") or "127.0.0.1" in deferred["relay"]
    assert delivered["dsn"] == "2.0.0" and "queued as SCRIPTED" in delivered["reply"]
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    assert trace("--message-id", msg["message_id"])[0]["queue_id"] == queue_id
    assert trace("--from", ALICE, "--to", bob)[0]["queue_id"] == queue_id
    assert trace("--from", "someone@else.test") == []
    assert trace("--to", bob, "--until", "2000-01-01") == []
    # The text form, as an administrator reads it.
    capsys.readouterr()
    assert cli.main(["-c", path, "trace", "--to", bob]) == 0
    out = capsys.readouterr().out
    assert f"{queue_id}  from=<{ALICE}>" in out and "deferred  to=<bob@remote.test>" in out
    assert cli.main(["-c", path, "trace", "--to", "nobody@x.test"]) == 1


def _deferred(st: ServerThread) -> str | None:
    from postwarden.observe.health import read_db

    db = read_db(st.cfg.db_path)
    try:
        row = db.execute("SELECT queue_id FROM events WHERE event = 'deferred'").fetchone()
    finally:
        db.close()
    return row[0] if row else None


class Hook(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    Hook.received = []
    httpd = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/hook", Hook.received
    httpd.shutdown()
    httpd.server_close()


def test_spike_detector_suspends_an_account_and_the_webhook_is_signed(
        make_server: Callable[..., ServerThread], client_tls: ssl.SSLContext,
        webhook: tuple[str, list[tuple[dict[str, str], bytes]]], tmp_path: Path) -> None:
    url, received = webhook
    secret = "hook secret"
    extra = (f'[alerts]\ninterval = 0.1\nspike_factor = 10\nspike_min = 5\nfilters = false\n'
             f'webhook = "{url}"\nwebhook_secret = "{secret}"\n')
    # Alice usually sends 1 message per window: 10 in this one are a spike.
    (tmp_path / "data").mkdir()
    with SqliteMonitorStore(tmp_path / "data" / "postwarden.db") as store:
        store.set_baseline(ALICE, 1.0)
    st = make_server(extra)
    sub = st.port("submission")
    assert submit(sub, client_tls, [ALICE], count=9) == [250] * 9
    time.sleep(0.5)  # several rounds of the detector: 9 is below 10
    assert submit(sub, client_tls, [ALICE], count=1) == [250]
    assert wait_for(lambda: submit(sub, client_tls, [ALICE]) == [550], timeout=10)
    with SqliteMonitorStore(st.cfg.db_path) as store:
        ((account, reason, _, by),) = store.suspensions()
        audit = store.audit_entries()
    assert (account, by) == (ALICE, "spike detector") and "usually 1.0" in reason
    assert any(e.action == "account suspend" and e.target == ALICE for e in audit)

    assert wait_for(lambda: any(json.loads(b)["rule"] == "account_spike" for _, b in received))
    headers, body = next((h, b) for h, b in received
                         if json.loads(b)["rule"] == "account_spike")
    payload = json.loads(body)
    assert payload["state"] == "firing" and payload["key"] == f"account_spike:{ALICE}"
    expected = hmac.new(secret.encode(), headers["X-Postwarden-Timestamp"].encode() + b"."
                        + body, hashlib.sha256).hexdigest()
    assert headers["X-Postwarden-Signature"] == f"sha256={expected}"
    assert sum(json.loads(b)["rule"] == "account_spike" for _, b in received) == 1  # dedup

    # The administrator lifts it: the account sends again, not suspended anew
    # within the same window.
    assert cli.main(["-c", str(st.cfg.path), "suspend", "lift", ALICE]) == 0
    assert wait_for(lambda: submit(sub, client_tls, [ALICE]) == [250], timeout=5)
    time.sleep(0.3)
    assert submit(sub, client_tls, [ALICE]) == [250]


def test_audit_log_of_administrative_actions(
        make_server: Callable[..., ServerThread], capsys: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    st = make_server(QUIET_ALERTS)
    path = str(st.cfg.path)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("a very secret passphrase 42\n"))
    assert cli.main(["-c", path, "user", "add", f"bob@{DOMAIN}", "--password-stdin"]) == 0
    assert cli.main(["-c", path, "ban", "add", "192.0.2.7", "--reason", "test"]) == 0
    assert cli.main(["-c", path, "queue", "delete", "NOSUCHQUEUEID000"]) != 0
    assert cli.main(["-c", path, "user", "list"]) == 0  # read-only: not audited
    capsys.readouterr()
    assert cli.main(["-c", path, "audit", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    actions = [(e["action"], e["target"], e["result"]) for e in entries]
    assert ("config changed", path, "ok") in actions  # the server's start
    assert ("user add", f"bob@{DOMAIN}", "ok") in actions
    assert ("ban add", "192.0.2.7", "ok") in actions
    assert ("queue delete", "NOSUCHQUEUEID000", "failed (exit 1)") in actions
    assert not any(a == "user list" for a, _, _ in actions)
    assert all(e["actor"] for e in entries)
    assert "secret passphrase" not in json.dumps(entries)
