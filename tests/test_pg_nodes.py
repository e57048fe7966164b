"""Several postwarden nodes sharing one queue in PostgreSQL, as separate
``postwarden serve`` processes on loopback ports.

Each node has a data directory of its own; they share the queue (one
PostgreSQL schema per test).  Mail goes through an alias to a remote
recipient whose domain is routed to an SMTP sink, which counts what it
receives by Message-ID: exactly once in the normal case, everything after
a node is SIGKILLed mid-delivery, duplicates no more than the leases the
dead node held.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from tests.conftest import PASSWORD, PG_DSN, write_config
from tests.crashload import queue_list
from tests.service import Service, free_ports, kill_leftovers, with_top

from postwarden import config as config_mod
from postwarden.auth.passwords import hash_password
from postwarden.storage.pg_directory import DirectoryEdit

FORWARD = "fwd@example.test"
REMOTE = "friend@sink.example"


class Sink:
    """The remote MX: an aiosmtpd server counting Message-IDs; ``delay``
    seconds pass between the end of DATA and its 250 (a slow destination,
    so that deliveries are in flight when a node is killed)."""

    def __init__(self, delay: float = 0.0) -> None:
        from aiosmtpd.controller import Controller

        self.port, = free_ports(1)
        self.delay = delay
        self.ids: Counter[str] = Counter()
        self.messages: dict[str, bytes] = {}  # the last copy of each, by Message-ID
        self.started = 0  # DATA commands received (before the delay)
        self.lock = threading.Lock()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.started += 1
        await asyncio.sleep(self.delay)
        mid = BytesHeaderParser().parsebytes(envelope.content)["Message-ID"]
        with self.lock:
            self.ids[str(mid)] += 1
            self.messages[str(mid)] = envelope.content
        return "250 2.0.0 Ok: sunk"

    def count(self) -> int:
        with self.lock:
            return len(self.ids)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    s.controller.start()
    yield s
    s.controller.stop()


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    kill_leftovers()


class Node:
    """One ``postwarden serve`` process on the shared queue."""

    def __init__(self, directory: Path, cert_files: tuple[Path, Path], dns_port: int,
                 schema: str, sink_port: int, *, workers: int = 4, scan: float = 60.0,
                 lease: float = 30.0, heartbeat: float = 1.0, extra: str = "",
                 processes: int = 1) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        ports = free_ports(3)
        self.port = ports[0]
        self.submission = ports[1]
        extra = (f"[checks]\nverify = false\n"
                 f"[queue]\nscan_interval = {scan}\nretry_min = 1\nretry_max = 2\n"
                 f"workers = {workers}\n"
                 f'[transports]\n"sink.example" = "smtp:[127.0.0.1]:{sink_port}"\n'
                 f'[storage]\nbackend = "postgres"\ndsn = "{PG_DSN}"\nschema = "{schema}"\n'
                 f"pool_min = 1\npool_max = 4\nlease = {lease}\nheartbeat = {heartbeat}\n"
                 + extra)
        self.config_path = write_config(directory, cert_files, extra,
                                        ports=(ports[0], ports[1], ports[2]), dns_port=dns_port)
        with_top(self.config_path, f"processes = {processes}")
        self.cfg = config_mod.load(self.config_path)
        # The shared directory (every node sees it): the alias to the sink.
        with DirectoryEdit(self.cfg.storage, self.cfg.domains) as directory:
            directory.add_alias(FORWARD, [REMOTE])
        self.service: Service | None = None

    def start(self) -> Node:
        self.service = Service(self.config_path, self.dir / "serve.log")
        self.service.wait_ready(self.port, timeout=60)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.service is not None
        return self.service.stop(sig)


def send(port: int, tag: str, count: int) -> list[str]:
    """``count`` messages to the alias over one connection; their Message-IDs."""
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("sender.remote.example")
        for i in range(count):
            msg = EmailMessage()
            mid = f"<{tag}.{i}.{time.monotonic_ns()}@remote.example>"
            msg["From"], msg["To"], msg["Subject"] = "load@remote.example", FORWARD, tag
            msg["Message-ID"] = mid
            msg.set_content(f"message {i} from {tag}\n")
            client.send_message(msg, "load@remote.example", [FORWARD])
            ids.append(mid)
    return ids


def nodes_cli(node: Node, *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "postwarden", "-c", str(node.config_path),
                          "nodes", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if "--json" in args else out.stdout


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def pg(schema: str, sql: str) -> Any:
    async def main() -> Any:
        conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": schema})
        try:
            return await conn.fetch(sql)
        finally:
            await conn.close()
    return asyncio.run(main())


@pytest.fixture
def nodes(tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any, pg_schema: str,
          sink: Sink) -> Any:
    def make(name: str, **kw: Any) -> Node:
        return Node(tmp_path / name, cert_files, loopback_dns.port, pg_schema, sink.port, **kw)
    return make


def test_one_node_on_postgres_delivers_and_the_cli_sees_the_shared_queue(
        nodes: Any, sink: Sink, pg_schema: str) -> None:
    admin, = free_ports(1)
    a = nodes("a", extra=f'[admin]\nenabled = true\naddress = "127.0.0.1:{admin}"\n').start()
    ids = send(a.port, "solo", 5)
    wait_for(lambda: sink.count() == 5, 30, "5 deliveries")
    assert set(sink.ids) == set(ids) and set(sink.ids.values()) == {1}
    wait_for(lambda: not pg(pg_schema, "SELECT 1 FROM messages"), 10, "an empty queue")
    assert queue_list(a.config_path) == []
    [row] = nodes_cli(a, "--json")
    assert row["live"] and row["in_flight"] == 0 and row["heartbeat_age"] < 5
    assert a.service is not None and row["pid"] == a.service.proc.pid
    assert "live" in nodes_cli(a)
    # /metrics: this node's claims, and the shared queue (empty now).
    time.sleep(1.5)  # a heartbeat refreshes the queue figures
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    claims = [line for line in text.splitlines() if line.startswith("postwarden_node_claims{")]
    assert len(claims) == 1 and float(claims[0].rsplit(" ", 1)[1]) >= 1
    assert 'postwarden_queue_messages{state="active"} 0.0' in text
    # /readyz asks the shared database (the primary: it takes writes).
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=10) as r:
        ready = json.loads(r.read())
    assert ready["ready"] and ready["checks"]["storage"] == "ok"
    assert "alerts_failed" not in (a.dir / "serve.log").read_text()
    assert a.stop() == 0
    assert pg(pg_schema, "SELECT 1 FROM nodes") == []  # deregistered


def test_mail_accepted_by_an_accept_only_node_is_delivered_by_another_at_once(
        nodes: Any, sink: Sink) -> None:
    # Scans every 60 s: only the NOTIFY of the commit on A can wake B in time.
    a = nodes("a", workers=0).start()
    b = nodes("b").start()
    time.sleep(0.5)  # B's first scan found nothing
    started = time.monotonic()
    ids = send(a.port, "via-a", 3)
    wait_for(lambda: sink.count() == 3, 20, "deliveries by node B")
    assert time.monotonic() - started < 20
    assert set(sink.ids) == set(ids)
    assert a.stop() == 0 and b.stop() == 0


def test_two_and_three_nodes_deliver_everything_exactly_once(nodes: Any, sink: Sink,
                                                             pg_schema: str) -> None:
    # Node c runs two processes (its worker accepts, its main process delivers).
    group = [nodes("a").start(), nodes("b").start(), nodes("c", processes=2).start()]
    sent: list[str] = []
    lock = threading.Lock()

    def sender(node: Node, tag: str) -> None:
        ids = send(node.port, tag, 40)
        with lock:
            sent.extend(ids)

    threads = [threading.Thread(target=sender, args=(n, f"{n.dir.name}{k}"))
               for n in group for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(sent) == 240
    wait_for(lambda: sink.count() == 240, 90, "240 deliveries")
    time.sleep(1.0)  # nothing more arrives
    assert set(sink.ids) == set(sent)
    assert max(sink.ids.values()) == 1, "a message was delivered twice"
    deliverers = pg(pg_schema, "SELECT relay FROM events WHERE event = 'lease_expired'")
    assert deliverers == []
    for n in group:
        assert n.stop() == 0


def test_sigkill_mid_delivery_loses_nothing_and_duplicates_stay_within_the_leases(
        nodes: Any, sink: Sink, pg_schema: str) -> None:
    sink.delay = 1.5  # deliveries stay in flight
    a = nodes("a", workers=4, scan=1.0, lease=4.0, heartbeat=1.0).start()
    ids = send(a.port, "doomed", 20)
    wait_for(lambda: sink.started >= 2, 20, "deliveries in flight on node A")
    assert a.stop(signal.SIGKILL) == -signal.SIGKILL
    admin, = free_ports(1)
    b = nodes("b", workers=4, scan=1.0, lease=4.0, heartbeat=1.0,
              extra=f'[admin]\nenabled = true\naddress = "127.0.0.1:{admin}"\n').start()
    wait_for(lambda: sink.count() == 20, 90, "every message delivered by node B")
    time.sleep(sink.delay + 1.0)
    assert set(sink.ids) == set(ids), "a message was lost"
    duplicates = sum(n - 1 for n in sink.ids.values())
    takeovers = pg(pg_schema, "SELECT queue_id FROM events WHERE event = 'lease_expired'")
    # Only what A held a lease on can come twice, and each takeover is counted.
    assert 0 < len(takeovers) <= 4
    assert duplicates <= len(takeovers)
    # Counted per node: B's row (A's stays behind with a stale heartbeat).
    rows = pg(pg_schema, "SELECT takeovers, heartbeat FROM nodes ORDER BY heartbeat")
    assert len(rows) == 2 and rows[-1]["takeovers"] == len(takeovers)
    # `postwarden nodes`: A is gone, B live; --prune forgets A.
    listed = {r["pid"]: r for r in nodes_cli(b, "--json")}
    assert b.service is not None and a.service is not None
    assert listed[b.service.proc.pid]["live"] and not listed[a.service.proc.pid]["live"]
    assert listed[b.service.proc.pid]["takeovers"] == len(takeovers)
    # /metrics of B: the takeovers as a counter too, labelled with B's node id.
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    (counted,) = [line for line in text.splitlines()
                  if line.startswith("postwarden_lease_takeovers_total{")]
    assert "# TYPE postwarden_lease_takeovers_total counter" in text
    assert f'node="{listed[b.service.proc.pid]["node_id"]}"' in counted
    assert float(counted.rsplit(" ", 1)[1]) == len(takeovers)
    assert [r["pid"] for r in nodes_cli(b, "--json", "--prune")] == [b.service.proc.pid]
    assert b.stop() == 0


# ---- shared protection state ------------------------------------------------

def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(200)


def rcpt_replies(port: int, *rcpts: str) -> list[int]:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:  # no QUIT: a ban may end the session
        client.ehlo("prober.remote.example")
        client.mail("prober@remote.example")
        return [client.rcpt(r)[0] for r in rcpts]
    finally:
        client.close()


def test_a_ban_on_node_a_refuses_the_client_on_node_b(nodes: Any, pg_schema: str) -> None:
    extra = "[bans]\nharvest_rejects = 3\n"
    a = nodes("a", extra=extra).start()
    b = nodes("b", extra=extra).start()
    assert greeting(b.port).startswith(b"220 ")
    # A directory harvest on A: three unknown recipients, then a ban.
    # The third reject is the ban: 421 and the session ends.
    assert rcpt_replies(a.port, *(f"nobody{i}@example.test" for i in range(3))) == [550, 550, 421]
    wait_for(lambda: greeting(b.port).startswith(b"421 4.7.0"), 10, "node B to refuse")
    [ban] = pg(pg_schema, "SELECT network, reason FROM protect_bans")
    assert ban["network"] == "127.0.0.1/32"
    # Lifted through B's configuration: A accepts the client again.
    out = subprocess.run([sys.executable, "-m", "postwarden", "-c", str(b.config_path), "ban",
                          "del", "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: greeting(a.port).startswith(b"220 "), 10, "node A to accept again")
    # An administrator's ban through A's configuration reaches B.
    out = subprocess.run([sys.executable, "-m", "postwarden", "-c", str(a.config_path), "ban",
                          "add", "127.0.0.0/8", "--reason", "test"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: greeting(b.port).startswith(b"421 4.7.0"), 10, "node B to refuse")
    assert a.stop() == 0 and b.stop() == 0


def test_rate_limits_count_what_a_client_did_on_every_node(nodes: Any) -> None:
    extra = "[ratelimit]\nip_messages = 4\n"
    a = nodes("a", extra=extra).start()
    b = nodes("b", extra=extra).start()
    send(a.port, "rl-a", 2)
    send(b.port, "rl-b", 2)
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        send(a.port, "rl-over", 1)
    assert info.value.smtp_code in (450, 451, 452, 550)
    with pytest.raises(smtplib.SMTPSenderRefused):
        send(b.port, "rl-over", 1)
    assert a.stop() == 0 and b.stop() == 0


def test_a_greylist_retry_passes_on_the_other_node(nodes: Any, sink: Sink) -> None:
    extra = "[greylist]\nenabled = true\ndelay = 1\n"
    a = nodes("a", extra=extra).start()
    b = nodes("b", extra=extra).start()
    assert rcpt_replies(a.port, FORWARD) == [451]  # first attempt: greylisted on A
    time.sleep(1.2)
    assert rcpt_replies(b.port, FORWARD) == [250]  # the retry reaches B: passed
    assert a.stop() == 0 and b.stop() == 0


def test_an_account_added_through_one_node_is_known_to_the_others(nodes: Any) -> None:
    extra = "[bans]\nenabled = false\n"  # the probes below would look like a harvest
    a = nodes("a", extra=extra).start()
    b = nodes("b", extra=extra).start()
    assert rcpt_replies(b.port, "newcomer@example.test") == [550]
    out = subprocess.run([sys.executable, "-m", "postwarden", "-c", str(a.config_path), "user",
                          "add", "newcomer@example.test", "--password-stdin"],
                         input="a long enough password 42\n", capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: rcpt_replies(b.port, "newcomer@example.test") == [250], 10,
             "node B to know the new account")
    out = subprocess.run([sys.executable, "-m", "postwarden", "-c", str(b.config_path), "user",
                          "list"], capture_output=True, text=True, timeout=60)
    assert "newcomer@example.test" in out.stdout
    assert a.stop() == 0 and b.stop() == 0


# ---- quarantine and DKIM keys shared --------------------------------------

ALICE = "alice@example.test"


def add_alice(node: Node) -> None:
    with DirectoryEdit(node.cfg.storage, node.cfg.domains) as directory:
        directory.add_user(ALICE, hash_password(PASSWORD))


def submit(node: Node | int, tls: ssl.SSLContext, body: str, tag: str
           ) -> tuple[str, int, bytes]:
    """Alice submits ``body`` to the remote friend through a node (or a
    submission port); (Message-ID, code, text)."""
    mid = f"<{tag}.{time.monotonic_ns()}@example.test>"
    port = node if isinstance(node, int) else node.submission
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.starttls(context=tls)
        client.login(ALICE, PASSWORD)
        client.mail(ALICE)
        client.rcpt(REMOTE)
        code, text = client.data(
            f"From: Alice <{ALICE}>\r\nTo: {REMOTE}\r\nSubject: {tag}\r\n"
            f"Message-ID: {mid}\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n\r\n"
            f"{body}\r\n".encode())
    return mid, code, text


def cli(node: Node | Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``postwarden`` with a node's config (or the config file ``node``)."""
    path = node if isinstance(node, Path) else node.config_path
    return subprocess.run([sys.executable, "-m", "postwarden", "-c", str(path), *args],
                          capture_output=True, text=True, timeout=60)


