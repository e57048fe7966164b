"""The web admin in a real browser (Debian's Chromium, headless, driven by
Playwright) against a running server: admin accounts from the command
line, login and logout with the session cookie's flags, the login lockout,
CSRF refusal of a forged form post, a read-only admin, the queue page
(hold, release, delete of real queued mail), and an account created in the
browser that then sends over SMTP."""

from __future__ import annotations

import io
import os
import smtplib
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import DOMAIN, PASSWORD, ServerThread, maildir_messages, require_tool, wait_for
from tests.test_service import free_ports

from postwarden import cli
from postwarden.auth.passwords import hash_password
from postwarden.storage.sqlite_monitor import SqliteMonitorStore
from postwarden.web.store import SqliteAdminStore

ALICE = f"alice@{DOMAIN}"
ADMIN_PASSWORD = "correct horse battery staple 42"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_tool("chromium")
    from playwright.sync_api import sync_playwright  # the test extra

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    pg = context.new_page()
    pg.set_default_timeout(15000)
    yield pg
    context.close()


def add_admin(st: ServerThread, name: str, role: str = "admin") -> None:
    with SqliteAdminStore(st.cfg.db_path) as s:
        s.add(name, hash_password(ADMIN_PASSWORD), role)


@pytest.fixture
def web(make_server: Callable[..., ServerThread]) -> ServerThread:
    ports = free_ports(5)
    st = make_server(f'[admin]\nenabled = true\naddress = "127.0.0.1:{ports[3]}"\n'
                     '[alerts]\nenabled = false\n'
                     f'[transports]\n"remote.example" = "smtp:[127.0.0.1]:{ports[4]}"\n'
                     '[queue]\nretry_min = 300\n', ports=(ports[0], ports[1], ports[2]))
    add_admin(st, "root")
    add_admin(st, "viewer", "read-only")
    return st


def base(st: ServerThread) -> str:
    return f"http://127.0.0.1:{st.server.admin.port}"


