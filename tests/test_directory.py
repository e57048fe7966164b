"""SqliteDirectory: resolution, send-as, administration and freshness.

The tests taking the ``directory`` fixture run on both backends: SQLite,
and the PostgreSQL tables (the directory is written to PostgreSQL by one
command session and read back by another, as the CLI and the nodes do)."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postwarden import cli
from postwarden.envelope import Address
from postwarden.observe import log as logmod
from postwarden.storage import change_stamp
from postwarden.storage.sqlite_directory import (
    MAX_ALIAS_DEPTH,
    DirectoryError,
    SqliteDirectory,
    check_address,
)

# A stored hash need not verify here; the directory only checks its form.
HASH = "$argon2id$v=19$m=32768,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA"


def addr(text: str) -> Address:
    return Address.parse_simple(text)


@pytest.fixture(params=["sqlite", "postgres"])
def directory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SqliteDirectory]:
    if request.param == "sqlite":
        d = SqliteDirectory(tmp_path / "postwarden.db", ("example.org",))
        populate(d)
        yield d
        d.close()
        return
    from tests.conftest import PG_DSN

    from postwarden.storage.pg_directory import DirectoryEdit
    from postwarden.storage.settings import StorageSettings

    settings = StorageSettings(backend="postgres", dsn=PG_DSN,
                               schema=request.getfixturevalue("pg_schema"))
    with DirectoryEdit(settings, ("example.org",)) as d:
        populate(d)
    # Read back from PostgreSQL by another session.
    d = DirectoryEdit(settings, ("example.org",))
    yield d
    d.close()


def populate(d: SqliteDirectory) -> None:
    d.add_domain("example.net")
    for user in ("alice@example.org", "bob@example.org", "carol@example.net"):
        d.add_user(user, HASH)
    d.add_alias("team@example.org", ["alice@example.org", "Bob@Example.ORG"])
    d.add_alias("sales@example.org", ["team@example.org", "carol@example.net",
                                      "Partner@Remote.COM"])
    d.add_alias("info@example.org", ["sales@example.org", "alice@example.org"])
    d.add_alias("ext@example.org", ["someone@remote.com"])
    d.add_alias("@example.net", ["carol@example.net"])
    d.add_alias("alice@example.net", ["alice@example.org"])  # exact beats catch-all
    d.add_alias("loop1@example.org", ["loop2@example.org"])
    d.add_alias("loop2@example.org", ["loop1@example.org", "bob@example.org"])
    d.add_alias("dangling@example.org", ["nobody@example.org"])


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("alice@example.org", ["alice@example.org"]),
        ("ALICE@Example.Org", ["alice@example.org"]),
        ("team@example.org", ["alice@example.org", "bob@example.org"]),
        ("sales@example.org",
         ["alice@example.org", "bob@example.org", "carol@example.net", "Partner@remote.com"]),
        # nested, deduplicated
        ("info@example.org",
         ["alice@example.org", "bob@example.org", "carol@example.net", "Partner@remote.com"]),
        ("ext@example.org", ["someone@remote.com"]),
        # catch-all only when there is no account and no exact alias
        ("carol@example.net", ["carol@example.net"]),
        ("alice@example.net", ["alice@example.org"]),
        ("whoever@example.net", ["carol@example.net"]),
        # a loop adds nothing but the other targets still count
        ("loop1@example.org", ["bob@example.org"]),
        ("dangling@example.org", None),
        ("unknown@example.org", None),
        ("alice@remote.com", None),  # not a local domain
    ],
)
def test_resolve(directory: SqliteDirectory, address: str, expected: list[str] | None) -> None:
    assert asyncio.run(directory.resolve(addr(address))) == expected


def test_alias_depth_limit(tmp_path: Path) -> None:
    with SqliteDirectory(tmp_path / "d.db", ("example.org",)) as d:
        d.add_user("end@example.org", HASH)
        chain = [f"a{i}@example.org" for i in range(MAX_ALIAS_DEPTH + 2)]
        for src, dst in zip(chain, [*chain[1:], "end@example.org"], strict=True):
            d.add_alias(src, [dst])
        assert d.resolve_sync(chain[2]) == ["end@example.org"]
        assert d.resolve_sync(chain[0]) is None  # too deep


@pytest.mark.parametrize(
    ("username", "sender", "expected"),
    [
        ("alice@example.org", "alice@example.org", True),
        ("Alice@Example.org", "ALICE@example.ORG", True),
        ("alice@example.org", "team@example.org", True),
        ("bob@example.org", "info@example.org", True),  # nested
        ("carol@example.net", "sales@example.org", True),
        ("alice@example.org", "bob@example.org", False),
        ("carol@example.net", "team@example.org", False),
        ("carol@example.net", "whoever@example.net", False),  # catch-all never grants
        ("alice@example.org", "alice@remote.com", False),
        ("alice@example.org", "unknown@example.org", False),
    ],
)
def test_may_send_as(directory: SqliteDirectory, username: str, sender: str,
                     expected: bool) -> None:
    assert asyncio.run(directory.may_send_as(username, addr(sender))) is expected


def test_lookups(directory: SqliteDirectory) -> None:
    async def go() -> None:
        assert await directory.is_local_domain("EXAMPLE.org")
        assert await directory.is_local_domain("example.net.")
        assert not await directory.is_local_domain("remote.com")
        acc = await directory.get_account("Alice@Example.org")
        assert acc is not None and acc.address == "alice@example.org"
        assert acc.password_hash == HASH and acc.enabled
        assert await directory.get_account("team@example.org") is None

    asyncio.run(go())


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (lambda d: d.add_user("x@remote.com", HASH), "remote.com is not a local domain"),
        (lambda d: d.add_user("alice@example.org", HASH), "already exists"),
        (lambda d: d.add_user("team@example.org", HASH), "is an alias"),
        (lambda d: d.add_user("new@example.org", "clear text"), "not an argon2 hash"),
        (lambda d: d.set_password("nobody@example.org", HASH), "no such account"),
        (lambda d: d.del_user("nobody@example.org"), "no such account"),
        (lambda d: d.add_alias("alice@example.org", ["bob@example.org"]), "is an account"),
        (lambda d: d.add_alias("me@example.org", ["me@example.org"]), "itself"),
        (lambda d: d.add_alias("x@remote.com", ["bob@example.org"]), "not a local domain"),
        (lambda d: d.add_alias("x@example.org", ["@example.net"]), "full address"),
        (lambda d: d.add_alias("x@example.org", []), "at least one target"),
        (lambda d: d.del_alias("nothing@example.org"), "no such alias"),
        (lambda d: d.add_domain("example.org"), "listed in the config file"),
        (lambda d: d.add_domain("example.net"), "already exists"),
        (lambda d: d.add_domain("bad_domain"), "not a valid domain"),
        (lambda d: d.del_domain("example.org"), "remove it there"),
        (lambda d: d.del_domain("example.net"), "still has 1 account(s) and 2 alias(es)"),
        (lambda d: d.del_domain("nowhere.com"), "no such domain"),
    ],
)
def test_admin_errors(directory: SqliteDirectory, action: object, message: str) -> None:
    with pytest.raises(DirectoryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        action(directory)  # type: ignore[operator]


def test_admin_roundtrip(directory: SqliteDirectory) -> None:
    assert directory.list_domains() == ["example.net", "example.org"]
    assert [a.address for a in directory.list_users("example.org")] == [
        "alice@example.org", "bob@example.org"]
    alias = directory.add_alias("team@example.org", ["carol@example.net", "alice@example.org"])
    assert alias.targets == ("alice@example.org", "bob@example.org", "carol@example.net")
    directory.del_alias("team@example.org")
    assert "team@example.org" not in {a.source for a in directory.list_aliases()}
    directory.del_user("bob@example.org")
    assert directory.find_account("bob@example.org") is None
    directory.del_user("carol@example.net")
    directory.del_alias("@example.net")
    directory.del_alias("alice@example.net")
    directory.del_domain("example.net")
    assert directory.list_domains() == ["example.org"]


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("user@example.org", True),
        ("first.last+tag@sub.example.org", True),
        ("josé@example.org", True),  # RFC 6532 UTF-8 local part
        ("user@example.org.", True),
        ("no-at-sign", False),
        ("two@@example.org", False),
        ("a@b@example.org", False),
        ("@example.org", False),
        ("user@", False),
        ("us er@example.org", False),
        ("user\t@example.org", False),
        ("user\x00@example.org", False),
        ('"quoted"@example.org', False),
        (".user@example.org", False),
        ("us..er@example.org", False),
        ("user%remote@example.org", False),  # percent hack
        ("host!user@example.org", False),  # bang path
        ("user@exa_mple.org", False),
        ("user@-example.org", False),
        ("user@[127.0.0.1]", False),
        ("user@127.0.0.1", False),
        ("user@bücher.de", False),  # use the A-label
        ("x" * 65 + "@example.org", False),
    ],
)
def test_check_address(text: str, ok: bool) -> None:
    if ok:
        assert check_address(text).endswith("@" + text.rpartition("@")[2].rstrip(".").lower())
    else:
        with pytest.raises(DirectoryError):
            check_address(text)


def _write_config(tmp_path: Path) -> Path:
    path = tmp_path / "postwarden.toml"
    path.write_text('hostname = "mail.example.org"\ndata_dir = "data"\n'
                    'domains = ["example.org"]\n')
    return path


def test_running_directory_sees_cli_changes(tmp_path: Path) -> None:
    """An open instance (the server) sees what the CLI (another process) writes."""
    cfg = _write_config(tmp_path)
    (tmp_path / "data").mkdir()
    with SqliteDirectory(tmp_path / "data" / "postwarden.db", ("example.org",)) as server:
        who = addr("dave@example.org")
        assert asyncio.run(server.resolve(who)) is None
        assert asyncio.run(server.get_account("dave@example.org")) is None

        run = subprocess.run(
            [sys.executable, "-m", "postwarden", "-c", str(cfg), "user", "add",
             "dave@example.org", "--password-stdin"],
            input="a long enough password\n", capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr
        assert asyncio.run(server.resolve(who)) == ["dave@example.org"]
        acc = asyncio.run(server.get_account("dave@example.org"))
        assert acc is not None and acc.password_hash.startswith("$argon2id$")

        assert cli.main(["-c", str(cfg), "domain", "add", "example.com"]) == 0
        assert asyncio.run(server.is_local_domain("example.com"))
        assert cli.main(["-c", str(cfg), "alias", "add", "@example.com",
                         "dave@example.org"]) == 0
        assert asyncio.run(server.resolve(addr("x@example.com"))) == ["dave@example.org"]

        assert cli.main(["-c", str(cfg), "user", "del", "dave@example.org"]) == 0
        assert asyncio.run(server.resolve(who)) is None
        assert asyncio.run(server.resolve(addr("x@example.com"))) is None


def test_shares_database_with_other_tables(tmp_path: Path) -> None:
    db_path = tmp_path / "postwarden.db"
    other = sqlite3.connect(db_path)
    other.execute("CREATE TABLE messages (queue_id TEXT PRIMARY KEY)")
    other.execute("PRAGMA user_version = 7")
    other.commit()
    other.close()
    with SqliteDirectory(db_path, ("example.org",)) as d:
        d.add_user("a@example.org", HASH)
    with SqliteDirectory(db_path, ()) as d:  # reopening migrates nothing twice
        assert d.find_account("a@example.org") is not None
    check = sqlite3.connect(db_path)
    assert check.execute("PRAGMA user_version").fetchone() == (7,)
    assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    tables = {r[0] for r in check.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"messages", "domains", "accounts", "aliases", "directory_schema"} <= tables
    check.close()


def test_new_database_file_is_private(tmp_path: Path) -> None:
    with SqliteDirectory(tmp_path / "new.db", ()):
        pass
    assert (tmp_path / "new.db").stat().st_mode & 0o077 == 0


# -- the lookup cache (storage/change_stamp.py) --------------------------------


def _behind_the_stamp(db_path: Path, sql: str, *args: object) -> None:
    """A change made to the file directly (an sqlite3 shell), not stamped."""
    raw = sqlite3.connect(db_path)
    raw.execute(sql, args)
    raw.commit()
    raw.close()


def test_lookups_cached_until_a_stamped_change(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's answers come from its cache until a writer stamps a
    change; a change made around the stamp is seen once MAX_AGE passed."""
    monkeypatch.setattr(change_stamp, "MAX_AGE", 0.3)
    db_path = tmp_path / "postwarden.db"
    with SqliteDirectory(db_path, ("example.org",)) as server, \
            SqliteDirectory(db_path, ("example.org",)) as cli_side:
        cli_side.add_user("alice@example.org", HASH)
        cli_side.add_domain("example.net")
        assert server.resolve_sync("alice@example.org") == ["alice@example.org"]
        assert server.is_local("example.net")

        _behind_the_stamp(db_path, "DELETE FROM accounts WHERE address = ?",
                          "alice@example.org")
        _behind_the_stamp(db_path, "DELETE FROM domains WHERE name = ?", "example.net")
        assert server.resolve_sync("alice@example.org") == ["alice@example.org"]  # cached
        assert server.is_local("example.net")
        time.sleep(0.35)
        assert server.resolve_sync("alice@example.org") is None
        assert not server.is_local("example.net")

        # A stamped change applies to the very next lookup, unknown answers included.
        cli_side.add_user("alice@example.org", HASH)
        assert server.resolve_sync("alice@example.org") == ["alice@example.org"]
        cli_side.add_domain("example.net")
        assert server.is_local("example.net")
        cli_side.del_user("alice@example.org")
        assert server.resolve_sync("alice@example.org") is None

    stamp = Path(f"{db_path}{change_stamp.SUFFIX}")
    assert stamp.stat().st_mode & 0o077 == 0


