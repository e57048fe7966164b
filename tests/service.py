"""The real ``postwarden serve`` process for tests: start it on free
loopback ports, wait for its greeting, signal it, read its log, find its
worker processes."""

from __future__ import annotations

import json
import os
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


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Service:
    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postwarden", "-c", str(config_path), "serve"],
            stdout=self.log, stderr=self.log)
        RUNNING.append(self.proc)

    def wait_ready(self, port: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"postwarden exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("postwarden did not become ready")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(20)
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
