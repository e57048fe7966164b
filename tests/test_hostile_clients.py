"""Hostile clients against the real ``postwarden serve`` process: idle
connections by the thousand, slowloris, oversized and malformed input,
pipelined floods, hostile AUTH, deeply nested MIME.  Each gets the right
reply or is disconnected, memory per connection stays bounded, and a normal
client is served meanwhile."""

from __future__ import annotations

import base64
import contextlib
import resource
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import add_user
from tests.service import ALICE, Service, kill_leftovers, setup_config, with_top

COMMAND_TIMEOUT = 4.0
IDLE = 2000


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, cert_files: tuple[Path, Path],
            loopback_dns: Any) -> Iterator[tuple[Service, list[int]]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 3 * IDLE)), hard))
    tmp = tmp_path_factory.mktemp("hostile")
    path, ports, cfg = setup_config(
        tmp, cert_files, loopback_dns,
        f"command_timeout = {COMMAND_TIMEOUT}\n[checks]\nverify = false\n"
        "[connections]\nmax_per_ip = 0\nmax_total = 0\n[queue]\nworkers = 0\n")
    with_top(path, "processes = 1")  # one process, to measure its memory
    add_user(cfg, ALICE)
    svc = Service(path, tmp / "serve.log")
    svc.wait_ready(ports[0])
    yield svc, ports
    svc.stop()
    kill_leftovers()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert s.recv(200).startswith(b"220 ")
    return s


def replies_until_close(s: socket.socket, timeout: float = 10) -> list[bytes]:
    s.settimeout(timeout)
    buf = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(65536):
            buf += chunk
    s.close()
    return [ln for ln in buf.split(b"\r\n") if len(ln) >= 4 and ln[3:4] == b" "]


def exchange(s: socket.socket, data: bytes, count: int) -> list[bytes]:
    s.sendall(data)
    buf = b""
    while True:
        lines = [ln for ln in buf.split(b"\r\n") if len(ln) >= 4 and ln[3:4] == b" "]
        if len(lines) >= count:
            return lines
        chunk = s.recv(65536)
        if not chunk:
            return lines
        buf += chunk


def send_one(port: int, tag: str) -> float:
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as c:
        c.sendmail("s@remote.example", [ALICE], f"Subject: {tag}\r\n\r\nx\r\n".encode())
    return time.monotonic() - started


def test_idle_crowd_and_slowloris_do_not_starve_a_normal_client(
        service: tuple[Service, list[int]]) -> None:
    svc, ports = service
    before = rss_kib(svc.proc.pid)
    opened = time.monotonic()
    idle = [socket.create_connection(("127.0.0.1", ports[0]), timeout=10)
            for _ in range(IDLE)]
    for s in idle:
        assert s.recv(200).startswith(b"220 ")
    per_conn = (rss_kib(svc.proc.pid) - before) * 1024 / IDLE
    print(f"\n{IDLE} idle connections: {per_conn / 1024:.1f} KiB each")
    assert per_conn < 64 * 1024

    # Slowloris: one byte every 0.5 s of a command that never ends.
    cut_off: list[float] = []

    def slowloris() -> None:
        s = connect(ports[0])
        start = time.monotonic()
        with contextlib.suppress(OSError):
            for b in b"EHLO " + b"x" * 60:
                s.sendall(bytes([b]))
                s.settimeout(0.5)
                with contextlib.suppress(TimeoutError):
                    if s.recv(100).startswith(b"421 4.4.2"):
                        cut_off.append(time.monotonic() - start)
                        break
        s.close()

    slow = [threading.Thread(target=slowloris) for _ in range(20)]
    for t in slow:
        t.start()
    latencies = [send_one(ports[0], f"normal {i}") for i in range(10)]
    print(f"normal client: max {max(latencies) * 1000:.0f} ms per message")
    assert max(latencies) < 3.0
    for t in slow:
        t.join(60)
    # The command timeout is for the whole command, not for each byte.
    assert len(cut_off) == 20 and max(cut_off) < COMMAND_TIMEOUT + 3, cut_off
    # The idle crowd was dropped with 421 at its timeout.
    assert time.monotonic() - opened < 60
    for s in idle[:50]:
        assert replies_until_close(s)[-1].startswith(b"421 4.4.2")
    for s in idle[50:]:
        s.close()


