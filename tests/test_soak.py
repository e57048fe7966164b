"""Soak: a steady stream of mail for a while, with faults injected (a worker
killed, the remote MX refusing for a spell), while the main process's RSS,
the open file descriptors of all server processes and the queue size are
sampled; all must stay flat.  The suite runs it briefly;
``make soak`` for POSTWARDEN_SOAK_SECONDS (600 there)."""

from __future__ import annotations

import os
import signal
import smtplib
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import add_alias, add_user, wait_for
from tests.crashload import corrupt_count
from tests.fault_mx import FaultMx
from tests.service import ALICE, Service, children, kill_leftovers, setup_config, with_top

SECONDS = float(os.environ.get("POSTWARDEN_SOAK_SECONDS", "20"))
RATE = float(os.environ.get("POSTWARDEN_SOAK_RATE", "20"))  # messages per second


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def queue_size(db: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.timeout(SECONDS * 2 + 120)
def test_soak_stays_flat(tmp_path: Path, cert_files: tuple[Path, Path],
                         loopback_dns: Any) -> None:
    with FaultMx("good") as mx:
        loopback_dns.set("soak.example", {"MX": [(10, "mx.soak.example")]})
        loopback_dns.set("mx.soak.example", {"A": ["127.0.0.1"]})
        path, ports, cfg = setup_config(
            tmp_path, cert_files, loopback_dns,
            "[checks]\nverify = false\n[queue]\nscan_interval = 1\nretry_min = 2\n"
            f"retry_max = 4\n[delivery]\nmx_port = {mx.port}\ntls = \"none\"\n")
        with_top(path, "processes = 2")
        add_user(cfg, ALICE)
        add_alias(cfg, "fwd@example.test", "someone@soak.example")
        svc = Service(path, tmp_path / "serve.log")
        svc.wait_ready(ports[0])
        stop = threading.Event()
        sent = [0]
        failed = [0]
        forwarded = [0]
        lock = threading.Lock()

        def sender(n: int) -> None:
            interval = n / RATE
            client = None
            next_at = time.monotonic()
            while not stop.is_set():
                next_at += interval
                try:
                    if client is None:
                        client = smtplib.SMTP("127.0.0.1", ports[0], timeout=15)
                    with lock:
                        rcpt = ALICE if sent[0] % 2 else "fwd@example.test"
                    client.sendmail("s@remote.example", [rcpt], (
                                    b"Subject: soak\r\n\r\n" + b"z" * 70 + b"\r\n") * 40)
                    with lock:
                        sent[0] += 1
                        forwarded[0] += rcpt != ALICE
                except (OSError, smtplib.SMTPException):
                    with lock:
                        failed[0] += 1
                    client = None
                stop.wait(max(0.0, next_at - time.monotonic()))
            if client is not None:
                client.close()

        threads = [threading.Thread(target=sender, args=(4,)) for _ in range(4)]
        for t in threads:
            t.start()
        samples: list[tuple[float, int, int, int]] = []
        started = time.monotonic()
        last_fault = started
        faults = 0
        try:
            while (now := time.monotonic()) - started < SECONDS:
                pids = [svc.proc.pid, *children(svc.proc.pid)]
                samples.append((now - started, rss_kib(svc.proc.pid),
                                sum(fds(p) for p in pids), queue_size(cfg.db_path)))
                if now - last_fault > max(5.0, SECONDS / 10):
                    last_fault = now
                    faults += 1
                    if faults % 2:
                        workers = children(svc.proc.pid)
                        if workers:
                            os.kill(workers[0], signal.SIGKILL)
                    else:
                        mx.mode = "greet421" if mx.mode == "good" else "good"
                time.sleep(1)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        mx.mode = "good"
        try:
            assert wait_for(lambda: queue_size(cfg.db_path) == 0, timeout=60)
        finally:
            svc.stop()
        assert corrupt_count(cfg.db_path) == 0
        kill_leftovers()

    n = len(samples)
    warm, late = samples[n // 4: n // 2], samples[3 * n // 4:]
    rss_warm = statistics.mean(s[1] for s in warm)
    rss_late = statistics.mean(s[1] for s in late)
    fd_warm = max(s[2] for s in warm)
    fd_late = max(s[2] for s in late)
    q_max = max(s[3] for s in samples)
    print(f"\nsoak {SECONDS:.0f} s at {RATE:.0f} msg/s: sent {sent[0]}, refused/cut "
          f"{failed[0]}, faults {faults}; main RSS {rss_warm / 1024:.1f} -> "
          f"{rss_late / 1024:.1f} MiB, fds {fd_warm} -> {fd_late}, queue max {q_max}, "
          f"drained to 0, remote: {forwarded[0]} acknowledged, {len(mx.received)} delivered")
    assert sent[0] > SECONDS * RATE * 0.5
    assert len(mx.received) >= forwarded[0]
    assert rss_late < rss_warm * 1.25 + 10 * 1024, (rss_warm, rss_late)
    assert fd_late <= fd_warm + 40, (fd_warm, fd_late)
    # The queue does not pile up: it holds at most what comes in during one
    # refusal spell of the remote MX and the time to drain it afterwards
    # (twice the spell), plus a minute; it is drained to 0 at the end.
    spell = max(5.0, SECONDS / 10)
    assert q_max < RATE * (2 * spell + 60), (q_max, spell)
