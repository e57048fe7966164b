"""Account hygiene: password rules, expiry, rotation and application passwords,
over real sockets (smtplib with STARTTLS) and through the CLI."""

from __future__ import annotations

import base64
import io
import re
import smtplib
import sqlite3
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import DOMAIN, PASSWORD, ServerThread

from postwarden import cli
from postwarden.auth import password_policy
from postwarden.config import PasswordsConfig
from postwarden.storage.sqlite_directory import MAX_APP_PASSWORDS, SqliteDirectory

ALICE = f"alice@{DOMAIN}"


def login(server: ServerThread, tls: ssl.SSLContext, password: str,
          user: str = ALICE) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    try:
        client.starttls(context=tls)
        client.login(user, password)
    except BaseException:
        # Closed here: a TLS session left open holds the server's stop
        # until its close times out.
        client.close()
        raise
    return client


def refused(server: ServerThread, tls: ssl.SSLContext, password: str) -> tuple[int, bytes]:
    with pytest.raises(smtplib.SMTPAuthenticationError) as info:
        login(server, tls, password)
    return info.value.smtp_code, info.value.smtp_error


def admin(server: ServerThread, *args: str, stdin: str | None = None,
          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
          ) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(["-c", str(server.cfg.path), *args])
    out, err = capsys.readouterr()
    return code, out, err


# --- the rules ------------------------------------------------------------


def test_check_password_rules() -> None:
    rules = PasswordsConfig()
    password_policy.check_password("a fine long passphrase", rules)
    with pytest.raises(password_policy.PasswordRejected, match="shorter than 12"):
        password_policy.check_password("short", rules)
    with pytest.raises(password_policy.PasswordRejected, match="common passwords"):
        password_policy.check_password("QWERTY123456", rules)  # case does not help
    password_policy.check_password("tiny", PasswordsConfig(min_length=4))


def test_is_expired() -> None:
    off, on = PasswordsConfig(), PasswordsConfig(max_age_days=90)
    now = 1_000_000_000.0
    assert not password_policy.is_expired(now - 1000 * 86400, off, now)
    assert not password_policy.is_expired(now - 89 * 86400, on, now)
    assert password_policy.is_expired(now - 91 * 86400, on, now)
    assert not password_policy.is_expired(None, on, now)


