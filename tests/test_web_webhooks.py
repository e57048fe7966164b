"""Delivery webhooks against a real HTTPS endpoint on loopback: an account's
delivered and deferred mail is reported as signed JSON (HMAC-SHA256), set
through the API and the web admin's accounts page, and a failing endpoint
is retried with backoff, doubling, until delivered or given up."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.conftest import DOMAIN, PASSWORD, ServerThread, add_user, wait_for, write_cert
from tests.test_service import free_ports
from tests.test_web_admin import add_admin, base, browser, login, page
from tests.test_web_api import call, new_key

from postwarden.web.store import SqliteAdminStore
from postwarden.web.webhooks import MAX_ATTEMPTS, RETRY_FIRST, RETRY_MAX, WebhookSender

__all__ = ["browser", "page"]  # fixtures
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


class Receiver:
    """An HTTPS endpoint keeping what it is sent; answers ``status`` (a list
    consumed one per request, then 200)."""

    def __init__(self, ca: trustme.CA, directory: Path) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.requests.append((dict(self.headers.items()), body))
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        cert, key = write_cert(ca, directory, "127.0.0.1")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/hooks/mail"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.requests]


@pytest.fixture
def receiver(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    r = Receiver(ca, tmp_path_factory.mktemp("hook"))
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def hooked(make_server: Callable[..., ServerThread], ca_file: Path) -> ServerThread:
    ports = free_ports(5)
    st = make_server(f'[admin]\nenabled = true\naddress = "127.0.0.1:{ports[3]}"\n'
                     '[alerts]\nenabled = false\n'
                     f'[delivery]\nca_file = "{ca_file}"\n'
                     f'[transports]\n"remote.example" = "smtp:[127.0.0.1]:{ports[4]}"\n'
                     '[queue]\nretry_min = 300\n', ports=(ports[0], ports[1], ports[2]))
    add_user(st.cfg, BOB)
    return st


def send(st: ServerThread, tls: ssl.SSLContext, rcpts: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", st.port("submission"), timeout=10) as c:
        c.starttls(context=tls)
        c.login(ALICE, PASSWORD)
        c.sendmail(ALICE, rcpts, b"Subject: hooked\r\n\r\nhi\r\n")


def test_signed_delivery_events(hooked: ServerThread, receiver: Receiver,
                                client_tls: ssl.SSLContext,
                                capsys: pytest.CaptureFixture[str]) -> None:
    admin = new_key(hooked, capsys, "admin")
    assert call(hooked, "POST", "/api/v1/webhooks", admin,
                {"account": ALICE, "url": "http://insecure.example/"})[0] == 422
    status, body = call(hooked, "POST", "/api/v1/webhooks", admin,
                        {"account": ALICE, "url": receiver.url})
    assert status == 201
    secret = body["secret"]
    send(hooked, client_tls, [BOB, "carol@remote.example"])
    assert wait_for(lambda: {e["event"] for e in receiver.events()} >= {"delivered",
                                                                        "deferred"}, 20)
    by_event = {e["event"]: e for e in receiver.events()}
    assert by_event["delivered"]["recipient"] == BOB
    assert by_event["deferred"]["recipient"] == "carol@remote.example"
    assert by_event["delivered"]["account"] == ALICE and by_event["delivered"]["queue_id"]
    for headers, raw in receiver.requests:
        stamp = headers["X-Postwarden-Timestamp"]
        expected = hmac.new(secret.encode(), stamp.encode() + b"." + raw,
                            hashlib.sha256).hexdigest()
        assert headers["X-Postwarden-Signature"] == f"sha256={expected}"
    # Bob's own mail (no webhook) is not reported.
    before = len(receiver.requests)
    with smtplib.SMTP("127.0.0.1", hooked.port("submission"), timeout=10) as c:
        c.starttls(context=client_tls)
        c.login(BOB, PASSWORD)
        c.sendmail(BOB, [ALICE], b"Subject: no hook\r\n\r\nhi\r\n")
    time.sleep(1.5)  # the sender posts every second: nothing more arrives
    assert len(receiver.requests) == before


def test_failing_endpoint_is_retried_with_backoff(hooked: ServerThread, receiver: Receiver,
                                                  client_tls: ssl.SSLContext,
                                                  page: Any) -> None:
    add_admin(hooked, "root")
    login(page, hooked)
    page.goto(base(hooked) + "/accounts")
    row = page.locator(f'[id="account-{ALICE}"]')
    row.locator("input[name=url]").fill(receiver.url)
    row.locator("text=Set webhook").click()
    assert "whsec_" in page.locator(".flash.secret").inner_text()
    assert receiver.url in page.locator(f'[id="account-{ALICE}"] .webhook').inner_text()
    receiver.statuses = [500]
    send(hooked, client_tls, [BOB])
    assert wait_for(lambda: receiver.requests, 20)
    with SqliteAdminStore(hooked.cfg.db_path) as store:
        now = time.time()
        # The failed attempt is recorded (attempt 1), the next one not before the backoff.
        assert wait_for(lambda: [r for r in store.outbox_due(now + 3600, 10) if r[4] == 1], 10)
        assert store.outbox_due(now + 5, 10) == []
        ((_, url, _, payload, attempts),) = store.outbox_due(now + 3600, 10)
        assert url == receiver.url and attempts == 1 and json.loads(payload)["recipient"] == BOB


def test_retries_back_off_doubling_until_delivered_or_given_up(
        tmp_path: Path, receiver: Receiver, ca_file: Path) -> None:
    """The sender's schedule against the real endpoint, on a clock of its
    own: 30 s after the first failure, 60 s after the second, ... and
    dropped after MAX_ATTEMPTS."""
    now = [1_000_000.0]
    with SqliteAdminStore(tmp_path / "p.db", clock=lambda: now[0]) as store:
        store.set_webhook(ALICE, receiver.url, "whsec_x")
        sender = WebhookSender(store, ca_file, clock=lambda: now[0])

        def flush_at(t: float) -> int:
            now[0] = 1_000_000.0 + t
            before = len(receiver.requests)
            # (In a thread: Playwright's loop may be running in this one.)
            with ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, sender.flush()).result(30)
            return len(receiver.requests) - before

        receiver.statuses = [500, 503]
        store.outbox_add([(ALICE, json.dumps({"event": "delivered", "n": 1}))])
        assert flush_at(0) == 1  # fails
        assert flush_at(RETRY_FIRST - 1) == 0
        assert flush_at(RETRY_FIRST) == 1  # fails again
        assert flush_at(RETRY_FIRST * 3 - 1) == 0
        assert flush_at(RETRY_FIRST * 3) == 1  # delivered
        assert store.outbox_due(now[0] + RETRY_MAX * 2, 10) == []
        assert [json.loads(b) for _, b in receiver.requests] == [{"event": "delivered",
                                                                  "n": 1}] * 3

        # An endpoint that always fails: the waits double up to RETRY_MAX,
        # and the event is dropped after MAX_ATTEMPTS.
        receiver.statuses = [500] * MAX_ATTEMPTS
        store.outbox_add([(ALICE, json.dumps({"event": "deferred", "n": 2}))])
        t, waits = RETRY_FIRST * 10, []
        for attempt in range(MAX_ATTEMPTS):
            assert flush_at(t) == 1
            due = store.outbox_due(now[0] + 2 * RETRY_MAX, 10)
            if attempt == MAX_ATTEMPTS - 1:
                assert due == []
                break
            ((_, _, _, _, attempts),) = due
            assert attempts == attempt + 1
            wait = (store._query("SELECT next_try FROM webadmin_webhook_outbox")[0][0]
                    - now[0])
            waits.append(wait)
            t += float(wait)  # type: ignore[arg-type]
        assert waits[:4] == [30.0, 60.0, 120.0, 240.0] and waits[-1] == RETRY_MAX
        assert receiver.statuses == []
