"""The web admin of a real ``postwarden serve`` with worker processes
(``processes = 2``): the workers accept SMTP, the main process serves
``[admin]``.  In headless Chromium: the dashboard shows the mail and the
refusals the worker handled, and a message the worker queued is held and
released from the queue page; a feedback report the worker accepts reaches
the account's webhook, posted by the main process."""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.conftest import PASSWORD, wait_for
from tests.test_service import ALICE, free_ports
from tests.test_web_admin import ADMIN_PASSWORD, browser, page
from tests.test_web_complaints import arf
from tests.test_web_webhooks import Receiver, receiver
from tests.test_workers import Paused, children, log_events, session_pids, start

from postwarden.auth.passwords import hash_password
from postwarden.web.store import SqliteAdminStore

__all__ = ["browser", "page", "receiver"]  # fixtures


def test_web_admin_of_a_server_with_workers(tmp_path: Path, cert_files: tuple[Path, Path],
                                            loopback_dns: Any, ca: trustme.CA,
                                            ca_file: Path, receiver: Receiver,
                                            page: Any) -> None:
    admin, refusing = free_ports(2)
    svc, ports, cfg, log = start(
        tmp_path, cert_files, loopback_dns,
        f'[admin]\nenabled = true\naddress = "127.0.0.1:{admin}"\n'
        "[alerts]\nenabled = false\n"
        f'[delivery]\nca_file = "{ca_file}"\n'
        f'[transports]\n"remote.example" = "smtp:[127.0.0.1]:{refusing}"\n'
        "[queue]\nretry_min = 300\n")
    base = f"http://127.0.0.1:{admin}"
    with SqliteAdminStore(cfg.db_path) as s:
        s.add("root", hash_password(ADMIN_PASSWORD), "admin")
        s.set_webhook(ALICE, receiver.url, "whsec_test")
    tls = ssl.create_default_context()
    ca.configure_trust(tls)
    try:
        (worker,) = children(svc.proc.pid)
        # With the main process stopped, the worker takes every connection.
        with Paused(svc.proc.pid):
            for i in range(3):
                with smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as c:
                    c.sendmail("news@remote.example", [ALICE],
                               f"Subject: n{i}\r\n\r\nhi\r\n".encode())
            with (smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as c,
                  pytest.raises(smtplib.SMTPRecipientsRefused)):
                c.sendmail("news@remote.example", ["nobody@example.test"], b"\r\n")
            with smtplib.SMTP("127.0.0.1", ports[1], timeout=10) as c:
                c.starttls(context=tls)
                c.login(ALICE, PASSWORD)
                c.mail(ALICE)
                c.rcpt("bob@remote.example")
                code, text = c.data(b"Subject: to a remote\r\n\r\nbody\r\n")
        assert code == 250
        queue_id = text.decode().rsplit(" ", 1)[-1]
        accepted = wait_for(lambda: log_events(log, "accepted") if len(
            log_events(log, "accepted")) == 4 else None)
        pids = session_pids(log)
        assert {pids.get(a["session"]) for a in accepted} == {worker}

        page.goto(base + "/login")
        page.fill("input[name=name]", "root")
        page.fill("input[name=password]", ADMIN_PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        assert int(page.locator("#in-24h").inner_text()) == 4
        assert "news@remote.example" in page.locator("#top-senders").inner_text()
        assert "rcpt" in page.locator("#top-rejections").inner_text()

        # The remote message waits (its MX refuses connections): hold it, release it.
        assert wait_for(lambda: [e for e in log_events(log, "deferred")
                                 if e.get("queue_id") == queue_id], 15)
        page.goto(base + "/queue")
        page.locator(f"#msg-{queue_id} input[type=checkbox]").check()
        page.click("button[value=hold]")
        assert "1 of 1 message(s) held" in page.locator(".flash.ok").inner_text()
        assert page.locator(f"#msg-{queue_id} .state").inner_text() == "held"
        page.click(f"text={queue_id}")
        assert "Subject: to a remote" in page.locator("pre.headers").inner_text()
        page.click("button[value=release]")
        assert "released" in page.locator(".flash.ok").inner_text()
        assert page.locator("dd.state").inner_text() == "active"

        # A complaint about it, accepted by the worker.
        original = (f"Received: from c by mail.example.test (postwarden) with ESMTPSA id "
                    f"{queue_id};\r\n\tThu, 26 Nov 2026 22:00:00 +0000\r\n"
                    "Subject: to a remote\r\n\r\n").encode()
        with Paused(svc.proc.pid), smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as c:
            c.sendmail("fbl@remote.example", [ALICE],
                       arf(original, rcpt="bob@remote.example"))
        assert wait_for(lambda: [e for e in receiver.events()
                                 if e["event"] == "complained"], 15)
        (complaint,) = [e for e in receiver.events() if e["event"] == "complained"]
        assert complaint["queue_id"] == queue_id and complaint["account"] == ALICE
        assert complaint["recipient"] == "bob@remote.example"
        report = log_events(log, "accepted")[-1]
        assert wait_for(lambda: session_pids(log).get(report["session"])) == worker
    finally:
        assert svc.stop() == 0
