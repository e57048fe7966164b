"""The postwarden command line, in process and as the installed console script."""

from __future__ import annotations

import io
import re
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from postwarden import cli, config
from postwarden.auth import passwords
from postwarden.storage.sqlite_directory import SqliteDirectory

SCRIPT = Path(sys.executable).parent / "postwarden"


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run the installed console script (a real process, as an admin would)."""
    if not SCRIPT.exists():
        pytest.skip(f"console script {SCRIPT} not installed (pip install -e .)")
    return subprocess.run([str(SCRIPT), *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


def init(tmp_path: Path, *extra: str) -> Path:
    """A set-up directory (in process, fast); returns the config path."""
    assert cli.main(["init", "--dir", str(tmp_path), "--domain", "example.org",
                     "--listen-host", "127.0.0.1", "--mx-port", "0", "--submission-port",
                     "0", "--submissions-port", "0", *extra]) == 0
    return tmp_path / "postwarden.toml"


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- init and check-config ------------------------------------------------


def test_init_then_check_config(tmp_path: Path) -> None:
    target = tmp_path / "site"
    proc = run("init", "--dir", str(target), "--domain", "Example.ORG", "--non-interactive",
               "--mx-port", "2525")
    assert proc.returncode == 0, proc.stderr
    cfg_path = target / "postwarden.toml"

    # The written config passes load() (including the key permission check).
    cfg = config.load(cfg_path)
    assert cfg.hostname == "mail.example.org"
    assert cfg.domains == ("example.org",)
    assert cfg.data_dir == target.resolve() / "data"
    assert tomllib.loads(cfg_path.read_text())["data_dir"] == "data"
    assert [(lst.name, lst.host, lst.port) for lst in cfg.listeners] == [
        ("mx", "127.0.0.1", 2525), ("submission", "127.0.0.1", 587),
        ("submissions", "127.0.0.1", 465)]
    assert cfg.tls.key is not None and cfg.tls.cert is not None
    assert cfg.tls.key.stat().st_mode & 0o777 == 0o600
    assert cfg.data_dir.stat().st_mode & 0o777 == 0o700

    # The password is printed exactly once, and it is the account's password.
    found = re.findall(r"^    (\S{20})$", proc.stdout, re.MULTILINE)
    assert len(found) == 1, proc.stdout
    password = found[0]
    assert proc.stdout.count(password) == 1
    assert "postmaster@example.org" in proc.stdout
    with SqliteDirectory(cfg.db_path, cfg.domains) as d:
        acc = d.find_account("postmaster@example.org")
    assert acc is not None
    assert passwords.verify_password(acc.password_hash, password)
    assert password not in cfg_path.read_text()

    check = run("-c", str(cfg_path), "check-config")
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith(f"config OK: {cfg_path}\n")
    assert "submissions  127.0.0.1:465" in check.stdout
    assert "domains: example.org" in check.stdout


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    cfg_path = init(tmp_path)
    before = cfg_path.read_text()
    proc = run("init", "--dir", str(tmp_path), "--domain", "other.org")
    assert proc.returncode == 1
    no_traceback(proc)
    assert "already exists" in proc.stderr and "--force" in proc.stderr
    assert cfg_path.read_text() == before


def test_init_force_keeps_existing_account(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    init(tmp_path)
    capsys.readouterr()
    init(tmp_path, "--force")
    out = capsys.readouterr().out
    assert "postmaster@example.org already exists; password unchanged" in out
    assert "shown only this once" not in out
    assert config.load(tmp_path / "postwarden.toml").hostname == "mail.example.org"


def test_init_ipv6_listen_host(tmp_path: Path) -> None:
    assert cli.main(["init", "--dir", str(tmp_path), "--domain", "example.org",
                     "--hostname", "smtp.example.org", "--listen-host", "::1"]) == 0
    cfg = config.load(tmp_path / "postwarden.toml")
    assert cfg.hostname == "smtp.example.org"
    assert {(lst.host, lst.port) for lst in cfg.listeners} == {
        ("::1", 25), ("::1", 587), ("::1", 465)}
    assert '"[::1]:25"' in (tmp_path / "postwarden.toml").read_text()


def test_generated_certificate_verifies(tmp_path: Path) -> None:
    """A client that trusts cert.pem completes a TLS handshake for the hostname."""
    cfg = config.load(init(tmp_path))
    assert cfg.tls.cert is not None and cfg.tls.key is not None
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cfg.tls.cert, cfg.tls.key)
    for name in ("mail.example.org", "localhost", "127.0.0.1"):
        client_ctx = ssl.create_default_context(cafile=str(cfg.tls.cert))
        client_ctx.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
        _handshake(client_ctx, server_ctx, name)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ssl.create_default_context(cafile=str(cfg.tls.cert)), server_ctx,
                   "other.example.org")


def _handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, name: str) -> None:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


# --- config errors: one line, names the key, exit 1 -----------------------


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace('"127.0.0.1:0"', '"127.0.0.1"', 1),
         "postwarden: config error: listeners.mx.address: '127.0.0.1' is not HOST:PORT"),
        (lambda t: t.replace("[log]", 'colour = "blue"\n[log]'),
         "postwarden: config error: tls.colour: unknown key"),
        (lambda t: "relay = true\n" + t, "postwarden: config error: relay: unknown key"),
        (lambda t: t.replace('min_version = "TLSv1.2"', 'min_version = "SSLv3"'),
         "postwarden: config error: tls.min_version: must be one of TLSv1.2, TLSv1.3"),
        (lambda t: t.replace('hostname = "mail.example.org"', ""),
         "postwarden: config error: hostname: is required"),
        (lambda t: t + "\n[[[", "postwarden: config error: "),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, edit: object, expected: str) -> None:
    cfg_path = init(tmp_path)
    cfg_path.write_text(edit(cfg_path.read_text()))  # type: ignore[operator]
    for args in (["check-config"], ["user", "list"], ["domain", "list"]):
        proc = run("-c", str(cfg_path), *args)
        assert proc.returncode == 1, (args, proc.stdout)
        no_traceback(proc)
        assert proc.stderr.startswith(expected), proc.stderr


def test_world_readable_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = init(tmp_path)
    (tmp_path / "tls/key.pem").chmod(0o644)
    capsys.readouterr()
    assert cli.main(["-c", str(cfg_path), "check-config"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("postwarden: config error: tls.key: ")
    assert "chmod 600" in err


def test_missing_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(config.CONFIG_ENV, str(tmp_path / "nope.toml"))
    assert cli.main(["check-config"]) == 1
    err = capsys.readouterr().err
    assert err == (f"postwarden: config error: config file {tmp_path / 'nope.toml'} "
                   "not found (run 'postwarden init')\n")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["user"],
        ["user", "add"],
        ["alias", "add", "a@example.org"],
        ["init", "--domain", "example.org"],
        ["init", "--dir", "x", "--domain", "bad_domain"],
        ["init", "--dir", "x", "--domain", "example.org", "--mx-port", "99999"],
        ["init", "--dir", "x", "--domain", "example.org", "--listen-host", "mail.example"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


# --- user, domain, alias --------------------------------------------------


def test_user_add_password_stdin_subprocess(tmp_path: Path) -> None:
    cfg_path = init(tmp_path)
    proc = run("-c", str(cfg_path), "user", "add", "Alice@Example.org", "--password-stdin",
               stdin="s3cret passphrase!\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "created account alice@example.org\n"
    assert "s3cret" not in proc.stdout + proc.stderr
    cfg = config.load(cfg_path)
    with SqliteDirectory(cfg.db_path, cfg.domains) as d:
        acc = d.find_account("alice@example.org")
    assert acc is not None
    assert passwords.verify_password(acc.password_hash, "s3cret passphrase!")

    empty = run("-c", str(cfg_path), "user", "add", "bob@example.org", "--password-stdin",
                stdin="\n")
    assert empty.returncode == 1
    no_traceback(empty)
    assert empty.stderr == "postwarden: empty password on standard input\n"


class Admin:
    """Runs cli.main in process against one config, capturing output."""

    def __init__(self, cfg_path: Path, capsys: pytest.CaptureFixture[str],
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.cfg_path = cfg_path
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        capsys.readouterr()

    def __call__(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            self.monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = cli.main(["-c", str(self.cfg_path), *args])
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def admin(tmp_path: Path, capsys: pytest.CaptureFixture[str],
          monkeypatch: pytest.MonkeyPatch) -> Admin:
    return Admin(init(tmp_path), capsys, monkeypatch)


def test_user_commands(admin: Admin) -> None:
    code, out, _ = admin("user", "add", "bob@example.org")
    assert code == 0
    generated = re.findall(r"^    (\S+)$", out, re.MULTILINE)
    assert len(generated) == 1 and len(generated[0]) == passwords.GENERATED_LENGTH

    assert admin("user", "list") == (
        0, "bob@example.org\npostmaster@example.org\n", "")
    assert admin("user", "add", "bob@example.org", "--password-stdin",
                 stdin="another password\n") == (
        1, "", "postwarden: account bob@example.org already exists\n")
    assert admin("user", "add", "eve@elsewhere.com", "--password-stdin",
                 stdin="another password\n")[2] == (
        "postwarden: eve@elsewhere.com: domain elsewhere.com is not a local domain "
        "(add it with 'postwarden domain add elsewhere.com')\n")
    assert admin("user", "add", "bad address@example.org")[2] == (
        "postwarden: invalid address 'bad address@example.org': character ' ' not allowed "
        "in the local part\n")
    assert admin("user", "add", "nobody")[0] == 1

    assert admin("user", "passwd", "bob@example.org", "--password-stdin",
                 stdin="short\n") == (
        1, "", "postwarden: password refused: shorter than 12 characters "
               "([passwords] min_length)\n")
    code, out, err = admin("user", "passwd", "bob@example.org", "--password-stdin",
                           stdin="a fine long passphrase\n")
    assert (code, out, err) == (0, "password changed for bob@example.org\n", "")
    assert admin("user", "passwd", "ghost@example.org", "--password-stdin",
                 stdin="whatever password\n") == (
        1, "", "postwarden: no such account: ghost@example.org\n")
    assert admin("user", "passwd", "bob@example.org", "--password-stdin",
                 stdin="bad\x00password\n")[0] == 1

    assert admin("user", "del", "BOB@example.org") == (0, "deleted account bob@example.org\n",
                                                       "")
    assert admin("user", "del", "bob@example.org")[0] == 1
    assert admin("user", "list")[1] == "postmaster@example.org\n"


def test_domain_commands(admin: Admin) -> None:
    assert admin("domain", "add", "Example.NET") == (0, "added domain example.net\n", "")
    assert admin("domain", "list")[1] == "example.net\t(database)\nexample.org\t(config)\n"
    assert admin("domain", "add", "example.net")[0] == 1
    assert admin("domain", "add", "not a domain")[0] == 1
    assert admin("user", "add", "x@example.net", "--password-stdin",
                 stdin="a good password\n")[0] == 0
    code, _, err = admin("domain", "del", "example.net")
    assert code == 1 and "still has 1 account(s)" in err
    assert admin("user", "del", "x@example.net")[0] == 0
    assert admin("domain", "del", "example.net") == (0, "deleted domain example.net\n", "")
    code, _, err = admin("domain", "del", "example.org")
    assert code == 1 and "config file" in err
    assert admin("domain", "list")[1] == "example.org\t(config)\n"


def test_alias_commands(admin: Admin) -> None:
    assert admin("alias", "add", "Sales@example.org", "postmaster@example.org",
                 "Boss@Partner.COM") == (
        0, "alias sales@example.org -> postmaster@example.org, Boss@partner.com\n", "")
    assert admin("alias", "add", "@example.org", "postmaster@example.org")[0] == 0
    assert admin("alias", "list")[1] == (
        "@example.org -> postmaster@example.org\n"
        "sales@example.org -> postmaster@example.org, Boss@partner.com\n")
    code, _, err = admin("alias", "add", "postmaster@example.org", "x@partner.com")
    assert code == 1 and "is an account" in err
    assert admin("alias", "add", "x@example.org", "not-an-address")[0] == 1
    assert admin("alias", "del", "sales@example.org") == (
        0, "deleted alias sales@example.org\n", "")
    assert admin("alias", "del", "sales@example.org")[0] == 1
    assert admin("alias", "list")[1] == "@example.org -> postmaster@example.org\n"