def test_resolved_list_is_the_callers_own(tmp_path: Path) -> None:
    with SqliteDirectory(tmp_path / "postwarden.db", ("example.org",)) as d:
        d.add_user("alice@example.org", HASH)
        first = d.resolve_sync("alice@example.org")
        assert first == ["alice@example.org"]
        first.append("mallory@example.com")
        assert d.resolve_sync("alice@example.org") == ["alice@example.org"]


def test_unreadable_stamp_turns_the_cache_off(tmp_path: Path) -> None:
    db_path = tmp_path / "postwarden.db"
    Path(f"{db_path}{change_stamp.SUFFIX}").mkdir()  # neither readable nor writable as a file
    logged = io.StringIO()
    old_stream = logmod._sink.stream
    logmod.configure(stream=logged)
    try:
        with SqliteDirectory(db_path, ("example.org",)) as cli_side:
            cli_side.add_user("alice@example.org", HASH)  # the stamp fails; the change stands
    finally:
        logmod.configure(stream=old_stream)
    assert "change_stamp_failed" in logged.getvalue()
    with SqliteDirectory(db_path, ("example.org",)) as server:
        assert server.resolve_sync("alice@example.org") == ["alice@example.org"]
        _behind_the_stamp(db_path, "DELETE FROM accounts WHERE address = ?",
                          "alice@example.org")
        assert server.resolve_sync("alice@example.org") is None  # read from the file


