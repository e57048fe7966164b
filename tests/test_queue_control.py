"""Queue control in the SQLite store (flush, requeue, hold, delete, history),
from the server's store and from a second instance on the same database
(what the CLI opens), plus the schema migration.  Real files throughout."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from postwarden.envelope import Address, Envelope, RcptParams, Recipient
from postwarden.storage.base import (
    CommitMeta,
    DeliveryEvent,
    RcptStatus,
    RecipientResult,
    StorageError,
)
from postwarden.storage.sqlite_queue import MessageCorrupt, SqliteQueueStore
from postwarden.storage.sqlite_schema import MIGRATIONS, SCHEMA_VERSION

T = TypeVar("T")
T0 = 1_700_000_000.0


def run(func: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await func()
    return asyncio.run(main())


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def paths(tmp: Path) -> tuple[Path, Path]:
    return tmp / "data" / "postwarden.db", tmp / "data" / "spool"


async def open_store(tmp: Path, clock: Callable[[], float] = lambda: T0) -> SqliteQueueStore:
    store = SqliteQueueStore(*paths(tmp), inline_max=1024, clock=clock)
    await store.start()
    return store


async def commit(store: SqliteQueueStore, *rcpts: str, size: int = 10) -> str:
    body = store.new_body()
    body.write(b"x" * size)
    env = Envelope(Address("alice", "example.test"),
                   recipients=[Recipient(Address.parse_simple(r)) for r in rcpts or ("b@x.test",)])
    return await store.commit(body, env, b"", CommitMeta(client_ip="192.0.2.1"))


async def defer(store: SqliteQueueStore, queue_id: str, until: float) -> None:
    msg = await store.get(queue_id)
    assert msg is not None
    await store.record_results(queue_id, [
        RecipientResult(r.id, RcptStatus.DEFERRED, "4.4.1 connection refused", until,
                        relay="mx.x.test[192.0.2.9]:25") for r in msg.recipients])


def test_history_follows_a_message_and_outlives_it(tmp_path: Path) -> None:
    clock = Clock()

    async def main() -> None:
        store = await open_store(tmp_path, clock)
        queue_id = await commit(store, "a@x.test", "b@x.test")
        msg = await store.get(queue_id)
        assert msg is not None
        a, b = msg.recipients
        clock.now = T0 + 5
        await store.record_results(queue_id, [
            RecipientResult(a.id, RcptStatus.DELIVERED, "2.0.0 250 ok", relay="local"),
            RecipientResult(b.id, RcptStatus.DEFERRED, "4.4.1 refused", T0 + 100, relay="r")])
        got = await store.get(queue_id)
        assert got is not None
        a2, b2 = got.recipients
        assert (a2.relay, a2.last_attempt, a2.final_ts) == ("local", T0 + 5, T0 + 5)
        assert (b2.relay, b2.last_attempt, b2.final_ts, b2.warned) == ("r", T0 + 5, 0.0, False)
        clock.now = T0 + 200
        await store.record_results(
            queue_id, [RecipientResult(b.id, RcptStatus.FAILED, "5.4.7 expired", event="expired")],
            [DeliveryEvent(T0 + 200, queue_id, "bounced", "b@x.test", reply="BOUNCEID")])
        assert await store.get(queue_id) is None
        assert await store.history(queue_id) == [
            # The trace: one queued event per recipient, with the sender.
            DeliveryEvent(T0, queue_id, "queued", "a@x.test",
                          reply="from=<alice@example.test>, size=10, nrcpt=2, client=192.0.2.1",
                          sender="alice@example.test"),
            DeliveryEvent(T0, queue_id, "queued", "b@x.test", sender="alice@example.test"),
            DeliveryEvent(T0 + 5, queue_id, "delivered", "a@x.test", "local", "2.0.0", "250 ok"),
            DeliveryEvent(T0 + 5, queue_id, "deferred", "b@x.test", "r", "4.4.1", "refused"),
            DeliveryEvent(T0 + 200, queue_id, "expired", "b@x.test", "", "5.4.7", "expired"),
            DeliveryEvent(T0 + 200, queue_id, "bounced", "b@x.test", reply="BOUNCEID"),
            DeliveryEvent(T0 + 200, queue_id, "removed"),
        ]
        assert await store.history("NOSUCHMESSAGE000") == []
        await store.close()

    run(main)


def test_flush_makes_pending_recipients_due(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        one, two, held = [await commit(store, "a@x.test", "b@x.test") for _ in range(3)]
        for queue_id in (one, two, held):
            await defer(store, queue_id, T0 + 3600)
        assert await store.set_held(held, True)
        assert await store.due(T0, 10) == []
        assert await store.flush(one) == 2
        assert [m.queue_id for m in await store.due(T0, 10)] == [one]
        assert await store.flush() == 4  # one and two; not the held one
        assert {m.queue_id for m in await store.due(T0, 10)} == {one, two}
        assert await store.flush("NOSUCHMESSAGE000") == 0
        msg = await store.get(one)
        assert msg is not None and all(r.attempts == 1 for r in msg.recipients)
        await store.close()

    run(main)


def test_hold_release_requeue_and_delete(tmp_path: Path) -> None:
    clock = Clock()

    async def main() -> None:
        store = await open_store(tmp_path, clock)
        queue_id = await commit(store, "a@x.test")
        await defer(store, queue_id, T0 + 3600)
        clock.now = T0 + 1
        assert await store.set_held(queue_id, True)
        msg = await store.get(queue_id)
        assert msg is not None and msg.held
        assert await store.flush(queue_id) == 0  # held: flush does not release
        clock.now = T0 + 2
        assert await store.requeue(queue_id)  # releases and starts over
        msg = await store.get(queue_id)
        assert msg is not None and not msg.held
        [rcpt] = msg.recipients
        assert (rcpt.attempts, rcpt.next_attempt, rcpt.status) == (0, 0.0, RcptStatus.DEFERRED)
        assert [m.queue_id for m in await store.due(T0, 10)] == [queue_id]
        clock.now = T0 + 3
        assert await store.set_held(queue_id, False)
        assert await store.delete(queue_id)
        assert await store.get(queue_id) is None
        assert not await store.delete(queue_id)
        assert not await store.set_held(queue_id, True)
        assert not await store.requeue(queue_id)
        assert [(e.ts, e.event) for e in await store.history(queue_id)] == [
            (T0, "queued"), (T0, "deferred"), (T0 + 1, "held"), (T0 + 2, "requeued"),
            (T0 + 3, "released"), (T0 + 3, "deleted")]
        await store.close()

    run(main)


def test_second_instance_changes_rows_but_never_removes_spool_files(tmp_path: Path) -> None:
    async def main() -> None:
        server = await open_store(tmp_path)
        assert server.owns_spool
        cli = await open_store(tmp_path)
        assert not cli.owns_spool
        big = await commit(server, "a@x.test", size=50_000)
        small = await commit(server, "a@x.test")
        [spool] = list(paths(tmp_path)[1].glob("*.spool"))
        # The CLI's changes are visible to the server at once (WAL).
        assert await cli.set_held(small, True)
        assert await server.due(T0 + 1, 10) == [await server.get(big)]
        assert await cli.requeue(small)
        assert len(await server.due(T0 + 1, 10)) == 2
        # The server reads the big message while the CLI deletes it.
        reader = server.read_message(big)
        first = await anext(reader)
        assert await cli.delete(big)
        assert spool.exists()  # not the CLI's to remove
        rest = b"".join([chunk async for chunk in reader])
        assert len(first + rest) == 50_000
        # Too young for the periodic collection; collected when old enough.
        assert await server.collect_garbage() == 0
        assert await cli.collect_garbage(min_age=0) == 0  # never by the CLI
        assert await server.collect_garbage(min_age=0) == 1
        assert not spool.exists()
        # A read that starts after the delete fails cleanly (not "corrupt").
        with pytest.raises(StorageError, match="no message") as info:
            await anext(server.read_message(big))
        assert not isinstance(info.value, MessageCorrupt)
        assert [e.event for e in await server.history(big)] == ["queued", "deleted"]
        await cli.close()
        await server.close()

    run(main)


def test_a_body_gone_with_its_row_is_not_corruption(tmp_path: Path) -> None:
    """Between reading the row and opening the spool file, the CLI may delete
    the message and the collection remove the file.  That window has no
    await point to stop in, so the verdict it reaches is checked directly."""

    async def main() -> None:
        server = await open_store(tmp_path)
        cli = await open_store(tmp_path)
        queue_id = await commit(server, "a@x.test", size=50_000)
        assert await cli.delete(queue_id)
        with pytest.raises(StorageError, match="was deleted") as info:
            await server._corrupt(queue_id, "spool file missing")
        assert not isinstance(info.value, MessageCorrupt)
        assert "corrupt" not in [e.event for e in await server.history(queue_id)]
        # A message that still exists is quarantined, with an event.
        other = await commit(server, "a@x.test")
        with pytest.raises(MessageCorrupt):
            await server._corrupt(other, "spool file missing")
        assert await server.state(other) == "corrupt"
        assert [e.event for e in await server.history(other)] == ["queued", "corrupt"]
        await cli.close()
        await server.close()

    run(main)


_CLI_CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from postwarden.storage.sqlite_queue import SqliteQueueStore

    async def main():
        d = Path(sys.argv[1])
        store = SqliteQueueStore(d / "postwarden.db", d / "spool")
        await store.start()
        assert not store.owns_spool
        flushed = 0
        for i in range(40):
            for m in await store.list():
                await store.set_held(m.queue_id, True)
                await store.set_held(m.queue_id, False)
            flushed += await store.flush()
        await store.close()
        print("done", flushed)

    asyncio.run(main())
""")