def test_a_message_held_on_node_a_is_released_from_node_b_and_delivered(
        nodes: Any, sink: Sink, client_tls: ssl.SSLContext, pg_schema: str) -> None:
    a = nodes("a", workers=0)  # accepts only: B delivers
    add_alice(a)
    a.start()
    b = nodes("b").start()
    # Outgoing review (the default DLP filter) holds a card number.
    mid, code, text = submit(a, client_tls, "my card is 4111 1111 1111 1111", "held")
    assert code == 250 and b"queued as Q" in text
    held_id = text.decode().rsplit(" ", 1)[1]
    listing = cli(b, "quarantine", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    [held] = json.loads(listing.stdout)
    assert held["id"] == held_id and held["filters"] == ["dlp"]
    assert held["recipients"] == [REMOTE] and held["auth_user"] == ALICE
    shown = cli(b, "quarantine", "show", held_id)
    assert shown.returncode == 0 and "Subject: held" in shown.stdout
    time.sleep(1.0)
    assert mid not in sink.ids  # held: not delivered
    released = cli(b, "quarantine", "release", held_id)
    assert released.returncode == 0, released.stderr
    assert f"{held_id}: released as " in released.stdout and "shared queue" in released.stdout
    wait_for(lambda: mid in sink.ids, 20, "the released message at the sink")
    assert b"4111 1111 1111 1111" in sink.messages[mid]
    # Gone from the quarantine of every node; a second release says so.
    assert json.loads(cli(a, "quarantine", "list", "--json").stdout) == []
    again = cli(a, "quarantine", "release", held_id)
    assert again.returncode == 1 and f"no message {held_id}" in again.stderr
    assert a.stop() == 0 and b.stop() == 0


def test_a_dkim_key_generated_through_node_a_signs_on_node_b(
        nodes: Any, sink: Sink, client_tls: ssl.SSLContext) -> None:
    import dkim  # type: ignore[import-untyped]

    a = nodes("a")
    add_alice(a)
    a.start()
    b = nodes("b").start()
    out = cli(a, "dkim", "keygen", "example.test", "--selector", "shared", "--activate")
    assert out.returncode == 0, out.stderr
    assert "in PostgreSQL, for every node" in out.stdout
    # The record to publish, as node B prints it.
    records = cli(b, "dns", "records", "example.test")
    assert records.returncode == 0, records.stderr
    [line] = [ln for ln in records.stdout.splitlines()
              if ln.startswith("shared._domainkey.example.test. TXT")]
    txt = "".join(re.findall(r'"([^"]*)"', line)).encode()  # the character-strings
    assert txt.startswith(b"v=DKIM1; k=rsa; p=")
    listed = cli(b, "dkim", "list")
    assert "shared" in listed.stdout and "active" in listed.stdout
    time.sleep(1.5)  # node B's copy of the keys is refreshed every second
    mid, code, _ = submit(b, client_tls, "signed on B", "signed")
    assert code == 250
    wait_for(lambda: mid in sink.ids, 20, "the signed message at the sink")
    message = sink.messages[mid]
    assert b"DKIM-Signature:" in message and b"s=shared" in message

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return txt if name == b"shared._domainkey.example.test." else b""
    assert dkim.verify(message, dnsfunc=dnsfunc)
    # Deactivated through B: A stops signing (its copy follows).
    out = cli(b, "dkim", "deactivate", "example.test", "shared")
    assert out.returncode == 0, out.stderr
    time.sleep(1.5)
    mid, code, _ = submit(a, client_tls, "unsigned on A", "unsigned")
    wait_for(lambda: mid in sink.ids, 20, "the unsigned message at the sink")
    assert b"DKIM-Signature:" not in sink.messages[mid]
    assert a.stop() == 0 and b.stop() == 0


def test_two_nodes_sharing_a_spool_directory_deliver_large_bodies_byte_exact(
        nodes: Any, sink: Sink, tmp_path: Path, pg_schema: str) -> None:
    import base64
    import os

    shared = tmp_path / "nfs"  # stands in for a file system both nodes mount
    shared.mkdir(mode=0o700)
    extra = f'shared_spool_dir = "{shared}"\n'  # appended to [storage]
    a = nodes("a", workers=0, extra=extra).start()  # accepts only
    raw = []
    for i in range(3):
        mid = f"<big.{i}.{time.monotonic_ns()}@remote.example>"
        lines = base64.encodebytes(os.urandom(400_000)).replace(b"\n", b"\r\n")
        raw.append((mid, (f"From: load@remote.example\r\nTo: {FORWARD}\r\nSubject: big\r\n"
                          f"Message-ID: {mid}\r\n\r\n").encode() + lines))
    with smtplib.SMTP("127.0.0.1", a.port, timeout=30) as client:
        for _mid, message in raw:
            client.sendmail("load@remote.example", [FORWARD], message)
    # Accepted on A: the bodies are files in the shared directory, named by the rows.
    files = {p.name for p in shared.glob("*.spool")}
    named = {r["spool_name"] for r in pg(pg_schema, "SELECT spool_name FROM messages")}
    assert len(files) == 3 and named == files
    assert not list(a.cfg.spool_dir.glob("*.spool"))
    b = nodes("b", extra=extra).start()  # delivers what A accepted
    wait_for(lambda: sink.count() == 3, 60, "3 deliveries by node B")
    for mid, message in raw:
        assert sink.messages[mid].endswith(message)  # byte for byte, after the trace
    wait_for(lambda: not pg(pg_schema, "SELECT 1 FROM messages"), 10, "an empty queue")
    assert list(shared.glob("*.spool")) == []  # removed with their messages
    assert a.stop() == 0 and b.stop() == 0



# ---- from one SQLite node to PostgreSQL ---------------------------------------

def test_a_sqlite_node_copied_to_postgres_serves_its_users_and_delivers_its_queue(
        nodes: Any, sink: Sink, tmp_path: Path, cert_files: tuple[Path, Path],
        loopback_dns: Any, client_tls: ssl.SSLContext, pg_schema: str) -> None:
    from tests.conftest import ServerThread, add_user

    old = tmp_path / "sqlite-node"
    old.mkdir()
    ports = free_ports(3)
    extra = ("[checks]\nverify = false\n[queue]\nworkers = 0\n"  # accepts only: mail waits
             f'[transports]\n"sink.example" = "smtp:[127.0.0.1]:{sink.port}"\n')
    path = write_config(old, cert_files, extra, ports=(ports[0], ports[1], ports[2]),
                        dns_port=loopback_dns.port)
    cfg = config_mod.load(path)
    add_user(cfg, ALICE)
    st = ServerThread(cfg).start()
    try:
        assert cli(path, "dkim", "keygen", "example.test", "--selector", "moved",
                   "--activate").returncode == 0
        queued = [submit(ports[1], client_tls, f"queued {i}", f"queued{i}") for i in range(3)]
        assert all(code == 250 for _m, code, _t in queued)
        held_mid, _, text = queued[2]
        held_qid = text.decode().rsplit(" ", 1)[1]
        assert cli(path, "queue", "hold", held_qid).returncode == 0
        _, code, text = submit(ports[1], client_tls, "card 4111 1111 1111 1111", "review")
        quarantined = text.decode().rsplit(" ", 1)[1]
        assert code == 250 and quarantined.startswith("Q")
        assert cli(path, "ban", "add", "192.0.2.0/24", "--reason", "moved too").returncode == 0
        assert cli(path, "access", "add", "deny-sender", "*@moved.example").returncode == 0
        running = cli(path, "storage", "copy-to-postgres", "--dsn", PG_DSN, "--schema",
                      pg_schema)
        assert running.returncode == 1 and "is running" in running.stderr
    finally:
        st.stop()

    out = cli(path, "storage", "copy-to-postgres", "--dsn", PG_DSN, "--schema", pg_schema)
    assert out.returncode == 0, out.stderr
    counts = {" ".join(line.split()[1:]): int(line.split()[0])
              for line in out.stdout.splitlines()[1:] if line[:1] == " "}
    assert counts["accounts"] == 1 and counts["queued messages"] == 3
    assert counts["recipients"] == 3 and counts["DKIM keys"] == 1
    assert counts["quarantined messages"] == 1 and counts["bans"] == 1
    assert counts["access entries"] == 1
    assert "secret" not in out.stdout and PG_DSN not in out.stdout
    again = cli(path, "storage", "copy-to-postgres", "--dsn", PG_DSN, "--schema", pg_schema)
    assert again.returncode == 1 and "not empty" in again.stderr and "--force" in again.stderr
    assert "Traceback" not in again.stderr

    # A node on PostgreSQL takes over: the queued mail goes, the held waits.
    node = nodes("pg").start()
    wait_for(lambda: sink.count() == 2, 30, "the two queued messages")
    assert set(sink.ids) == {queued[0][0], queued[1][0]}
    assert cli(node, "queue", "release", held_qid).returncode == 0
    wait_for(lambda: held_mid in sink.ids, 30, "the released message")
    # The account authenticates, the copied key signs, the quarantine and
    # the ban came along.
    mid, code, _ = submit(node, client_tls, "after the move", "after")
    assert code == 250
    wait_for(lambda: mid in sink.ids, 30, "mail submitted after the move")
    assert b"s=moved" in sink.messages[mid]
    listing = json.loads(cli(node, "quarantine", "list", "--json").stdout)
    assert [h["id"] for h in listing] == [quarantined]
    assert "192.0.2.0/24" in cli(node, "ban", "list").stdout
    assert "*@moved.example" in cli(node, "access", "list").stdout
    assert max(sink.ids.values()) == 1
    assert node.stop() == 0


def test_client_config_and_dns_records_read_the_shared_directory(nodes: Any) -> None:
    a, b = nodes("a"), nodes("b")  # two configs on one schema (not started)
    assert cli(a, "domain", "add", "second.test").returncode == 0
    out = cli(b, "dns", "records", "second.test")
    assert out.returncode == 0, out.stderr
    assert "second.test. MX 10 mail.example.test." in out.stdout
    unknown = cli(b, "client-config", "carol@second.test")
    assert unknown.returncode == 0 and "carol@second.test is not an account" in unknown.stderr
    add = subprocess.run([sys.executable, "-m", "postwarden", "-c", str(a.config_path), "user",
                          "add", "carol@second.test", "--password-stdin"],
                         input="a long enough password 42\n", capture_output=True, text=True,
                         timeout=60)
    assert add.returncode == 0, add.stderr
    known = cli(b, "client-config", "carol@second.test")
    assert known.returncode == 0 and "not an account" not in known.stderr
    assert "carol@second.test" in known.stdout
