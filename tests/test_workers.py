"""``postwarden serve`` with worker processes (``processes = N``): every
process accepts on the same listeners, the main process delivers what the
workers queued, and the workers live and die with it."""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.conftest import PASSWORD, add_user, maildir_messages, wait_for
from tests.service import ALICE, Service, alive, children, log_events, setup_config, with_top

from postwarden import config as config_mod
from postwarden.workers import process_count


def start(tmp_path: Path, cert_files: tuple[Path, Path], dns: Any, extra: str = ""
          ) -> tuple[Service, list[int], config_mod.Config, Path]:
    path, ports, _ = setup_config(tmp_path, cert_files, dns, extra)
    cfg = config_mod.load(with_top(path, "processes = 2"))
    add_user(cfg, ALICE)
    log = tmp_path / "serve.log"
    svc = Service(path, log)
    svc.wait_ready(ports[0])
    assert wait_for(lambda: len(log_events(log, "ready")) == 2, timeout=20), log.read_text()
    return svc, ports, cfg, log


class Paused:
    """The main process stopped (SIGSTOP) for a while: connections go to the
    worker, once it sees that the main process takes none (smtp/steering.py:
    an idle main process is left every new connection)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def __exit__(self, *exc: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


def greet(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = s.recv(100)
    assert greeting.startswith(b"220"), greeting
    return s


def session_pids(log: Path) -> dict[str, int]:
    return {r["session"]: r["pid"] for r in log_events(log, "connect")}


def test_every_process_accepts_and_the_main_one_delivers(
        tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any) -> None:
    # Deliveries start only when the runner is woken or scans (every 300 s
    # here): mail that a worker queued arrives because the worker told the
    # main process.
    svc, ports, cfg, log = start(tmp_path, cert_files, loopback_dns,
                                 "[queue]\nscan_interval = 300\n")
    try:
        (worker,) = children(svc.proc.pid)
        with Paused(svc.proc.pid), smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as client:
            client.sendmail("s@remote.example", [ALICE], b"Subject: one\r\n\r\nx\r\n")
        # (Log lines are written within 50 ms.)
        (accepted,) = wait_for(lambda: log_events(log, "accepted"))
        assert wait_for(lambda: session_pids(log).get(accepted["session"])) == worker
        # The main process, running again, hears of it and delivers now.
        assert wait_for(lambda: maildir_messages(cfg, ALICE), timeout=10)
        with smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as client:
            client.sendmail("s@remote.example", [ALICE], b"Subject: two\r\n\r\nx\r\n")
        assert wait_for(lambda: set(session_pids(log).values()) == {svc.proc.pid, worker})
        assert wait_for(lambda: len(maildir_messages(cfg, ALICE)) == 2, timeout=10)
    finally:
        assert svc.stop() == 0


def test_a_dead_worker_is_replaced_and_sigterm_stops_all(
        tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any) -> None:
    svc, ports, _cfg, log = start(tmp_path, cert_files, loopback_dns)
    (worker,) = children(svc.proc.pid)
    os.kill(worker, signal.SIGKILL)
    assert wait_for(lambda: [c for c in children(svc.proc.pid) if c != worker], timeout=15)
    (fresh,) = wait_for(lambda: len(log_events(log, "ready")) == 3
                        and children(svc.proc.pid), timeout=20)
    assert fresh != worker
    assert log_events(log, "worker_died")[0]["pid"] == worker
    with smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as client:
        assert client.noop()[0] == 250
    assert svc.stop() == 0
    assert wait_for(lambda: not alive(fresh), timeout=10)


def test_workers_exit_when_the_main_process_dies(
        tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any) -> None:
    svc, ports, _cfg, _log = start(tmp_path, cert_files, loopback_dns)
    (worker,) = children(svc.proc.pid)
    svc.stop(signal.SIGKILL)
    # Orphaned, it stops accepting on the inherited sockets and exits.
    assert wait_for(lambda: not alive(worker), timeout=10)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ports[0]), timeout=2).recv(100)


def test_sighup_reloads_the_certificate_in_every_process(
        tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any) -> None:
    cert_dir = tmp_path / "tls"
    cert_dir.mkdir()
    cert, key = cert_dir / "cert.pem", cert_dir / "key.pem"
    cert.write_bytes(cert_files[0].read_bytes())
    key.write_bytes(cert_files[1].read_bytes())
    key.chmod(0o600)
    svc, ports, _cfg, log = start(tmp_path, (cert, key), loopback_dns)
    try:
        new_ca = trustme.CA()
        issued = new_ca.issue_cert("mail.example.test", "127.0.0.1")
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        svc.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: len(log_events(log, "tls_reloaded")) == 2, timeout=10)
        ctx = ssl.create_default_context()
        new_ca.configure_trust(ctx)
        # Whichever process takes the connection serves the new certificate.
        (worker,) = children(svc.proc.pid)
        for paused in (False, True):
            with contextlib.ExitStack() as stack:
                if paused:
                    stack.enter_context(Paused(svc.proc.pid))
                with smtplib.SMTP("127.0.0.1", ports[1], timeout=10) as client:
                    client.starttls(context=ctx)
                    client.login(ALICE, PASSWORD)
        assert set(session_pids(log).values()) == {svc.proc.pid, worker}
    finally:
        assert svc.stop() == 0


def test_an_idle_main_process_serves_one_client_alone_and_shares_when_busy(
        tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any) -> None:
    # One client's sessions one after another stay in one process (its
    # caches warm), however many processes there are.
    svc, ports, _cfg, log = start(tmp_path, cert_files, loopback_dns)
    try:
        (worker,) = children(svc.proc.pid)
        probes = set(session_pids(log))  # the start-up's readiness probes

        def pids() -> list[int]:
            return [pid for session, pid in session_pids(log).items() if session not in probes]

        for _ in range(30):  # (no mail: a delivery would count as load too)
            with smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as client:
                assert client.noop()[0] == 250
        assert wait_for(lambda: len(pids()) == 30)
        assert set(pids()) == {svc.proc.pid}
        # With sessions open in the main process, new ones are shared.
        held = [greet(ports[0]) for _ in range(2)]
        for _ in range(40):
            held.append(greet(ports[0]))
            if wait_for(lambda: worker in pids(), timeout=0.2):
                break
        assert worker in pids()
        for s in held:
            s.close()
    finally:
        assert svc.stop() == 0


def test_connection_limits_hold_for_all_processes_together(
        tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any) -> None:
    # 6 connections per client network for the whole server, wherever the
    # kernel hands them; the 7th gets 421 from whichever process took it.
    svc, ports, _cfg, log = start(tmp_path, cert_files, loopback_dns,
                                  "[connections]\nmax_per_ip = 6\n")
    held: list[socket.socket] = []
    try:
        with Paused(svc.proc.pid):
            held += [greet(ports[0]) for _ in range(3)]  # in the worker
        held += [greet(ports[0]) for _ in range(3)]  # in the main process
        assert wait_for(lambda: len(set(session_pids(log).values())) == 2)
        for _ in range(3):
            extra = socket.create_connection(("127.0.0.1", ports[0]), timeout=10)
            assert extra.recv(100).startswith(b"421 4.7.0 Too many connections from your")
            extra.close()
        held.pop(0).close()  # one leaves: there is room for one more
        assert wait_for(lambda: _greets(ports[0], held), timeout=10)
    finally:
        for s in held:
            s.close()
        assert svc.stop() == 0


def _greets(port: int, held: list[socket.socket]) -> bool:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if s.recv(100).startswith(b"220"):
        held.append(s)
        return True
    s.close()
    return False


def test_processes_setting(tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    from tests.conftest import write_config

    assert process_count(0) == len(os.sched_getaffinity(0))
    assert process_count(3) == 3
    for bad in ('"many"', "0", "65", "1.5", "true"):
        path = with_top(write_config(tmp_path, cert_files, dns_port=53), f"processes = {bad}")
        with pytest.raises(config_mod.ConfigError, match="processes"):
            config_mod.load(path)
    path = with_top(write_config(tmp_path, cert_files, dns_port=53), 'processes = "auto"')
    assert config_mod.load(path).processes == 0


def test_the_web_listener_runs_in_the_main_process_only(
        tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any) -> None:
    import urllib.request

    from tests.service import free_ports

    (http_port,) = free_ports(1)
    svc, _ports, _cfg, log = start(
        tmp_path, cert_files, loopback_dns,
        f'[http]\nenabled = true\naddress = "127.0.0.1:{http_port}"\n')
    try:
        url = f"http://127.0.0.1:{http_port}/.well-known/mta-sts.txt"
        req = urllib.request.Request(url, headers={"Host": "mta-sts.example.test"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
            assert b"version: STSv1" in resp.read()
        assert [r.get("worker") for r in log_events(log, "ready")] == [None, 1]
    finally:
        assert svc.stop() == 0


def test_a_worker_that_keeps_failing_is_restarted_ever_more_slowly(
        tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any) -> None:
    svc, ports, cfg, log = start(tmp_path, cert_files, loopback_dns)
    try:
        good = cfg.path.read_text()
        cfg.path.write_text(good + "\nthis is not TOML\n")  # a new worker cannot start
        (worker,) = children(svc.proc.pid)
        os.kill(worker, signal.SIGKILL)
        assert wait_for(lambda: len(log_events(log, "worker_died")) >= 3, timeout=15)
        delays = [r["restart_in"] for r in log_events(log, "worker_died")][:3]
        assert delays == [1.0, 2.0, 4.0]
        with smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as client:
            assert client.noop()[0] == 250  # the main process serves meanwhile
        cfg.path.write_text(good)
        assert wait_for(lambda: len(log_events(log, "ready")) == 3, timeout=15)
    finally:
        assert svc.stop() == 0
