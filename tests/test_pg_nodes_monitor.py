"""Monitoring across nodes on PostgreSQL, as separate ``postwarden serve``
processes (the :class:`~tests.test_pg_nodes.Node` of the node tests):
a suspension made through node A is refused by node B, and node B's
``postwarden audit`` shows it; an alert that two nodes see is notified
once, also when the node that evaluates the shared rules dies; mail
accepted by node A is traced, and counted by ``postwarden status``, from
node B.
"""

from __future__ import annotations

import json
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import PASSWORD
from tests.service import free_ports, kill_leftovers
from tests.test_pg_nodes import REMOTE, Node, pg, send, wait_for

from postwarden.auth.passwords import hash_password
from postwarden.storage.pg_directory import DirectoryEdit

ALICE = "alice@example.test"
QUIET = "[alerts]\nfilters = false\nmail = false\n"


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    kill_leftovers()


@pytest.fixture
def nodes(tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any,
          pg_schema: str) -> Any:
    nowhere, = free_ports(1)  # no delivery is awaited here

    def make(name: str, **kw: Any) -> Node:
        return Node(tmp_path / name, cert_files, loopback_dns.port, pg_schema, nowhere, **kw)
    return make


def cli(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "postwarden", "-c", str(node.config_path),
                           *args], capture_output=True, text=True, timeout=60)


def mail_from(node: Node, tls: ssl.SSLContext) -> int:
    """The reply to MAIL FROM in an authenticated submission session on ``node``."""
    port = next(lc.port for lc in node.cfg.listeners if lc.name == "submission")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=tls)
        client.login(ALICE, PASSWORD)
        code, _ = client.mail(ALICE)
        client.rset()
    return int(code)


def test_a_suspension_through_node_a_is_refused_by_node_b_and_audited(
        nodes: Any, client_tls: ssl.SSLContext) -> None:
    a = nodes("a", extra=QUIET)
    with DirectoryEdit(a.cfg.storage, a.cfg.domains) as directory:
        directory.add_user(ALICE, hash_password(PASSWORD))
    a.start()
    b = nodes("b", extra=QUIET).start()
    assert mail_from(b, client_tls) == 250
    done = cli(a, "suspend", "add", ALICE, "--reason", "phished password")
    assert done.returncode == 0, done.stderr
    started = time.monotonic()
    wait_for(lambda: mail_from(b, client_tls) == 550, 10, "node B to refuse the account")
    wait_for(lambda: mail_from(a, client_tls) == 550, 10, "node A to refuse the account")
    assert time.monotonic() - started < 5  # each node reloads every second
    listed = cli(b, "suspend", "list")
    assert f"{ALICE}  since" in listed.stdout and "phished password" in listed.stdout
    # Node B's audit log shows what was done through node A.
    shown = cli(b, "audit", "--json")
    assert shown.returncode == 0, shown.stderr
    entries = [(e["source"], e["action"], e["target"], e["result"])
               for e in json.loads(shown.stdout)]
    assert ("cli", "suspend add", ALICE, "ok") in entries
    # Each node recorded its own config file at start (hostname:path).
    started_with = {t for s, act, t, _ in entries if act == "config changed"}
    assert started_with == {f"{n.cfg.hostname}:{n.config_path}" for n in (a, b)}
    # Lifted through B: A lets the account send again.
    assert cli(b, "suspend", "lift", ALICE).returncode == 0
    wait_for(lambda: mail_from(a, client_tls) == 250, 10, "node A to accept the account")
    assert ("cli", "suspend lift", ALICE, "ok") in [
        (e["source"], e["action"], e["target"], e["result"])
        for e in json.loads(cli(a, "audit", "--json").stdout)]
    assert a.stop() == 0 and b.stop() == 0


class Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        Hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    Hook.received = []
    httpd = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/hook", Hook.received
    httpd.shutdown()
    httpd.server_close()


def notices(received: list[dict[str, Any]], state: str) -> list[str]:
    return [p["key"] for p in received if p["state"] == state]


def test_an_alert_two_nodes_see_is_notified_once_even_when_the_leader_dies(
        nodes: Any, pg_schema: str, webhook: tuple[str, list[dict[str, Any]]]) -> None:
    url, received = webhook
    extra = (f'[alerts]\ninterval = 0.2\nqueue_max = 1\nfilters = false\nmail = false\n'
             f'webhook = "{url}"\n')
    # Accept-only nodes: the message stays in the shared queue.
    group = {n.dir.name: n for n in (nodes("a", workers=0, extra=extra).start(),
                                     nodes("b", workers=0, extra=extra).start())}
    send(group["a"].port, "alerting", 2)
    wait_for(lambda: "queue_size" in notices(received, "firing"), 10, "the queue_size alert")
    time.sleep(1.5)  # several rounds on each node
    assert notices(received, "firing") == ["queue_size"]

    def leader() -> str:
        leading = [name for name, n in group.items()
                   if "alerts_leader" in (n.dir / "serve.log").read_text()]
        assert len(leading) == 1, leading
        return leading[0]

    first = leader()
    assert group[first].stop(signal.SIGKILL) == -signal.SIGKILL
    (other,) = set(group) - {first}
    wait_for(lambda: "alerts_leader" in (group[other].dir / "serve.log").read_text(), 10,
             "the surviving node to evaluate the shared rules")
    time.sleep(1.0)
    assert notices(received, "firing") == ["queue_size"]  # it was firing already
    # The queue empties through the survivor: resolved, once.
    for row in pg(pg_schema, "SELECT queue_id FROM messages"):
        assert cli(group[other], "queue", "delete", row["queue_id"]).returncode == 0
    wait_for(lambda: "queue_size" in notices(received, "resolved"), 10, "the resolved notice")
    time.sleep(1.0)
    assert notices(received, "resolved") == ["queue_size"]
    assert group[other].stop() == 0


def test_mail_accepted_on_node_a_is_traced_and_counted_from_node_b(nodes: Any) -> None:
    a = nodes("a", workers=0, extra=QUIET).start()
    b = nodes("b", workers=0, extra=QUIET).start()
    ids = send(a.port, "traced", 2)
    shown = cli(b, "trace", "--to", REMOTE, "--json")
    assert shown.returncode == 0, shown.stderr
    traces = json.loads(shown.stdout)
    assert sorted(t["message_id"] for t in traces) == sorted(ids)
    for t in traces:
        assert t["sender"] == "load@remote.example" and t["recipients"]
        assert t["events"][0]["event"] == "queued"
        assert "listener=mx" in t["events"][0]["detail"]
    plain = cli(b, "trace", "--message-id", ids[0])
    assert plain.returncode == 0 and "queued" in plain.stdout
    status = cli(b, "status", "--json")
    figures = json.loads(status.stdout)
    assert figures["running"] and figures["queue"]["messages"]["active"] == 2
    assert figures["last_hour"]["received"] == 2
    assert a.stop() == 0 and b.stop() == 0
