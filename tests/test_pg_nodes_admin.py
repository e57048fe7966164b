"""The administration state of several nodes on PostgreSQL, as separate
``postwarden serve`` processes (the :class:`~tests.test_pg_nodes.Node` of
the node tests): an access-list entry added through node A's command line
refuses the client on node B, and node B's web admin lists and deletes it;
bans set through node B's web page and API are the shared ones; a DKIM
key generated through node A is on node B's DNS page and API; a
feedback report about mail an account sent through node A reaches the
account's webhook as a signed ``complained`` event, whichever node the
report arrives at (also an accept-only node: the webhook outbox is shared,
and a delivering node posts it).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import http.cookiejar
import json
import re
import smtplib
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import DOMAIN, PASSWORD
from tests.service import free_ports, kill_leftovers
from tests.test_pg_nodes import (
    REMOTE,
    Node,
    Sink,
    add_alice,
    cli,
    greeting,
    submit,
    wait_for,
)
from tests.test_web_complaints import FBL, arf
from tests.test_web_webhooks import Receiver, receiver

from postwarden.auth.passwords import hash_password
from postwarden.storage.pg_directory import DirectoryEdit

__all__ = ["receiver"]  # fixtures
ALICE = f"alice@{DOMAIN}"
ADMIN_PASSWORD = "a long admin password 42"


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    kill_leftovers()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    s.controller.start()
    yield s
    s.controller.stop()


@pytest.fixture
def nodes(tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any, pg_schema: str,
          sink: Sink, ca_file: Path) -> Any:
    """``make(name, web=True, **kw)``: a node, with the web admin and API on
    a port of its own (``node.web``) when ``web``."""
    def make(name: str, *, web: bool = True, extra: str = "", **kw: Any) -> Node:
        port, = free_ports(1)
        if web:
            extra += (f'[admin]\nenabled = true\naddress = "127.0.0.1:{port}"\n'
                      f"[alerts]\nenabled = false\n")
        extra += f'[delivery]\nca_file = "{ca_file}"\n'  # the webhook receiver's CA
        node = Node(tmp_path / name, cert_files, loopback_dns.port, pg_schema, sink.port,
                    extra=extra, **kw)
        node.web = port  # type: ignore[attr-defined]
        return node
    return make


class Browser:
    """A web admin session over HTTP, as a browser keeps it (cookies, the
    forms' CSRF token)."""

    def __init__(self, node: Node) -> None:
        self.base = f"http://127.0.0.1:{node.web}"  # type: ignore[attr-defined]
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(self, path: str) -> str:
        with self.opener.open(self.base + path, timeout=20) as r:
            return str(r.read().decode())

    def post(self, path: str, fields: dict[str, str], page: str) -> str:
        """Submit a form of ``page`` (its CSRF token) to ``path``."""
        token = re.search(r'name="csrf" value="([^"]+)"', page)
        assert token is not None, page
        data = urllib.parse.urlencode({"csrf": token.group(1), **fields}).encode()
        with self.opener.open(self.base + path, data=data, timeout=20) as r:
            return str(r.read().decode())

    def login(self, name: str) -> None:
        page = self.get("/login")
        welcome = self.post("/login", {"name": name, "password": ADMIN_PASSWORD}, page)
        assert "Log out" in welcome or "logout" in welcome, welcome[:500]


def api(node: Node, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{node.web}{path}", method=method,  # type: ignore[attr-defined]
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def admin_key(node: Node) -> str:
    out = cli(node, "api-key", "add", "--scope", "admin", "--label", "test")
    assert out.returncode == 0, out.stderr
    return next(w for w in out.stdout.split() if w.startswith("pwk_"))


def add_admin(node: Node) -> None:
    """The admin ``root``, created through ``node``'s command line."""
    out = subprocess.run([sys.executable, "-m", "postwarden", "-c", str(node.config_path),
                          "admin", "add", "root", "--password-stdin"],
                         input=ADMIN_PASSWORD + "\n", capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


def test_an_access_entry_added_through_node_a_applies_on_node_b(
        nodes: Any, tmp_path: Path) -> None:
    a = nodes("a", web=False).start()
    b = nodes("b").start()
    assert greeting(b.port).startswith(b"220 ")
    out = cli(a, "access", "add", "deny", "127.0.0.1")
    assert out.returncode == 0 and "added: deny 127.0.0.1/32" in out.stdout, out.stderr
    added = time.monotonic()
    wait_for(lambda: greeting(b.port).startswith(b"554 5.7.1"), 5, "node B to refuse")
    took = time.monotonic() - added
    assert took < 3.0
    (tmp_path / "access-took").write_text(f"{took:.2f}\n")
    # Node B's command line and web admin list the entry.
    listed = json.loads(cli(b, "access", "list", "--json").stdout)
    assert {"listener": "", "kind": "deny", "value": "127.0.0.1/32",
            "source": "db"} in listed
    add_admin(a)  # the web admin's accounts are shared too
    browser = Browser(b)
    browser.login("root")
    page = browser.get("/access")
    assert "127.0.0.1/32" in page
    # Deleted through node B's web page: node A accepts the client again.
    after = browser.post("/access/del", {"kind": "deny", "value": "127.0.0.1/32",
                                         "listener": ""}, page)
    assert "Deleted: deny 127.0.0.1/32" in html.unescape(after)
    wait_for(lambda: greeting(a.port).startswith(b"220 "), 5, "node A to accept again")
    # An entry added on node B's page is listed by node A's command line.
    page = browser.get("/access")
    browser.post("/access/add", {"kind": "deny-helo", "value": "*.spam.example",
                                 "listener": ""}, page)
    listed = json.loads(cli(a, "access", "list", "--json").stdout)
    assert [r["value"] for r in listed if r["kind"] == "deny-helo"] == ["*.spam.example"]
    # A ban set on node B's page is in the shared ban table (node A lists it).
    page = browser.get("/access")
    after = html.unescape(browser.post("/bans/add", {"address": "192.0.2.7", "hours": "2",
                                                     "reason": "spam run"}, page))
    assert "Banned 192.0.2.7" in after and "spam run" in after
    assert "192.0.2.7" in cli(a, "ban", "list").stdout
    assert a.stop() == 0 and b.stop() == 0


def test_node_b_web_dns_page_and_api_show_a_key_generated_through_node_a(
        nodes: Any) -> None:
    a = nodes("a", web=False).start()
    b = nodes("b").start()
    out = cli(a, "dkim", "keygen", DOMAIN, "--selector", "webshown", "--activate")
    assert out.returncode == 0, out.stderr
    name = f"webshown._domainkey.{DOMAIN}"
    key = admin_key(a)

    def api_records() -> list[Any]:
        status, body = api(b, "GET", f"/api/v1/dns/{DOMAIN}", key)
        assert status == 200, body
        return [r for r in body["records"] if r["kind"] == "DKIM"]
    wait_for(lambda: [r["name"] for r in api_records()] == [name], 5,
             "node B's API to show the key")
    (record,) = api_records()
    assert record["value"].startswith("v=DKIM1; k=rsa; p=")
    # The record as node A's command line prints it, on node B's page.
    printed = cli(a, "dns", "records", DOMAIN).stdout
    assert record["value"].split("p=", 1)[1][:40] in "".join(re.findall(r'"([^"]*)"', printed))
    # The API's bans are the shared ones too.
    status, body = api(b, "POST", "/api/v1/bans", key, {"address": "198.51.100.9"})
    assert status == 201, body
    assert "198.51.100.9" in cli(a, "ban", "list").stdout
    status, body = api(b, "GET", "/api/v1/bans", key)
    assert status == 200 and [x["network"] for x in body["bans"]] == ["198.51.100.9/32"]
    assert api(b, "DELETE", "/api/v1/bans/198.51.100.9", key)[0] == 200
    add_admin(a)
    browser = Browser(b)
    browser.login("root")
    page = html.unescape(browser.get("/dns"))
    assert f"{name}." in page and record["value"] in page
    # The live check reads the shared directory and keys too (nothing is
    # published on the loopback DNS: the key's record is missing).
    checked = html.unescape(browser.get(f"/dns?check={DOMAIN}"))
    assert 'class="list check"' in checked
    assert re.search(rf"missing</td><td>DKIM</td><td>{re.escape(name)}</td>", checked), \
        checked[checked.find("list check"):][:1500]
    assert a.stop() == 0 and b.stop() == 0


def signed_by(secret: str, headers: dict[str, str], raw: bytes) -> bool:
    stamp = headers["X-Postwarden-Timestamp"]
    return headers["X-Postwarden-Signature"] == "sha256=" + hmac.new(
        secret.encode(), stamp.encode() + b"." + raw, hashlib.sha256).hexdigest()


def test_a_complaint_reaches_the_webhook_whichever_node_the_report_arrives_at(
        nodes: Any, sink: Sink, receiver: Receiver, client_tls: ssl.SSLContext) -> None:
    # A accepts only (workers = 0); B delivers and posts the webhook events.
    a = nodes("a", workers=0)
    add_alice(a)
    with DirectoryEdit(a.cfg.storage, a.cfg.domains) as directory:
        directory.add_user(FBL, hash_password(PASSWORD))
    a.start()
    b = nodes("b").start()
    key = admin_key(b)
    status, body = api(a, "POST", "/api/v1/webhooks", key,
                       {"account": ALICE, "url": receiver.url})
    assert status == 201, body
    secret = body["secret"]

    def complaints() -> list[dict[str, Any]]:
        return [e for e in receiver.events() if e["event"] == "complained"]

    mid, code, _ = submit(a, client_tls, "hello Carol", "complained-of")
    assert code == 250
    wait_for(lambda: mid in sink.ids, 20, "the message at the remote MX")
    wait_for(lambda: [e for e in receiver.events() if e["event"] == "delivered"], 20,
             "the delivered event")
    queue_id = receiver.events()[0]["queue_id"]
    delivered = sink.messages[mid]

    # The provider's report arrives at node B's mx.
    with smtplib.SMTP("127.0.0.1", b.port, timeout=30) as c:
        c.sendmail("feedback@remote.example", [FBL], arf(delivered, rcpt=REMOTE))
    wait_for(lambda: complaints(), 20, "the complained event")
    (complaint,) = complaints()
    assert complaint["account"] == ALICE and complaint["queue_id"] == queue_id
    assert complaint["recipient"] == REMOTE and complaint["feedback_type"] == "abuse"
    assert complaint["message_id"] == mid
    headers, raw = next(r for r in receiver.requests if b'"complained"' in r[1])
    assert signed_by(secret, headers, raw)

    # Another report, at node A's mx: A does not post webhooks (it does not
    # deliver), the shared outbox takes the event to B, which posts it.
    with smtplib.SMTP("127.0.0.1", a.port, timeout=30) as c:
        c.sendmail("feedback@remote.example", [FBL],
                   arf(delivered, feedback_type="fraud", rcpt=REMOTE))
    wait_for(lambda: len(complaints()) == 2, 20, "the second complained event")
    assert complaints()[1]["feedback_type"] == "fraud"
    assert complaints()[1]["queue_id"] == queue_id
    # Both complaints are in the message's history, on either node.
    traced = cli(b, "trace", "--id", queue_id, "--json")
    assert traced.returncode == 0, traced.stderr
    assert json.dumps(json.loads(traced.stdout)).count('"complained"') == 2
    assert a.stop() == 0 and b.stop() == 0
