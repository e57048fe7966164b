"""``postwarden quarantine list|show|release|delete``: review held messages.

Messages held by a content filter (see :mod:`postwarden.filter`) wait in
the quarantine table of the database (on PostgreSQL the one every node
shares: a message held by any node is reviewed from any node).
``release`` re-injects one into the delivery queue as it was held (no
filter sees it again), adding the Message-ID/Date and DKIM signature a
submitted message would have got, and wakes the running server (on
PostgreSQL the commit wakes every node); ``delete`` drops it.

Security exposure: administrator only (the data directory is 0700).
``show`` prints envelope, reasons and header fields, never the body.
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
from postwarden import control
from postwarden.envelope import Address, Envelope, MailParams, RcptParams, Recipient
from postwarden.message import cleanup, rawheaders
from postwarden.storage import factory
from postwarden.storage.base import CommitMeta, QueueStore
from postwarden.storage.sqlite_quarantine import HeldMessage, QuarantineError, QuarantineStore

Handler = Callable[[_config.Config, argparse.Namespace], int]


class QuarantineCommandError(Exception):
    """A quarantine command failed (one line, exit status 1)."""


def _store(cfg: _config.Config) -> QuarantineStore:
    if not cfg.storage.postgres and not cfg.db_path.exists():
        raise QuarantineCommandError(f"no database at {cfg.db_path} (has the server run?)")
    return factory.open_quarantine(cfg)


def _get(store: QuarantineStore, held_id: str) -> tuple[HeldMessage, bytes]:
    try:
        found = store.get(held_id)
    except QuarantineError as exc:
        raise QuarantineCommandError(str(exc)) from None
    if found is None:
        raise QuarantineCommandError(f"no message {held_id} in the quarantine")
    return found


def held_dict(h: HeldMessage) -> dict[str, Any]:
    return {"id": h.id, "held_at": h.ts, "direction": h.direction, "sender": h.sender,
            "recipients": list(h.recipients), "filters": list(h.filters),
            "reasons": list(h.reasons), "rules": list(h.rules), "size": h.size,
            "client_ip": h.client_ip, "auth_user": h.auth_user}


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def cmd_list(cfg: _config.Config, args: argparse.Namespace) -> int:
    with _store(cfg) as store:
        store.expire(cfg.filters.quarantine_retention)
        held = store.list(limit=args.limit)
    if args.json:
        json.dump([held_dict(h) for h in held], sys.stdout, indent=2)
        print()
        return 0
    if not held:
        print("quarantine is empty")
        return 0
    print(f"{'ID':<14} {'HELD AT':<19} {'DIR':<8} {'SIZE':>8}  SENDER / REASONS")
    for h in held:
        print(f"{h.id:<14} {_when(h.ts):<19} {h.direction:<8} {h.size:>8}  <{h.sender}> -> "
              + ", ".join(h.recipients[:5]) + (" ..." if len(h.recipients) > 5 else ""))
        for reason in h.reasons:
            print(f"{'':<53}{reason}")
    print(f"-- {len(held)} message(s)")
    return 0


def cmd_show(cfg: _config.Config, args: argparse.Namespace) -> int:
    with _store(cfg) as store:
        h, message = _get(store, args.id)
    print(f"id:         {h.id}")
    print(f"held at:    {_when(h.ts)} ({h.direction}, via {h.listener or '-'})")
    print(f"client:     {h.client_ip or '-'} helo={h.helo or '-'}")
    if h.auth_user:
        print(f"auth user:  {h.auth_user}")
    print(f"sender:     <{h.sender}>")
    print(f"recipients: {', '.join(h.recipients)}")
    print(f"size:       {h.size} bytes")
    print(f"held by:    {', '.join(h.filters)}")
    print("reasons:")
    for reason in h.reasons:
        print(f"  {reason}")
    if h.rules:
        print(f"rules:      {', '.join(h.rules)}")
    head = rawheaders.parse_header(message)
    print("headers:")
    for line in message[:head.end].decode("utf-8", "replace").splitlines():
        print(f"  {line}")
    return 0


def _envelope(h: HeldMessage) -> Envelope:
    mail = h.envelope.get("mail", {})
    rcpts = h.envelope.get("rcpt", [])
    if not isinstance(mail, dict) or not isinstance(rcpts, list):
        raise QuarantineCommandError(f"{h.id}: bad envelope record")
    params = MailParams(size=mail.get("size"), body=mail.get("body"),
                        smtputf8=bool(mail.get("smtputf8")), ret=mail.get("ret"),
                        envid=mail.get("envid"))
    recipients = []
    for r in rcpts:
        notify = r.get("notify")
        recipients.append(Recipient(Address.parse_simple(r["address"]),
                                    RcptParams(tuple(notify) if notify is not None else None,
                                               r.get("orcpt"))))
    sender = Address.parse_simple(h.sender) if h.sender else None
    return Envelope(sender, params, recipients)


async def _sign(cfg: _config.Config, h: HeldMessage, message: bytes) -> bytes:
    """What the session would have added to a submitted message: missing
    Message-ID/Date (RFC 6409 8) and the DKIM signature."""
    if not h.auth_user:
        return b""
    from postwarden.cli_dns import local_domains
    from postwarden.message.dkim_sign import from_domain, sign_message

    scanner = cleanup.HeaderScanner()
    scanner.feed(message)
    scanner.close()
    added = cleanup.submission_headers(scanner, cfg.hostname)
    if not cfg.dkim.sign:
        return added
    full = added + message
    # The directory and the keys of this backend (on PostgreSQL the shared
    # ones), read in a thread: they are synchronous.
    domains = set(await asyncio.to_thread(local_domains, cfg))
    candidates = {from_domain(full) or "", h.sender.rpartition("@")[2].lower()}
    local = {d for d in candidates if d and d.lower().removesuffix(".") in domains}
    if not local:
        return added

    def sign() -> bytes:
        with factory.dkim_keys(cfg) as keys:
            return sign_message(full, h.sender, keys, local.__contains__)
    return await asyncio.to_thread(sign) + added


async def release(cfg: _config.Config, store: QuarantineStore, queue: QueueStore,
                  held_id: str) -> str:
    """Re-inject a held message into ``queue`` as it was held, then drop it
    from the quarantine; the queue id (used by the CLI and the web admin)."""
    h, message = _get(store, held_id)
    envelope = _envelope(h)
    prepend = await _sign(cfg, h, message)
    body = queue.new_body()
    body.write(message)
    queue_id = await queue.commit(body, envelope, prepend, CommitMeta(
        client_ip=h.client_ip, helo=h.helo, auth_user=h.auth_user,
        listener=h.listener, session_id=f"quarantine-{h.id}"))
    store.delete(h.id)
    return queue_id


def cmd_release(cfg: _config.Config, args: argparse.Namespace) -> int:
    with _store(cfg) as store:
        async def inject() -> str:
            queue = factory.queue_store(cfg, node=False)
            await queue.start()
            try:
                return await release(cfg, store, queue, args.id)
            finally:
                await queue.close()

        queue_id = asyncio.run(inject())
    if cfg.storage.postgres:  # the commit woke every node
        print(f"{args.id}: released as {queue_id} into the shared queue")
        return 0
    woke = control.request(cfg.data_dir, "wake")
    print(f"{args.id}: released as {queue_id}; " + (
        "the server is delivering now" if woke
        else "the server is not running: delivery happens when it starts"))
    return 0


def cmd_delete(cfg: _config.Config, args: argparse.Namespace) -> int:
    with _store(cfg) as store:
        if not store.delete(args.id):
            raise QuarantineCommandError(f"no message {args.id} in the quarantine")
    print(f"{args.id}: deleted")
    return 0


def add_parser(sub: Any, wrap: Callable[[Handler], Callable[[argparse.Namespace], int]]
               ) -> None:
    """Register ``quarantine`` under the main parser; ``wrap`` loads the config."""
    q = sub.add_parser("quarantine", help="review messages held by the content filters"
                       ).add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = q.add_parser("list", help="list held messages with their reasons")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--limit", type=int, default=10000, help="at most this many messages")
    sp.set_defaults(func=wrap(cmd_list))
    for name, func, what in (("show", cmd_show, "envelope, reasons and headers of one"),
                             ("release", cmd_release, "deliver a held message"),
                             ("delete", cmd_delete, "delete a held message")):
        sp = q.add_parser(name, help=what)
        sp.add_argument("id")
        sp.set_defaults(func=wrap(func))
