"""What the PostgreSQL queue adds to the conformance suite (tests/test_queue_store.py):
the [storage] config section, schema creation and migration, leases claimed
with SKIP LOCKED, expiry and takeover, LISTEN/NOTIFY wake-ups, node rows.

Real PostgreSQL (each test in a schema of its own), several stores in one
process standing in for several nodes.
"""

from __future__ import annotations

import asyncio
import copy
import os
import stat
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from tests.conftest import PG_DSN
from tests.test_queue_store import envelope, pg_settings, read_all, run

from postwarden import config
from postwarden.storage.base import CommitMeta, RcptStatus, RecipientResult, StorageError
from postwarden.storage.pg_queue import PgQueueStore
from postwarden.storage.sqlite_queue import MessageCorrupt

BASE: dict[str, Any] = {
    "hostname": "mail.example.org",
    "domains": ["example.org"],
    "listeners": {"mx": {"address": "127.0.0.1:25"}},
}


def parse_storage(table: dict[str, Any]) -> config.Config:
    data = copy.deepcopy(BASE)
    data["storage"] = table
    return config.parse(data, Path("/etc/postwarden/postwarden.toml"))


def test_storage_defaults_to_sqlite() -> None:
    cfg = config.parse(copy.deepcopy(BASE), Path("/etc/postwarden/postwarden.toml"))
    assert cfg.storage.backend == "sqlite" and not cfg.storage.postgres


def test_storage_postgres_settings() -> None:
    s = parse_storage({"backend": "postgres", "dsn": "postgresql://pw@db.example:5432/mail",
                       "schema": "mail_a", "pool_min": 1, "pool_max": 20, "lease": 30,
                       "heartbeat": 2.5}).storage
    assert (s.backend, s.dsn, s.schema) == ("postgres", "postgresql://pw@db.example:5432/mail",
                                            "mail_a")
    assert (s.pool_min, s.pool_max, s.lease, s.heartbeat) == (1, 20, 30.0, 2.5)


