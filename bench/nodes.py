"""Several postwarden nodes on one PostgreSQL, against one node on SQLite.

For each setup (SQLite, one node; PostgreSQL with one, two and three nodes,
every node a ``postwarden serve`` process with ``processes = 1`` on this
machine) two figures:

* **accept**: messages per second acknowledged (250 after DATA, i.e.
  committed) with delivery off on every node (``[queue] workers = 0``), the
  load spread evenly over the nodes;
* **end-to-end**: messages per second from the first connection to the
  last message received by the sink (smtp-sink), nodes delivering.

Ratios are against SQLite with one node.  The load generator
(:mod:`bench.loadgen`) runs on the same machine, as does PostgreSQL: on a
small machine every process competes for the same cores, which is the
point of saying where the limits are (docs/scaling.md).

    python -m bench.nodes [--count 2000] [--sessions 16] [--size 2048]
                          [--dsn postgresql://postgres@127.0.0.1:5432/test] [--json FILE]

Each run uses a PostgreSQL schema of its own, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.dnsstub import DnsStub
from bench.loadgen import Load
from bench.servers import (
    HOST,
    BenchError,
    PostwardenServer,
    Sink,
    ensure_postfix,
    make_postwarden_template,
    stop_all,
    toml_set,
    wait_until,
)

SENDER = "bench@client.test"
RCPT = "sink@sink.test"  # routed to smtp-sink in relay mode
SETUPS = (("sqlite", 1), ("postgres", 1), ("postgres", 2), ("postgres", 3))


class Node(PostwardenServer):
    """A PostwardenServer with ``processes = 1`` and, for PostgreSQL, the
    shared ``[storage]``."""

    def __init__(self, *args: Any, storage: dict[str, str] | None = None,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.storage = storage or {}

    def _configure(self) -> None:
        super()._configure()
        text = self.cfg.read_text()
        text = re.sub(r"(?m)^processes\s*=.*$", "", text)
        text = "processes = 1\n" + text
        for key, value in self.storage.items():
            text = toml_set(text, "storage", key, value)
        self.cfg.write_text(text)


async def _drop(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def seed_directory(dsn: str, schema: str) -> None:
    """What make_postwarden_template adds to its SQLite directory, in the
    shared one: the sink's domain and the bench's accounts."""
    from postwarden.auth.passwords import hash_password
    from postwarden.storage.pg_directory import DirectoryEdit
    from postwarden.storage.settings import StorageSettings

    settings = StorageSettings(backend="postgres", dsn=dsn, schema=schema)
    password = hash_password("bench-password-not-secret")
    with DirectoryEdit(settings, ("example.test",)) as directory:
        directory.add_domain("sink.test")
        for address in ("sink@sink.test", "sink@example.test"):
            directory.add_user(address, password)


def spread(nodes: list[Node], count: int, sessions: int, size: int) -> tuple[float, int, list[str]]:
    """The load over every node at once: (elapsed seconds, sent, errors)."""
    loads = [Load(HOST, n.port, SENDER, RCPT, size, count // len(nodes) + (i < count % len(nodes)),
                  max(1, sessions // len(nodes)), pipelining=True)
             for i, n in enumerate(nodes)]
    threads = [threading.Thread(target=load.run, daemon=True) for load in loads]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    return elapsed, sum(load.sent for load in loads), [e for load in loads for e in load.errors]


def measure(root: Path, template: Path, dns_port: int, tools: dict[str, str], backend: str,
            n: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    workdir = root / f"{backend}-{n}-{mode}"
    schema = "bench_" + secrets.token_hex(4)
    storage = ({"backend": '"postgres"', "dsn": f'"{args.dsn}"', "schema": f'"{schema}"',
                "pool_max": "8"} if backend == "postgres" else {})
    result: dict[str, Any] = {"backend": backend, "nodes": n, "mode": mode,
                              "count": args.count, "sessions": args.sessions, "size": args.size}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        if backend == "postgres":
            stack.callback(lambda: asyncio.run(_drop(args.dsn, schema)))
        workdir.mkdir(parents=True)
        if backend == "postgres":
            seed_directory(args.dsn, schema)
        sink = None
        if mode == "relay":
            sink = Sink(workdir / "sink", tools["smtp-sink"])
            stack.callback(sink.stop)
            sink.start()
        nodes = []
        for i in range(n):
            node = Node(workdir / f"node{i}", mode, template, dns_port,
                        sink_port=sink.port if sink else None, checks=False, storage=storage)
            stack.callback(node.stop)
            node.start()
            nodes.append(node)
        elapsed, sent, errors = spread(nodes, args.count, args.sessions, args.size)
        if errors:
            raise BenchError(f"{backend} x{n} {mode}: {errors[0]}")
        result["accept_seconds"] = round(elapsed, 3)
        result["accept_rate"] = round(sent / elapsed, 1)
        if sink is not None:
            start = time.monotonic() - elapsed
            if not wait_until(lambda: sink.count() >= sent, 600, 0.02):
                raise BenchError(f"{backend} x{n}: only {sink.count()} of {sent} delivered")
            total = time.monotonic() - start
            result["e2e_seconds"] = round(total, 3)
            result["e2e_rate"] = round(sent / total, 1)
    return result


def table(results: list[dict[str, Any]]) -> str:
    base = {r["mode"]: r for r in results if r["backend"] == "sqlite" and r["nodes"] == 1}
    lines = ["| setup | accept msg/s | ratio | end-to-end msg/s | ratio |",
             "|---|---:|---:|---:|---:|"]
    setups: dict[tuple[str, int], dict[str, Any]] = {}
    for r in results:
        setups.setdefault((r["backend"], r["nodes"]), {})[r["mode"]] = r
    for (backend, n), modes in setups.items():
        acc = modes.get("hold", {}).get("accept_rate")
        e2e = modes.get("relay", {}).get("e2e_rate")
        acc0 = base.get("hold", {}).get("accept_rate")
        e2e0 = base.get("relay", {}).get("e2e_rate")
        lines.append(
            f"| {backend}, {n} node{'s' if n > 1 else ''} | {acc or '-'} | "
            f"{f'{acc / acc0:.2f}' if acc and acc0 else '-'} | {e2e or '-'} | "
            f"{f'{e2e / e2e0:.2f}' if e2e and e2e0 else '-'} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--no-install", action="store_true")
    args = p.parse_args()
    tools = ensure_postfix(install=not args.no_install)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pw-bench-nodes-") as tmp:
        root = Path(tmp)
        dns = DnsStub().start()
        try:
            template = make_postwarden_template(root / "template")
            for backend, n in SETUPS:
                for mode in ("hold", "relay"):
                    r = measure(root, template, dns.port, tools, backend, n, mode, args)
                    print(json.dumps(r), flush=True)
                    results.append(r)
        finally:
            dns.stop()
            stop_all()
    print()
    print(table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
