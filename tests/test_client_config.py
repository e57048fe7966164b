"""``postwarden client-config`` and the [http], [clients] and [relaying]
settings: what a person types into Outlook or Foxmail, and clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from postwarden import cli
from postwarden.onboard.clientconfig import client_settings

INIT = ["--listen-host", "127.0.0.1", "--mx-port", "25", "--submission-port", "587",
        "--submissions-port", "465", "--non-interactive"]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    assert cli.main(["init", "--dir", str(tmp_path), "--domain", "example.org", *INIT]) == 0
    return tmp_path / "postwarden.toml"


def test_client_config_table(site: Path, capsys: Any) -> None:
    capsys.readouterr()
    assert cli.main(["-c", str(site), "client-config", "Postmaster@Example.org"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    rows = {line.split("  ")[0].strip(): line.split() for line in out.splitlines()
            if line.startswith(("Outgoing (", "Incoming ("))}
    assert rows == {
        "Outgoing (SMTP 465)": ["Outgoing", "(SMTP", "465)", "mail.example.org", "465",
                                "SSL/TLS", "normal", "password"],
        "Outgoing (SMTP 587)": ["Outgoing", "(SMTP", "587)", "mail.example.org", "587",
                                "STARTTLS", "normal", "password"]}
    assert "Username: postmaster@example.org" in out
    assert "no IMAP server is configured" in out


def test_client_config_with_imap_and_public_ports(site: Path, capsys: Any) -> None:
    with site.open("a") as f:
        f.write('\n[clients]\nserver = "smtp.example.org"\nsubmission_port = 2587\n'
                'imap_server = "imap.example.org"\nimap_security = "starttls"\n')
    capsys.readouterr()
    assert cli.main(["-c", str(site), "client-config"]) == 0
    out = capsys.readouterr().out
    assert "Incoming (IMAP)        imap.example.org             143   STARTTLS" in out
    assert "Outgoing (SMTP 2587)   smtp.example.org             2587  STARTTLS" in out
    assert "Username: your full email address" in out


def test_unknown_account_warns_and_bad_address_fails(site: Path, capsys: Any) -> None:
    capsys.readouterr()
    assert cli.main(["-c", str(site), "client-config", "bob@example.org"]) == 0
    assert "bob@example.org is not an account here" in capsys.readouterr().err
    assert cli.main(["-c", str(site), "client-config", "not-an-address"]) == 1
    assert "is not an address" in capsys.readouterr().err


def test_settings_follow_the_listeners(site: Path) -> None:
    from postwarden import config

    cfg = config.load(site)
    s = client_settings(cfg, "a@example.org", ports={"submission": 4587})
    assert [(e.port, e.security) for e in s.outgoing] == [(465, "SSL/TLS"), (4587, "STARTTLS")]


@pytest.mark.parametrize("extra,message", [
    ('[http]\nenabled = "yes"\n', "config error: http.enabled: must be true or false"),
    ('[http]\naddress = "nowhere"\n', "config error: http.address: 'nowhere' is not HOST:PORT"),
    ('[http]\nmta_sts_mode = "strict"\n',
     "config error: http.mta_sts_mode: must be one of testing, enforce, none"),
    ('[clients]\nimap_security = "tls"\n',
     "config error: clients.imap_security: must be one of ssl, starttls"),
    ('[clients]\nimap_port = 99999\n', "config error: clients.imap_port: must be a port"),
    ('[clients]\nwebmail = "x"\n', "config error: clients.webmail: unknown key"),
    ('[relaying]\nnetworks = ["10.0.0.0/33"]\n',
     "config error: relaying.networks: '10.0.0.0/33' is not an IP network"),
])
def test_config_errors_name_the_key(site: Path, capsys: Any, extra: str, message: str) -> None:
    with site.open("a") as f:
        f.write("\n" + extra)
    capsys.readouterr()
    assert cli.main(["-c", str(site), "check-config"]) == 1
    assert message in capsys.readouterr().err


def test_public_relay_networks_are_refused_unless_explicitly_allowed(
        tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    from tests.conftest import write_config

    from postwarden import config as config_mod

    path = write_config(tmp_path, cert_files,
                        '[relaying]\nnetworks = ["10.0.0.0/8", "0.0.0.0/0"]\n', dns_port=53)
    with pytest.raises(config_mod.ConfigError,
                       match=r"relaying\.networks: 0\.0\.0\.0/0 .*open relay"):
        config_mod.load(path)
    path = write_config(tmp_path, cert_files,
                        '[relaying]\nnetworks = ["192.0.2.0/24"]\nallow_public = true\n',
                        dns_port=53)
    cfg = config_mod.load(path)
    assert cfg.relay.contains("::ffff:192.0.2.7") and not cfg.relay.contains("198.51.100.1")
    path = write_config(tmp_path, cert_files, '[relaying]\nnetworks = ["10.1.0.0/16"]\n',
                        dns_port=53)
    assert config_mod.load(path).relay.contains("10.1.2.3")
