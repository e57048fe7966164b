"""The web admin's queue page over a large queue: how long one page
(``storage/sqlite_queue_browse.py``) takes among N queued messages
(default 100,000), for each filter and sort the page offers.

Builds a queue database with the real schema holding ``--messages``
messages (one recipient each, a third deferred, one in fifty held, from
500 senders to 100 domains), then times each query (median of ``--reps``).

    python -m bench.queue_page [--messages 100000] [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from postwarden.storage import sqlite_queue_browse as browse
from postwarden.storage.sqlite_queue import SqliteQueueStore
from postwarden.storage.sqlite_schema import init_schema

QUERIES: list[tuple[str, dict[str, object]]] = [
    ("all, oldest first", {}),
    ("held", {"state": "held"}),
    ("deferred", {"state": "deferred"}),
    ("search a recipient domain", {"text": "dest42"}),
    ("newest, page 1001", {"sort": "newest", "offset": 50000}),
    ("largest", {"sort": "largest"}),
    ("deferred + sender search", {"state": "deferred", "text": "s7@"}),
]


def build(path: Path, messages: int) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    init_schema(db)
    db.execute("PRAGMA journal_mode = WAL")
    now = time.time()
    db.execute("BEGIN")
    for i in range(messages):
        qid = f"Q{i:012d}"
        db.execute("INSERT INTO messages (queue_id, sender, params, received_at, size, held, "
                   "prepend, body_size, checksum, body) VALUES (?, ?, '{}', ?, ?, ?, x'', 0, "
                   "0, x'')", (qid, f"s{i % 500}@example.org", now - i, 1000 + i % 5000,
                               int(i % 50 == 0)))
        db.execute("INSERT INTO recipients (queue_id, address, params, status) "
                   "VALUES (?, ?, '{}', ?)", (qid, f"r{i}@dest{i % 100}.example",
                                             "deferred" if i % 3 == 0 else "queued"))
    db.execute("COMMIT")
    db.close()


async def measure(path: Path, reps: int) -> None:
    store = SqliteQueueStore(path, path.parent / "spool")
    await store.start()
    try:
        for name, kw in QUERIES:
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                page = await browse.browse(store, limit=50, **kw)  # type: ignore[arg-type]
                times.append(time.perf_counter() - start)
            print(f"{name:<28} {page.total:>8} matching  "
                  f"{statistics.median(times) * 1000:7.1f} ms")
    finally:
        await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=100000)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "postwarden.db"
        build(path, args.messages)
        asyncio.run(measure(path, args.reps))


if __name__ == "__main__":
    main()
