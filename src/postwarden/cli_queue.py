"""``postwarden queue ...``: look at and steer the queue, while the server runs.

Each command opens the queue database as a second client (SQLite WAL lets
the CLI and the server use it at once; writes go through the store, which
never collects spool files it does not own) and, where the change should act
at once, pokes the running server over the control socket
(:mod:`postwarden.control`).

Security exposure: administrator only (the data directory is 0700).  Shows
envelope data and message headers, never bodies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from postwarden import config as _config
from postwarden import control
from postwarden.storage.base import QueuedMessage
from postwarden.storage.factory import queue_store

if TYPE_CHECKING:
    from postwarden.storage.factory import AnyQueueStore

T = TypeVar("T")
HEADER_LIMIT = 64 * 1024


class QueueCommandError(Exception):
    """A queue command failed (one line, exit status 1)."""


def _run(cfg: _config.Config, action: Callable[[AnyQueueStore], Awaitable[T]]) -> T:
    async def main() -> T:
        if not cfg.storage.postgres and not cfg.db_path.exists():
            raise QueueCommandError(f"no queue database at {cfg.db_path} (has the server run?)")
        store = queue_store(cfg, node=False)  # [storage] backend
        await store.start()
        try:
            return await action(store)
        finally:
            await store.close()
    return asyncio.run(main())


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def message_dict(m: QueuedMessage, now: float) -> dict[str, Any]:
    return {
        "queue_id": m.queue_id,
        "received_at": m.received_at,
        "age_seconds": round(now - m.received_at, 1),
        "size": m.size,
        "sender": m.sender,
        "held": m.held,
        "auth_user": m.auth_user,
        "client_ip": m.client_ip,
        "recipients": [{"address": r.address, "status": r.status.value, "attempts": r.attempts,
                        "next_attempt": r.next_attempt, "last_reply": r.last_reply}
                       for r in m.recipients],
    }


def cmd_list(cfg: _config.Config, args: argparse.Namespace) -> int:
    msgs = _run(cfg, lambda s: s.list(limit=args.limit))
    now = time.time()
    if args.json:
        json.dump([message_dict(m, now) for m in msgs], sys.stdout, indent=2)
        print()
        return 0
    if not msgs:
        print("queue is empty")
        return 0
    print(f"{'QUEUE ID':<18} {'AGE':>5} {'SIZE':>9}  SENDER / RECIPIENTS")
    for m in msgs:
        flag = " (held)" if m.held else ""
        print(f"{m.queue_id:<18} {_age(now - m.received_at):>5} {m.size:>9}  "
              f"<{m.sender}>{flag}")
        for r in m.recipients:
            reply = f"  ({r.last_reply})" if r.last_reply else ""
            print(f"{'':<35}  {r.address}  [{r.status.value}]{reply}")
    total = sum(m.size for m in msgs)
    print(f"-- {len(msgs)} message(s), {total} bytes")
    return 0


async def _headers(store: AnyQueueStore, queue_id: str) -> bytes:
    buf = bytearray()
    gen = store.read_message(queue_id)
    try:
        async for chunk in gen:
            buf += chunk
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                return bytes(buf[: end + 2])
            if len(buf) > HEADER_LIMIT:
                break
    finally:
        await gen.aclose()
    return bytes(buf[:HEADER_LIMIT])


def cmd_show(cfg: _config.Config, args: argparse.Namespace) -> int:
    async def show(store: AnyQueueStore) -> tuple[QueuedMessage | None, bytes, list[Any]]:
        msg = await store.get(args.queue_id)
        history = await store.history(args.queue_id)
        headers = await _headers(store, args.queue_id) if msg is not None else b""
        return msg, headers, history

    msg, headers, history = _run(cfg, show)
    if msg is None and not history:
        raise QueueCommandError(f"no message {args.queue_id} in the queue or its history")
    now = time.time()
    if msg is not None:
        d = message_dict(msg, now)
        print(f"queue id:   {msg.queue_id}{' (held)' if msg.held else ''}")
        print(f"received:   {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(msg.received_at))}"
              f" ({_age(now - msg.received_at)} ago) from {msg.client_ip or '-'}"
              f" helo={msg.helo or '-'} via {msg.listener or '-'}")
        if msg.auth_user:
            print(f"auth user:  {msg.auth_user}")
        print(f"sender:     <{msg.sender}>")
        p = msg.params
        params = {k: v for k, v in (("size", p.size), ("body", p.body), ("ret", p.ret),
                                    ("envid", p.envid)) if v}
        if p.smtputf8:
            params["smtputf8"] = True
        if params:
            print(f"parameters: {params}")
        print(f"size:       {msg.size} bytes")
        print("recipients:")
        for r in d["recipients"]:
            print(f"  {r['address']}  [{r['status']}, {r['attempts']} attempt(s)]"
                  + (f"  {r['last_reply']}" if r["last_reply"] else ""))
        print("headers:")
        for line in headers.decode("utf-8", "replace").splitlines():
            print(f"  {line}")
    else:
        print(f"queue id:   {args.queue_id} (no longer queued)")
    print("history:")
    for ev in history:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev.ts))
        parts = [ev.event, ev.rcpt and f"to=<{ev.rcpt}>", ev.relay and f"relay={ev.relay}",
                 ev.dsn and f"dsn={ev.dsn}", ev.reply and f"({ev.reply})"]
        print(f"  {stamp}  " + " ".join(x for x in parts if x))
    return 0


def _wake(cfg: _config.Config) -> str:
    if control.request(cfg.data_dir, "wake"):
        return "the server is delivering now"
    return "the server is not running: delivery happens when it starts"


def cmd_flush(cfg: _config.Config, args: argparse.Namespace) -> int:
    count = _run(cfg, lambda s: s.flush(args.queue_id))
    if args.queue_id and not count:
        raise QueueCommandError(f"no deferred recipient of {args.queue_id} to retry")
    print(f"{count} recipient(s) due now; {_wake(cfg)}")
    return 0


def _one(cfg: _config.Config, args: argparse.Namespace,
         action: Callable[[AnyQueueStore], Awaitable[bool]], done: str,
         wake: bool = False) -> int:
    if not _run(cfg, action):
        raise QueueCommandError(f"no message {args.queue_id} in the queue")
    print(f"{args.queue_id}: {done}" + (f"; {_wake(cfg)}" if wake else ""))
    return 0


def cmd_hold(cfg: _config.Config, args: argparse.Namespace) -> int:
    return _one(cfg, args, lambda s: s.set_held(args.queue_id, True), "held")


def cmd_release(cfg: _config.Config, args: argparse.Namespace) -> int:
    return _one(cfg, args, lambda s: s.set_held(args.queue_id, False), "released", wake=True)


def cmd_delete(cfg: _config.Config, args: argparse.Namespace) -> int:
    return _one(cfg, args, lambda s: s.delete(args.queue_id), "deleted")


def cmd_requeue(cfg: _config.Config, args: argparse.Namespace) -> int:
    return _one(cfg, args, lambda s: s.requeue(args.queue_id), "requeued", wake=True)


Handler = Callable[[_config.Config, argparse.Namespace], int]


def add_parser(sub: Any, wrap: Callable[[Handler], Callable[[argparse.Namespace], int]]
               ) -> None:
    """Register ``queue`` under the main parser; ``wrap`` loads the config."""
    queue = sub.add_parser("queue", help="list and steer the mail queue").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    sp = queue.add_parser("list", help="list queued messages")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--limit", type=int, default=10000, help="at most this many messages")
    sp.set_defaults(func=wrap(cmd_list))
    sp = queue.add_parser("show", help="envelope, headers and history of a message")
    sp.add_argument("queue_id")
    sp.set_defaults(func=wrap(cmd_show))
    sp = queue.add_parser("flush", help="retry deferred mail now (one message or all)")
    sp.add_argument("queue_id", nargs="?")
    sp.set_defaults(func=wrap(cmd_flush))
    for name, func, what in (("hold", cmd_hold, "keep a message from delivery"),
                             ("release", cmd_release, "release a held message"),
                             ("delete", cmd_delete, "delete a message (no bounce)"),
                             ("requeue", cmd_requeue, "retry a message from scratch now")):
        sp = queue.add_parser(name, help=what)
        sp.add_argument("queue_id")
        sp.set_defaults(func=wrap(func))
