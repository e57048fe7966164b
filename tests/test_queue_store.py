"""The queue stores: commit point, group commit, self-validating records.

The conformance tests take the ``backend`` fixture and run against both
backends from the same code: SQLite (real files in tmp_path) and
PostgreSQL (a schema of its own on the test server).  The others are about
SQLite's files: real spool files; failures are produced for real
(truncated files, RLIMIT_FSIZE in a subprocess, SIGKILL).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tests.conftest import PG_DSN

from postwarden.envelope import Address, Envelope, MailParams, RcptParams, Recipient
from postwarden.storage.base import (
    CommitMeta,
    DeliveryEvent,
    QueuedMessage,
    RcptStatus,
    RecipientResult,
    StorageError,
)
from postwarden.storage.pg_queue import PgQueueStore
from postwarden.storage.settings import StorageSettings
from postwarden.storage.sqlite_queue import MessageCorrupt, SqliteQueueStore

T = TypeVar("T")
CHUNK = 64 * 1024
PREPEND = b"Received: from client.example (client.example [192.0.2.1])\r\n"


def run(func: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await func()
    return asyncio.run(main())


def envelope(*rcpts: str, sender: str | None = "alice@example.test") -> Envelope:
    return Envelope(
        sender=Address.parse_simple(sender) if sender else None,
        recipients=[Recipient(Address.parse_simple(r)) for r in rcpts or ("bob@example.test",)])


async def open_store(tmp: Path, inline_max: int = 128 * 1024) -> SqliteQueueStore:
    store = SqliteQueueStore(tmp / "data" / "postwarden.db", tmp / "data" / "spool", inline_max)
    await store.start()
    return store


@dataclass(frozen=True)
class Backend:
    """Opens a queue store of one backend (the conformance tests' parameter)."""

    name: str
    schema: str = ""

    @property
    def sqlite(self) -> bool:
        return self.name == "sqlite"

    async def open(self, tmp: Path, inline_max: int = 128 * 1024) -> Any:
        if self.sqlite:
            return await open_store(tmp, inline_max)
        store = PgQueueStore(pg_settings(self.schema), tmp / "data" / "spool", inline_max)
        await store.start()
        return store


def pg_settings(schema: str, **kw: Any) -> StorageSettings:
    return StorageSettings(**{"backend": "postgres", "dsn": PG_DSN, "schema": schema, **kw})


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "postgres":
        return Backend("postgres", request.getfixturevalue("pg_schema"))
    return Backend("sqlite")


async def commit(store: Any, data: bytes, env: Envelope | None = None,
                 prepend: bytes = PREPEND) -> str:
    body = store.new_body()
    for start in range(0, len(data), CHUNK):
        body.write(data[start:start + CHUNK])
    return await store.commit(body, env or envelope(), prepend,
                              CommitMeta(client_ip="192.0.2.1", helo="client.example",
                                         listener="mx", session_id="S1"))


async def read_all(store: Any, queue_id: str) -> bytes:
    return b"".join([chunk async for chunk in store.read_message(queue_id)])


def spool_files(tmp: Path) -> list[Path]:
    return sorted((tmp / "data" / "spool").glob("*.spool"))


def test_inline_round_trip(tmp_path: Path, backend: Backend) -> None:
    data = os.urandom(1024)
    env = Envelope(
        sender=Address("Alice", "example.test"),
        params=MailParams(size=1024, body="8BITMIME", smtputf8=True, ret="HDRS", envid="E1"),
        recipients=[Recipient(Address("bob", "example.test"),
                              RcptParams(notify=("SUCCESS", "FAILURE"),
                                         orcpt="rfc822;bob@example.test")),
                    Recipient(Address("carol", "remote.example"))])

    async def main() -> None:
        store = await backend.open(tmp_path)
        queue_id = await commit(store, data, env)
        assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{25}", queue_id)
        assert await read_all(store, queue_id) == PREPEND + data
        assert spool_files(tmp_path) == []  # inline: one WAL fsync covers all
        msg = await store.get(queue_id)
        assert msg is not None
        assert msg.sender == "Alice@example.test"
        assert msg.params == env.params
        assert msg.size == len(PREPEND) + len(data)
        assert (msg.client_ip, msg.helo, msg.listener) == ("192.0.2.1", "client.example", "mx")
        assert [r.address for r in msg.recipients] == ["bob@example.test", "carol@remote.example"]
        assert msg.recipients[0].params == env.recipients[0].params
        assert msg.recipients[1].params == RcptParams()
        assert all(r.status is RcptStatus.QUEUED for r in msg.recipients)
        assert await store.state(queue_id) == "active"
        await store.close()

    run(main)
    if backend.sqlite:
        assert stat.S_IMODE((tmp_path / "data" / "postwarden.db").stat().st_mode) == 0o600


def test_null_sender_round_trip(tmp_path: Path, backend: Backend) -> None:
    async def main() -> None:
        store = await backend.open(tmp_path)
        queue_id = await commit(store, b"bounce\r\n", envelope(sender=None), prepend=b"")
        msg = await store.get(queue_id)
        assert msg is not None and msg.sender == ""
        assert await read_all(store, queue_id) == b"bounce\r\n"
        await store.close()

    run(main)


def test_queue_id_chosen_by_the_session(tmp_path: Path, backend: Backend) -> None:
    async def main() -> None:
        store = await backend.open(tmp_path, inline_max=100)
        meta = CommitMeta(session_id="S9", queue_id="ABCDEFGHIJKLMNOP")
        body = store.new_body()
        body.write(b"q" * 500)
        assert await store.commit(body, envelope(), b"", meta) == "ABCDEFGHIJKLMNOP"
        again = store.new_body()
        again.write(b"w" * 500)
        with pytest.raises(StorageError):  # taken: nothing committed, file gone
            await store.commit(again, envelope(), b"", meta)
        # SQLite keeps the body in its spool file; PostgreSQL in the row.
        assert len(spool_files(tmp_path)) == (1 if backend.sqlite else 0)
        assert await read_all(store, "ABCDEFGHIJKLMNOP") == b"q" * 500
        await store.close()

    run(main)


def test_large_body_streams_through_spool_file(tmp_path: Path, backend: Backend) -> None:
    chunk = os.urandom(CHUNK)
    n = 80  # 5 MiB
    expected_crc = zlib.crc32(PREPEND + chunk * n)

    async def main() -> None:
        store = await backend.open(tmp_path)
        body = store.new_body()
        tracemalloc.start()
        try:
            for _ in range(n):
                body.write(chunk)
            _, write_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert body.size == n * CHUNK
        assert body.buffered == 0  # spilled: nothing held in memory
        assert write_peak < 1024 * 1024
        [spool] = spool_files(tmp_path)  # streamed to a local file first
        assert stat.S_IMODE(spool.stat().st_mode) == 0o600
        assert stat.S_IMODE(spool.parent.stat().st_mode) == 0o700
        queue_id = await store.commit(body, envelope(), PREPEND, CommitMeta())
        assert len(spool_files(tmp_path)) == (1 if backend.sqlite else 0)

        tracemalloc.start()
        try:
            crc, largest = 0, 0
            async for part in store.read_message(queue_id):
                crc = zlib.crc32(part, crc)
                largest = max(largest, len(part))
            _, read_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert crc == expected_crc
        assert largest <= CHUNK
        assert read_peak < 1024 * 1024
        await store.close()

    run(main)


def test_concurrent_commits_share_transactions(tmp_path: Path, backend: Backend) -> None:
    async def main() -> None:
        store = await backend.open(tmp_path, inline_max=4096)
        bodies = [f"message {i}\r\n".encode() * (1 if i % 10 else 1000) for i in range(200)]
        ids = await asyncio.gather(*(commit(store, b) for b in bodies))
        assert len(set(ids)) == 200
        assert store.stats.messages == 200
        # Group commit: far fewer transactions (fsyncs) than messages.
        assert store.stats.transactions < 50, store.stats
        for queue_id, data in zip(ids, bodies, strict=True):
            assert await read_all(store, queue_id) == PREPEND + data
        assert len(await store.list()) == 200
        await store.close()

    run(main)


def test_each_committed_message_is_handed_over_as_due_returns_it(tmp_path: Path) -> None:
    """The queue runner of the committing process starts deliveries from
    what ``on_queued`` hands it: the same message, recipient ids included
    (record_results goes by them), as a read of the queue would give."""
    async def main() -> None:
        store = await open_store(tmp_path, inline_max=4096)
        handed: list[QueuedMessage] = []
        store.on_queued.append(handed.append)
        params = MailParams(size=900, body="8BITMIME", ret="HDRS", envid="e1")
        envs = [Envelope(Address.parse_simple("alice@example.test"), params,
                         [Recipient(Address.parse_simple(f"r{i}-{j}@example.test"),
                                    RcptParams(notify=("FAILURE",), orcpt=f"rfc822;x{j}@y"))
                          for j in range(1 + i % 4)])
                for i in range(40)]
        # Committed together: they share transactions, ids interleave there.
        ids = await asyncio.gather(*(commit(store, b"m\r\n" * (1 + i), env)
                                     for i, env in enumerate(envs)))
        assert store.stats.transactions < 40
        assert sorted(m.queue_id for m in handed) == sorted(ids)
        due = {m.queue_id: m for m in await store.due(time.time() + 1, 100)}
        for msg in handed:
            assert msg == due[msg.queue_id]
        await store.close()

    run(main)


def test_a_failing_commit_does_not_sink_the_others_of_its_batch(tmp_path: Path,
                                                                backend: Backend) -> None:
    async def main() -> None:
        store = await backend.open(tmp_path)

        async def with_id(n: int, queue_id: str) -> str:
            body = store.new_body()
            body.write(f"message {n}\r\n".encode())
            return await store.commit(body, envelope(), b"", CommitMeta(queue_id=queue_id))

        # Committed together: two claim the same queue id, so one must fail.
        ids = [f"ID{n:014d}" for n in range(20)] + ["ID00000000000003"]
        results = await asyncio.gather(*(with_id(n, q) for n, q in enumerate(ids)),
                                       return_exceptions=True)
        assert store.stats.transactions < 21  # batched
        failed = [r for r in results if isinstance(r, BaseException)]
        assert len(failed) == 1 and isinstance(failed[0], StorageError)
        assert sorted(m.queue_id for m in await store.list()) == ids[:20]
        await store.close()

    run(main)


class LockHolder:
    """Another process holding the queue database's write lock (as a worker
    process's writer does during its transaction) until released."""

    def __init__(self, db: Path) -> None:
        script = textwrap.dedent("""
            import sqlite3, sys
            conn = sqlite3.connect(sys.argv[1], isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            print("locked", flush=True)
            sys.stdin.readline()
            conn.execute("COMMIT")
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", script, str(db)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == b"locked\n"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"\n")
        self.proc.stdin.close()
        assert self.proc.wait(10) == 0


def test_commits_made_while_another_process_writes_join_the_next_transaction(
        tmp_path: Path) -> None:
    """Messages that arrive while the writer waits for another process's
    write lock join the transaction it is about to run, instead of waiting
    for the lock once more; those with a spool file to fsync first go into
    the transaction after it.  None is lost."""
    async def main() -> None:
        store = await open_store(tmp_path, inline_max=4096)
        await commit(store, b"warm\r\n")
        before = store.stats.transactions
        holder = LockHolder(tmp_path / "data" / "postwarden.db")
        try:
            first = asyncio.ensure_future(commit(store, b"first\r\n"))
            await asyncio.sleep(0.2)  # the writer waits for the lock now
            small = [b"small %d\r\n" % i for i in range(4)]
            large = [b"%d" % i * 10_000 + b"\r\n" for i in range(2)]  # spool files
            rest = asyncio.gather(*(commit(store, b) for b in small + large))
            await asyncio.sleep(0.2)
            assert not first.done()
        finally:
            holder.release()
        ids = [await first, *await rest]
        # The first message and the four small ones in one transaction, the
        # two with spool files in the next.
        assert store.stats.transactions - before == 2
        assert store.stats.largest_batch == 5
        for queue_id, data in zip(ids, [b"first\r\n", *small, *large], strict=True):
            assert await read_all(store, queue_id) == PREPEND + data
        await store.close()

    run(main)


def test_closing_while_waiting_for_the_lock_commits_what_was_submitted(
        tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path, inline_max=4096)
        holder = LockHolder(tmp_path / "data" / "postwarden.db")
        try:
            first = asyncio.ensure_future(commit(store, b"first\r\n"))
            await asyncio.sleep(0.2)
            spooled = asyncio.ensure_future(commit(store, b"x" * 10_000 + b"\r\n"))
            await asyncio.sleep(0.1)
            closing = asyncio.ensure_future(store.close())
            await asyncio.sleep(0.2)
            assert not closing.done()
        finally:
            holder.release()
        await closing
        ids = [await first, await spooled]
        reopened = await open_store(tmp_path, inline_max=4096)
        assert sorted(m.queue_id for m in await reopened.list()) == sorted(ids)
        assert await read_all(reopened, ids[1]) == PREPEND + b"x" * 10_000 + b"\r\n"
        await reopened.close()

    run(main)


def test_a_body_read_back_before_its_end_still_gets_the_rest(
        tmp_path: Path, backend: Backend) -> None:
    # In memory, then spilled: what was read back is not what is kept, and
    # a buffer the writer changes after writing is not what is kept either.
    async def main() -> None:
        store = await backend.open(tmp_path, inline_max=3000)
        body = store.new_body()
        chunk = bytearray(b"a" * 1000)
        body.write(chunk)
        chunk[:] = b"b" * 1000  # the caller reuses its buffer
        body.write(b"c" * 500)
        assert body.read_back() == b"a" * 1000 + b"c" * 500
        body.write(b"d" * 500)
        assert body.read_back() == b"a" * 1000 + b"c" * 500 + b"d" * 500
        assert spool_files(tmp_path) == []
        body.write(b"e" * 2000)  # beyond inline_max: to a spool file
        assert len(spool_files(tmp_path)) == 1
        whole = b"a" * 1000 + b"c" * 500 + b"d" * 500 + b"e" * 2000
        assert body.read_back() == whole
        queue_id = await store.commit(body, envelope(), PREPEND, CommitMeta())
        assert await read_all(store, queue_id) == PREPEND + whole
        await store.close()

    run(main)


def test_abort_removes_spool_file(tmp_path: Path, backend: Backend) -> None:
    async def main() -> None:
        store = await backend.open(tmp_path, inline_max=1000)
        body = store.new_body()
        body.write(b"x" * 5000)
        assert len(spool_files(tmp_path)) == 1
        body.abort()
        assert spool_files(tmp_path) == []
        with pytest.raises(StorageError):
            body.write(b"more")
        # A failed commit (no recipient) removes its file too, commits nothing.
        body = store.new_body()
        body.write(b"y" * 5000)
        with pytest.raises(StorageError):
            await store.commit(body, Envelope(sender=None), b"", CommitMeta())
        assert spool_files(tmp_path) == []
        assert await store.list() == []
        await store.close()

    run(main)


def test_commit_after_close_fails_cleanly(tmp_path: Path, backend: Backend) -> None:
    async def main() -> None:
        store = await backend.open(tmp_path, inline_max=10)
        body = store.new_body()
        body.write(b"z" * 100)
        await store.close()
        with pytest.raises(StorageError):
            await store.commit(body, envelope(), b"", CommitMeta())
        assert spool_files(tmp_path) == []

    run(main)


def test_truncated_spool_file_is_quarantined(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path, inline_max=1000)
        queue_id = await commit(store, b"a" * 300_000)
        [spool] = spool_files(tmp_path)
        os.truncate(spool, 1000)
        with pytest.raises(MessageCorrupt):
            await read_all(store, queue_id)
        assert await store.state(queue_id) == "corrupt"
        assert await store.due(1e12, 10) == []
        with pytest.raises(MessageCorrupt):
            await read_all(store, queue_id)
        await store.close()

    run(main)


def test_flipped_byte_detected_before_the_end_is_accepted(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path, inline_max=1000)
        queue_id = await commit(store, b"a" * 300_000)
        [spool] = spool_files(tmp_path)
        with open(spool, "r+b") as f:
            f.seek(299_000)
            f.write(b"b")
        chunks: list[bytes] = []
        with pytest.raises(MessageCorrupt):
            async for part in store.read_message(queue_id):
                chunks.append(part)
        assert await store.state(queue_id) == "corrupt"
        await store.close()

    run(main)


def test_start_quarantines_rows_with_missing_or_short_files(tmp_path: Path) -> None:
    async def main() -> tuple[str, str, str]:
        store = await open_store(tmp_path, inline_max=1000)
        missing = await commit(store, b"m" * 5000)
        short = await commit(store, b"s" * 5000)
        fine = await commit(store, b"f" * 5000)
        await store.close()
        return missing, short, fine

    missing, short, fine = run(main)
    by_size = {}
    for p in spool_files(tmp_path):
        by_size[p.read_bytes()[:1]] = p
    by_size[b"m"].unlink()
    os.truncate(by_size[b"s"], 10)

    async def reopen() -> None:
        store = await open_store(tmp_path, inline_max=1000)
        assert await store.state(missing) == "corrupt"
        assert await store.state(short) == "corrupt"
        assert await store.state(fine) == "active"
        assert [m.queue_id for m in await store.due(1e12, 10)] == [fine]
        await store.close()

    run(reopen)


def test_start_removes_unreferenced_spool_files(tmp_path: Path) -> None:
    async def main() -> str:
        store = await open_store(tmp_path, inline_max=1000)
        queue_id = await commit(store, b"k" * 5000)
        stray = store.new_body()
        stray.write(b"never committed" * 1000)  # the process "dies" here
        await store.close()
        return queue_id

    queue_id = run(main)
    assert len(spool_files(tmp_path)) == 2
    other = tmp_path / "data" / "spool" / "README"
    other.write_text("not ours")

    async def reopen() -> None:
        store = await open_store(tmp_path, inline_max=1000)
        assert len(spool_files(tmp_path)) == 1
        assert other.exists()
        assert await read_all(store, queue_id) == PREPEND + b"k" * 5000
        await store.close()

    run(reopen)


def test_second_instance_does_not_collect_garbage(tmp_path: Path) -> None:
    async def main() -> None:
        first = await open_store(tmp_path, inline_max=1000)
        body = first.new_body()
        body.write(b"in flight" * 1000)
        second = await open_store(tmp_path, inline_max=1000)  # e.g. the CLI
        assert len(spool_files(tmp_path)) == 1
        queue_id = await first.commit(body, envelope(), b"", CommitMeta())
        assert await read_all(second, queue_id) == b"in flight" * 1000
        await second.close()
        await first.close()

    run(main)


def test_due_returns_the_longest_waiting_messages_however_many_recipients(
        tmp_path: Path, backend: Backend) -> None:
    async def main() -> None:
        store = await backend.open(tmp_path)
        many = [f"r{i}@example.test" for i in range(30)]
        crowded = [await commit(store, f"crowded {i}\r\n".encode(), envelope(*many))
                   for i in range(6)]
        single = [await commit(store, f"single {i}\r\n".encode()) for i in range(6)]
        now = 4e9  # everything is due
        due = await store.due(now, 8)
        # All due since the same moment: ties go by queue id.  Eight whole
        # messages, however many recipient rows the crowded ones take.
        everything = sorted(crowded + single)
        assert [m.queue_id for m in due] == everything[:8]
        assert all(len(m.recipients) == (30 if m.queue_id in crowded else 1) for m in due)
        assert [m.queue_id for m in await store.due(now, 100)] == everything
        # Those in flight are left out, and as many others come instead.
        in_flight = {everything[0], everything[3], everything[4]}
        rest = [q for q in everything if q not in in_flight]
        assert [m.queue_id for m in await store.due(now, 8, in_flight)] == rest[:8]
        assert [m.queue_id for m in await store.due(now, 100, set(everything))] == []
        await store.close()

    run(main)


def test_due_record_results_and_removal(tmp_path: Path, backend: Backend) -> None:
    async def main() -> None:
        store = await backend.open(tmp_path, inline_max=1000)
        queue_id = await commit(store, b"r" * 5000,
                                envelope("a@example.test", "b@example.test", "c@example.test"))
        [msg] = await store.due(100.0, 10)
        a, b, c = msg.recipients
        await store.record_results(queue_id, [
            RecipientResult(a.id, RcptStatus.DELIVERED, "2.0.0 delivered to maildir"),
            RecipientResult(b.id, RcptStatus.DEFERRED, "4.4.1 try later", next_attempt=160.0),
            RecipientResult(c.id, RcptStatus.FAILED, "5.1.1 mailbox unavailable")])
        assert await store.due(150.0, 10) == []
        [msg] = await store.due(160.0, 10)
        assert [r.address for r in msg.recipients] == ["b@example.test"]
        assert msg.recipients[0].attempts == 1
        assert msg.recipients[0].status is RcptStatus.DEFERRED
        # FAILED results are kept until the message goes (bounces need them).
        full = await store.get(queue_id)
        assert full is not None
        assert [r.status for r in full.recipients] == [
            RcptStatus.DELIVERED, RcptStatus.DEFERRED, RcptStatus.FAILED]
        assert full.recipients[2].last_reply == "5.1.1 mailbox unavailable"
        await store.record_results(queue_id, [
            RecipientResult(b.id, RcptStatus.DELIVERED, "2.0.0 delivered to maildir")])
        assert await store.get(queue_id) is None
        assert spool_files(tmp_path) == []
        await store.close()

    run(main)


def test_a_delivered_message_is_found_by_message_id_and_its_history_grows(
        tmp_path: Path, backend: Backend) -> None:
    async def main() -> None:
        store = await backend.open(tmp_path)
        body = store.new_body()
        body.write(b"Subject: x\r\n\r\nx\r\n")
        queue_id = await store.commit(body, envelope("b@example.test"),
                                      PREPEND, CommitMeta(message_id="<m.1@example.test>",
                                                          detail="user=a@example.test"))
        [msg] = await store.due(100.0, 10)
        await store.record_results(queue_id, [
            RecipientResult(msg.recipients[0].id, RcptStatus.DELIVERED, "2.0.0 ok")])
        assert await store.get(queue_id) is None
        assert await store.find_message_id("<m.1@example.test>") == [queue_id]
        assert await store.find_message_id("<other@example.test>") == []
        # A line added after the message is gone (a complaint, days later).
        await store.add_events([DeliveryEvent(200.0, queue_id, "complained",
                                              rcpt="b@example.test", detail="abuse")])
        events = await store.history(queue_id)
        assert [e.event for e in events][-1] == "complained"
        assert events[-1].rcpt == "b@example.test" and events[-1].detail == "abuse"
        await store.close()

    run(main)


def test_held_messages_are_not_due(tmp_path: Path, backend: Backend) -> None:
    async def main() -> None:
        store = await backend.open(tmp_path)
        queue_id = await commit(store, b"h")
        assert await store.set_held(queue_id, True)
        assert await store.due(1e12, 10) == []
        assert await store.set_held(queue_id, False)
        assert [m.queue_id for m in await store.due(1e12, 10)] == [queue_id]
        assert not await store.set_held("NOSUCHID", True)
        assert await store.delete(queue_id)
        assert await store.list() == []
        await store.close()

    run(main)


_FULL_CHILD = textwrap.dedent("""
    import asyncio, resource, signal, sys
    from pathlib import Path
    from postwarden.envelope import Address, Envelope, Recipient
    from postwarden.storage.base import CommitMeta, StorageError, StorageFull
    from postwarden.storage.sqlite_queue import SqliteQueueStore

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of a signal
    ENV = Envelope(Address("a", "example.test"),
                   recipients=[Recipient(Address("b", "example.test"))])

    async def main():
        d = Path(sys.argv[1])
        store = SqliteQueueStore(d / "q.db", d / "spool", inline_max=128 * 1024)
        await store.start()
        limit = int(sys.argv[2])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        body = store.new_body()
        try:
            for _ in range(64):
                body.write(b"x" * 65536)
            print("spool ok")
        except StorageFull:
            print("spool full")
        except StorageError as e:
            print("spool error", e)
        print("spool files", len(list((d / "spool").glob("*.spool"))), flush=True)
        for i in range(100):
            body = store.new_body()
            body.write(bytes([65 + i % 26]) * 100_000)
            try:
                queue_id = await store.commit(body, ENV, b"", CommitMeta())
            except StorageFull:
                print("db full", flush=True)
                break
            except StorageError as e:
                print("db error", e, flush=True)
                break
            print("committed", i, queue_id, flush=True)
        await store.close()

    asyncio.run(main())
""")


def test_file_size_limit_is_storage_full_and_commits_nothing(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _FULL_CHILD, str(tmp_path), str(1024 * 1024)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "spool full"
    assert lines[1] == "spool files 0"
    committed = [line.split() for line in lines if line.startswith("committed")]
    assert lines[-1].startswith("db "), lines[-1]  # the database hit the limit
    assert committed

    async def reopen() -> None:
        store = SqliteQueueStore(tmp_path / "q.db", tmp_path / "spool")
        await store.start()
        queued = {m.queue_id for m in await store.list()}
        assert queued == {queue_id for _, _, queue_id in committed}
        for _, i, queue_id in committed:
            assert await read_all(store, queue_id) == bytes([65 + int(i) % 26]) * 100_000
        await store.close()

    run(reopen)


_CRASH_CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from postwarden.envelope import Address, Envelope, Recipient
    from postwarden.storage.base import CommitMeta
    from postwarden.storage.sqlite_queue import SqliteQueueStore

    ENV = Envelope(Address("a", "example.test"),
                   recipients=[Recipient(Address("b", "example.test"))])

    def body(i):
        return f"{i}:".encode() * (50_000 if i % 4 == 0 else 200)

    async def main():
        d = Path(sys.argv[1])
        store = SqliteQueueStore(d / "q.db", d / "spool", inline_max=64 * 1024)
        await store.start()

        async def one(i):
            w = store.new_body()
            data = body(i)
            for start in range(0, len(data), 65536):
                w.write(data[start:start + 65536])
            queue_id = await store.commit(w, ENV, b"X-Seq: %d\\r\\n" % i, CommitMeta())
            sys.stdout.write(f"{i} {queue_id}\\n")
            sys.stdout.flush()

        i = 0
        while True:
            await asyncio.gather(*(one(i + k) for k in range(8)))
            i += 8

    asyncio.run(main())
""")


def test_every_acknowledged_commit_survives_sigkill(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    acked: list[tuple[int, str]] = []
    try:
        while len(acked) < 60:
            line = proc.stdout.readline()
            assert line, "child exited early"
            i, queue_id = line.split()
            acked.append((int(i), queue_id.decode()))
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
    for line in rest.splitlines(keepends=True):
        if line.endswith(b"\n"):
            i, queue_id = line.split()
            acked.append((int(i), queue_id.decode()))

    async def reopen() -> None:
        store = SqliteQueueStore(tmp_path / "q.db", tmp_path / "spool", inline_max=64 * 1024)
        await store.start()
        for i, queue_id in acked:
            expected = b"X-Seq: %d\r\n" % i + f"{i}:".encode() * (50_000 if i % 4 == 0 else 200)
            assert await read_all(store, queue_id) == expected
            assert await store.state(queue_id) == "active"
        # Bodies of commits cut short by the kill were collected as garbage.
        rows = await store.list(10_000)
        assert len(list((tmp_path / "spool").glob("*.spool"))) == sum(
            1 for m in rows if m.size > 64 * 1024)
        await store.close()

    run(reopen)
