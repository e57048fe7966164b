"""Bans, brute-force protection and rate limits, against a real server.

Clients connect from 127.0.0.1 or, to show that another address is not
affected, from 127.0.0.2 (Linux routes all of 127/8 to lo; the client socket
is bound to that source address)."""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import DOMAIN, PASSWORD, ServerThread, pg_pool, write_config

from postwarden import cli
from postwarden import config as config_mod
from postwarden.storage.sqlite_protect import SqliteProtectStore, parse_network

ALICE = f"alice@{DOMAIN}"
APP = f"app@{DOMAIN}"
OTHER_IP = "127.0.0.2"


def _other_ip_works() -> bool:
    try:
        with socket.socket() as s:
            s.bind((OTHER_IP, 0))
    except OSError:
        return False
    return True


needs_other_ip = pytest.mark.skipif(not _other_ip_works(), reason="cannot bind 127.0.0.2")


def connect(server: ServerThread, listener: str = "submission", source: str = "127.0.0.1"
            ) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", server.port(listener), timeout=10,
                        source_address=(source, 0))


def submission(server: ServerThread, tls: ssl.SSLContext, source: str = "127.0.0.1"
               ) -> smtplib.SMTP:
    client = connect(server, source=source)
    client.ehlo("client.example")
    client.starttls(context=tls)
    client.ehlo("client.example")
    return client


def refused(server: ServerThread, source: str = "127.0.0.1", listener: str = "submission"
            ) -> tuple[int, bytes | str] | None:
    """The greeting's refusal, or None when the server greets."""
    try:
        client = connect(server, listener, source)
    except smtplib.SMTPConnectError as exc:
        return exc.smtp_code, exc.smtp_error
    except smtplib.SMTPServerDisconnected:
        return 0, b"disconnected"
    with contextlib.suppress(smtplib.SMTPException, OSError):
        client.quit()
    return None


def fail_logins(server: ServerThread, tls: ssl.SSLContext, count: int,
                user: str = ALICE) -> None:
    for _ in range(count):
        try:
            client = submission(server, tls)
        except (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected):
            return
        try:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                auth_plain(client, user, "wrong password")
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()


def auth_plain(client: smtplib.SMTP, user: str, password: str) -> None:
    """One AUTH PLAIN (``login`` would try every mechanism: two failures)."""
    client.user, client.password = user, password
    client.auth("PLAIN", client.auth_plain)