def login(page: Any, st: ServerThread, name: str = "root",
          password: str = ADMIN_PASSWORD) -> None:
    page.goto(base(st) + "/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


def submit(st: ServerThread, tls: ssl.SSLContext, to: str, subject: str = "queued") -> str:
    with smtplib.SMTP("127.0.0.1", st.port("submission"), timeout=10) as c:
        c.starttls(context=tls)
        c.login(ALICE, PASSWORD)
        c.mail(ALICE)
        c.rcpt(to)
        code, reply = c.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    assert code == 250
    return reply.decode().rsplit(" ", 1)[-1]


def audit_actions(st: ServerThread) -> list[tuple[str, str, str, str]]:
    with SqliteMonitorStore(st.cfg.db_path) as m:
        return [(e.actor, e.source, e.action, e.target) for e in m.audit_entries()]


def test_admin_accounts_from_the_command_line(make_server: Callable[..., ServerThread],
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    st = make_server()
    conf = str(st.cfg.path)
    assert cli.main(["-c", conf, "admin", "add", "ops", "--role", "read-only"]) == 0
    out = capsys.readouterr().out
    assert "created admin ops (read-only)" in out
    generated = out.split("store it now):")[1].split()[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO(ADMIN_PASSWORD + "\n"))
    assert cli.main(["-c", conf, "admin", "add", "boss", "--password-stdin"]) == 0
    assert cli.main(["-c", conf, "admin", "list"]) == 0
    listing = capsys.readouterr().out
    assert "boss\tadmin" in listing and "ops\tread-only" in listing
    assert cli.main(["-c", conf, "admin", "add", "boss"]) == 1
    assert "admin boss already exists" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("password\n"))
    assert cli.main(["-c", conf, "admin", "passwd", "ops", "--password-stdin"]) == 1
    assert cli.main(["-c", conf, "admin", "del", "ops"]) == 0
    assert cli.main(["-c", conf, "admin", "del", "ops"]) == 1
    with SqliteAdminStore(st.cfg.db_path) as s:
        boss = s.get("boss")
        assert boss is not None and boss.password_hash.startswith("$argon2id$")
        assert [a.name for a in s.list_admins()] == ["boss"]
    actions = [a[2:] for a in audit_actions(st)]
    assert ("admin add", "boss") in actions and ("admin del", "ops") in actions
    assert ADMIN_PASSWORD not in str(audit_actions(st)) and generated not in str(actions)


def test_login_session_cookie_and_logout(web: ServerThread, page: Any) -> None:
    page.goto(base(web) + "/queue")
    assert page.url.startswith(base(web) + "/login")  # no session: the login page
    page.fill("input[name=name]", "root")  # and back to the page asked for
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base(web) + "/queue")
    assert page.locator("h1").inner_text() == "Queue"
    cookie = next(c for c in page.context.cookies() if c["name"] == "pw_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert not cookie["secure"]  # plain HTTP on loopback here; Secure with TLS
    page.goto(base(web) + "/")
    assert page.locator("h1").inner_text() == "Dashboard"
    page.click("text=Log out")
    page.wait_for_url(base(web) + "/login")
    page.goto(base(web) + "/accounts")
    assert "/login" in page.url
    actions = audit_actions(web)
    assert ("root", "web", "admin login", "root") in actions
    assert ("root", "web", "admin logout", "root") in actions


def test_login_lockout(web: ServerThread, page: Any) -> None:
    for _ in range(5):
        login(page, web, password="wrong")
        assert "Wrong name or password" in page.locator(".flash.error").inner_text()
    login(page, web)  # the right password, too late
    assert "Too many failed logins" in page.locator(".flash.error").inner_text()
    assert page.locator("h1").inner_text() == "Log in"


def test_forged_form_posts_are_refused(web: ServerThread, page: Any,
                                       client_tls: ssl.SSLContext) -> None:
    queue_id = submit(web, client_tls, "bob@remote.example")
    login(page, web)
    page.wait_for_url(base(web) + "/")
    # A page of another site posting a form to the admin: the browser sends
    # no session cookie (SameSite=Strict), and there is no CSRF token.
    page.goto("about:blank")
    page.set_content(f'<form method="post" action="{base(web)}/queue/action">'
                     f'<input name="id" value="{queue_id}"><input name="action" value="delete">'
                     '<button>go</button></form>')
    page.click("button")
    assert "Refused" in page.locator("h1").inner_text()
    # The same post with the admin's cookie but without the token.
    response = page.context.request.post(base(web) + "/queue/action",
                                         form={"id": queue_id, "action": "delete"})
    assert response.status == 403 and "CSRF" in response.text()
    # With a token of another session.
    response = page.context.request.post(base(web) + "/queue/action",
                                         form={"id": queue_id, "action": "delete",
                                               "csrf": "x" * 43})
    assert response.status == 403
    assert web.call(web.server.store.get(queue_id)) is not None
    # A forged login form (no login token cookie) is refused too.
    data = urllib.parse.urlencode({"name": "root", "password": ADMIN_PASSWORD}).encode()
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(base(web) + "/login", data=data, timeout=10)
    assert exc.value.code == 403


def test_queue_page_hold_release_delete(web: ServerThread, page: Any,
                                        client_tls: ssl.SSLContext) -> None:
    first = submit(web, client_tls, "bob@remote.example", "first")
    second = submit(web, client_tls, "carol@remote.example", "second")
    wait_for(lambda: all(r.status.value == "deferred" for m in
                         web.call(web.server.store.list()) for r in m.recipients), 15)
    login(page, web)
    page.goto(base(web) + "/queue")
    assert page.locator("#total").inner_text() == "2"
    row = page.locator(f"#msg-{first}")
    assert "bob@remote.example" in row.inner_text()
    # Hold one message.
    row.locator("input[type=checkbox]").check()
    page.click("button[value=hold]")
    assert "1 of 1 message(s) held" in page.locator(".flash.ok").inner_text()
    assert page.locator(f"#msg-{first} .state").inner_text() == "held"
    assert web.call(web.server.store.get(first)).held
    # The filter shows the held one only.
    page.select_option("select[name=state]", "held")
    page.click("text=Show")
    assert page.locator("#total").inner_text() == "1"
    # Release it from its own page, which shows headers and history.
    page.click(f"text={first}")
    assert "Subject: first" in page.locator("pre.headers").inner_text()
    page.click("button[value=release]")
    assert "released" in page.locator(".flash.ok").inner_text()
    assert page.locator("dd.state").inner_text() == "active"
    assert not web.call(web.server.store.get(first)).held
    # Delete both in bulk (after confirming).
    page.goto(base(web) + "/queue")
    page.once("dialog", lambda d: d.accept())
    page.check("input.select-all")
    page.click("button[value=delete]")
    assert "2 of 2 message(s) deleted" in page.locator(".flash.ok").inner_text()
    assert page.locator("#total").inner_text() == "0"
    assert web.call(web.server.store.list()) == []
    actions = audit_actions(web)
    assert ("root", "web", "queue hold", first) in actions
    assert ("root", "web", "queue release", first) in actions
    assert ("root", "web", "queue delete", "2 messages") in actions
    del second


def test_account_created_in_the_browser_sends_over_smtp(web: ServerThread, page: Any,
                                                        client_tls: ssl.SSLContext) -> None:
    login(page, web)
    page.goto(base(web) + "/accounts")
    # Validation messages as the user sees them.
    page.fill("#account-add input[name=address]", "dave@elsewhere.example")
    page.fill("#account-add input[name=password]", "Another long pass phrase 7")
    page.click("#account-add button")
    assert "elsewhere.example" in page.locator(".flash.error").inner_text()
    page.fill("#account-add input[name=address]", f"dave@{DOMAIN}")
    page.fill("#account-add input[name=password]", "password")
    page.click("#account-add button")
    assert page.locator(".flash.error").count() == 1
    page.fill("#account-add input[name=address]", f"dave@{DOMAIN}")
    page.fill("#account-add input[name=password]", "Another long pass phrase 7")
    page.click("#account-add button")
    assert f"Created account dave@{DOMAIN}" in page.locator(".flash.ok").inner_text()
    assert page.locator(f'[id="account-dave@{DOMAIN}"]').count() == 1
    with smtplib.SMTP("127.0.0.1", web.port("submission"), timeout=10) as c:
        c.starttls(context=client_tls)
        c.login(f"dave@{DOMAIN}", "Another long pass phrase 7")
        c.sendmail(f"dave@{DOMAIN}", [ALICE], b"Subject: from dave\r\n\r\nhi\r\n")
    assert wait_for(lambda: any(b"from dave" in m for m in maildir_messages(web.cfg, ALICE)))
    # A generated application password, shown once, also logs in.
    page.fill(f'[id="account-dave@{DOMAIN}"] input[name=label]', "phone")
    page.click(f'[id="account-dave@{DOMAIN}"] >> text=New application password')
    secret = page.locator(".flash.secret").inner_text().rsplit(" ", 1)[-1]
    with smtplib.SMTP("127.0.0.1", web.port("submission"), timeout=10) as c:
        c.starttls(context=client_tls)
        c.login(f"dave@{DOMAIN}", secret)
    assert ("root", "web", "user add", f"dave@{DOMAIN}") in audit_actions(web)
    assert secret not in str(audit_actions(web))


def test_domains_and_aliases_pages(web: ServerThread, page: Any) -> None:
    login(page, web)
    page.goto(base(web) + "/domains")
    page.fill("input[name=domain]", "second.example")
    page.click("text=Add domain")
    assert "Added domain second.example" in page.locator(".flash.ok").inner_text()
    page.fill("input[name=domain]", "not a domain")
    page.click("text=Add domain")
    assert page.locator(".flash.error").count() == 1
    page.goto(base(web) + "/aliases")
    page.fill("input[name=source]", "sales@second.example")
    page.fill("input[name=targets]", ALICE)
    page.click("text=Save alias")
    assert page.locator("table.list").inner_text().count("sales@second.example") == 1
    assert web.server.directory.resolve_sync("sales@second.example") == [ALICE]


def test_read_only_admin_sees_but_cannot_change(web: ServerThread, page: Any,
                                                client_tls: ssl.SSLContext) -> None:
    queue_id = submit(web, client_tls, "bob@remote.example")
    login(page, web, "viewer")
    page.goto(base(web) + "/queue")
    assert page.locator(f"#msg-{queue_id}").count() == 1
    assert page.locator("button[value=delete]").count() == 0
    page.goto(base(web) + "/accounts")
    assert page.locator("#account-add").count() == 0
    # A change posted with a valid token is still refused.
    page.goto(base(web) + "/queue")
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    response = page.context.request.post(base(web) + "/queue/action", form={
        "id": queue_id, "action": "delete", "csrf": token})
    assert response.status == 403 and "read-only" in response.text()
    assert web.call(web.server.store.get(queue_id)) is not None


def screenshot(page: Any, name: str, tmp: Path) -> None:
    """Into the test's directory, and into $POSTWARDEN_SCREENSHOTS (docs/screenshots
    when the README's pictures are renewed)."""
    page.screenshot(path=str(tmp / f"{name}.png"), full_page=True)
    target = os.environ.get("POSTWARDEN_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / f"{name}.png"), full_page=True)


def test_dashboard_chart_and_trace_after_real_traffic(web: ServerThread, page: Any,
                                                      client_tls: ssl.SSLContext,
                                                      tmp_path: Path) -> None:
    mx = web.port("mx")
    for i in range(3):
        with smtplib.SMTP("127.0.0.1", mx, timeout=10) as c:
            c.sendmail("news@remote.example", [ALICE],
                       f"Subject: n{i}\r\nMessage-ID: <n{i}@remote.example>\r\n\r\nhi\r\n"
                       .encode())
    with (smtplib.SMTP("127.0.0.1", mx, timeout=10) as c,
          pytest.raises(smtplib.SMTPRecipientsRefused)):
        c.sendmail("news@remote.example", [f"nobody@{DOMAIN}"], b"Subject: x\r\n\r\nx\r\n")
    held = submit(web, client_tls, "bob@remote.example", "to a remote")
    assert wait_for(lambda: len(maildir_messages(web.cfg, ALICE)) == 3)
    login(page, web)
    page.wait_for_url(base(web) + "/")
    assert int(page.locator("#in-24h").inner_text()) == 4
    assert int(page.locator("#out-24h").inner_text()) == 3
    chart = page.locator("#traffic-chart")
    assert chart.is_visible()
    box = chart.bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 40
    # The last minutes' points are above the baseline: the chart shows the traffic.
    points = [tuple(map(float, p.split(","))) for p in
              (page.locator("polyline.in").get_attribute("points") or "").split()]
    assert len(points) == 24 * 60 and min(y for _, y in points[-5:]) < 160
    assert "news@remote.example" in page.locator("#top-senders").inner_text()
    assert "rcpt" in page.locator("#top-rejections").inner_text()
    assert page.locator("#success-rate").inner_text() == "100.0 %"
    screenshot(page, "dashboard", tmp_path)
    page.goto(base(web) + "/queue")
    screenshot(page, "queue", tmp_path)
    # The trace: search by sender, as `postwarden trace --from` does.
    page.goto(base(web) + "/trace")
    page.fill("input[name=from]", "news@remote.example")
    page.click("text=Search")
    assert page.locator("#found").inner_text() == "3"
    section = page.locator("section.trace").first
    assert "delivered" in section.inner_text() and ALICE in section.inner_text()
    screenshot(page, "trace", tmp_path)
    page.fill("input[name=from]", "")
    page.fill("input[name=id]", held)
    page.click("text=Search")
    assert page.locator("#found").inner_text() == "1"
    assert "bob@remote.example" in page.locator(f"#trace-{held}").inner_text()
    page.click(f"#trace-{held} h2 a")
    assert "Subject: to a remote" in page.locator("pre.headers").inner_text()


def test_https_listener_sets_a_secure_cookie(make_server: Callable[..., ServerThread],
                                             cert_files: tuple[Path, Path],
                                             browser: Any) -> None:
    cert, key = cert_files
    port = free_ports(1)[0]
    st = make_server(f'[admin]\nenabled = true\naddress = "127.0.0.1:{port}"\n'
                     f'tls_cert = "{cert}"\ntls_key = "{key}"\n[alerts]\nenabled = false\n')
    add_admin(st, "root")
    context = browser.new_context(ignore_https_errors=True)  # a test CA's certificate
    try:
        pg = context.new_page()
        pg.goto(f"https://127.0.0.1:{port}/login")
        pg.fill("input[name=name]", "root")
        pg.fill("input[name=password]", ADMIN_PASSWORD)
        pg.click("button[type=submit]")
        pg.wait_for_url(f"https://127.0.0.1:{port}/")
        cookie = next(c for c in context.cookies() if c["name"] == "pw_session")
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    finally:
        context.close()


def test_no_open_redirect_and_bounded_bodies(web: ServerThread, page: Any) -> None:
    for target in ("//evil.example/", "/\\evil.example/", "https://evil.example/"):
        page.goto(base(web) + "/login?" + urllib.parse.urlencode({"next": target}))
        page.fill("input[name=name]", "root")
        page.fill("input[name=password]", ADMIN_PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(base(web) + "/")
        page.context.clear_cookies()
    # A body larger than any form is refused before it is read.
    req = urllib.request.Request(base(web) + "/login", data=b"x" * (2 * 1024 * 1024),
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 413
