"""Crash consistency under load: the harness behind tests/test_crash.py and
``make crash``.

Senders keep submitting messages of mixed sizes over many connections while
the server is killed with SIGKILL at random moments (the main process, so
that its workers die with it, or sometimes a worker alone) and restarted.
Every message carries its own id and the SHA-256 of its body; the harness
remembers which ones got a 250.  In the end the server runs without
interruption until its queue is empty, and the :class:`Report` says what
arrived where: every acknowledged message must have arrived at each of its
recipients (a local Maildir and a remote SMTP sink), intact; duplicates
(at-least-once delivery after a crash) are counted, not failures.

The storage backend is a :class:`Backend`: the config it needs and how to
prepare it.  SQLite (the default, nothing to prepare) is the only one so far;
PostgreSQL plugs in here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import add_alias, add_user, write_config
from tests.service import Service, alive, children, free_ports, with_top

from postwarden import config as config_mod

LOCAL = "alice@example.test"
FORWARD = "fwd@example.test"  # an alias to a remote recipient: the SMTP sink
REMOTE = "friend@sink.example"
_ID = re.compile(rb"^X-Test-Id: ([0-9a-f]{32})$", re.M)
_SUM = re.compile(rb"^X-Test-Sum: ([0-9a-f]{64})$", re.M)


@dataclass(frozen=True)
class Backend:
    """A queue storage backend for the crash test."""

    name: str
    config: str = ""  # TOML added to the server's config
    prepare: Callable[[Path], None] | None = None  # e.g. create a database


SQLITE = Backend("sqlite")


@dataclass
class Plan:
    rounds: int = 5
    senders: int = 6
    # Seconds of load between a restart and the next kill (uniform).
    run_between: tuple[float, float] = (0.5, 2.5)
    # Of the kills, this share kills one worker process instead of the main one.
    worker_kill_share: float = 0.25
    # (size in bytes, weight): mostly small, some spooled (> 128 KiB), a few large.
    sizes: tuple[tuple[int, int], ...] = ((2_000, 60), (40_000, 20), (300_000, 12),
                                          (2_000_000, 6), (10_000_000, 2))
    drain_timeout: float = 120.0
    seed: int = 0
    # Copy the data directory while the server is stopped (SIGSTOP) at one
    # kill point, for the power-loss style check.
    snapshot_round: int = -1


@dataclass
class Report:
    backend: str
    rounds: int = 0
    main_kills: int = 0
    worker_kills: int = 0
    attempted: int = 0
    acknowledged: int = 0
    acknowledged_bytes: int = 0
    delivered_local: int = 0
    delivered_remote: int = 0
    lost: list[str] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)
    unacknowledged_delivered: int = 0
    duplicates_local: int = 0
    duplicates_remote: int = 0
    seconds: float = 0.0
    snapshot: Path | None = None  # the data directory copied at a kill point
    snapshot_acked: dict[str, tuple[str, ...]] = field(default_factory=dict)
    remote_before_snapshot: set[str] = field(default_factory=set)

    def summary(self) -> str:
        return (f"{self.backend}: {self.rounds} rounds ({self.main_kills} main-process "
                f"kills, {self.worker_kills} worker kills), {self.attempted} messages "
                f"attempted, {self.acknowledged} acknowledged "
                f"({self.acknowledged_bytes / 1e6:.1f} MB), lost {len(self.lost)}, "
                f"corrupted {len(self.corrupted)}, duplicates local "
                f"{self.duplicates_local} remote {self.duplicates_remote}, "
                f"unacknowledged but delivered {self.unacknowledged_delivered}, "
                f"{self.seconds:.0f} s")


def make_message(rng: random.Random, size: int) -> tuple[str, str, bytes]:
    """(id, sha256 of the body with LF line ends, message with CRLF)."""
    mid = uuid.uuid4().hex
    line = rng.randbytes(57).hex()[:76].encode()
    lines = max(1, size // 78)
    body = b"".join(line[i % 7:] + b"%d\r\n" % i for i in range(lines))
    digest = hashlib.sha256(body.replace(b"\r\n", b"\n")).hexdigest()
    head = (f"From: load@remote.example\r\nTo: {LOCAL}\r\nSubject: crash test {mid}\r\n"
            f"X-Test-Id: {mid}\r\nX-Test-Sum: {digest}\r\n\r\n").encode()
    return mid, digest, head + body


def check_message(data: bytes) -> tuple[str | None, bool]:
    """(id, intact) of a delivered message (either line-end convention)."""
    flat = data.replace(b"\r\n", b"\n")
    m, s = _ID.search(flat), _SUM.search(flat)
    end = flat.find(b"\n\n")
    if m is None or s is None or end < 0:
        return None, False
    body = flat[end + 2:]
    return m.group(1).decode(), hashlib.sha256(body).hexdigest() == s.group(1).decode()


class Sink:
    """The remote MX: an aiosmtpd server keeping every message it gets."""

    def __init__(self, port: int) -> None:
        from aiosmtpd.controller import Controller

        self.received: list[bytes] = []
        self.times: list[float] = []  # time.monotonic() of each arrival
        self.lock = threading.Lock()
        self.controller = Controller(self, hostname="127.0.0.1", port=port,
                                     data_size_limit=64 * 1024 * 1024)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.received.append(bytes(envelope.content))
            self.times.append(time.monotonic())
        return "250 2.0.0 Ok: sunk"

    def __enter__(self) -> Sink:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


class Load:
    """Sender threads: each keeps one connection, reconnects when the server
    goes away, and records which messages got a 250 (per recipient)."""

    def __init__(self, port: int, plan: Plan) -> None:
        self.port = port
        self.plan = plan
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sums: dict[str, str] = {}
        self.acked: dict[str, tuple[str, ...]] = {}  # id -> recipients acknowledged
        self.acked_at: dict[str, float] = {}
        self.acked_bytes = 0
        self.attempted = 0
        self.threads = [threading.Thread(target=self._run, args=(plan.seed * 1000 + i,),
                                         daemon=True) for i in range(plan.senders)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def _pick_size(self, rng: random.Random) -> int:
        sizes, weights = zip(*self.plan.sizes, strict=True)
        base = rng.choices(sizes, weights)[0]
        return max(200, int(base * rng.uniform(0.5, 1.0)))

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        client: smtplib.SMTP | None = None
        while not self.stop.is_set():
            try:
                if client is None:
                    client = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
                    client.ehlo("load.remote.example")
                rcpts = rng.choice(((LOCAL,), (FORWARD,), (LOCAL, FORWARD)))
                mid, digest, msg = make_message(rng, self._pick_size(rng))
                with self.lock:
                    self.sums[mid] = digest
                    self.attempted += 1
                refused = client.sendmail("load@remote.example", list(rcpts), msg)
                ok = tuple(r for r in rcpts if r not in refused)
                with self.lock:
                    self.acked[mid] = ok
                    self.acked_at[mid] = time.monotonic()
                    self.acked_bytes += len(msg)
            except (OSError, smtplib.SMTPException):
                # Killed under us, or a 4xx: not acknowledged; the sender
                # would try again later (a new message here).
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()
                client = None
                self.stop.wait(0.1)
        if client is not None:
            with contextlib.suppress(Exception):
                client.quit()


class CrashRun:
    def __init__(self, directory: Path, cert_files: tuple[Path, Path], dns_port: int,
                 plan: Plan, backend: Backend = SQLITE) -> None:
        self.dir = directory
        self.plan = plan
        self.backend = backend
        self.rng = random.Random(plan.seed)
        self.sink_port, = free_ports(1)
        ports = free_ports(3)
        self.port = ports[0]
        extra = (f"[checks]\nverify = false\n[queue]\nscan_interval = 1\nretry_min = 1\n"
                 f"retry_max = 2\n[transports]\n"
                 f'"sink.example" = "smtp:[127.0.0.1]:{self.sink_port}"\n{backend.config}')
        self.config_path = write_config(directory, cert_files, extra,
                                        ports=(ports[0], ports[1], ports[2]),
                                        dns_port=dns_port)
        with_top(self.config_path, "processes = 2")
        self.cfg = config_mod.load(self.config_path)
        if backend.prepare is not None:
            backend.prepare(directory)
        add_user(self.cfg, LOCAL)
        add_alias(self.cfg, FORWARD, REMOTE)
        self.log = directory / "serve.log"
        self.report = Report(backend.name)

    def _start(self) -> Service:
        svc = Service(self.config_path, self.log)
        svc.wait_ready(self.port, timeout=60)
        return svc

    def _snapshot(self, svc: Service) -> None:
        """Copy the data directory while every server process is stopped:
        the files as the kernel holds them at that instant."""
        pids = [svc.proc.pid, *children(svc.proc.pid)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            stamp = time.monotonic()
            target = self.dir / "snapshot"
            subprocess.run(["cp", "-a", str(self.cfg.data_dir), str(target)], check=True,
                           timeout=120)
            self.report.snapshot = target
            with self.load.lock:
                self.report.snapshot_acked = {m: self.load.acked[m]
                                              for m, t in self.load.acked_at.items()
                                              if t < stamp}
            with self.sink.lock:
                arrived = [d for d, t in zip(self.sink.received, self.sink.times,
                                             strict=True) if t < stamp]
            self.report.remote_before_snapshot = {
                m for m in (check_message(d)[0] for d in arrived) if m}
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def run(self) -> Report:
        started = time.monotonic()
        r = self.report
        with Sink(self.sink_port) as sink:
            self.sink = sink
            svc = self._start()
            self.load = Load(self.port, self.plan)
            self.load.start()
            try:
                for n in range(self.plan.rounds):
                    time.sleep(self.rng.uniform(*self.plan.run_between))
                    workers = [c for c in children(svc.proc.pid) if alive(c)]
                    if workers and self.rng.random() < self.plan.worker_kill_share:
                        os.kill(self.rng.choice(workers), signal.SIGKILL)
                        r.worker_kills += 1
                    else:
                        if 0 <= self.plan.snapshot_round <= n and r.snapshot is None:
                            self._snapshot(svc)
                        svc.stop(signal.SIGKILL)
                        r.main_kills += 1
                        for w in workers:  # PR_SET_PDEATHSIG: they follow
                            deadline = time.monotonic() + 10
                            while alive(w) and time.monotonic() < deadline:
                                time.sleep(0.02)
                        svc = self._start()
                    r.rounds += 1
            finally:
                self.load.finish()
            try:
                self._drain(sink)
            finally:
                svc.stop()
        r.seconds = time.monotonic() - started
        return r

    def _delivered(self, sink: Sink) -> tuple[Counter[str], Counter[str], set[str]]:
        local: Counter[str] = Counter()
        remote: Counter[str] = Counter()
        broken: set[str] = set()
        new = self.cfg.mail_dir / "example.test" / "alice" / "Maildir" / "new"
        files = sorted(new.iterdir()) if new.is_dir() else []
        for data in [p.read_bytes() for p in files]:
            mid, ok = check_message(data)
            if mid is None or not ok:
                broken.add(mid or "?")
            if mid:
                local[mid] += 1
        with sink.lock:
            got = list(sink.received)
        for data in got:
            mid, ok = check_message(data)
            if mid is None or not ok:
                broken.add(mid or "?")
            if mid:
                remote[mid] += 1
        return local, remote, broken

    def _missing(self, local: Counter[str], remote: Counter[str]) -> list[str]:
        lost = []
        for mid, rcpts in self.load.acked.items():
            if (LOCAL in rcpts and not local[mid]) or (FORWARD in rcpts and not remote[mid]):
                lost.append(mid)
        return lost

    def _drain(self, sink: Sink) -> None:
        r = self.report
        deadline = time.monotonic() + self.plan.drain_timeout
        while True:
            local, remote, broken = self._delivered(sink)
            lost = self._missing(local, remote)
            if not lost or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        r.attempted = self.load.attempted
        r.acknowledged = len(self.load.acked)
        r.acknowledged_bytes = self.load.acked_bytes
        r.delivered_local = len(local)
        r.delivered_remote = len(remote)
        r.lost = lost
        r.corrupted = sorted(broken)
        r.duplicates_local = sum(n - 1 for n in local.values())
        r.duplicates_remote = sum(n - 1 for n in remote.values())
        r.unacknowledged_delivered = len((set(local) | set(remote)) - set(self.load.acked))


def corrupt_count(db_path: Path) -> int:
    """Messages the queue moved to its ``corrupt`` state (never delivered)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return int(conn.execute(
            "SELECT count(*) FROM messages WHERE state = 'corrupt'").fetchone()[0])
    finally:
        conn.close()