@pytest.mark.parametrize(("table", "key", "problem"), [
    ({"backend": "mysql"}, "storage.backend", "must be one of sqlite, postgres"),
    ({"backend": "postgres"}, "storage.dsn", "is required"),
    ({"backend": "postgres", "dsn": "db.example:5432"}, "storage.dsn", "postgresql://"),
    ({"dsn": "postgresql://db.example/mail"}, "storage.dsn", 'only used with backend'),
    ({"backend": "postgres", "dsn": "postgresql://x/y", "schema": "Mail-A"},
     "storage.schema", "SQL identifier"),
    ({"backend": "postgres", "dsn": "postgresql://x/y", "pool_max": 0}, "storage.pool_max",
     "at least 1"),
    ({"backend": "postgres", "dsn": "postgresql://x/y", "pool_min": 5, "pool_max": 2},
     "storage.pool_max", "at least pool_min"),
    ({"backend": "postgres", "dsn": "postgresql://x/y", "pool_max": 2.5}, "storage.pool_max",
     "whole number"),
    ({"backend": "postgres", "dsn": "postgresql://x/y", "lease": 10, "heartbeat": 6},
     "storage.heartbeat", "half the lease"),
    ({"backend": "postgres", "dsn": "postgresql://x/y", "lease": "1m"}, "storage.lease",
     "number of seconds"),
    ({"host": "db"}, "storage.host", "unknown key"),
    ({"shared_spool_dir": "/srv/spool"}, "storage.shared_spool_dir", "only used with backend"),
    ({"backend": "postgres", "dsn": "postgresql://x/y", "shared_spool_dir": "spool"},
     "storage.shared_spool_dir", "must be an absolute path, not 'spool'"),
    ({"backend": "postgres", "dsn": "postgresql://x/y", "shared_spool_dir": "/srv/../etc"},
     "storage.shared_spool_dir", "must not contain '..'"),
    ({"backend": "postgres", "dsn": "postgresql://x/y", "shared_spool_dir": 7},
     "storage.shared_spool_dir", "must be a string"),
])
def test_storage_errors_name_the_key(table: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        parse_storage(table)
    assert info.value.key == key
    assert problem in info.value.problem


def test_the_shared_spool_directory_must_be_there(tmp_path: Path) -> None:
    table = {"backend": "postgres", "dsn": "postgresql://x/y",
             "shared_spool_dir": str(tmp_path / "nfs")}
    cfg = parse_storage(table)
    assert cfg.storage.shared_spool_dir == str(tmp_path / "nfs")
    with pytest.raises(config.ConfigError) as info:
        config.check_shared_spool(cfg)
    assert info.value.key == "storage.shared_spool_dir"
    assert "does not exist (is the shared file system mounted?)" in info.value.problem
    (tmp_path / "nfs").write_text("")
    with pytest.raises(config.ConfigError, match="is not a directory"):
        config.check_shared_spool(cfg)
    (tmp_path / "nfs").unlink()
    (tmp_path / "nfs").mkdir()
    config.check_shared_spool(cfg)


async def open_pg(tmp: Path, schema: str, name: str = "", **kw: Any) -> PgQueueStore:
    store = PgQueueStore(pg_settings(schema, **kw), tmp / name / "spool", node_id=name or "")
    await store.start()
    return store


async def put(store: PgQueueStore, data: bytes = b"body\r\n", *rcpts: str) -> str:
    body = store.new_body()
    body.write(data)
    return await store.commit(body, envelope(*rcpts), b"", CommitMeta())


def test_two_nodes_starting_at_once_create_the_schema_once(tmp_path: Path,
                                                           pg_schema: str) -> None:
    async def main() -> None:
        stores = await asyncio.gather(*(open_pg(tmp_path, pg_schema, f"n{i}")
                                        for i in range(4)))
        queue_id = await put(stores[0])
        assert (await stores[3].get(queue_id)) is not None
        assert {n["node_id"] for n in await stores[1].nodes()} == {"n0", "n1", "n2", "n3"}
        for s in stores:
            await s.close()
        # A clean stop deregisters the node.
        again = await open_pg(tmp_path, pg_schema, "n9")
        assert [n["node_id"] for n in await again.nodes()] == ["n9"]
        await again.close()

    run(main)


def test_a_schema_of_version_3_is_migrated_and_keeps_its_queue(tmp_path: Path,
                                                               pg_schema: str) -> None:
    from postwarden.storage import pg_schema as schema_mod

    async def main() -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:  # what a postwarden of schema 3 created, with a message queued
            await conn.execute(f'CREATE SCHEMA "{pg_schema}"')
            await conn.execute(f'SET search_path TO "{pg_schema}"')
            await conn.execute("CREATE TABLE pw_schema (version INTEGER NOT NULL)")
            await conn.execute("INSERT INTO pw_schema VALUES (3)")
            for version in range(3):
                for stmt in schema_mod._statements(schema_mod.MIGRATIONS[version]):
                    await conn.execute(stmt)
            await conn.execute(
                "INSERT INTO messages (queue_id, sender, params, received_at, size, prepend, "
                "body, body_size, checksum) VALUES ('OLDMESSAGE234567', '', '{}', 1, 5, '', "
                "$1, 5, 0)", b"old\r\n")
            assert await schema_mod.prepare(conn, pg_schema) == 3
            assert await conn.fetchval("SELECT version FROM pw_schema") == schema_mod.SCHEMA_VERSION
            assert await conn.fetchval("SELECT spool_name FROM messages") == ""
            assert await conn.fetchval("SELECT count(*) FROM quarantine") == 0
            assert await conn.fetchval("SELECT version FROM dkim_version") == 0
        finally:
            await conn.close()

    run(main)


def test_a_newer_schema_is_refused(tmp_path: Path, pg_schema: str) -> None:
    async def main() -> None:
        store = await open_pg(tmp_path, pg_schema)
        await store.close()
        conn = await asyncpg.connect(PG_DSN)
        await conn.execute(f'UPDATE "{pg_schema}".pw_schema SET version = 99')
        await conn.close()
        with pytest.raises(StorageError, match="version 99, newer than"):
            await open_pg(tmp_path, pg_schema)

    run(main)


def test_unreachable_database_is_a_storage_error_without_the_dsn(tmp_path: Path) -> None:
    async def main() -> None:
        settings = pg_settings("x", dsn="postgresql://pw:secret@127.0.0.1:1/test")
        store = PgQueueStore(settings, tmp_path / "spool")
        with pytest.raises(StorageError) as info:
            await store.start()
        assert "[storage] dsn" in str(info.value) and "secret" not in str(info.value)

    run(main)


def test_each_due_message_is_claimed_by_one_node_only(tmp_path: Path, pg_schema: str) -> None:
    async def main() -> None:
        a, b, c = [await open_pg(tmp_path, pg_schema, n) for n in ("a", "b", "c")]
        ids = {await put(a, f"m{i}\r\n".encode()) for i in range(60)}
        claims = await asyncio.gather(*(s.claim(1e12, 7) for s in (a, b, c) for _ in range(4)))
        got = [m.queue_id for batch in claims for m in batch]
        assert len(got) == len(set(got)) == 60 and set(got) == ids
        assert await a.claim(1e12, 100) == []  # all leased
        # The leases are visible to the others: nothing more for anyone.
        assert await b.claim(1e12, 100) == []
        assert a.in_flight + b.in_flight + c.in_flight == 60
        for s in (a, b, c):
            await s.close()

    run(main)


def test_results_release_the_lease_and_deferred_mail_comes_back(tmp_path: Path,
                                                                pg_schema: str) -> None:
    async def main() -> None:
        a = await open_pg(tmp_path, pg_schema, "a")
        b = await open_pg(tmp_path, pg_schema, "b")
        queue_id = await put(a, b"x\r\n", "r1@example.test", "r2@example.test")
        [msg] = await a.claim(100.0, 10)
        r1, r2 = msg.recipients
        await a.record_results(queue_id, [
            RecipientResult(r1.id, RcptStatus.DELIVERED, "2.0.0 ok"),
            RecipientResult(r2.id, RcptStatus.DEFERRED, "4.4.1 later", next_attempt=200.0)])
        assert a.in_flight == 0
        assert await b.claim(150.0, 10) == []  # not due yet
        [again] = await b.claim(200.0, 10)  # lease released: b may take it
        assert [r.address for r in again.recipients] == ["r2@example.test"]
        await b.record_results(queue_id, [
            RecipientResult(r2.id, RcptStatus.DELIVERED, "2.0.0 ok")])
        assert await a.get(queue_id) is None
        events = [e.event for e in await a.history(queue_id)]
        assert events == ["queued", "queued", "delivered", "deferred", "delivered", "removed"]
        await a.close()
        await b.close()

    run(main)


def test_an_expired_lease_is_taken_over_and_counted(tmp_path: Path, pg_schema: str) -> None:
    async def main() -> None:
        clock = [1000.0]
        dead = PgQueueStore(pg_settings(pg_schema, lease=30.0, heartbeat=5.0),
                            tmp_path / "d", node_id="dead", clock=lambda: clock[0])
        live = PgQueueStore(pg_settings(pg_schema, lease=30.0, heartbeat=5.0),
                            tmp_path / "l", node_id="live", clock=lambda: clock[0])
        await dead.start()
        await live.start()
        queue_id = await put(dead)
        assert [m.queue_id for m in await dead.claim(clock[0], 10)] == [queue_id]
        clock[0] += 20
        await dead.heartbeat()  # renewed while delivering: until 1050
        clock[0] += 25
        assert await live.claim(clock[0], 10) == []  # 1045: still leased
        clock[0] += 10  # 1055: "dead" stopped renewing (it died)
        [msg] = await live.claim(clock[0], 10)
        assert msg.queue_id == queue_id
        assert live.lease_stats.takeovers == 1 and dead.lease_stats.takeovers == 0
        [event] = [e for e in await live.history(queue_id) if e.event == "lease_expired"]
        assert event.relay == "dead"
        await live.heartbeat()
        [row] = [n for n in await live.nodes() if n["node_id"] == "live"]
        assert (row["in_flight"], row["takeovers"]) == (1, 1)
        await live.close()  # releases its lease
        survivor = await open_pg(tmp_path, pg_schema, "next")
        assert [m.queue_id for m in await survivor.claim(clock[0], 10)] == [queue_id]
        await survivor.close()
        await dead.close()

    run(main)


def test_a_commit_on_one_node_wakes_the_others(tmp_path: Path, pg_schema: str) -> None:
    async def main() -> None:
        a = await open_pg(tmp_path, pg_schema, "a")
        b = await open_pg(tmp_path, pg_schema, "b")
        woke = asyncio.Event()
        b.on_commit.append(lambda _qid: woke.set())
        await put(a)
        await asyncio.wait_for(woke.wait(), 5)
        # The queue commands wake them too (release, flush, requeue).
        woke.clear()
        queue_id = await put(a)
        await asyncio.wait_for(woke.wait(), 5)
        woke.clear()
        assert await a.set_held(queue_id, True)
        assert await a.set_held(queue_id, False)
        await asyncio.wait_for(woke.wait(), 5)
        await a.close()
        await b.close()

    run(main)


def test_queue_commands(tmp_path: Path, pg_schema: str) -> None:
    async def main() -> None:
        store = await open_pg(tmp_path, pg_schema)
        queue_id = await put(store, b"q\r\n", "a@example.test", "b@example.test")
        [msg] = await store.claim(100.0, 10)
        await store.record_results(queue_id, [
            RecipientResult(r.id, RcptStatus.DEFERRED, "4.4.1 later", next_attempt=5000.0)
            for r in msg.recipients])
        assert await store.due(200.0, 10) == []
        assert await store.claim(200.0, 10) == []
        assert await store.flush() == 2
        assert len(await store.due(store._clock(), 10)) == 1
        [again] = await store.claim(store._clock(), 10)  # flushed: claimable now
        await store.release(again.queue_id)
        assert await store.requeue(queue_id)
        full = await store.get(queue_id)
        assert full is not None and [r.attempts for r in full.recipients] == [0, 0]
        assert not await store.requeue("NOSUCHID")
        assert await store.flush("NOSUCHID") == 0
        assert await store.delete(queue_id)
        assert not await store.delete(queue_id)
        events = [e.event for e in await store.history(queue_id)]
        assert events[-2:] == ["requeued", "deleted"]
        assert await store.prune_events(keep=-10.0) >= len(events)
        assert await store.history(queue_id) == []
        await store.close()

    run(main)


def test_a_damaged_body_is_quarantined(tmp_path: Path, pg_schema: str) -> None:
    async def main() -> None:
        store = await open_pg(tmp_path, pg_schema)
        queue_id = await put(store, b"a" * 200_000)
        assert await read_all(store, queue_id) == b"a" * 200_000
        conn = await asyncpg.connect(PG_DSN)
        await conn.execute(f"UPDATE \"{pg_schema}\".messages SET body = overlay(body "
                           "PLACING 'b'::bytea FROM 150000) WHERE queue_id = $1", queue_id)
        await conn.close()
        with pytest.raises(MessageCorrupt):
            await read_all(store, queue_id)
        assert await store.state(queue_id) == "corrupt"
        assert await store.claim(1e12, 10) == []  # never delivered
        await store.close()

    run(main)


def test_protection_state_is_the_same_for_two_nodes(pg_schema: str) -> None:
    from tests.conftest import pg_pool

    from postwarden.storage.pg_protect import PgProtectStore

    async def main() -> None:
        pool_a, pool_b = await pg_pool(pg_schema), await pg_pool(pg_schema)
        a, b = PgProtectStore(pool_a), PgProtectStore(pool_b)
        assert await b.banned("192.0.2.9") is None  # B caches "no bans"
        await a.ban("192.0.2.9", "auth", (900.0,), 86400.0)
        await asyncio.sleep(1.1)  # BAN_CACHE_SECONDS
        ban = await b.banned("192.0.2.9")
        assert ban is not None and ban.reason == "auth"
        # Failures and rates count what the client did on both nodes.
        assert [await s.record("auth_ip", "192.0.2.7", 900) for s in (a, b, a)] == [1, 2, 3]
        await a.clear("auth_ip", "192.0.2.7")
        assert await b.record("auth_ip", "192.0.2.7", 900) == 1
        await a.add_rates([("msg:ip:192.0.2.7", 2)], 3600)
        await b.add_rates([("msg:ip:192.0.2.7", 3)], 3600)
        assert await a.rate("msg:ip:192.0.2.7", 3600) == pytest.approx(5, abs=0.01)
        await a.lock("Alice@example.test", "192.0.2.7", "auth", 600)
        assert await b.locked("alice@example.test", "192.0.2.7")
        await pool_a.close()
        await pool_b.close()

    run(main)


def test_a_node_survives_losing_its_connections(tmp_path: Path, pg_schema: str) -> None:
    async def main() -> None:
        a = await open_pg(tmp_path, pg_schema, "a", heartbeat=0.2, lease=5.0)
        b = await open_pg(tmp_path, pg_schema, "b")
        woke = asyncio.Event()
        a.on_commit.append(lambda _qid: woke.set())
        # The database drops every connection of node A (a restart, a failover).
        admin = await asyncpg.connect(PG_DSN)
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'postwarden a'")
        await admin.close()
        assert killed >= 2  # the pool's and the LISTEN connection
        # A listens again at its next heartbeat (and wakes, for what it missed) ...
        await asyncio.wait_for(woke.wait(), 5)
        woke.clear()
        # ... then hears B's commits again, and its own pool reconnects.
        await put(b)
        await asyncio.wait_for(woke.wait(), 5)
        for _ in range(3):  # the pool may hand out a dead connection first
            try:
                await put(a)
                break
            except StorageError:
                continue
        else:
            raise AssertionError("node A cannot commit after reconnecting")
        assert len(await a.list()) >= 2
        await a.close()
        await b.close()

    run(main)


def test_heartbeats_and_results_at_once_never_deadlock(tmp_path: Path, pg_schema: str) -> None:
    async def main() -> None:
        store = await open_pg(tmp_path, pg_schema, "n")
        for _ in range(3):
            for i in range(80):
                await put(store, f"m{i}\r\n".encode())
            msgs = await store.claim(1e12, 100)
            assert len(msgs) == 80
            stop = asyncio.Event()

            async def beat(stop: asyncio.Event) -> None:
                while not stop.is_set():
                    await store.heartbeat()

            beats = [asyncio.create_task(beat(stop)) for _ in range(2)]
            await asyncio.gather(*(store.record_results(m.queue_id, [
                RecipientResult(r.id, RcptStatus.DELIVERED, "2.0.0 ok") for r in m.recipients])
                for m in msgs))
            stop.set()
            await asyncio.gather(*beats)
            assert await store.list() == []
        await store.close()

    run(main)


# ---- the shared spool -------------------------------------------------------

def shared_files(root: Path) -> list[Path]:
    return sorted(root.glob("*.spool"))


def test_a_shared_spool_body_is_read_by_another_node_and_removed_with_the_message(
        tmp_path: Path, pg_schema: str) -> None:
    shared = tmp_path / "nfs"
    shared.mkdir()
    body = os.urandom(300_000)  # beyond the inline limit: a file

    async def main() -> None:
        a = await open_pg(tmp_path, pg_schema, "a", shared_spool_dir=str(shared))
        b = await open_pg(tmp_path, pg_schema, "b", shared_spool_dir=str(shared))
        queue_id = await put(a, body)
        [file] = shared_files(shared)
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        assert file.read_bytes() == body
        [row] = await b.pool.fetch("SELECT octet_length(body), spool_name FROM messages")
        assert row[0] == 0 and row[1] == file.name  # the row names the file
        small = await put(a, b"small\r\n")  # inline: in the row
        assert len(shared_files(shared)) == 1
        claimed = {m.queue_id: m for m in await b.claim(1e12, 10)}
        assert await read_all(b, queue_id) == body
        assert await read_all(b, small) == b"small\r\n"
        for qid, msg in claimed.items():
            await b.record_results(qid, [RecipientResult(r.id, RcptStatus.DELIVERED, "2.0.0 ok")
                                         for r in msg.recipients])
        assert shared_files(shared) == []  # removed after the message
        # A body deleted by `queue delete` goes too.
        doomed = await put(a, body)
        assert len(shared_files(shared)) == 1
        assert await b.delete(doomed) is True
        assert shared_files(shared) == []
        await a.close()
        await b.close()

    run(main)


def test_a_missing_or_altered_shared_spool_file_marks_the_message_corrupt(
        tmp_path: Path, pg_schema: str) -> None:
    shared = tmp_path / "nfs"
    shared.mkdir()

    async def main() -> None:
        store = await open_pg(tmp_path, pg_schema, shared_spool_dir=str(shared))
        altered = await put(store, b"a" * 200_000)
        [file] = shared_files(shared)
        file.write_bytes(b"a" * 199_999 + b"b")
        missing = await put(store, b"c" * 200_000)
        [other] = [f for f in shared_files(shared) if f != file]
        other.unlink()
        for queue_id in (altered, missing):
            with pytest.raises(MessageCorrupt):
                await read_all(store, queue_id)
            assert await store.state(queue_id) == "corrupt"
        await store.close()

    run(main)


def test_a_commit_that_fails_leaves_no_file_and_old_garbage_is_swept(
        tmp_path: Path, pg_schema: str) -> None:
    shared = tmp_path / "nfs"
    shared.mkdir()

    async def main() -> None:
        store = await open_pg(tmp_path, pg_schema, shared_spool_dir=str(shared))
        meta = CommitMeta(queue_id="ABCDEFGHIJKLMNOP")
        for expect_error in (False, True):
            body = store.new_body()
            body.write(b"q" * 200_000)
            if expect_error:
                with pytest.raises(StorageError):  # the id is taken
                    await store.commit(body, envelope(), b"", meta)
            else:
                await store.commit(body, envelope(), b"", meta)
        [kept] = shared_files(shared)
        # Files no row names: an old one is garbage, a young one may be a
        # body still arriving on some node.
        old, young = shared / ("0" * 32 + ".spool"), shared / ("1" * 32 + ".spool")
        for f in (old, young):
            f.write_bytes(b"x")
        day_ago = time.time() - 2 * 86400
        for f in (old, kept):
            os.utime(f, (day_ago, day_ago))
        (shared / "notes.txt").write_text("not ours")
        assert await store.sweep_shared_spool() == 1
        assert sorted(p.name for p in shared.iterdir()) == sorted(
            [kept.name, young.name, "notes.txt"])
        await store.close()

    run(main)
