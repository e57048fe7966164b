"""``postwarden doctor`` against a running server: a correct setup is all
ok; a broken one (expired certificate, missing DKIM record, open relay by
a bad [relaying] config) has each problem reported, and exit status 1."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.conftest import DOMAIN, HOSTNAME, ServerThread, write_config
from tests.test_service import free_ports

from postwarden import bootstrap, cli, dkim_keys

DNSBL = '[dnsbl]\nzones = [{ zone = "bl.test", weight = 3 }]\n'


@pytest.fixture
def published(loopback_dns: Any) -> Iterator[Callable[[Path, bool], None]]:
    """Publish the records of a correct setup (``dkim``: with the DKIM key)."""
    names: list[str] = []

    def publish(data_dir: Path, dkim: bool = True) -> None:
        zones: dict[str, Any] = {
            DOMAIN: {"MX": [(10, HOSTNAME)], "TXT": ["v=spf1 mx -all"]},
            HOSTNAME: {"A": ["127.0.0.1"]},
            f"_dmarc.{DOMAIN}": {"TXT": [f"v=DMARC1; p=none; rua=mailto:postmaster@{DOMAIN}"]},
            f"_mta-sts.{DOMAIN}": {"TXT": ["v=STSv1; id=20260101"]},
            f"_smtp._tls.{DOMAIN}": {"TXT": [f"v=TLSRPTv1; rua=mailto:postmaster@{DOMAIN}"]},
            "1.0.0.127.in-addr.arpa": {"PTR": [HOSTNAME]},
        }
        (key,) = bootstrap.init_dkim(data_dir, DOMAIN)
        if dkim:
            zones[key.dns_name] = {"TXT": [dkim_keys.public_record(key)]}
        for name, data in zones.items():
            loopback_dns.set(name, data)
            names.append(name)

    yield publish
    for name in names:
        loopback_dns.remove(name)


def doctor(st: ServerThread, capsys: Any) -> tuple[int, str]:
    capsys.readouterr()
    status = cli.main(["-c", str(st.cfg.path), "doctor", "--timeout", "2"])
    return status, capsys.readouterr().out


def lines_with(out: str, status: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.strip().startswith(status + " ")]


def test_correct_setup_is_all_ok(make_server: Callable[..., ServerThread],
                                 published: Callable[[Path, bool], None], capsys: Any) -> None:
    st = make_server(DNSBL, ports=tuple(free_ports(3)))
    published(st.cfg.data_dir, True)
    status, out = doctor(st, capsys)
    assert status == 0, out
    assert not lines_with(out, "FAIL") and not lines_with(out, "warn"), out
    for name in ("config", "database", "listener mx", "listener submission",
                 "listener submissions", "certificate", "certificate name", "dns example.test",
                 "reverse dns", "relay test", "blocklists", "queue"):
        assert any(ln.split(None, 1)[1].startswith(name) for ln in lines_with(out, "ok")), (
            name, out)
    assert "127.0.0.1 -> mail.example.test -> 127.0.0.1" in out
    assert "all checks passed" in out


def test_broken_setup_reports_each_problem(
        make_server: Callable[..., ServerThread], published: Callable[[Path, bool], None],
        ca: trustme.CA, tmp_path: Path, capsys: Any) -> None:
    expired_dir = tmp_path / "expired"
    expired_dir.mkdir()
    now = datetime.datetime.now(datetime.UTC)
    issued = ca.issue_cert(HOSTNAME, "localhost", "127.0.0.1",
                           not_before=now - datetime.timedelta(days=100),
                           not_after=now - datetime.timedelta(days=1))
    cert, key = expired_dir / "cert.pem", expired_dir / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    # An expired certificate, and an open relay by a bad [relaying] config.
    st = make_server(DNSBL + '[relaying]\nnetworks = ["0.0.0.0/0"]\nallow_public = true\n',
                     ports=tuple(free_ports(3)))
    text = st.cfg.path.read_text()
    st.cfg.path.write_text(text.replace(str(st.cfg.tls.cert), str(cert))
                           .replace(str(st.cfg.tls.key), str(key)))
    published(st.cfg.data_dir, False)  # no DKIM record
    status, out = doctor(st, capsys)
    assert status == 1, out
    fails = "\n".join(lines_with(out, "FAIL"))
    assert "certificate" in fails and "expired on" in fails
    assert "dns DKIM" in fails and "missing" in fails
    assert "open relay" in fails and "0.0.0.0/0" in fails
    assert "OPEN RELAY" in fails and "<victim@relay-test.invalid>" in fails
    # The running server still presents the old (valid) certificate file.
    assert "another certificate than the file" in out
    assert "fix: " in out and "problem(s) to fix" in out


def test_nothing_running_fails_listeners_and_blocklisting(
        tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any,
        published: Callable[[Path, bool], None], capsys: Any) -> None:
    path = write_config(tmp_path, cert_files, DNSBL, ports=tuple(free_ports(3)),
                        dns_port=loopback_dns.port)
    published(tmp_path / "data", True)
    loopback_dns.set("1.0.0.127.bl.test", {"A": ["127.0.0.2"]})
    try:
        capsys.readouterr()
        status = cli.main(["-c", str(path), "doctor", "--timeout", "2"])
        out = capsys.readouterr().out
    finally:
        loopback_dns.remove("1.0.0.127.bl.test")
    assert status == 1
    fails = "\n".join(lines_with(out, "FAIL"))
    assert "listener mx" in fails and "no connection" in fails
    assert "listed on bl.test" in fails
    assert "relay test" in out  # could not run: a warning, not a crash
