"""``postwarden ban list|add|del``: look at and change the bans, while the
server runs.

The commands write the shared database
(:class:`~postwarden.storage.sqlite_protect.SqliteProtectStore`); a running
server reloads its bans at least once a second, so a change applies within
a second on every node.  ``del`` also forgets the address's failure
counters and account locks.

Security exposure: administrator only (the data directory is 0700).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from postwarden import config as _config
from postwarden.storage import factory
from postwarden.storage.sqlite_protect import Ban, ProtectError, SqliteProtectStore

if TYPE_CHECKING:
    from postwarden.storage.pg_protect import PgBanAdmin

Handler = Callable[[_config.Config, argparse.Namespace], int]


def _store(cfg: _config.Config) -> SqliteProtectStore | PgBanAdmin:
    return factory.ban_admin(cfg)  # on PostgreSQL the ban table every node reads


def _left(ban: Ban, now: float) -> str:
    if ban.until is None:
        return "permanent"
    seconds = int(ban.until - now)
    if seconds <= 0:
        return "expired"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def cmd_list(cfg: _config.Config, args: argparse.Namespace) -> int:
    with _store(cfg) as store:
        bans = store.list_bans(include_expired=args.all)
    now = time.time()
    if not bans:
        print("no bans")
        return 0
    print(f"{'ADDRESS':<40} {'LEFT':>9} {'LEVEL':>5}  REASON")
    for ban in bans:
        print(f"{ban.shown:<40} {_left(ban, now):>9} {ban.level:>5}  {ban.reason}")
    return 0


def cmd_add(cfg: _config.Config, args: argparse.Namespace) -> int:
    with _store(cfg) as store:
        ban = store.add_ban(args.address, args.reason, args.duration)
    left = "permanently" if ban.until is None else f"for {_left(ban, time.time())}"
    print(f"banned {ban.shown} {left}")
    return 0


def cmd_del(cfg: _config.Config, args: argparse.Namespace) -> int:
    with _store(cfg) as store:
        found = store.del_ban(args.address)
    if not found:
        raise ProtectError(f"no ban for {args.address}")
    print(f"unbanned {args.address}")
    return 0


def _duration(text: str) -> float | None:
    if text.strip().lower() in ("permanent", "forever", "0"):
        return None
    try:
        return _config.parse_duration("--duration", text)
    except _config.ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None


def _reported(handler: Handler) -> Handler:
    """ProtectError (bad address, no such ban): one line, exit status 1."""
    def run(cfg: _config.Config, args: argparse.Namespace) -> int:
        try:
            return handler(cfg, args)
        except ProtectError as exc:
            print(f"postwarden: {exc}", file=sys.stderr)
            return 1
    return run


def add_parser(sub: Any, wrap: Callable[[Handler], Callable[[argparse.Namespace], int]]
               ) -> None:
    """Register ``ban`` (``wrap`` loads the config, as for ``queue``)."""
    ban = sub.add_parser("ban", help="list, add and lift bans of client addresses"
                         ).add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = ban.add_parser("list", help="list the bans in force")
    sp.add_argument("--all", action="store_true", help="include expired bans")
    sp.set_defaults(func=wrap(_reported(cmd_list)))
    sp = ban.add_parser("add", help="ban an IP address or network")
    sp.add_argument("address", help="IP address or CIDR network")
    sp.add_argument("--duration", type=_duration, default=None,
                    help="e.g. 3600, 15m, 1h, 7d (default: permanent)")
    sp.add_argument("--reason", default="banned by the administrator")
    sp.set_defaults(func=wrap(_reported(cmd_add)))
    sp = ban.add_parser("del", help="lift a ban (and the address's account locks)")
    sp.add_argument("address")
    sp.set_defaults(func=wrap(_reported(cmd_del)))
