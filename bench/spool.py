"""Large bodies on PostgreSQL: in the row (``bytea``) or in a shared spool
directory (``[storage] shared_spool_dir``).

One PgQueueStore commits ``--count`` messages of ``--size`` bytes,
``--concurrency`` at a time (streamed through a body writer as a session
does), then reads each back whole; both ways in turn, each in a schema of
its own, dropped afterwards.  The spool directory is a local one here, so
the figures compare the database's work, not a network file system's.

    python -m bench.spool [--count 200] [--size 524288] [--concurrency 8]
                          [--dsn postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import tempfile
import time
from pathlib import Path

import asyncpg

from postwarden.envelope import Address, Envelope, MailParams, Recipient
from postwarden.storage.base import CommitMeta
from postwarden.storage.pg_queue import PgQueueStore
from postwarden.storage.settings import StorageSettings

CHUNK = 64 * 1024


async def _one(args: argparse.Namespace, shared: bool, root: Path) -> dict[str, float]:
    schema = "bench_" + secrets.token_hex(4)
    spool = root / "shared"
    spool.mkdir(exist_ok=True)
    settings = StorageSettings(backend="postgres", dsn=args.dsn, schema=schema,
                               pool_min=2, pool_max=args.concurrency + 2,
                               shared_spool_dir=str(spool) if shared else "")
    store = PgQueueStore(settings, root / "local", register=False)
    await store.start()
    body = os.urandom(args.size)
    env = Envelope(Address("a", "example.test"), MailParams(),
                   [Recipient(Address("b", "example.test"))])
    sem = asyncio.Semaphore(args.concurrency)
    ids: list[str] = []

    async def commit() -> None:
        async with sem:
            w = store.new_body()
            for at in range(0, len(body), CHUNK):
                w.write(body[at:at + CHUNK])
            ids.append(await store.commit(w, env, b"", CommitMeta()))
    try:
        started = time.perf_counter()
        await asyncio.gather(*(commit() for _ in range(args.count)))
        accept = time.perf_counter() - started
        started = time.perf_counter()
        for queue_id in ids:
            total = 0
            async for part in store.read_message(queue_id):
                total += len(part)
            assert total == args.size
        read = time.perf_counter() - started
        db_bytes = await store.pool.fetchval(
            "SELECT pg_total_relation_size('messages')")
    finally:
        await store.close()
        conn = await asyncpg.connect(args.dsn)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    mib = args.count * args.size / 2**20
    return {"commit_msg_s": args.count / accept, "commit_mib_s": mib / accept,
            "read_mib_s": mib / read, "table_mib": db_bytes / 2**20}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--size", type=int, default=512 * 1024)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    args = p.parse_args()
    print(f"{args.count} messages of {args.size} bytes, {args.concurrency} commits at once")
    print(f"{'bodies':<14} {'commit msg/s':>12} {'commit MiB/s':>12} {'read MiB/s':>10} "
          f"{'messages table MiB':>18}")
    with tempfile.TemporaryDirectory(prefix="pw-bench-spool-") as tmp:
        for shared in (False, True):
            r = asyncio.run(_one(args, shared, Path(tmp)))
            name = "shared spool" if shared else "bytea (row)"
            print(f"{name:<14} {r['commit_msg_s']:>12.1f} {r['commit_mib_s']:>12.1f} "
                  f"{r['read_mib_s']:>10.1f} {r['table_mib']:>18.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
