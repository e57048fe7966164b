"""DKIM keys in PostgreSQL (postwarden.storage.pg_dkim): commands work on a
copy and write it back; overlapping changes never lose one another; a
node's copy follows the table."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tests.conftest import PG_DSN, pg_pool

from postwarden.dkim_keys import DkimKeyError, KeyStore
from postwarden.storage.pg_dkim import DkimReplica, key_copy, read_keys
from postwarden.storage.settings import StorageSettings

DOMAIN = "example.test"


def settings(schema: str) -> StorageSettings:
    return StorageSettings(backend="postgres", dsn=PG_DSN, schema=schema)


def test_a_change_is_written_back_and_a_failed_one_is_not(pg_schema: str) -> None:
    s = settings(pg_schema)
    with key_copy(s, edit=True) as store:
        store.generate(DOMAIN, "one", "ed25519", activate=True)
    version, rows = read_keys(s)
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [(DOMAIN, "one", "ed25519", True)]
    assert rows[0][3].startswith(b"-----BEGIN PRIVATE KEY-----")
    with pytest.raises(DkimKeyError), key_copy(s, edit=True) as store:
        store.generate(DOMAIN, "two", "ed25519")
        store.activate(DOMAIN, "nosuch")
    assert read_keys(s) == (version, rows)
    with key_copy(s) as store:  # reading only: nothing written, nothing left behind
        root = store.root
        assert [k.selector for k in store.active(DOMAIN)] == ["one"]
    assert read_keys(s) == (version, rows) and not root.exists()


def test_overlapping_changes_are_refused_rather_than_lost(pg_schema: str) -> None:
    s = settings(pg_schema)
    with pytest.raises(DkimKeyError, match="changed meanwhile"), \
            key_copy(s, edit=True) as first:
        first.generate(DOMAIN, "first", "ed25519")
        with key_copy(s, edit=True) as second:
            second.generate(DOMAIN, "second", "ed25519")
    assert [r[1] for r in read_keys(s)[1]] == ["second"]


def test_a_node_copy_follows_the_table(pg_schema: str, tmp_path: Path) -> None:
    s = settings(pg_schema)

    async def main() -> None:
        pool = await pg_pool(pg_schema)
        try:
            copy = KeyStore(tmp_path / "dkim-cache")
            replica = DkimReplica(pool, copy)
            await replica.start()
            assert copy.domains() == []
            await asyncio.to_thread(generate, s)
            assert await replica.refresh() is True
            assert [k.selector for k in copy.active(DOMAIN)] == ["new"]
            assert await replica.refresh() is False  # unchanged: nothing rewritten
            await replica.stop()
        finally:
            await pool.close()

    def generate(s: StorageSettings) -> None:
        with key_copy(s, edit=True) as store:
            store.generate(DOMAIN, "new", "ed25519", activate=True)

    asyncio.run(main())
