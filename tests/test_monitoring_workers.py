"""Monitoring with worker processes (``processes = 2``): what a worker
counted appears in the main process's ``/metrics``; an account suspended in
the database is refused by the worker too; ``postwarden status``."""

from __future__ import annotations

import json
import smtplib
import ssl
import subprocess
from pathlib import Path
from typing import Any

import trustme
from tests.conftest import PASSWORD, require_tool, wait_for
from tests.test_monitoring import get, samples, value
from tests.test_service import ALICE, free_ports
from tests.test_workers import Paused, children, log_events, session_pids, start

from postwarden import cli


def test_worker_figures_and_suspensions_reach_every_process(
        tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any, ca: trustme.CA,
        capsys: Any) -> None:
    (admin,) = free_ports(1)
    svc, ports, cfg, log = start(
        tmp_path, cert_files, loopback_dns,
        f'[admin]\nenabled = true\naddress = "127.0.0.1:{admin}"\n'
        "[alerts]\nfilters = false\nmail = false\n[queue]\nscan_interval = 300\n")
    tls = ssl.create_default_context()
    ca.configure_trust(tls)
    try:
        (worker,) = children(svc.proc.pid)
        with Paused(svc.proc.pid), smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as c:
            c.sendmail("s@remote.example", [ALICE], b"Subject: w\r\n\r\nfrom a worker\r\n")
        (accepted,) = wait_for(lambda: log_events(log, "accepted"))
        assert wait_for(lambda: session_pids(log).get(accepted["session"])) == worker

        # Suspended in the database: the worker refuses the account too.
        assert cli.main(["-c", str(cfg.path), "suspend", "add", ALICE]) == 0

        def refused_by_worker() -> bool:
            with smtplib.SMTP("127.0.0.1", ports[1], timeout=10) as c:
                c.starttls(context=tls)
                c.login(ALICE, PASSWORD)
                code, _ = c.mail(ALICE)
                return code == 550
        with Paused(svc.proc.pid):
            assert wait_for(refused_by_worker, timeout=5)

        def scraped() -> dict[Any, float] | None:
            status, body = get(admin, "/metrics")
            found = samples(body.decode()) if status == 200 else {}
            ok = value(found, "postwarden_messages_accepted_total", listener="mx") == 1
            return found if ok else None
        found = wait_for(scraped)
        assert found, get(admin, "/metrics")
        assert value(found, "postwarden_recipients_accepted_total", listener="mx") == 1
        assert value(found, "postwarden_messages_rejected_total", listener="submission",
                     reason="mail", kind="permanent") >= 1
        assert value(found, "postwarden_accounts_suspended") == 1
        promtool = require_tool("promtool")
        check = subprocess.run([promtool, "check", "metrics"], input=get(admin, "/metrics")[1],
                               capture_output=True, timeout=30, check=False)
        assert check.returncode == 0, check.stdout + check.stderr

        capsys.readouterr()
        assert cli.main(["-c", str(cfg.path), "status", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["running"] is True and status["ready"] is True
        assert status["suspended"] == [ALICE]
        assert status["last_hour"]["received"] == 1
        assert cli.main(["-c", str(cfg.path), "status"]) == 0
        out = capsys.readouterr().out
        assert "server: running, ready" in out and f"suspended: {ALICE}" in out
    finally:
        assert svc.stop() == 0
    # Passwords never reach the log; the AUTH user does.
    text = log.read_text()
    assert PASSWORD not in text
    assert any(r.get("user") == ALICE for r in log_events(log, "auth"))
