"""The real ``postwarden serve`` process: restart after SIGKILL, SIGHUP reload."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.conftest import PASSWORD, add_alias, add_user, maildir_messages, wait_for, write_config
from tests.service import ALICE, Service, free_ports, kill_leftovers, setup_config


@pytest.fixture(autouse=True)
def _no_leftover_servers() -> Iterator[None]:
    yield
    kill_leftovers()


def test_queued_mail_survives_sigkill(tmp_path: Path, cert_files: tuple[Path, Path],
                                      loopback_dns: Any) -> None:
    # First life: accept only (no delivery workers), so nothing leaves the queue.
    path, ports, cfg = setup_config(tmp_path, cert_files, loopback_dns, "[queue]\nworkers = 0\n")
    add_user(cfg, ALICE)
    svc = Service(path, tmp_path / "serve.log")
    svc.wait_ready(ports[0])
    count = 25
    client = smtplib.SMTP("127.0.0.1", ports[0], timeout=10)
    for i in range(count):
        client.sendmail("s@remote.example", [ALICE],
                        f"Subject: message {i}\r\n\r\nbody {i}\r\n".encode())
    svc.stop(signal.SIGKILL)
    assert maildir_messages(cfg, ALICE) == []

    # Second life: the same data directory, with delivery.
    path.write_text(path.read_text().replace("workers = 0", "workers = 4"))
    svc = Service(path, tmp_path / "serve.log")
    svc.wait_ready(ports[0])
    msgs = wait_for(lambda: len(maildir_messages(cfg, ALICE)) >= count and
                    maildir_messages(cfg, ALICE), timeout=30)
    assert svc.stop() == 0
    subjects = sorted(m.split(b"Subject: ")[1].split(b"\n")[0] for m in msgs)
    assert subjects == sorted(f"message {i}".encode() for i in range(count))


def test_sighup_reloads_certificate_without_dropping_sessions(
        tmp_path: Path, cert_files: tuple[Path, Path], ca: trustme.CA, loopback_dns: Any
) -> None:
    cert_dir = tmp_path / "tls"
    cert_dir.mkdir()
    cert, key = cert_dir / "cert.pem", cert_dir / "key.pem"
    cert.write_bytes(cert_files[0].read_bytes())
    key.write_bytes(cert_files[1].read_bytes())
    key.chmod(0o600)
    path, ports, cfg = setup_config(tmp_path, (cert, key), loopback_dns)
    add_user(cfg, ALICE)
    svc = Service(path, tmp_path / "serve.log")
    try:
        svc.wait_ready(ports[1])
        old_ctx = ssl.create_default_context()
        ca.configure_trust(old_ctx)
        session = smtplib.SMTP("127.0.0.1", ports[1], timeout=10)
        session.ehlo("laptop")
        session.starttls(context=old_ctx)
        session.login(ALICE, PASSWORD)

        new_ca = trustme.CA()
        issued = new_ca.issue_cert("mail.example.test", "127.0.0.1")
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        svc.proc.send_signal(signal.SIGHUP)

        new_ctx = ssl.create_default_context()
        new_ca.configure_trust(new_ctx)

        def handshake_with_new_cert() -> bool:
            c = smtplib.SMTP("127.0.0.1", ports[1], timeout=10)
            c.ehlo("x")
            try:
                c.starttls(context=new_ctx)
            except ssl.SSLError:
                return False
            c.quit()
            return True

        assert wait_for(handshake_with_new_cert, timeout=10)
        # The session opened before the reload goes on.
        assert session.noop()[0] == 250
        session.sendmail(ALICE, [ALICE], b"Subject: after reload\r\n\r\nx\r\n")
        session.quit()
    finally:
        assert svc.stop() == 0
    events = [json.loads(line).get("event")
              for line in (tmp_path / "serve.log").read_text().splitlines()
              if line.startswith("{")]
    assert "tls_reloaded" in events


def test_serve_reports_port_in_use(tmp_path: Path, cert_files: tuple[Path, Path],
                                   loopback_dns: Any) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    path = write_config(tmp_path, cert_files, ports=(port, 0, 0), dns_port=loopback_dns.port)
    r = subprocess.run([sys.executable, "-m", "postwarden", "-c", str(path), "serve"],
                       capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    blocker.close()
    assert r.returncode == 1
    assert "listeners.mx.address" in r.stderr and "Traceback" not in r.stderr


class SlowSink:
    """An aiosmtpd handler that takes ``delay`` seconds to accept DATA."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.started = threading.Event()
        self.received: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.started.set()
        await asyncio.sleep(self.delay)
        self.received.append(envelope.content)
        return "250 2.0.0 Ok: sunk"


def _submit_remote(port: int) -> None:
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    client.sendmail("s@remote.example", ["fwd@example.test"],
                    b"Subject: in flight\r\n\r\nx\r\n")
    client.quit()


def _queued(path: Path) -> list[dict[str, Any]]:
    r = subprocess.run([sys.executable, "-m", "postwarden", "-c", str(path), "queue", "list",
                        "--json"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    data: list[dict[str, Any]] = json.loads(r.stdout)
    return data


@pytest.mark.parametrize(("delay", "finishes"), [(1.5, True), (6.0, False)])
def test_sigterm_lets_deliveries_finish_or_keeps_them_queued(
        tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any, delay: float,
        finishes: bool) -> None:
    from aiosmtpd.controller import Controller

    sink_port = free_ports(1)[0]
    extra = (f'[queue]\nshutdown_timeout = 3\n[transports]\n'
             f'"slow.example" = "smtp:[127.0.0.1]:{sink_port}"\n')
    path, ports, cfg = setup_config(tmp_path, cert_files, loopback_dns, extra)
    add_user(cfg, ALICE)
    add_alias(cfg, "fwd@example.test", "friend@slow.example")  # forwarded off-site
    sink = SlowSink(delay)
    controller = Controller(sink, hostname="127.0.0.1", port=sink_port)
    controller.start()
    try:
        svc = Service(path, tmp_path / "serve.log")
        svc.wait_ready(ports[0])
        _submit_remote(ports[0])
        assert sink.started.wait(15), "delivery did not start"
        started = time.monotonic()
        assert svc.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 10
        if finishes:
            assert len(sink.received) == 1
            assert _queued(path) == []
        else:
            # Cut off by the shutdown timeout before the peer's 250: still
            # queued, and delivered again after the restart (at least once;
            # the peer may have kept the first copy, RFC 1047).
            assert [m["recipients"][0]["address"] for m in _queued(path)] == [
                "friend@slow.example"]
            sink.delay = 0
            before = len(sink.received)
            svc = Service(path, tmp_path / "serve.log")
            svc.wait_ready(ports[0])
            assert wait_for(lambda: len(sink.received) > before, timeout=15)
            assert wait_for(lambda: _queued(path) == [], timeout=15)
            assert svc.stop() == 0
    finally:
        controller.stop()