def test_cli_refuses_weak_passwords(make_server: Callable[..., ServerThread],
                                    monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    st = make_server("[passwords]\nmin_length = 14\n")
    run = lambda *a, stdin=None: admin(st, *a, stdin=stdin, monkeypatch=monkeypatch,  # noqa: E731
                                       capsys=capsys)
    assert run("user", "add", f"bob@{DOMAIN}", "--password-stdin", stdin="thirteen char\n") == (
        1, "", "postwarden: password refused: shorter than 14 characters "
               "([passwords] min_length)\n")
    code, out, err = run("user", "passwd", ALICE, "--password-stdin", stdin="qazwsxedcrfvtgb\n")
    assert code == 1 and "common passwords" in err
    # Refused passwords change nothing: the old one still works.
    code, out, err = run("user", "passwd", ALICE)  # generated: always passes
    assert code == 0 and re.search(r"^    (\S{20})$", out, re.MULTILINE)


# --- expiry and rotation over SMTP ----------------------------------------


def _age_password(st: ServerThread, days: float) -> None:
    db = sqlite3.connect(st.cfg.db_path)
    with db:
        db.execute("UPDATE accounts SET password_changed = ?", (time.time() - days * 86400,))
    db.close()


def test_expired_password_is_refused(make_server: Callable[..., ServerThread],
                                     client_tls: ssl.SSLContext,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    st = make_server("[passwords]\nmax_age_days = 30\n")
    login(st, client_tls, PASSWORD).quit()  # fresh: fine
    _age_password(st, 31)
    code, text = refused(st, client_tls, PASSWORD)
    assert code == 535 and text.startswith(b"5.7.8") and b"password expired" in text
    # A new password makes the account usable again at once.
    assert admin(st, "user", "passwd", ALICE, "--password-stdin",
                 stdin="a brand new passphrase\n", monkeypatch=monkeypatch,
                 capsys=capsys)[0] == 0
    login(st, client_tls, "a brand new passphrase").quit()


def test_expiry_off_by_default(make_server: Callable[..., ServerThread],
                               client_tls: ssl.SSLContext) -> None:
    st = make_server()
    _age_password(st, 10_000)
    login(st, client_tls, PASSWORD).quit()


def test_rotation_without_downtime(make_server: Callable[..., ServerThread],
                                   client_tls: ssl.SSLContext,
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    st = make_server()
    old_session = login(st, client_tls, PASSWORD)
    assert admin(st, "user", "passwd", ALICE, "--password-stdin",
                 stdin="rotated passphrase 2\n", monkeypatch=monkeypatch,
                 capsys=capsys)[0] == 0
    # The session that logged in with the old password goes on working.
    old_session.sendmail(ALICE, [ALICE], b"Subject: still here\r\n\r\nhi\r\n")
    old_session.quit()
    assert refused(st, client_tls, PASSWORD)[0] == 535
    login(st, client_tls, "rotated passphrase 2").quit()


# --- application passwords ------------------------------------------------


def test_app_passwords(make_server: Callable[..., ServerThread], client_tls: ssl.SSLContext,
                       monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    st = make_server("[passwords]\nmax_age_days = 30\n")
    run = lambda *a: admin(st, *a, monkeypatch=monkeypatch, capsys=capsys)  # noqa: E731
    code, out, _ = run("user", "app-password", "add", ALICE, "--label", "phone")
    assert code == 0 and out.startswith(f"created application password 1 for {ALICE} (phone)")
    phone = re.findall(r"^    (\S+)$", out, re.MULTILINE)[0]
    code, out, _ = run("user", "app-password", "add", ALICE)
    laptop = re.findall(r"^    (\S+)$", out, re.MULTILINE)[0]
    code, out, _ = run("user", "app-password", "list", ALICE)
    assert [line.split("\t")[0::2] for line in out.splitlines()] == [["1", "phone"], ["2", ""]]

    login(st, client_tls, phone).quit()
    login(st, client_tls, laptop).quit()
    login(st, client_tls, PASSWORD).quit()
    # Only with the account's own username.
    with pytest.raises(smtplib.SMTPAuthenticationError):
        login(st, client_tls, phone, user=f"postmaster@{DOMAIN}")

    assert run("user", "app-password", "revoke", ALICE, "1") == (
        0, f"revoked application password 1 of {ALICE}\n", "")
    assert refused(st, client_tls, phone)[0] == 535
    login(st, client_tls, laptop).quit()
    login(st, client_tls, PASSWORD).quit()
    assert run("user", "app-password", "revoke", ALICE, "1")[2] == (
        f"postwarden: no application password 1 for {ALICE}\n")

    # An expired account password does not block application passwords.
    _age_password(st, 31)
    assert b"password expired" in refused(st, client_tls, PASSWORD)[1]
    login(st, client_tls, laptop).quit()


def test_app_password_limit(tmp_path: Path) -> None:
    from postwarden.auth.passwords import hash_password

    h = hash_password("x" * 20)
    with SqliteDirectory(tmp_path / "db", [DOMAIN]) as d:
        d.add_user(ALICE, h)
        for _ in range(MAX_APP_PASSWORDS):
            d.add_app_password(ALICE, h)
        with pytest.raises(Exception, match="maximum"):
            d.add_app_password(ALICE, h)
        d.del_user(ALICE)
        assert d.app_password_hashes(h) == []


def test_schema_1_is_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "db")
    db.executescript("""
        CREATE TABLE directory_schema (version INTEGER NOT NULL);
        INSERT INTO directory_schema VALUES (1);
        CREATE TABLE accounts (address TEXT PRIMARY KEY, domain TEXT NOT NULL,
            password_hash TEXT NOT NULL, enabled INTEGER NOT NULL DEFAULT 1,
            created_at REAL NOT NULL, updated_at REAL NOT NULL);
        INSERT INTO accounts VALUES ('a@example.test', 'example.test', '$argon2id$x', 1, 5, 7);
    """)
    db.close()
    with SqliteDirectory(tmp_path / "db", [DOMAIN]) as d:
        assert d.password_changed("a@example.test") == 7.0
        assert d._query("SELECT version FROM directory_schema") == [(2,)]


# --- AUTH never before TLS ------------------------------------------------


@pytest.mark.parametrize("listener", ["mx", "submission"])
def test_no_auth_before_tls(make_server: Callable[..., ServerThread], listener: str) -> None:
    st = make_server()
    client = smtplib.SMTP("127.0.0.1", st.port(listener), timeout=10)
    client.ehlo("laptop")
    assert not client.has_extn("auth")
    creds = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
    code, _ = client.docmd("AUTH", f"PLAIN {creds}")
    assert code in (503, 530, 538)  # refused, never 235
    client.quit()


def test_submissions_is_tls_from_the_first_byte(make_server: Callable[..., ServerThread],
                                                 client_tls: ssl.SSLContext) -> None:
    st = make_server()
    sock = __import__("socket").create_connection(("127.0.0.1", st.port("submissions")), 10)
    sock.sendall(b"EHLO laptop\r\n")  # cleartext: no SMTP reply, TLS only
    data = sock.recv(100)
    assert not data.startswith(b"2")
    sock.close()
    client = smtplib.SMTP_SSL("127.0.0.1", st.port("submissions"), context=client_tls,
                              timeout=10)
    client.ehlo("laptop")
    assert client.has_extn("auth")
    client.login(ALICE, PASSWORD)
    client.quit()
