"""The quarantine store, the same tests against SQLite and PostgreSQL
(what the filter service, ``postwarden quarantine`` and the web admin use)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import PG_DSN

from postwarden.storage.pg_quarantine import PgQuarantine
from postwarden.storage.settings import StorageSettings
from postwarden.storage.sqlite_quarantine import (
    HeldMessage,
    QuarantineError,
    QuarantineStore,
    SqliteQuarantine,
    new_id,
)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        q: QuarantineStore = SqliteQuarantine(tmp_path / "postwarden.db")
    else:
        schema = request.getfixturevalue("pg_schema")
        q = PgQuarantine(StorageSettings(backend="postgres", dsn=PG_DSN, schema=schema))
    with q:
        yield q


def held(ts: float, **kw: Any) -> HeldMessage:
    fields: dict[str, Any] = {
        "id": new_id(), "ts": ts, "direction": "outbound", "sender": "alice@example.test",
        "recipients": ("bob@example.test", "Ünïcode@example.test"), "filters": ("dlp",),
        "reasons": ("dlp: outgoing content review: card x1",), "rules": ("DLP_CARD",),
        "size": 42, "client_ip": "127.0.0.1", "helo": "client.example",
        "auth_user": "alice@example.test", "listener": "submission",
        "envelope": {"mail": {"size": 42}, "rcpt": [{"address": "bob@example.test"}]}}
    fields.update(kw)
    return HeldMessage(**fields)


def test_a_held_message_round_trips_whole(store: QuarantineStore) -> None:
    h = held(time.time())
    message = b"Received: from x\r\nSubject: numbers\r\n\r\n\x00\xff binary\r\n"
    store.add(h, message)
    assert store.get(h.id) == (h, message)
    assert store.list() == [h]
    assert store.get("Q000000000000") is None


def test_list_is_oldest_first_and_bounded(store: QuarantineStore) -> None:
    now = time.time()
    items = [held(now - age) for age in (30, 10, 20)]
    for h in items:
        store.add(h, b"m\r\n")
    listed = store.list()
    assert [h.ts for h in listed] == sorted(h.ts for h in items)
    assert len(store.list(limit=2)) == 2


def test_delete_and_expire(store: QuarantineStore) -> None:
    now = time.time()
    old, new = held(now - 3600), held(now - 5)
    store.add(old, b"old\r\n")
    store.add(new, b"new\r\n")
    assert store.expire(600, now=now) == 1
    assert [h.id for h in store.list()] == [new.id]
    assert store.delete(new.id) is True
    assert store.delete(new.id) is False
    assert store.list() == []


def test_an_id_is_held_once(store: QuarantineStore) -> None:
    h = held(time.time())
    store.add(h, b"m\r\n")
    with pytest.raises(Exception):  # noqa: B017 - the backend's integrity error
        store.add(h, b"m\r\n")
    assert len(store.list()) == 1


def test_an_unreachable_database_is_a_quarantine_error_without_the_dsn() -> None:
    q = PgQuarantine(StorageSettings(backend="postgres",
                                     dsn="postgresql://pw:secret@127.0.0.1:1/none"))
    with pytest.raises(QuarantineError) as info:
        q.list()
    assert "secret" not in str(info.value) and "[storage] dsn" in str(info.value)
