"""swaks, the SMTP test tool administrators use, against a real server."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from tests.conftest import PASSWORD, ServerThread, maildir_messages, require_tool, wait_for

ALICE = "alice@example.test"


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    exe = require_tool("swaks")
    return subprocess.run([exe, "--timeout", "10", *args], capture_output=True, text=True,
                          timeout=60)


def test_starttls_auth_plain(server: ServerThread, ca_file: Path) -> None:
    r = swaks("--server", f"127.0.0.1:{server.port('submission')}", "--tls",
              "--tls-verify", "--tls-ca-path", str(ca_file), "--tls-sni", "mail.example.test",
              "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", PASSWORD,
              "--from", ALICE, "--to", ALICE, "--header", "Subject: swaks starttls")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "235 2.7.0" in r.stdout and "250 2.0.0 Ok: queued as" in r.stdout
    msgs = wait_for(lambda: maildir_messages(server.cfg, ALICE))
    assert b"Subject: swaks starttls" in msgs[0]


def test_implicit_tls_auth_login(server: ServerThread) -> None:
    r = swaks("--server", f"127.0.0.1:{server.port('submissions')}", "--tlsc",
              "--auth", "LOGIN", "--auth-user", ALICE, "--auth-password", PASSWORD,
              "--from", ALICE, "--to", ALICE)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TLS started" in r.stdout and "235 2.7.0" in r.stdout


def test_pipelining(server: ServerThread) -> None:
    r = swaks("--server", f"127.0.0.1:{server.port('mx')}", "--pipeline",
              "--from", "s@remote.example", "--to", f"{ALICE},nobody@example.test")
    # One recipient is refused: swaks reports partial failure (exit 0 with --pipeline
    # means all commands were answered in order).
    assert "550 5.1.1" in r.stdout
    assert "250 2.0.0 Ok: queued as" in r.stdout
    assert wait_for(lambda: maildir_messages(server.cfg, ALICE))


def test_auth_refused_without_tls(server: ServerThread) -> None:
    r = swaks("--server", f"127.0.0.1:{server.port('submission')}", "--auth", "PLAIN",
              "--auth-user", ALICE, "--auth-password", PASSWORD, "--from", ALICE, "--to", ALICE)
    assert r.returncode != 0
    assert "235" not in r.stdout


@pytest.mark.parametrize("password", ["wrong", ""])
def test_wrong_password(server: ServerThread, password: str) -> None:
    r = swaks("--server", f"127.0.0.1:{server.port('submission')}", "--tls",
              "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", password or "x",
              "--from", ALICE, "--to", ALICE)
    assert r.returncode != 0
    assert "535 5.7.8" in r.stdout
