"""``postwarden nodes [--json]``: the nodes sharing the PostgreSQL queue.

One line per node registered in the ``nodes`` table: its id (host, pid and
a random suffix), when it started, its last heartbeat and whether that is
recent (a node is *live* while its heartbeat is younger than
:data:`LIVE_BEATS` heartbeat intervals; a node killed without a clean stop
stays listed as *gone* until removed with ``--prune``), the deliveries it
holds a lease on, and how many messages it took over from nodes whose
lease expired.

Security exposure: administrator only (needs the config and the database).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from postwarden import config as _config

Handler = Callable[[_config.Config, argparse.Namespace], int]
# A node whose last heartbeat is older than this many intervals is gone.
LIVE_BEATS = 3


class NodesCommandError(Exception):
    """The command cannot run (one line, exit status 1)."""


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


async def _nodes(cfg: _config.Config, prune: bool) -> list[dict[str, Any]]:
    from postwarden.storage.pg_queue import PgQueueStore

    store = PgQueueStore(cfg.storage, cfg.spool_dir, register=False)
    await store.start()
    try:
        rows = await store.nodes()
        now = time.time()
        limit = LIVE_BEATS * cfg.storage.heartbeat
        for row in rows:
            row["live"] = now - row["heartbeat"] <= limit
        if prune:
            gone = [r["node_id"] for r in rows if not r["live"]]
            await store.forget_nodes(gone)
            rows = [r for r in rows if r["live"]]
        return rows
    finally:
        await store.close()


def cmd_nodes(cfg: _config.Config, args: argparse.Namespace) -> int:
    if not cfg.storage.postgres:
        print('postwarden: nodes: one node only ([storage] backend = "sqlite"); '
              'several nodes share a queue with backend = "postgres"', file=sys.stderr)
        return 1
    try:
        rows = asyncio.run(_nodes(cfg, args.prune))
    except Exception as exc:  # StorageError: the database does not answer
        print(f"postwarden: nodes: {exc}", file=sys.stderr)
        return 1
    now = time.time()
    if args.json:
        print(json.dumps([{**r, "heartbeat_age": round(now - r["heartbeat"], 3)}
                          for r in rows], indent=2))
        return 0
    if not rows:
        print("no nodes")
        return 0
    print(f"{'NODE':<40} {'STATE':<5} {'HEARTBEAT':>9} {'UP':>6} {'IN-FLIGHT':>9} "
          f"{'TAKEOVERS':>9}")
    for r in rows:
        print(f"{r['node_id']:<40} {'live' if r['live'] else 'gone':<5} "
              f"{_age(now - r['heartbeat']) + ' ago':>9} {_age(now - r['started']):>6} "
              f"{r['in_flight']:>9} {r['takeovers']:>9}")
    return 0


def add_parser(sub: Any, wrap: Callable[[Handler], Callable[[argparse.Namespace], int]]
               ) -> None:
    """Register ``nodes`` (``wrap`` loads the config)."""
    sp = sub.add_parser("nodes", help="list the nodes sharing the PostgreSQL queue")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--prune", action="store_true",
                    help="forget nodes that are gone (no heartbeat for "
                         f"{LIVE_BEATS} intervals)")
    sp.set_defaults(func=wrap(cmd_nodes))
