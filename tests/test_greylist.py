"""Greylisting: the store's decisions with an injected clock (on both
backends, SQLite and PostgreSQL, from the same tests), the client network,
the config section, and a real server answering RCPT."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import PASSWORD, ServerThread, pg_pool

from postwarden.config import ConfigError, parse
from postwarden.policy.greylist import client_network
from postwarden.storage.sqlite_greylist import Decision, SqliteGreylist

NET = "192.0.2.0/24"


class PgGreylistSync:
    """PgGreylist (async, over a pool) with SqliteGreylist's synchronous
    calls, so that the same tests decide on both backends."""

    def __init__(self, schema: str, **kw: float) -> None:
        from postwarden.storage.pg_protect import PgGreylist

        self.loop = asyncio.new_event_loop()
        self.pool = self.loop.run_until_complete(pg_pool(schema))
        self.greylist = PgGreylist(self.pool, **kw)

    def decide(self, *args: Any) -> Decision:
        return self.loop.run_until_complete(self.greylist.decide(*args))

    def counts(self) -> tuple[int, int]:
        return self.loop.run_until_complete(self.greylist.counts())

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.close())
        self.loop.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    kw: dict[str, float] = {"delay": 300, "expiry": 4 * 3600, "allow": 35 * 86400}
    s: Any
    if request.param == "postgres":
        s = PgGreylistSync(request.getfixturevalue("pg_schema"), **kw)
    else:
        s = SqliteGreylist(tmp_path / "postwarden.db", **kw)
    yield s
    s.close()


@pytest.mark.parametrize(("ip", "network"), [
    ("192.0.2.77", "192.0.2.0/24"),
    ("::ffff:192.0.2.77", "192.0.2.0/24"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
])
def test_client_network(ip: str, network: str) -> None:
    assert client_network(ip) == network


def test_first_attempt_early_retry_and_pass(store: Any) -> None:
    t = 1000.0
    d = store.decide(NET, "a@s.example", "u@example.test", t)
    assert (d.wait, d.reason) == (300, "new")
    d = store.decide(NET, "a@s.example", "u@example.test", t + 100)
    assert (d.wait, d.reason) == (200, "early")  # the first attempt counts, not the last
    d = store.decide(NET, "a@s.example", "u@example.test", t + 301)
    assert (d.wait, d.reason) == (0, "passed")
    assert store.counts() == (0, 1)


def test_passed_network_is_allow_listed_for_allow_days(store: Any) -> None:
    t = 1000.0
    store.decide(NET, "a@s.example", "u@example.test", t)
    store.decide(NET, "a@s.example", "u@example.test", t + 300)
    # Another sender and recipient from the same /24: no delay.
    d = store.decide(NET, "b@other.example", "v@example.test", t + 400)
    assert (d.wait, d.reason) == (0, "allow-listed")
    # Another network: greylisted.
    assert store.decide("198.51.100.0/24", "a@s.example", "u@example.test",
                        t + 400).wait == 300
    # After allow_days the network is greylisted again.
    assert store.decide(NET, "c@s.example", "u@example.test",
                        t + 300 + 35 * 86400 + 1).reason == "new"


def test_unretried_triplet_expires(store: Any) -> None:
    t = 1000.0
    store.decide(NET, "a@s.example", "u@example.test", t)
    d = store.decide(NET, "a@s.example", "u@example.test", t + 4 * 3600 + 1)
    assert (d.wait, d.reason) == (300, "expired")


def test_triplets_are_distinct(store: Any) -> None:
    t = 1000.0
    store.decide(NET, "a@s.example", "u@example.test", t)
    assert store.decide(NET, "a@s.example", "w@example.test", t + 301).reason == "new"
    assert store.decide(NET, "", "u@example.test", t + 301).reason == "new"


def test_state_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "postwarden.db"
    s = SqliteGreylist(db, delay=300, expiry=14400, allow=86400)
    s.decide(NET, "a@s.example", "u@example.test", 1000.0)
    s.close()
    s = SqliteGreylist(db, delay=300, expiry=14400, allow=86400)
    try:
        assert s.decide(NET, "a@s.example", "u@example.test", 1400.0).reason == "passed"
    finally:
        s.close()


def test_config_defaults_and_errors() -> None:
    base = {"hostname": "mail.example.test"}
    p = Path("/tmp/postwarden.toml")
    gl = parse(base, p).greylist
    assert (gl.enabled, gl.delay, gl.expiry, gl.allow_days) == (False, 300, 14400, 35)
    gl = parse({**base, "greylist": {"enabled": True, "delay": 60}}, p).greylist
    assert (gl.enabled, gl.delay) == (True, 60)
    for table, key in (({"enabled": "yes"}, "greylist.enabled"),
                       ({"delay": -1}, "greylist.delay"),
                       ({"delay": 600, "expiry": 300}, "greylist.expiry"),
                       ({"allow": 1}, "greylist.allow")):
        with pytest.raises(ConfigError) as err:
            parse({**base, "greylist": table}, p)
        assert err.value.key == key


# ---- a real server ----------------------------------------------------------

GREYLIST = """
[greylist]
enabled = true
delay = 1
"""


def _rcpt(server: ServerThread, sender: str, rcpt: str) -> tuple[int, bytes]:
    client = smtplib.SMTP("127.0.0.1", server.port("mx"), timeout=10)
    try:
        client.ehlo("client.example")
        client.mail(sender)
        return client.rcpt(rcpt)
    finally:
        client.quit()


def test_greylisting_end_to_end(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(GREYLIST)
    code, text = _rcpt(server, "bob@sender.test", "alice@example.test")
    assert (code, text) == (451, b"4.7.1 Greylisted, please try again in 1 seconds")
    code, text = _rcpt(server, "bob@sender.test", "alice@example.test")
    assert (code, text[:5]) == (451, b"4.7.1")  # too early
    time.sleep(1.1)
    assert _rcpt(server, "bob@sender.test", "alice@example.test")[0] == 250
    # The network is now allow-listed: a new triplet passes at once.
    assert _rcpt(server, "carol@elsewhere.test", "alice@example.test")[0] == 250


def test_unknown_recipient_is_refused_not_greylisted(
        make_server: Callable[..., ServerThread]) -> None:
    server = make_server(GREYLIST)
    assert _rcpt(server, "bob@sender.test", "nobody@example.test")[0] == 550
    assert _rcpt(server, "bob@sender.test", "someone@remote.test")[0] == 554


def test_authenticated_submission_is_not_greylisted(
        make_server: Callable[..., ServerThread], client_tls: ssl.SSLContext) -> None:
    server = make_server(GREYLIST)
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    try:
        client.starttls(context=client_tls)
        client.login("alice@example.test", PASSWORD)
        client.mail("alice@example.test")
        assert client.rcpt("alice@example.test")[0] == 250
        assert client.rcpt("someone@remote.test")[0] == 250
    finally:
        client.quit()


def test_greylisting_off_by_default(make_server: Callable[..., ServerThread]) -> None:
    server = make_server()
    assert _rcpt(server, "bob@sender.test", "alice@example.test")[0] == 250

