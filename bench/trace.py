"""Message trace search over a large history: how long ``postwarden trace``
takes to find messages among N events (default one million).

Builds a queue database with the real schema (storage/sqlite_schema.py)
holding ``--events`` events of ``--events / 4`` messages over 30 days
(queued, deferred or delivered, delivered, removed), from 5,000 senders to
100,000 recipients, then times each kind of search (median of ``--reps``,
including the history of every message found).

    python -m bench.trace [--events 1000000] [--reps 5] [--keep DIR]
                          [--dsn postgresql://postgres@127.0.0.1/test]

With ``--dsn``, the same events are copied into a PostgreSQL schema
(``bench_trace``, created by postwarden's migrations and dropped after)
and the same searches run there too, as ``postwarden trace`` does on the
PostgreSQL backend.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from postwarden.observe import trace
from postwarden.observe.health import read_db
from postwarden.storage.base import Reader
from postwarden.storage.sqlite_schema import EVENT_COLS, init_schema

DAY = 86400.0


def build(path: Path, events: int, now: float, rng: random.Random) -> list[tuple[str, ...]]:
    """The database; returns sample (queue id, message id, sender, rcpt) rows."""
    db = sqlite3.connect(path, isolation_level=None)
    init_schema(db)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")
    senders = [f"user{i}@example.org" for i in range(5000)]
    rcpts = [f"customer{i}@client{i % 977}.example" for i in range(100000)]
    samples: list[tuple[str, ...]] = []
    rows: list[tuple[object, ...]] = []
    db.execute("BEGIN")
    for n in range(events // 4):
        ts = now - rng.random() * 30 * DAY
        qid = f"Q{n:015d}"
        sender, rcpt = rng.choice(senders), rng.choice(rcpts)
        mid = f"<{n}.{rng.getrandbits(40):x}@mua.example.org>"
        later = "deferred" if rng.random() < 0.1 else "delivered"
        rows += [
            (ts, qid, "queued", rcpt, "", "", "from=<...>, size=2048, nrcpt=1", sender, mid,
             "listener=submission tls=TLSv1.3/TLS_AES_256_GCM_SHA384 user=" + sender),
            (ts + 1, qid, later, rcpt, "mx.client.example[192.0.2.1]:25",
             "4.2.0" if later == "deferred" else "2.0.0", "250 ok", "", "", ""),
            (ts + 2, qid, "delivered", rcpt, "mx.client.example[192.0.2.1]:25", "2.0.0",
             "250 ok", "", "", ""),
            (ts + 2, qid, "removed", "", "", "", "", "", "", ""),
        ]
        if n % (events // 40) == 0:
            samples.append((qid, mid, sender, rcpt))
        if len(rows) >= 100000:
            db.executemany(f"INSERT INTO events ({EVENT_COLS}) VALUES "
                           "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            rows.clear()
    if rows:
        db.executemany(f"INSERT INTO events ({EVENT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       rows)
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()
    return samples


def copy_to_postgres(path: Path, dsn: str, schema: str) -> None:
    """The events of the SQLite file into ``schema`` (created afresh)."""
    import asyncio

    import asyncpg

    from postwarden.storage.pg_schema import prepare, quote_ident

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema)} CASCADE")
            await prepare(conn, schema)
            src = sqlite3.connect(path)
            rows = src.execute(f"SELECT {EVENT_COLS} FROM events ORDER BY id").fetchall()
            src.close()
            await conn.copy_records_to_table("events", records=rows,
                                             columns=EVENT_COLS.split(", "),
                                             schema_name=schema)
            await conn.execute(f"ANALYZE {quote_ident(schema)}.events")
        finally:
            await conn.close()
    asyncio.run(run())


def drop_schema(dsn: str, schema: str) -> None:
    import asyncio

    import asyncpg

    from postwarden.storage.pg_schema import quote_ident

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema)} CASCADE")
        finally:
            await conn.close()
    asyncio.run(run())


def timings(db: Reader, cases: dict[str, trace.Query], reps: int) -> None:
    print(f"{'search':<38} {'median ms':>10} {'max ms':>8} {'messages':>9}")
    for name, q in cases.items():
        times, found = [], 0
        for _ in range(reps):
            t = time.perf_counter()
            found = len(trace.histories(db, trace.find_ids(db, q)))
            times.append((time.perf_counter() - t) * 1000)
        print(f"{name:<38} {statistics.median(times):>10.2f} {max(times):>8.2f} {found:>9}")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--keep", type=Path, default=None, help="build the database here")
    ap.add_argument("--dsn", default="", help="also search a copy in this PostgreSQL")
    ap.add_argument("--schema", default="bench_trace", help="its schema (dropped after)")
    args = ap.parse_args()
    directory = args.keep or Path(tempfile.mkdtemp(prefix="postwarden-trace-"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "postwarden.db"
    now = time.time()
    rng = random.Random(8)
    start = time.monotonic()
    if path.exists():
        path.unlink()
    samples = build(path, args.events, now, rng)
    (count,) = sqlite3.connect(path).execute("SELECT count(*) FROM events").fetchone()
    print(f"{count} events of {count // 4} messages built in {time.monotonic() - start:.1f} s "
          f"({path.stat().st_size / 1e6:.0f} MB)")
    qid, mid, sender, rcpt = samples[len(samples) // 2]
    cases = {
        "--id": trace.Query(queue_id=qid),
        "--message-id": trace.Query(message_id=mid),
        "--from (30 days, newest 50)": trace.Query(sender=sender),
        "--from --since 1d": trace.Query(sender=sender, since=now - DAY),
        "--to": trace.Query(rcpt=rcpt),
        "--from --to": trace.Query(sender=sender, rcpt=rcpt),
        "--since 1h --until 30m (time only)": trace.Query(since=now - 3600,
                                                          until=now - 1800),
    }
    print("SQLite:")
    db = read_db(path)
    try:
        timings(db, cases, args.reps)
    finally:
        db.close()
    if args.dsn:
        from postwarden.storage.pg_sync import PgSession
        from postwarden.storage.settings import StorageSettings

        start = time.monotonic()
        copy_to_postgres(path, args.dsn, args.schema)
        print(f"PostgreSQL (copied in {time.monotonic() - start:.1f} s):")
        try:
            with PgSession(StorageSettings(backend="postgres", dsn=args.dsn,
                                           schema=args.schema)) as session:
                timings(session, cases, args.reps)
        finally:
            drop_schema(args.dsn, args.schema)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
