"""Interactive ``postwarden init`` driven through a pseudo-terminal: the
questions, their defaults, ports in use, the certificate it finds or makes,
and a config that ``check-config`` accepts and that serves mail."""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pexpect
import pytest
import trustme
from tests.conftest import ServerThread, maildir_messages, wait_for, write_cert
from tests.test_service import free_ports

from postwarden import config as config_mod
from postwarden import sendtest

SCRIPT = Path(sys.executable).parent / "postwarden"


def spawn(*args: str) -> pexpect.spawn:
    if not SCRIPT.exists():
        pytest.skip(f"console script {SCRIPT} not installed (pip install -e .)")
    return pexpect.spawn(str(SCRIPT), ["init", *args], encoding="utf-8", timeout=60,
                         dimensions=(50, 200))


def finish(child: pexpect.spawn) -> str:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return str(child.before)


def test_interactive_init_serves_mail(tmp_path: Path, loopback_dns: Any) -> None:
    site = tmp_path / "site"
    mx, sub, subs = free_ports(3)
    busy = socket.socket()
    busy.bind(("127.0.0.1", mx))
    busy.listen(1)  # another program holds the mx port
    try:
        child = spawn("--dir", str(site), "--listen-host", "127.0.0.1", "--mx-port", str(mx),
                      "--submission-port", str(sub), "--submissions-port", str(subs),
                      "--letsencrypt-dir", str(tmp_path / "no-letsencrypt"))
        child.expect(r"Mail domain\(s\).*\[[^\]]*\]: ")
        child.sendline("example.test, Other.TEST")
        child.expect(r"host name.*\[mail\.example\.test\]: ")
        child.sendline("")  # the default
        child.expect(r"First account.*\[postmaster@example\.test\]: ")
        child.sendline("alice@elsewhere.test")  # not one of the domains: asked again
        child.expect("must be one of example.test, other.test")
        child.expect(r"\[postmaster@example\.test\]: ")
        child.sendline("alice@example.test")
        child.expect(f"port {mx} \\(mx\\) is already in use")
        child.expect(r"instead \(yes\).*\[yes\]: ")
        child.sendline("")
        out = finish(child)
    finally:
        busy.close()

    assert "SELF-SIGNED" in out
    password = re.search(r"Password for alice@example.test.*?\n\s*\n\s+(\S+)", out, re.S)
    assert password is not None, out
    # The closing: DNS records and client settings.
    assert "example.test. MX 10 mail.example.test." in out
    assert "other.test. MX 10 mail.example.test." in out
    assert "_submissions._tcp.example.test." in out
    assert re.search(rf"Outgoing \(SMTP {subs}\)\s+mail\.example\.test\s+{subs}\s+SSL/TLS", out)
    assert "Username: alice@example.test" in out

    path = site / "postwarden.toml"
    check = subprocess.run([str(SCRIPT), "-c", str(path), "check-config"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    cfg = config_mod.load(path)
    assert cfg.domains == ("example.test", "other.test")
    ports = {lst.name: lst.port for lst in cfg.listeners}
    assert ports["mx"] != mx and ports["submission"] == sub and ports["submissions"] == subs
    assert (cfg.data_dir / "dkim" / "other.test").is_dir()

    # Serve: tests resolve through the loopback DNS server only.
    with path.open("a") as f:
        f.write(f'\n[dns]\nnameservers = ["127.0.0.1:{loopback_dns.port}"]\ntimeout = 1.0\n')
    cfg = config_mod.load(path)
    st = ServerThread(cfg).start()
    try:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = ("alice@example.test", "postmaster@other.test",
                                                  "hello")
        msg.set_content("first mail\n")
        with smtplib.SMTP("127.0.0.1", st.port("submission"), timeout=30) as smtp:
            smtp.starttls(context=sendtest.tls_context(cfg))
            smtp.login("alice@example.test", password.group(1))
            smtp.send_message(msg)
        # postmaster@other.test is an alias of the first account.
        got = wait_for(lambda: maildir_messages(cfg, "alice@example.test"))
        assert got and b"first mail" in got[0]
    finally:
        st.stop()


def test_interactive_init_uses_a_letsencrypt_certificate(tmp_path: Path, ca: trustme.CA
                                                         ) -> None:
    live = tmp_path / "live"
    host_dir = live / "mx.example.net"
    host_dir.mkdir(parents=True)
    cert, key = write_cert(ca, host_dir, "mx.example.net")
    cert.rename(host_dir / "fullchain.pem")
    key.rename(host_dir / "privkey.pem")
    site = tmp_path / "site"
    child = spawn("--dir", str(site), "--domain", "example.net", "--listen-host", "127.0.0.1",
                  "--mx-port", "0", "--submission-port", "0", "--submissions-port", "0",
                  "--letsencrypt-dir", str(live))
    child.expect(r"\[example\.net\]: ")  # --domain became the default
    child.sendline("")
    child.expect(r"\[mail\.example\.net\]: ")
    child.sendline("mx.example.net")
    child.expect(r"\[postmaster@example\.net\]: ")
    child.sendline("")
    out = finish(child)
    assert "using the Let's Encrypt certificate" in out and "SELF-SIGNED" not in out
    cfg = config_mod.load(site / "postwarden.toml")
    assert cfg.tls.cert == host_dir / "fullchain.pem"
    assert cfg.tls.key == host_dir / "privkey.pem"
    assert not (site / "tls").exists()


def test_end_of_input_cancels_cleanly(tmp_path: Path) -> None:
    child = spawn("--dir", str(tmp_path / "site"))
    child.expect(r"Mail domain\(s\).*: ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert "init cancelled" in str(child.before) and "Traceback" not in str(child.before)
    assert not (tmp_path / "site" / "postwarden.toml").exists()


def test_without_a_terminal_domain_is_required(tmp_path: Path) -> None:
    proc = subprocess.run([str(SCRIPT), "init", "--dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "--domain is required" in proc.stderr