def test_answer_computed_across_a_change_is_not_kept(tmp_path: Path) -> None:
    """A lookup that overlaps a writer's commit keeps its answer under the
    token read before it, so the writer's stamp retires it."""
    stamp = change_stamp.ChangeStamp(tmp_path / "x.db")
    cache: change_stamp.StampedCache[int] = change_stamp.StampedCache(stamp)
    calls = []

    def racing() -> int:
        calls.append(1)
        stamp.bump()  # the writer commits and stamps while we query
        return len(calls)

    assert cache.get("k", racing) == 1
    assert cache.get("k", lambda: 2) == 2  # not served: 1 was computed before the stamp
    assert cache.get("k", lambda: 3) == 2  # this one stands: no change since


def test_stamp_file_replaced_by_hand_is_noticed_within_max_age(tmp_path: Path) -> None:
    now = [1000.0]
    stamp = change_stamp.ChangeStamp(tmp_path / "x.db", clock=lambda: now[0])
    assert stamp.read() == b""  # no change stamped yet
    stamp.bump()
    first = stamp.read()
    assert first and stamp.read() == first
    stamp.bump()
    second = stamp.read()
    assert second not in (b"", first)  # changed in place: seen at once

    Path(stamp.path).unlink()  # by hand; the next writer creates a new file
    stamp.bump()
    assert stamp.read() == second  # the reader still holds the old file
    now[0] += change_stamp.MAX_AGE
    third = stamp.read()
    assert third not in (b"", second)
    stamp.close()