def eventually(predicate: Callable[[], object], timeout: float = 3.0) -> object:
    """Poll slowly (the connection-rate limit counts every probe)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.3)


def message(sender: str, to: str | list[str]) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to if isinstance(to, str) else ", ".join(to)
    msg["Subject"] = "hi"
    msg.set_content("hello\n")
    return msg


def store_of(server: ServerThread) -> SqliteProtectStore:
    return SqliteProtectStore(server.cfg.db_path)


# --- brute force ------------------------------------------------------------


@needs_other_ip
def test_failed_auth_bans_ip_and_correct_password_is_refused(
        make_server: Callable[..., ServerThread], client_tls: ssl.SSLContext) -> None:
    server = make_server("[bans]\nauth_failures = 3\naccount_failures = 10\n")
    fail_logins(server, client_tls, 2)
    assert refused(server) is None  # below the threshold
    client = submission(server, client_tls)
    with pytest.raises(smtplib.SMTPAuthenticationError):
        auth_plain(client, ALICE, "wrong password")
    # The third failure bans: the session is ended with the ban reply.
    assert client.noop()[0] == 421
    code, text = refused(server) or (0, b"")
    assert code == 421 and b"4.7.0" in text
    # Banned at connect on every listener (also the correct password's route).
    assert refused(server, listener="mx") is not None
    # Another address is not affected: it logs in with the correct password.
    other = submission(server, client_tls, source=OTHER_IP)
    other.login(ALICE, PASSWORD)
    other.quit()
    with store_of(server) as store:
        [ban] = store.list_bans()
    assert ban.shown == "127.0.0.1" and "failed AUTH" in ban.reason and ban.level == 0
    assert ban.until is not None and 890 < ban.until - ban.created <= 900


@needs_other_ip
def test_account_locked_for_one_ip_only(make_server: Callable[..., ServerThread],
                                        client_tls: ssl.SSLContext) -> None:
    server = make_server("[bans]\nauth_failures = 50\naccount_failures = 2\n")
    fail_logins(server, client_tls, 2)
    client = submission(server, client_tls)
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        client.login(ALICE, PASSWORD)
    assert err.value.smtp_code == 535
    assert "too many failed attempts" in str(err.value.smtp_error)
    client.quit()
    assert refused(server) is None  # the IP itself is not banned
    other = submission(server, client_tls, source=OTHER_IP)
    other.login(ALICE, PASSWORD)
    other.quit()


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """Opens the protection store of one backend (inside the test's loop);
    the same tests run on both."""
    schema = request.getfixturevalue("pg_schema") if request.param == "postgres" else ""

    async def open_(clock: Callable[[], float] = time.time) -> Any:
        if not schema:
            return SqliteProtectStore(tmp_path / "db", clock=clock)
        from postwarden.storage.pg_protect import PgProtectStore

        store = PgProtectStore(await pg_pool(schema), clock=clock)
        store.close = lambda: None  # the pool closes with the loop
        return store
    return open_


def test_escalating_ban_durations(open_store: Any) -> None:
    now = [1000.0]
    durations = (900.0, 3600.0, 86400.0)

    async def run() -> list[float]:
        nonlocal store
        store = await open_store(lambda: now[0])
        lengths = []
        for _ in range(4):
            ban = await store.ban("192.0.2.7", "test", durations, memory=7 * 86400)
            assert ban.until is not None
            lengths.append(ban.until - ban.created)
            now[0] = ban.until + 10  # the ban ended; the next comes soon after
        now[0] += 8 * 86400  # forgotten after `memory`
        ban = await store.ban("192.0.2.7", "test", durations, memory=7 * 86400)
        assert ban.until is not None
        lengths.append(ban.until - ban.created)
        return lengths

    store: Any = None
    try:
        assert asyncio.run(run()) == [900.0, 3600.0, 86400.0, 86400.0, 900.0]
    finally:
        if store is not None:
            store.close()


def test_network_ban_and_ipv4_mapped(tmp_path: Path) -> None:
    store = SqliteProtectStore(tmp_path / "db")
    try:
        store.add_ban("198.51.100.0/24", "net", None)
        assert store.banned_sync("198.51.100.77") is not None
        assert store.banned_sync("::ffff:198.51.100.5") is not None
        assert store.banned_sync("198.51.101.1") is None
        assert str(parse_network("2001:db8::1")) == "2001:db8::1/128"
        assert store.del_ban("198.51.100.9/24")
        assert store.banned_sync("198.51.100.77") is None
    finally:
        store.close()


# --- restarts and the CLI ---------------------------------------------------


def test_ban_survives_restart(make_server: Callable[..., ServerThread],
                              client_tls: ssl.SSLContext, tmp_path: Path) -> None:
    extra = "[bans]\nauth_failures = 2\n"
    server = make_server(extra)
    fail_logins(server, client_tls, 2)
    assert refused(server) is not None
    # Restart the whole server (new store, empty cache) on the same database.
    server.call(server.server.stop(grace=1))
    server.call(server.server.start())
    code, _ = refused(server) or (0, b"")
    assert code == 421


def run_cli(cfg: config_mod.Config, *args: str) -> int:
    return cli.main(["-c", str(cfg.path), *args])


def test_ban_cli_with_running_server(server: ServerThread, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    cfg = server.cfg
    assert refused(server) is None
    assert run_cli(cfg, "ban", "add", "127.0.0.1", "--duration", "1h") == 0
    assert "banned 127.0.0.1 for" in capsys.readouterr().out
    # Within a second (the server's ban cache), the next connection is refused.
    assert eventually(lambda: refused(server)) is not None
    assert run_cli(cfg, "ban", "list") == 0
    out = capsys.readouterr().out
    assert "127.0.0.1" in out and "banned by the administrator" in out
    assert run_cli(cfg, "ban", "del", "127.0.0.1") == 0
    assert "unbanned" in capsys.readouterr().out
    assert eventually(lambda: refused(server) is None)
    assert run_cli(cfg, "ban", "del", "127.0.0.1") == 1
    assert "no ban" in capsys.readouterr().err
    assert run_cli(cfg, "ban", "add", "not-an-ip") == 1
    assert run_cli(cfg, "ban", "list") == 0
    assert "no bans" in capsys.readouterr().out


# --- harvest and protocol abuse --------------------------------------------


def test_directory_harvest_bans(make_server: Callable[..., ServerThread]) -> None:
    server = make_server("[bans]\nharvest_rejects = 3\n")
    client = connect(server, "mx")
    client.ehlo("harvester.example")
    client.mail("x@remote.example")
    for i in range(2):
        code, _ = client.rcpt(f"nobody{i}@{DOMAIN}")
        assert code == 550
    # The third unknown recipient bans: the session ends with 421.
    code, _ = client.rcpt(f"nobody2@{DOMAIN}")
    assert code == 421
    assert refused(server, listener="mx") is not None
    with store_of(server) as store:
        [ban] = store.list_bans()
    assert "harvest" in ban.reason


def test_pregreet_bans_briefly(tmp_path: Path, cert_files: tuple[Path, Path],
                               loopback_dns: Any) -> None:
    path = write_config(tmp_path, cert_files, "[bans]\nprotocol_ban = 60\n",
                        dns_port=loopback_dns.port)
    text = path.read_text().replace("[listeners.mx]\n", "[listeners.mx]\npregreet_wait = 0.3\n")
    path.write_text(text)
    server = ServerThread(config_mod.load(path)).start()
    try:
        _pregreet(server)
    finally:
        server.stop()


def _pregreet(server: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", server.port("mx")), timeout=5) as s:
        s.sendall(b"EHLO early.example\r\n")
        data = s.recv(1024)
    assert data.startswith(b"554")
    time.sleep(0.2)
    code, _ = refused(server, listener="mx") or (0, b"")
    assert code == 421
    with store_of(server) as store:
        [ban] = store.list_bans()
    assert ban.until is not None and ban.until - ban.created == pytest.approx(60)
    assert "greeting" in ban.reason


def test_http_on_smtp_bans(server: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", server.port("mx")), timeout=5) as s:
        assert s.recv(1024).startswith(b"220")
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(OSError):
            while s.recv(1024):
                pass
    assert eventually(lambda: refused(server, listener="mx")) is not None


# --- rate limits ------------------------------------------------------------


RATE = """
[ratelimit]
account_messages = 2
account_recipients = 3
ip_messages = 1
ip_recipients = 10
[ratelimit.accounts]
"app@example.test" = { messages = 4, recipients = 100 }
"""


def test_rate_limit_per_account_messages(make_server: Callable[..., ServerThread],
                                         client_tls: ssl.SSLContext) -> None:
    server = make_server(RATE)
    client = submission(server, client_tls)
    client.login(ALICE, PASSWORD)
    for _ in range(2):
        client.send_message(message(ALICE, "bob@remote.example"))
    with pytest.raises(smtplib.SMTPSenderRefused) as err:
        client.send_message(message(ALICE, "bob@remote.example"))
    assert err.value.smtp_code == 451 and b"4.7.1" in err.value.smtp_error
    assert b"Rate limit exceeded" in err.value.smtp_error
    client.quit()


def test_rate_limit_per_account_recipients(make_server: Callable[..., ServerThread],
                                           client_tls: ssl.SSLContext) -> None:
    server = make_server(RATE)
    client = submission(server, client_tls)
    client.login(ALICE, PASSWORD)
    client.mail(ALICE)
    codes = [client.rcpt(f"r{i}@remote.example")[0] for i in range(5)]
    assert codes == [250, 250, 250, 451, 451]
    client.rset()
    client.quit()


def test_per_account_override(make_server: Callable[..., ServerThread],
                              client_tls: ssl.SSLContext) -> None:
    server = make_server(RATE, users=(ALICE, APP))
    client = submission(server, client_tls)
    client.login(APP, PASSWORD)
    for _ in range(4):
        client.send_message(message(APP, ["a@remote.example", "b@remote.example",
                                          "c@remote.example", "d@remote.example"]))
    with pytest.raises(smtplib.SMTPSenderRefused):
        client.send_message(message(APP, "a@remote.example"))
    client.quit()
    # Alice's own (default) quota is separate and untouched.
    client = submission(server, client_tls)
    client.login(ALICE, PASSWORD)
    client.send_message(message(ALICE, "bob@remote.example"))
    client.quit()


@needs_other_ip
def test_rate_limit_per_ip(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(RATE)
    client = connect(server, "mx")
    client.send_message(message("x@remote.example", ALICE))
    with pytest.raises(smtplib.SMTPSenderRefused) as err:
        client.send_message(message("x@remote.example", ALICE))
    assert err.value.smtp_code == 451
    client.quit()
    other = connect(server, "mx", source=OTHER_IP)
    other.send_message(message("x@remote.example", ALICE))
    other.quit()


def test_sliding_window_estimate(open_store: Any) -> None:
    now = [7200.0]
    store: Any = None

    async def run() -> list[float]:
        nonlocal store
        store = await open_store(lambda: now[0])
        await store.add_rate("k", 3600, 10)
        seen = [await store.rate("k", 3600)]
        now[0] = 7200.0 + 3600 + 900  # a quarter into the next window
        seen.append(await store.rate("k", 3600))
        now[0] = 7200.0 + 3 * 3600
        seen.append(await store.rate("k", 3600))
        return seen

    try:
        assert asyncio.run(run()) == [10, pytest.approx(7.5), 0]
    finally:
        if store is not None:
            store.close()


def test_config_validation(tmp_path: Path) -> None:
    base = {"hostname": "mail.example.test"}
    path = tmp_path / "postwarden.toml"
    cfg = config_mod.parse(base, path)
    assert cfg.bans.durations == (900.0, 3600.0, 86400.0, 604800.0)
    assert cfg.ratelimit.account_quota("x@y.test").messages == 1000
    cfg = config_mod.parse({**base, "bans": {"durations": ["15m", "2h", "1d"]},
                            "ratelimit": {"accounts": {"App@X.test": {"messages": 5}}}}, path)
    assert cfg.bans.durations == (900.0, 7200.0, 86400.0)
    assert cfg.ratelimit.account_quota("app@x.test").messages == 5
    for bad, key in (({"bans": {"durations": []}}, "bans.durations"),
                     ({"bans": {"auth_failures": 0}}, "bans.auth_failures"),
                     ({"bans": {"nope": 1}}, "bans.nope"),
                     ({"ratelimit": {"window": "soon"}}, "ratelimit.window"),
                     ({"ratelimit": {"accounts": {"a@b": {"msgs": 1}}}},
                      "ratelimit.accounts.a@b.msgs")):
        with pytest.raises(config_mod.ConfigError) as err:
            config_mod.parse({**base, **bad}, path)
        assert err.value.key == key
