"""``postwarden dkim ...`` and ``postwarden dns records|check``.

The commands are registered on a small local parser with
:func:`postwarden.cli_dns.add_parsers`, as ``postwarden.cli`` does, and
``dns check`` asks a :class:`LoopbackDns` (never the real DNS).
"""

from __future__ import annotations

import argparse
import datetime
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rdatatype
import dns.zone
import pytest

from dns_server import LoopbackDns
from postwarden import cli_dns
from postwarden import config as _config
from postwarden.dkim_keys import KeyStore, public_record
from postwarden.storage.sqlite_directory import SqliteDirectory

DOMAIN = "example.test"
HOSTNAME = "mail.example.test"
PUBLIC_IP = "93.184.216.34"


def write_config(directory: Path, dns_port: int = 1, listen: str = PUBLIC_IP) -> Path:
    path = directory / "postwarden.toml"
    path.write_text(f"""
hostname = "{HOSTNAME}"
data_dir = "data"
domains = ["{DOMAIN}"]

[listeners.mx]
address = "{listen}:25"

[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = 2.0
""")
    return path


def run(config_path: Path, *argv: str) -> int:
    """``postwarden -c CONFIG ARGV...`` through a parser that holds only
    this module's commands (the main parser registers them the same way)."""
    parser = argparse.ArgumentParser(prog="postwarden")
    sub = parser.add_subparsers(dest="command", required=True)

    def wrap(handler: Any) -> Any:
        return lambda args: handler(_config.load(config_path, check_files=False), args)

    cli_dns.add_parsers(sub, wrap)
    args = parser.parse_args(list(argv))
    result: int = args.func(args)
    return result


@pytest.fixture
def loopback() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


@pytest.fixture
def cfg_path(tmp_path: Path, loopback: LoopbackDns) -> Path:
    return write_config(tmp_path, loopback.port)


@pytest.fixture
def store(cfg_path: Path) -> KeyStore:
    return KeyStore(cfg_path.parent / "data" / "dkim")


def correct_zone(store: KeyStore) -> dict[str, Any]:
    """What an administrator publishes after reading ``dns records``."""
    zones: dict[str, Any] = {
        DOMAIN: {"MX": [(10, HOSTNAME)],
                 "TXT": ["google-site-verification=abc", "v=spf1 mx -all"]},
        HOSTNAME: {"A": [PUBLIC_IP]},
        f"_dmarc.{DOMAIN}": {"TXT": [f"v=DMARC1; p=none; rua=mailto:postmaster@{DOMAIN}"]},
        f"_mta-sts.{DOMAIN}": {"TXT": ["v=STSv1; id=20261126120000"]},
        f"_smtp._tls.{DOMAIN}": {"TXT": [f"v=TLSRPTv1; rua=mailto:postmaster@{DOMAIN}"]},
    }
    for key in store.active(DOMAIN):
        zones[key.dns_name] = {"TXT": [public_record(key)]}
    return zones


def serve(loopback: LoopbackDns, zones: dict[str, Any]) -> None:
    for name, data in zones.items():
        loopback.set(name, data)


def status_lines(out: str) -> dict[tuple[str, str], str]:
    """``{(kind, name): status}`` from ``dns check`` output."""
    found = {}
    for m in re.finditer(r"^  (\w+)\s+(\S+)(?: \([a-z ]+\))?\s+(\S+)\.", out, re.M):
        found[(m.group(2), m.group(3))] = m.group(1)
    return found


# --- dkim -------------------------------------------------------------------


def test_dkim_commands(cfg_path: Path, store: KeyStore,
                       capsys: pytest.CaptureFixture[str]) -> None:
    assert run(cfg_path, "dkim", "keygen", DOMAIN, "--selector", "s1") == 0
    out = capsys.readouterr().out
    key = store.get(DOMAIN, "s1")
    assert "inactive" in out and "s1._domainkey.example.test. TXT" in out
    assert "postwarden dkim activate example.test s1" in out
    assert run(cfg_path, "dkim", "keygen", DOMAIN, "--selector", "s2",
               "--algorithm", "ed25519", "--activate") == 0
    assert [k.selector for k in store.active(DOMAIN)] == ["s2"]
    assert public_record(store.get(DOMAIN, "s2")) in capsys.readouterr().out

    assert run(cfg_path, "dkim", "activate", DOMAIN, "s1") == 0
    assert run(cfg_path, "dkim", "deactivate", DOMAIN, "s2") == 0
    assert [k.selector for k in store.active(DOMAIN)] == ["s1"]
    capsys.readouterr()
    assert run(cfg_path, "dkim", "list", "--records") == 0
    out = capsys.readouterr().out
    assert re.search(r"example\.test\s+s1\s+rsa\s+active\s+s1\._domainkey\.example\.test", out)
    assert re.search(r"example\.test\s+s2\s+ed25519\s+inactive", out)
    assert public_record(key) in out


