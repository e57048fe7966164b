"""The JSON API under /api/v1 against a running server: API keys from the
command line and from the web admin, scopes, the operations of the pages,
and Schemathesis run against the OpenAPI document (no server error)."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import DOMAIN, ServerThread, wait_for
from tests.test_service import free_ports
from tests.test_web_admin import add_admin, audit_actions, base, browser, login, page, submit

from postwarden import cli

__all__ = ["browser", "page"]  # fixtures
ALICE = f"alice@{DOMAIN}"


@pytest.fixture
def api(make_server: Callable[..., ServerThread]) -> ServerThread:
    ports = free_ports(5)
    st = make_server(f'[admin]\nenabled = true\naddress = "127.0.0.1:{ports[3]}"\n'
                     '[alerts]\nenabled = false\n'
                     f'[transports]\n"remote.example" = "smtp:[127.0.0.1]:{ports[4]}"\n'
                     '[queue]\nretry_min = 300\n', ports=(ports[0], ports[1], ports[2]))
    return st


def new_key(st: ServerThread, capsys: pytest.CaptureFixture[str], scope: str,
            account: str = "") -> str:
    args = ["-c", str(st.cfg.path), "api-key", "add", "--scope", scope, "--label", "test"]
    if account:
        args += ["--account", account]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    return next(w for w in out.split() if w.startswith("pwk_"))


def call(st: ServerThread, method: str, path: str, key: str | None = None,
         body: Any = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base(st) + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_keys_scopes_and_operations(api: ServerThread, capsys: pytest.CaptureFixture[str],
                                    client_tls: ssl.SSLContext) -> None:
    read = new_key(api, capsys, "read")
    admin = new_key(api, capsys, "admin")
    send = new_key(api, capsys, "send", ALICE)
    assert cli.main(["-c", str(api.cfg.path), "api-key", "list"]) == 0
    assert capsys.readouterr().out.count("\tlast used") == 3
    # No key, a wrong key, a revoked key: 401.
    assert call(api, "GET", "/api/v1/status")[0] == 401
    assert call(api, "GET", "/api/v1/status", read[:-2] + "xx")[0] == 401
    # Scopes.
    status, body = call(api, "GET", "/api/v1/status", read)
    assert status == 200 and body["queue"]["messages"]["active"] == 0
    assert call(api, "GET", "/api/v1/status", send)[0] == 403
    assert call(api, "POST", "/api/v1/domains", read, {"domain": "x.example"})[0] == 403
    # Accounts, domains, aliases.
    status, body = call(api, "POST", "/api/v1/domains", admin, {"domain": "second.example"})
    assert status == 201 and body == {"domain": "second.example"}
    status, body = call(api, "POST", "/api/v1/accounts", admin, {"address": "eve@second.example"})
    assert status == 201 and len(body["password"]) >= 20
    status, body = call(api, "POST", "/api/v1/accounts", admin,
                        {"address": "eve@nowhere.example", "password": "x"})
    assert status == 422 and "error" in body
    status, body = call(api, "POST", "/api/v1/aliases", admin,
                        {"source": "info@second.example", "targets": ["eve@second.example"]})
    assert status == 201
    assert api.server.directory.resolve_sync("info@second.example") == ["eve@second.example"]
    _, body = call(api, "GET", "/api/v1/accounts", read)
    assert {"address": "eve@second.example", "enabled": True} in body["accounts"]
    assert call(api, "DELETE", "/api/v1/aliases/info@second.example", admin)[0] == 200
    assert call(api, "DELETE", "/api/v1/accounts/eve@second.example", admin)[0] == 200
    assert call(api, "DELETE", "/api/v1/accounts/eve@second.example", admin)[0] == 422
    # The queue: list, filter, one message, hold and release.
    queue_id = submit(api, client_tls, "bob@remote.example")
    wait_for(lambda: call(api, "GET", "/api/v1/queue?state=deferred", read)[1]["total"], 15)
    status, body = call(api, "GET", "/api/v1/queue?q=bob@remote", read)
    assert status == 200 and body["total"] == 1
    assert body["messages"][0]["queue_id"] == queue_id
    assert call(api, "GET", "/api/v1/queue?limit=0", read)[0] == 422
    status, body = call(api, "POST", f"/api/v1/queue/{queue_id}/hold", admin)
    assert status == 200 and api.call(api.server.store.get(queue_id)).held
    assert call(api, "POST", f"/api/v1/queue/{queue_id}/hold", read)[0] == 403
    _, body = call(api, "GET", f"/api/v1/queue/{queue_id}", read)
    assert body["message"]["held"] is True and body["history"][0]["event"] == "queued"
    assert call(api, "POST", f"/api/v1/queue/{queue_id}/release", admin)[0] == 200
    assert call(api, "POST", "/api/v1/queue/NOSUCHID/delete", admin)[0] == 404
    # Keys: revoke one; it no longer works.
    _, body = call(api, "GET", "/api/v1/keys", admin)
    read_id = next(k["key_id"] for k in body["keys"] if k["scope"] == "read")
    assert call(api, "DELETE", f"/api/v1/keys/{read_id}", admin)[0] == 200
    assert call(api, "GET", "/api/v1/status", read)[0] == 401
    admin_id = admin.split("_")[1]
    assert (f"key:{admin_id}", "api", "queue hold", queue_id) in audit_actions(api)


def test_key_created_in_the_web_admin(api: ServerThread, page: Any) -> None:
    add_admin(api, "root")
    login(page, api)
    page.goto(base(api) + "/keys")
    page.select_option("#key-add select[name=scope]", "read")
    page.fill("#key-add input[name=label]", "monitoring")
    page.click("#key-add button")
    key = page.locator(".flash.secret").inner_text().rsplit(" ", 1)[-1]
    assert key.startswith("pwk_")
    assert call(api, "GET", "/api/v1/status", key)[0] == 200
    page.goto(base(api) + "/keys")
    assert "monitoring" in page.locator("table.list").inner_text()
    page.once("dialog", lambda d: d.accept())
    page.click("text=Revoke")
    assert "Revoked" in page.locator(".flash.ok").inner_text()
    assert call(api, "GET", "/api/v1/status", key)[0] == 401


def test_schemathesis_finds_no_server_error(api: ServerThread, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    st_cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st_cli is not None, "schemathesis (the test extra) is not installed"
    admin = new_key(api, capsys, "admin")
    r = subprocess.run([st_cli, "run", base(api) + "/api/v1/openapi.json",
                        "--checks", "not_a_server_error", "--max-examples", "25",
                        "-H", f"Authorization: Bearer {admin}", "--request-timeout", "10",
                        "--no-color"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(api.cfg.data_dir),
                            "SCHEMATHESIS_HOOKS": ""})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "passed" in r.stdout, r.stdout


def test_trace_bans_quarantine_settings(api: ServerThread, capsys: pytest.CaptureFixture[str],
                                        client_tls: ssl.SSLContext) -> None:
    read = new_key(api, capsys, "read")
    admin = new_key(api, capsys, "admin")
    queue_id = submit(api, client_tls, "bob@remote.example")
    status, body = call(api, "GET", "/api/v1/trace?from=" + ALICE, read)
    assert status == 200 and [m["queue_id"] for m in body["messages"]] == [queue_id]
    assert body["messages"][0]["recipients"] == ["bob@remote.example"]
    assert call(api, "GET", "/api/v1/trace?hours=0", read)[0] == 422
    assert call(api, "GET", "/api/v1/quarantine", read) == (200, {"held": []})
    assert call(api, "POST", "/api/v1/quarantine/QNONE/release", admin)[0] == 404
    status, body = call(api, "POST", "/api/v1/bans", admin,
                        {"address": "198.51.100.0/24", "hours": 1, "reason": "scan"})
    assert status == 201 and body["network"] == "198.51.100.0/24"
    _, body = call(api, "GET", "/api/v1/bans", read)
    assert [b["reason"] for b in body["bans"]] == ["scan"]
    assert call(api, "POST", "/api/v1/bans", admin, {"address": "nope"})[0] == 422
    assert call(api, "DELETE", "/api/v1/bans/198.51.100.0/24", admin)[0] == 200
    assert call(api, "DELETE", "/api/v1/bans/198.51.100.0/24", admin)[0] == 404
    assert call(api, "GET", "/api/v1/settings", read)[0] == 403
    status, body = call(api, "GET", "/api/v1/settings", admin)
    assert status == 200 and body["config"]["hostname"] == api.cfg.hostname


def test_dns_records_and_their_check(api: ServerThread, capsys: pytest.CaptureFixture[str],
                                     loopback_dns: Any) -> None:
    read = new_key(api, capsys, "read")
    status, body = call(api, "GET", f"/api/v1/dns/{DOMAIN}", read)
    assert status == 200 and "check" not in body
    kinds = {r["kind"]: r for r in body["records"]}
    assert kinds["MX"]["value"] == f"10 {api.cfg.hostname}." and kinds["MX"]["required"]
    assert {"SPF", "DMARC"} <= set(kinds)
    loopback_dns.set(DOMAIN, {"MX": [(10, api.cfg.hostname)]})
    try:
        status, body = call(api, "GET", f"/api/v1/dns/{DOMAIN}?check=1", read)
    finally:
        loopback_dns.remove(DOMAIN)
    assert status == 200
    checks = {c["kind"]: c["status"] for c in body["check"]}
    assert checks["MX"] == "ok" and checks["DMARC"] == "missing"
    assert call(api, "GET", "/api/v1/dns/elsewhere.example", read)[0] == 404
    assert call(api, "GET", f"/api/v1/dns/{DOMAIN}")[0] == 401
