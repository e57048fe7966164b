"""Admin accounts managed in the web admin (headless Chromium) and through
the JSON API: create with a generated password shown once, change the
role, reset the password (which ends the account's sessions), delete;
never the last admin nor oneself; read-only admins see no form and their
forged posts are refused; every change in the audit log."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import ServerThread
from tests.test_web_admin import (
    ADMIN_PASSWORD,
    audit_actions,
    base,
    browser,
    login,
    page,
    screenshot,
    web,
)
from tests.test_web_api import call, new_key

from postwarden.web.store import SqliteAdminStore

__all__ = ["browser", "page", "web"]  # fixtures


@pytest.fixture
def other_page(browser: Any) -> Iterator[Any]:
    """A second browser, with its own cookies (another admin's)."""
    context = browser.new_context()
    pg = context.new_page()
    pg.set_default_timeout(15000)
    yield pg
    context.close()


def roles(st: ServerThread) -> dict[str, str]:
    with SqliteAdminStore(st.cfg.db_path) as s:
        return {a.name: a.role for a in s.list_admins()}


def flash(page: Any, kind: str) -> str:
    return str(page.locator(f".flash.{kind}").inner_text())


def test_admin_accounts_page(web: ServerThread, page: Any, other_page: Any,
                             tmp_path: Path) -> None:
    login(page, web)
    page.goto(base(web) + "/admins")
    assert "root (you)" in page.locator("#admin-root").inner_text()
    assert page.locator("#admin-viewer .role").inner_text() == "read-only"
    # No delete button for oneself.
    assert page.locator("#admin-root form[action='/admins/del']").count() == 0

    # A read-only admin with a generated password, shown once.
    page.fill("#admin-add input[name=name]", "ops")
    page.select_option("#admin-add select[name=role]", "read-only")
    page.click("#admin-add button[type=submit]")
    assert "Created admin ops (read-only)" in flash(page, "ok")
    generated = flash(page, "secret").rsplit(": ", 1)[1].strip()
    assert generated
    page.reload()
    assert page.locator(".flash.secret").count() == 0
    assert page.locator("#admin-ops .role").inner_text() == "read-only"
    screenshot(page, "admins", tmp_path)

    # ops logs in elsewhere: sees the list, no form; a post is refused.
    login(other_page, web, "ops", generated)
    other_page.wait_for_url(base(web) + "/")
    other_page.goto(base(web) + "/admins")
    assert other_page.locator("#admin-ops").count() == 1
    assert other_page.locator("form[action^='/admins/']").count() == 0
    token = other_page.locator("input[name=csrf]").first.get_attribute("value")
    refused = other_page.context.request.post(base(web) + "/admins/add", form={
        "name": "mallory", "role": "admin", "csrf": token})
    assert refused.status == 403 and "read-only" in refused.text()
    # And a post without the CSRF token from root's browser.
    forged = page.context.request.post(base(web) + "/admins/add",
                                       form={"name": "mallory", "role": "admin"})
    assert forged.status == 403 and "CSRF" in forged.text()
    assert "mallory" not in roles(web)

    # root makes ops an admin, then gives it a new password: ops is logged out.
    page.select_option("#admin-ops select[name=role]", "admin")
    page.click("#admin-ops form[action='/admins/role'] button")
    assert "Admin ops is now admin." in flash(page, "ok")
    assert roles(web)["ops"] == "admin"
    page.click("#admin-ops form[action='/admins/passwd'] button")
    assert "sessions are ended" in flash(page, "ok")
    assert "New password for admin ops" in flash(page, "secret")
    other_page.goto(base(web) + "/admins")
    assert "/login" in other_page.url

    # Oneself: neither deleted (a forged post) nor given a generated password.
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    answer = page.context.request.post(base(web) + "/admins/del",
                                       form={"name": "root", "csrf": token})
    assert "cannot delete your own" in answer.text()  # the page it is sent back to
    page.goto(base(web) + "/admins")
    page.click("#admin-root form[action='/admins/passwd'] button")
    assert "Give your own new password" in flash(page, "error")
    assert "root" in roles(web)

    # ops deleted; root is now the last admin and stays one.
    page.once("dialog", lambda d: d.accept())
    page.click("#admin-ops form[action='/admins/del'] button")
    assert "Deleted admin ops." in flash(page, "ok")
    page.select_option("#admin-root select[name=role]", "read-only")
    page.click("#admin-root form[action='/admins/role'] button")
    assert "root is the last admin" in flash(page, "error")
    assert roles(web) == {"root": "admin", "viewer": "read-only"}

    actions = [(actor, source, action, target) for actor, source, action, target
               in audit_actions(web) if action.startswith("admin ") and "log" not in action]
    assert ("root", "web", "admin add", "ops") in actions
    assert ("root", "web", "admin role", "ops") in actions
    assert ("root", "web", "admin passwd", "ops") in actions
    assert ("root", "web", "admin del", "ops") in actions


def test_admin_accounts_through_the_api(web: ServerThread,
                                        capsys: pytest.CaptureFixture[str],
                                        client_tls: ssl.SSLContext) -> None:
    admin = new_key(web, capsys, "admin")
    read = new_key(web, capsys, "read")
    assert call(web, "GET", "/api/v1/admins", read)[0] == 403
    status, body = call(web, "GET", "/api/v1/admins", admin)
    assert status == 200
    assert {(a["name"], a["role"]) for a in body["admins"]} == {("root", "admin"),
                                                               ("viewer", "read-only")}
    status, body = call(web, "POST", "/api/v1/admins", admin, {"name": "ops"})
    assert status == 201 and body["role"] == "admin" and body["password"]
    status, body = call(web, "POST", "/api/v1/admins", admin,
                        {"name": "ops2", "role": "boss", "password": ADMIN_PASSWORD})
    assert status == 422 and "role" in body["error"]
    assert call(web, "POST", "/api/v1/admins", admin,
                {"name": "ops2", "password": "short"})[0] == 422
    status, body = call(web, "POST", "/api/v1/admins/ops/password", admin,
                        {"password": ADMIN_PASSWORD})
    assert status == 200 and "password" not in body and body["sessions_ended"]
    assert call(web, "POST", "/api/v1/admins/root/role", admin,
                {"role": "read-only"}) == (200, {"name": "root", "role": "read-only"})
    # ops is the last admin now: it stays one.
    status, body = call(web, "DELETE", "/api/v1/admins/ops", admin)
    assert status == 422 and "last admin" in body["error"]
    assert call(web, "POST", "/api/v1/admins/ops/role", admin, {"role": "read-only"})[0] == 422
    assert call(web, "DELETE", "/api/v1/admins/nobody", admin)[0] == 422
    assert call(web, "DELETE", "/api/v1/admins/viewer", admin)[0] == 200
    assert roles(web) == {"root": "read-only", "ops": "admin"}
    assert any(a[1:] == ("api", "admin del", "viewer") for a in audit_actions(web))