HOSTILE = [
    # (name, bytes after the greeting, start of the last reply expected)
    ("oversized line", b"EHLO " + b"a" * 200_000 + b"\r\nNOOP\r\n", b"250"),
    # A NUL makes the whole line a syntax error (RFC 5321 4.1.1: NUL is
    # no part of any command).
    ("nul in command", b"EHLO a\x00b\r\n", b"500 5.5.2"),
    ("nul in address", b"EHLO t\r\nMAIL FROM:<a\x00b@remote.example>\r\n", b"500 5.5.2"),
    ("invalid utf-8, no SMTPUTF8",
     b"EHLO t\r\nMAIL FROM:<\xff\xfe@remote.example>\r\n", b"5"),
    ("invalid utf-8 with SMTPUTF8",
     b"EHLO t\r\nMAIL FROM:<\xc3\x28@remote.example> SMTPUTF8\r\n", b"5"),
    ("invalid utf-8 in rcpt with SMTPUTF8",
     b"EHLO t\r\nMAIL FROM:<a@remote.example> SMTPUTF8\r\nRCPT TO:<\xe2\x82@example.test>\r\n",
     b"5"),
    ("unknown verbs", b"\xff\xfe\xfd\r\n", b"500"),
]


@pytest.mark.parametrize(("name", "data", "expect"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_malformed_input_gets_the_right_reply(
        service: tuple[Service, list[int]], name: str, data: bytes, expect: bytes) -> None:
    _svc, ports = service
    s = connect(ports[0])
    replies = exchange(s, data + b"NOOP\r\n", data.count(b"\r\n") + 1)
    assert replies[-2].startswith(expect), replies
    assert replies[-1].startswith(b"250"), replies  # the session goes on
    s.close()


def test_pipelined_flood_is_answered_in_order_or_cut_off(
        service: tuple[Service, list[int]]) -> None:
    _svc, ports = service
    s = connect(ports[0])
    flood = b"EHLO t\r\n" + b"NOOP\r\n" * 20_000 + b"QUIT\r\n"
    sender = threading.Thread(target=lambda: contextlib.suppress(OSError)
                              and s.sendall(flood), daemon=True)
    sender.start()
    replies = replies_until_close(s, timeout=30)
    # Either every command answered and QUIT honoured, or the session cut off
    # at the command limit with 421: never silence, never a hang.
    assert replies[-1].startswith((b"221", b"421 4.7.0")), replies[-3:]
    assert all(r.startswith(b"250") for r in replies[1:-1])
    assert send_one(ports[0], "after the flood") < 5


def _auth_session(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="mail.example.test")
    assert s.recv(200).startswith(b"220 ")
    exchange(s, b"EHLO t\r\n", 1)
    return s


@pytest.mark.parametrize(("line", "expect"), [
    (b"AUTH PLAIN " + b"QUFB" * 50_000, b"500 5.5.2"),  # 200 KB: over the line limit
    (b"AUTH PLAIN !!!not-base64***", b"501 5.5.2"),
    # Valid base64 of no PLAIN message, and a user name that is no UTF-8.
    (b"AUTH PLAIN " + base64.b64encode(b"\x00" * 3), b"501 5.5.2"),
    (b"AUTH PLAIN " + base64.b64encode(b"a\x00b"), b"501 5.5.2"),
    (b"AUTH LOGIN " + base64.b64encode(b"\xff\xfe"), b"501 5.5.2"),
])
def test_hostile_auth(service: tuple[Service, list[int]], client_tls: ssl.SSLContext,
                      line: bytes, expect: bytes) -> None:
    _svc, ports = service
    s = _auth_session(ports[2], client_tls)
    replies = exchange(s, line + b"\r\n", 1)
    assert replies[-1].startswith(expect), replies
    s.close()


def test_a_thousand_nested_mime_parts(service: tuple[Service, list[int]]) -> None:
    _svc, ports = service
    head = b"".join(b"Content-Type: multipart/mixed; boundary=\"b%d\"\r\n\r\n--b%d\r\n" % (i, i)
                    for i in range(1000))
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(1000)))
    msg = b"Subject: nested\r\nMIME-Version: 1.0\r\n" + head + b"\r\ndeep\r\n" + tail
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", ports[0], timeout=30) as c:
        try:
            c.sendmail("s@remote.example", [ALICE], msg)
        except smtplib.SMTPDataError as exc:  # refused as hostile: fine, not 4xx
            assert 500 <= exc.smtp_code < 600, exc
    assert time.monotonic() - started < 10
    assert send_one(ports[0], "after nesting") < 5