def test_cli_process_writes_while_the_server_commits(tmp_path: Path) -> None:
    """A real second process holds, releases and flushes while the server
    commits: both succeed (WAL, busy timeout), nothing is lost."""

    async def main() -> None:
        server = await open_store(tmp_path)
        await commit(server, "a@x.test")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CLI_CHILD, str(paths(tmp_path)[0].parent),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ids = [await commit(server, "a@x.test", size=2000 if i % 3 else 60_000)
               for i in range(60)]
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert out.startswith(b"done")
        listed = {m.queue_id for m in await server.list(limit=1000)}
        assert set(ids) <= listed
        assert all(not m.held for m in await server.list(limit=1000))
        await server.close()

    run(main)


_V1_ROWS = """
INSERT INTO messages (queue_id, sender, params, received_at, size, prepend, body,
                      body_size, checksum)
VALUES ('OLDMESSAGE000001', 'a@x.test', '{}', 1.0, 3, X'', X'616263', 3, 891568578);
INSERT INTO recipients (queue_id, address, params, status, attempts, last_reply)
VALUES ('OLDMESSAGE000001', 'b@x.test', '{"notify": null, "orcpt": null}', 'deferred', 2,
        '4.4.1 refused');
PRAGMA user_version = 1;
"""


def test_version_1_database_is_migrated(tmp_path: Path) -> None:
    db, _ = paths(tmp_path)
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    conn.executescript(MIGRATIONS[0] + _V1_ROWS)
    conn.close()

    async def main() -> None:
        store = await open_store(tmp_path)
        msg = await store.get("OLDMESSAGE000001")
        assert msg is not None
        [rcpt] = msg.recipients
        assert (rcpt.attempts, rcpt.last_reply, rcpt.relay, rcpt.warned) == (
            2, "4.4.1 refused", "", False)
        assert b"".join([c async for c in store.read_message("OLDMESSAGE000001")]) == b"abc"
        assert await store.history("OLDMESSAGE000001") == []
        await store.record_results("OLDMESSAGE000001", [
            RecipientResult(rcpt.id, RcptStatus.DELIVERED, "2.0.0 ok", relay="local")])
        assert [e.event for e in await store.history("OLDMESSAGE000001")] == [
            "delivered", "removed"]
        await store.close()
        again = await open_store(tmp_path)  # opening again changes nothing
        await again.close()

    run(main)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db, _ = paths(tmp_path)
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StorageError, match="newer"):
        run(lambda: open_store(tmp_path))


def test_old_history_of_gone_messages_is_pruned_at_start(tmp_path: Path) -> None:
    clock = Clock()

    async def main() -> None:
        store = await open_store(tmp_path, clock)
        gone = await commit(store, "a@x.test")
        kept = await commit(store, "a@x.test")
        assert await store.delete(gone)
        await store.close()
        clock.now = T0 + 31 * 86400
        store = await open_store(tmp_path, clock)
        assert await store.history(gone) == []
        assert [e.event for e in await store.history(kept)] == ["queued"]  # still queued
        await store.close()

    run(main)


def test_orcpt_and_notify_survive(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        body = store.new_body()
        body.write(b"x")
        params = RcptParams(notify=("SUCCESS", "DELAY"), orcpt="rfc822;Team@x.test")
        env = Envelope(Address("a", "x.test"), recipients=[Recipient(Address("b", "x.test"),
                                                                     params)])
        queue_id = await store.commit(body, env, b"", CommitMeta())
        msg = await store.get(queue_id)
        assert msg is not None and msg.recipients[0].params == params
        await store.close()

    run(main)
