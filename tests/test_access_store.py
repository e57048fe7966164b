"""The access-list store, the same tests against SQLite and PostgreSQL
(what ``postwarden access``, the web admin's Access page and the servers'
access checks read and write)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.conftest import PG_DSN

from postwarden.storage.base import StorageError
from postwarden.storage.pg_access import PgAccessStore
from postwarden.storage.settings import StorageSettings
from postwarden.storage.sqlite_access import AccessStore, AccessTables


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        s: AccessTables = AccessStore(tmp_path / "postwarden.db")
    else:
        schema = request.getfixturevalue("pg_schema")
        s = PgAccessStore(StorageSettings(backend="postgres", dsn=PG_DSN, schema=schema))
    with s:
        yield s


def test_entries_are_added_listed_and_deleted(store: AccessTables) -> None:
    assert store.entries() == []
    assert store.add("deny", "192.0.2.0/24")
    assert store.add("deny_sender", "*@spam.example", "submission")
    assert store.add("allow", "2001:db8::/32")
    listed = [(e.listener, e.kind, e.value) for e in store.entries()]
    assert listed == [("", "allow", "2001:db8::/32"), ("", "deny", "192.0.2.0/24"),
                      ("submission", "deny_sender", "*@spam.example")]
    assert [e.value for e in store.entries("submission")] == ["*@spam.example"]
    assert [e.value for e in store.entries("")] == ["2001:db8::/32", "192.0.2.0/24"]
    assert store.delete("deny", "192.0.2.0/24")
    assert not store.delete("deny", "192.0.2.0/24")  # gone already
    assert not store.delete("deny_sender", "*@spam.example")  # another listener's
    assert [e.value for e in store.entries()] == ["2001:db8::/32", "*@spam.example"]


def test_the_version_moves_on_each_change_and_only_then(store: AccessTables) -> None:
    v0 = store.version()
    assert store.add("deny_helo", "*.bad.example")
    v1 = store.version()
    assert v0 < v1
    assert not store.add("deny_helo", "*.bad.example")  # already there: no change
    assert not store.delete("deny", "198.51.100.1/32")
    assert store.version() == v1
    assert store.delete("deny_helo", "*.bad.example")
    assert v1 < store.version()


def test_the_same_entry_may_be_global_and_per_listener(store: AccessTables) -> None:
    assert store.add("deny", "203.0.113.0/24")
    assert store.add("deny", "203.0.113.0/24", "mx")
    assert len(store.entries()) == 2


def test_an_unreachable_database_is_a_storage_error_without_the_dsn() -> None:
    dsn = "postgresql://postwarden:s3cret@127.0.0.1:1/none"
    with pytest.raises(StorageError) as info:
        PgAccessStore(StorageSettings(backend="postgres", dsn=dsn, schema="x"))
    assert "s3cret" not in str(info.value)
    assert "PostgreSQL at [storage] dsn" in str(info.value)
