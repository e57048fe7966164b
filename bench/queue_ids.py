"""Queue ids and the queue database: what a commit costs when the trace
keeps a month of history, with random queue ids against ids that begin with
the time (``postwarden.ids``).

The ``events`` table keeps every message's trace for ``[trace] retention``
(30 days by default), so on a busy server it holds millions of rows, and
its index ``events_queue`` is keyed by the queue id.  This builds a queue
database with the real schema, fills ``events`` with ``--events`` rows (two
per message, spread over 30 days, ids of the format under test), then
commits ``--messages`` 2 KB messages through the real store
(:class:`~postwarden.storage.sqlite_queue.SqliteQueueStore`),
``--concurrency`` at a time so that they share group commits as a server's
sessions do.  It prints, for each format, the CPU time per message (the
whole process: event loop and writer thread) and the bytes the process
wrote per message, in 4 KiB pages (``wchar`` of /proc/self/io: the WAL
frames, before any fsync).

    python -m bench.queue_ids [--events 1000000] [--messages 20000] [--concurrency 10]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from postwarden import ids
from postwarden.envelope import Address, Envelope, Recipient
from postwarden.storage import sqlite_queue
from postwarden.storage.base import CommitMeta
from postwarden.storage.sqlite_queue import SqliteQueueStore
from postwarden.storage.sqlite_schema import init_schema

MONTH = 30 * 86400
BODY = b"".join(b"X" * 78 + b"\r\n" for _ in range(26))  # 2 KB


def random_id() -> str:
    """The former format: 80 random bits, RFC 4648 base32."""
    return base64.b32encode(os.urandom(10)).decode("ascii")


def timed_id_at(seconds: float) -> str:
    """An id of the current format, made at ``seconds`` (for the history)."""
    return ids.queue_id_at(int(seconds * 1000), os.urandom(10))


def wchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def build(directory: Path, history: int, make_id: Callable[[float], str]) -> None:
    conn = sqlite3.connect(directory / "postwarden.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    init_schema(conn)
    start = time.time() - MONTH
    conn.execute("BEGIN")
    for i in range(0, history, 2):
        at = start + MONTH * i / history
        queue_id = make_id(at)
        conn.executemany(
            "INSERT INTO events (ts, queue_id, event, rcpt, sender) VALUES (?, ?, ?, ?, ?)",
            [(at, queue_id, "queued", f"r{i % 997}@dest.example", "s@example.test"),
             (at + 1, queue_id, "delivered", f"r{i % 997}@dest.example", "")])
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


async def commit_all(directory: Path, messages: int, concurrency: int) -> tuple[float, int]:
    store = await SqliteQueueStore.open(directory / "postwarden.db", directory / "spool")
    envelope = Envelope(Address("sender", "example.test"),
                        recipients=[Recipient(Address("rcpt", "dest.example"))])
    meta = CommitMeta(client_ip="192.0.2.1", helo="client.example", listener="mx",
                      session_id="S1", message_id="<m@example.test>")

    async def one() -> None:
        body = store.new_body()
        body.write(BODY)
        await store.commit(body, envelope, b"Received: x\r\n", meta)

    try:
        cpu, written = time.process_time(), wchar()
        for _ in range(messages // concurrency):
            await asyncio.gather(*(one() for _ in range(concurrency)))
        return time.process_time() - cpu, wchar() - written
    finally:
        await store.close()


def main() -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=10)
    args = ap.parse_args()
    formats: list[tuple[str, Callable[[float], str], Callable[[], str]]] = [
        ("random (16 characters)", lambda _at: random_id(), random_id),
        ("time first (25 characters)", timed_id_at, ids.new_queue_id),
    ]
    print(f"{args.messages} commits of 2 KB, {args.concurrency} at a time, "
          f"after {args.events} trace events")
    for name, history_id, new_id in formats:
        with tempfile.TemporaryDirectory(prefix="postwarden-ids-") as tmp:
            directory = Path(tmp)
            build(directory, args.events, history_id)
            # The store's id source for this run.
            sqlite_queue.new_queue_id = new_id  # type: ignore[attr-defined]
            cpu, written = asyncio.run(commit_all(directory, args.messages, args.concurrency))
        print(f"  {name:28s} {1e6 * cpu / args.messages:7.1f} us CPU per message, "
              f"{written / args.messages / 4096:5.2f} pages written per message")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