def queue_list(config_path: Path) -> list[dict[str, Any]]:
    import json

    out = subprocess.run([sys.executable, "-m", "postwarden", "-c", str(config_path), "queue",
                          "list", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data: list[dict[str, Any]] = json.loads(out.stdout)
    return data


@dataclass
class SnapshotReport:
    acknowledged_before: int = 0
    found: int = 0
    lost: list[str] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)
    queue_corrupt: int = 0


def verify_snapshot(report: Report, directory: Path, cert_files: tuple[Path, Path],
                    dns_port: int, timeout: float = 120.0) -> SnapshotReport:
    """Start a server on the data directory copied at the kill point and let
    it deliver: every message acknowledged before the copy must arrive (or
    have arrived before it), intact; nothing half-written is delivered."""
    assert report.snapshot is not None
    out = SnapshotReport(acknowledged_before=len(report.snapshot_acked))
    root = directory / "restored"
    root.mkdir()
    subprocess.run(["cp", "-a", str(report.snapshot), str(root / "data")], check=True,
                   timeout=120)
    sink_port, = free_ports(1)
    ports = free_ports(3)
    extra = (f"[checks]\nverify = false\n[queue]\nscan_interval = 1\nretry_min = 1\n"
             f'retry_max = 2\n[transports]\n"sink.example" = "smtp:[127.0.0.1]:{sink_port}"\n')
    path = write_config(root, cert_files, extra, ports=(ports[0], ports[1], ports[2]),
                        dns_port=dns_port)
    cfg = config_mod.load(path)
    new = cfg.mail_dir / "example.test" / "alice" / "Maildir" / "new"
    with Sink(sink_port) as sink:
        svc = Service(path, root / "serve.log")
        try:
            svc.wait_ready(ports[0], timeout=60)
            deadline = time.monotonic() + timeout
            while True:
                local: set[str] = set()
                broken: set[str] = set()
                for p in sorted(new.iterdir()) if new.is_dir() else []:
                    mid, ok = check_message(p.read_bytes())
                    if mid is None or not ok:
                        broken.add(mid or p.name)
                    elif mid:
                        local.add(mid)
                with sink.lock:
                    got = list(sink.received)
                remote = set(report.remote_before_snapshot)
                for data in got:
                    mid, ok = check_message(data)
                    if mid is None or not ok:
                        broken.add(mid or "?")
                    elif mid:
                        remote.add(mid)
                lost = [m for m, rcpts in report.snapshot_acked.items()
                        if (LOCAL in rcpts and m not in local)
                        or (FORWARD in rcpts and m not in remote)]
                if not lost or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            svc.stop()
    out.lost = lost
    out.found = out.acknowledged_before - len(lost)
    out.corrupted = sorted(broken)
    out.queue_corrupt = corrupt_count(cfg.db_path)
    return out