def test_dkim_errors_are_one_line(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(cfg_path, "dkim", "activate", DOMAIN, "nope") == 1
    assert capsys.readouterr().err == "postwarden: no DKIM key nope for example.test\n"
    assert run(cfg_path, "dkim", "keygen", "../etc") == 1
    assert "not a valid DNS name" in capsys.readouterr().err
    assert run(cfg_path, "dkim", "keygen", "stranger.test", "--selector", "x") == 0
    assert "warning: stranger.test is not a local domain" in capsys.readouterr().err


# --- dns records --------------------------------------------------------------


def test_records(cfg_path: Path, store: KeyStore, capsys: pytest.CaptureFixture[str]) -> None:
    rsa_key = store.generate(DOMAIN, "pw1", activate=True)
    ed_key = store.generate(DOMAIN, "pw1e", "ed25519", activate=True)
    store.generate(DOMAIN, "pending")  # inactive: not published yet
    assert run(cfg_path, "dns", "records") == 0
    out = capsys.readouterr().out
    for line in [
        "example.test. MX 10 mail.example.test.",
        f"mail.example.test. A {PUBLIC_IP}",
        'example.test. TXT "v=spf1 mx -all"',
        "use \"v=spf1 a:mail.example.test mx -all\"",
        f'pw1e._domainkey.example.test. TXT "{public_record(ed_key)}"',
        '_dmarc.example.test. TXT "v=DMARC1; p=none; rua=mailto:postmaster@example.test"',
        '_smtp._tls.example.test. TXT "v=TLSRPTv1; rua=mailto:postmaster@example.test"',
        "https://mta-sts.example.test/.well-known/mta-sts.txt",
        "version: STSv1", "mode: testing", "mx: mail.example.test", "max_age: 604800",
    ]:
        assert line in out, line
    assert re.search(r'^_mta-sts\.example\.test\. TXT "v=STSv1; id=\d{14}"$', out, re.M)
    # The table has every value whole, the long RSA record included.
    assert re.search(r"^TXT\s+pw1\._domainkey\.example\.test\.\s+" + re.escape(
        public_record(rsa_key)) + "$", out, re.M)
    assert re.search(r"^MX\s+example\.test\.\s+10 mail\.example\.test\.$", out, re.M)
    assert "pending._domainkey" not in out


def test_records_are_a_valid_zone(cfg_path: Path, store: KeyStore,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The zone-file lines load in dnspython's zone parser, and the long
    RSA record comes back whole from its 255-octet pieces."""
    rsa_key = store.generate(DOMAIN, "pw1", activate=True)
    assert run(cfg_path, "dns", "records", DOMAIN) == 0
    out = capsys.readouterr().out
    zone_part = out.split("; table")[0].split("; zone file")[1]
    text = ("$TTL 3600\n"
            "example.test. SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 60\n"
            "example.test. NS ns.example.test.\n" + zone_part)
    zone = dns.zone.from_text(text, origin="example.test.", relativize=False)
    txt = zone.find_rdataset("pw1._domainkey.example.test.", dns.rdatatype.TXT)
    rdata = next(iter(txt))
    assert all(len(s) <= 255 for s in rdata.strings) and len(rdata.strings) > 1
    assert b"".join(rdata.strings).decode() == public_record(rsa_key)
    mx = next(iter(zone.find_rdataset("example.test.", dns.rdatatype.MX)))
    assert (mx.preference, mx.exchange.to_text()) == (10, "mail.example.test.")


def test_records_for_every_local_domain(cfg_path: Path, store: KeyStore,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = cfg_path.parent / "data"
    data.mkdir()
    with SqliteDirectory(data / "postwarden.db", [DOMAIN]) as directory:
        directory.add_domain("second.test")
        directory.add_alias(f"dmarc-reports@{DOMAIN}", ["reports@elsewhere.example"])
    assert run(cfg_path, "dns", "records") == 0
    out = capsys.readouterr().out
    assert "second.test. MX 10 mail.example.test." in out
    # A report address that exists is used; otherwise postmaster.
    assert "rua=mailto:dmarc-reports@example.test" in out
    assert "rua=mailto:postmaster@second.test" in out
    assert "no active key; create one with 'postwarden dkim keygen second.test" in out
    capsys.readouterr()
    assert run(cfg_path, "dns", "records", "second.test") == 0
    out = capsys.readouterr().out
    assert "second.test. MX" in out and "example.test. MX" not in out


def test_records_without_public_address(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, listen="127.0.0.1")
    assert run(path, "dns", "records") == 0
    out = capsys.readouterr().out
    assert "; mail.example.test. A <the public IPv4 address of this server>" in out
    assert not (tmp_path / "data" / "postwarden.db").exists()  # read-only


def test_records_for_a_foreign_domain_is_an_error(cfg_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert run(cfg_path, "dns", "records", "elsewhere.test") == 1
    assert "elsewhere.test is not a local domain" in capsys.readouterr().err


def test_expected_records_mta_sts_id_is_the_time(tmp_path: Path) -> None:
    cfg = _config.load(write_config(tmp_path), check_files=False)
    when = datetime.datetime(2026, 11, 26, 12, 30, 5, tzinfo=datetime.UTC)
    records = cli_dns.expected_records(cfg, DOMAIN, KeyStore(tmp_path / "k"), when)
    sts = [r for r in records if r.kind == "MTA-STS"]
    assert [r.value for r in sts] == ["v=STSv1; id=20261126123005"]
    assert [r.kind for r in records if r.required] == ["MX", "SPF", "DMARC"]  # no key yet


# --- dns check ----------------------------------------------------------------


def test_check_correct_zone(cfg_path: Path, store: KeyStore, loopback: LoopbackDns,
                            capsys: pytest.CaptureFixture[str]) -> None:
    store.generate(DOMAIN, "pw1", activate=True)
    store.generate(DOMAIN, "pw1e", "ed25519", activate=True)
    serve(loopback, correct_zone(store))
    assert run(cfg_path, "dns", "check") == 0
    out = capsys.readouterr().out
    statuses = status_lines(out)
    assert statuses == {
        ("MX", "example.test"): "ok", ("SPF", "example.test"): "ok",
        ("DKIM", "pw1._domainkey.example.test"): "ok",
        ("DKIM", "pw1e._domainkey.example.test"): "ok",
        ("DMARC", "_dmarc.example.test"): "ok", ("A", "mail.example.test"): "ok",
        ("MTA-STS", "_mta-sts.example.test"): "ok",
        ("TLS-RPT", "_smtp._tls.example.test"): "ok"}, out
    assert "all required records" in out
    assert ("pw1._domainkey.example.test", "TXT") in loopback.queries


def test_check_wrong_dkim_key(cfg_path: Path, store: KeyStore, loopback: LoopbackDns,
                              capsys: pytest.CaptureFixture[str]) -> None:
    key = store.generate(DOMAIN, "pw1", activate=True)
    zones = correct_zone(store)
    other = KeyStore(cfg_path.parent / "elsewhere").generate(DOMAIN, "pw1")
    zones[key.dns_name] = {"TXT": [public_record(other)]}
    serve(loopback, zones)
    assert run(cfg_path, "dns", "check", DOMAIN) == 1
    out = capsys.readouterr().out
    assert status_lines(out)[("DKIM", "pw1._domainkey.example.test")] == "wrong"
    assert "not the public half of pw1.rsa.key" in out
    assert f"expected: {public_record(key)}" in out
    assert f"found:    {public_record(other)}" in out
    assert "1 required record(s) not ok: DKIM pw1._domainkey.example.test (wrong)" in out


def test_check_missing_dmarc(cfg_path: Path, store: KeyStore, loopback: LoopbackDns,
                             capsys: pytest.CaptureFixture[str]) -> None:
    store.generate(DOMAIN, "pw1", activate=True)
    zones = correct_zone(store)
    del zones[f"_dmarc.{DOMAIN}"]
    serve(loopback, zones)
    assert run(cfg_path, "dns", "check") == 1
    out = capsys.readouterr().out
    assert status_lines(out)[("DMARC", "_dmarc.example.test")] == "missing"
    assert "expected: v=DMARC1; p=none; rua=mailto:postmaster@example.test" in out
    assert "found:    (nothing)" in out
    assert "DMARC _dmarc.example.test (missing)" in out


def test_check_optional_records_do_not_fail(cfg_path: Path, store: KeyStore,
                                            loopback: LoopbackDns,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    store.generate(DOMAIN, "pw1", activate=True)
    store.generate(DOMAIN, "next")  # rotation: generated, not published yet
    zones = correct_zone(store)
    for name in (f"_mta-sts.{DOMAIN}", f"_smtp._tls.{DOMAIN}", HOSTNAME):
        del zones[name]
    serve(loopback, zones)
    assert run(cfg_path, "dns", "check") == 0
    out = capsys.readouterr().out
    statuses = status_lines(out)
    assert statuses[("MTA-STS", "_mta-sts.example.test")] == "missing"
    assert statuses[("DKIM", "next._domainkey.example.test")] == "missing"
    assert "DKIM (inactive key)" in out
    # Once published, the new selector is ok and can be activated.
    loopback.set("next._domainkey.example.test",
                 {"TXT": [public_record(store.get(DOMAIN, "next"))]})
    assert run(cfg_path, "dns", "check") == 0
    assert status_lines(capsys.readouterr().out)[("DKIM", "next._domainkey.example.test")] \
        == "ok"


@pytest.mark.parametrize(("change", "kind", "status", "words"), [
    ({DOMAIN: {"MX": [(10, "mx.elsewhere.example")], "TXT": ["v=spf1 mx -all"]}},
     "MX", "wrong", "no MX record points at mail.example.test"),
    ({DOMAIN: {"MX": [(10, HOSTNAME)], "TXT": ["v=spf1 mx -all", "v=spf1 -all"]}},
     "SPF", "wrong", "several SPF records"),
    ({DOMAIN: {"MX": [(10, HOSTNAME)], "TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]}},
     "SPF", "wrong", "does not authorise mail.example.test"),
    ({DOMAIN: {"MX": [(10, HOSTNAME)], "TXT": ["v=spf1 +all"]}},
     "SPF", "wrong", "every host"),
    ({DOMAIN: {"MX": [(10, HOSTNAME)]}}, "SPF", "missing", ""),
    ({f"_dmarc.{DOMAIN}": {"TXT": ["v=DMARC1; p=maybe"]}}, "DMARC", "wrong", "p= must be"),
    ({f"_dmarc.{DOMAIN}": "SERVFAIL"}, "DMARC", "error", "DNS server failure"),
])
def test_check_problems(cfg_path: Path, store: KeyStore, loopback: LoopbackDns,
                        capsys: pytest.CaptureFixture[str], change: dict[str, Any],
                        kind: str, status: str, words: str) -> None:
    store.generate(DOMAIN, "pw1", activate=True)
    serve(loopback, {**correct_zone(store), **change})
    assert run(cfg_path, "dns", "check") == 1
    out = capsys.readouterr().out
    name = f"_dmarc.{DOMAIN}" if kind == "DMARC" else DOMAIN
    assert status_lines(out)[(kind, name)] == status, out
    assert words in out


@pytest.mark.parametrize("spf", ["v=spf1 a:mail.example.test -all",
                                 f"v=spf1 ip4:{PUBLIC_IP} -all",
                                 "v=spf1 include:_spf.provider.example ~all"])
def test_check_other_spf_forms(cfg_path: Path, store: KeyStore, loopback: LoopbackDns,
                               capsys: pytest.CaptureFixture[str], spf: str) -> None:
    store.generate(DOMAIN, "pw1", activate=True)
    zones = correct_zone(store)
    zones[DOMAIN] = {"MX": [(10, HOSTNAME)], "TXT": [spf]}
    serve(loopback, zones)
    assert run(cfg_path, "dns", "check") == 0
    out = capsys.readouterr().out
    assert status_lines(out)[("SPF", DOMAIN)] == "ok"
    if "include" in spf:
        assert "not verified" in out


def test_check_without_active_key(cfg_path: Path, store: KeyStore, loopback: LoopbackDns,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    serve(loopback, correct_zone(store))
    assert run(cfg_path, "dns", "check") == 1
    out = capsys.readouterr().out
    assert "no active DKIM key (postwarden dkim keygen example.test --activate)" in out


def test_check_with_an_unreachable_resolver(tmp_path: Path, loopback: LoopbackDns,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, loopback.port)
    loopback.set(DOMAIN, "DROP")
    KeyStore(tmp_path / "data" / "dkim").generate(DOMAIN, "pw1", activate=True)
    assert run(path, "dns", "check") == 1
    out = capsys.readouterr().out
    assert status_lines(out)[("MX", DOMAIN)] == "error"
    assert "DNS timeout" in out
