"""The web admin's operations pages in Chromium: the quarantine (a message
held by the outgoing review, released and delivered), access lists and
bans, DNS records with their live check, and the settings with secrets
masked."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Callable
from typing import Any

import pytest
from tests.conftest import DOMAIN, PASSWORD, ServerThread, add_user, maildir_messages, wait_for
from tests.test_service import free_ports
from tests.test_web_admin import add_admin, audit_actions, base, browser, login, page

__all__ = ["browser", "page"]  # fixtures
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
SECRET = "webhook-secret-that-must-not-show"


@pytest.fixture
def ops(make_server: Callable[..., ServerThread]) -> ServerThread:
    ports = free_ports(4)
    st = make_server(f'[admin]\nenabled = true\naddress = "127.0.0.1:{ports[3]}"\n'
                     f'[alerts]\nenabled = false\nwebhook = "https://hooks.example/x"\n'
                     f'webhook_secret = "{SECRET}"\n', ports=(ports[0], ports[1], ports[2]))
    add_user(st.cfg, BOB)
    add_admin(st, "root")
    return st


def test_quarantine_release(ops: ServerThread, page: Any, client_tls: ssl.SSLContext) -> None:
    with smtplib.SMTP("127.0.0.1", ops.port("submission"), timeout=10) as c:
        c.starttls(context=client_tls)
        c.login(ALICE, PASSWORD)
        c.sendmail(ALICE, [BOB], b"Subject: card\r\n\r\nmy card is 4111 1111 1111 1111\r\n")
    login(page, ops)
    page.goto(base(ops) + "/quarantine")
    row = page.locator("tr[id^=held-]")
    assert row.count() == 1 and BOB in row.inner_text()
    assert "card" in row.locator(".reasons").inner_text().lower()
    held_id = (row.get_attribute("id") or "").removeprefix("held-")
    page.once("dialog", lambda d: d.accept())
    row.locator("text=Release").click()
    assert f"Released {held_id}" in page.locator(".flash.ok").inner_text()
    assert wait_for(lambda: any(b"4111 1111" in m for m in maildir_messages(ops.cfg, BOB)), 15)
    assert ("root", "web", "quarantine release", held_id) in audit_actions(ops)


def test_access_and_bans(ops: ServerThread, page: Any) -> None:
    login(page, ops)
    page.goto(base(ops) + "/access")
    page.fill("#ban-add input[name=address]", "192.0.2.7")
    page.fill("#ban-add input[name=hours]", "2")
    page.fill("#ban-add input[name=reason]", "spam run")
    page.click("#ban-add button")
    assert "Banned 192.0.2.7" in page.locator(".flash.ok").inner_text()
    assert "spam run" in page.locator("#ban-list").inner_text()
    assert [b.reason for b in ops.server.protect.list_bans()] == ["spam run"]
    page.fill("#ban-add input[name=address]", "not-an-ip")
    page.click("#ban-add button")
    assert "not an IP address" in page.locator(".flash.error").inner_text()
    page.locator("#ban-list >> text=Unban").click()
    assert ops.server.protect.list_bans() == []
    page.select_option("#access-add select[name=kind]", "deny-sender")
    page.fill("#access-add input[name=value]", "*@spammer.example")
    page.click("#access-add button")
    assert "Added: deny-sender" in page.locator(".flash.ok").inner_text()
    assert "*@spammer.example" in page.locator("#access-list").inner_text()
    page.select_option("#access-add select[name=kind]", "allow")
    page.fill("#access-add input[name=value]", "300.1.1.1/8")
    page.click("#access-add button")
    assert page.locator(".flash.error").count() == 1
    actions = [a[2:] for a in audit_actions(ops)]
    assert ("ban add", "192.0.2.7") in actions and ("ban del", "192.0.2.7/32") in actions


def test_dns_records_and_live_check(ops: ServerThread, page: Any, loopback_dns: Any) -> None:
    login(page, ops)
    page.goto(base(ops) + "/dns")
    section = page.locator(f'[id="dns-{DOMAIN}"]')
    assert f"10 {ops.cfg.hostname}." in section.inner_text()
    assert section.locator("button[data-copy]").count() >= 3
    loopback_dns.set(DOMAIN, {"MX": [(10, ops.cfg.hostname)]})
    try:
        section.locator("text=Check").click()
        check = page.locator(f'[id="dns-{DOMAIN}"] table.check')
        rows = {r.split("\t")[1].split(" ")[0]: r.split("\t")[0]
                for r in check.locator("tbody tr").all_inner_texts()}
        assert rows["MX"] == "ok" and rows["DMARC"] == "missing", check.inner_text()
    finally:
        loopback_dns.remove(DOMAIN)


def test_settings_masks_secrets(ops: ServerThread, page: Any) -> None:
    login(page, ops)
    page.goto(base(ops) + "/settings")
    text = page.locator("#settings").inner_text()
    assert "alerts.webhook_secret" in text and "••••" in text
    assert SECRET not in page.content()
    assert "https://hooks.example/x" in text and ops.cfg.hostname in text
