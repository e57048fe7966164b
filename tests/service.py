"""The real ``postwarden serve`` process for tests: start it on free
loopback ports, wait for its greeting, signal it, read its log, find its
worker processes."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import write_config

from postwarden import config as config_mod

ALICE = "alice@example.test"

# Every server started here, so that a failed test's fixture can kill them.
RUNNING: list[subprocess.Popen[bytes]] = []


def kill_leftovers() -> None:
    """A failed assertion must not leave a server running."""
    while RUNNING:
        proc = RUNNING.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 for a server started later.

    Taken below the kernel's ephemeral range: a port the kernel hands out
    for binding to port 0 can be handed out again, before the server binds
    it, as the local port of some client connection (to PostgreSQL, say),
    and the server then fails with "Address already in use"."""
    low = _ephemeral_low()
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(10000, low) if low > 11000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in ports:
            ports.append(port)
    return ports


class Service:
    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postwarden", "-c", str(config_path), "serve"],
            stdout=self.log, stderr=self.log)
        RUNNING.append(self.proc)

    def wait_ready(self, port: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.flush()
                tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
                raise AssertionError(f"postwarden exited with {self.proc.returncode}:\n"
                                     + "\n".join(tail))
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("postwarden did not become ready")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the main process and wait for it, and for its workers:
        after a SIGKILL they get SIGTERM from the kernel and exit on their
        own, and until they have, they hold the listening sockets (a new
        server on the same ports would fail to bind)."""
        workers = children(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(20)
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.log.close()
        return code


def setup_config(directory: Path, cert_files: tuple[Path, Path], dns: Any, extra: str = ""
                 ) -> tuple[Path, list[int], config_mod.Config]:
    ports = free_ports(3)
    path = write_config(directory, cert_files, extra, ports=(ports[0], ports[1], ports[2]),
                        dns_port=dns.port)
    cfg = config_mod.load(path)
    return path, ports, cfg


def with_top(path: Path, line: str) -> Path:
    """Put a top-level key before the config's tables."""
    path.write_text(line + "\n" + path.read_text())
    return path


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by SIGKILL
                continue
            if record.get("event") == event:
                out.append(record)
    return out


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return status != "Z"
