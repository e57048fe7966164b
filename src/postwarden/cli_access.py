"""``postwarden access ...``: the access lists kept in the database.

    postwarden access add [--listener NAME] KIND VALUE
    postwarden access del [--listener NAME] KIND VALUE
    postwarden access list [--listener NAME] [--json]

KIND is ``allow`` or ``deny`` (VALUE an address or CIDR, IPv4 or IPv6) or
``deny-helo``, ``deny-sender``, ``deny-recipient`` (VALUE a glob such as
``*@spam.example``, or ``/regex/``).  A running server picks up a change
within a second (:mod:`postwarden.policy.access`); on PostgreSQL the
entries are shared, so a change made through any node applies on every
node.  The lists of the config file (``[access]``) are shown by ``list``
too, marked ``config``.

Security exposure: administrator only (the data directory is 0700).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from postwarden import config as _config
from postwarden.storage import factory

Handler = Callable[[_config.Config, argparse.Namespace], int]
KINDS = {"allow": "allow", "deny": "deny", "deny-helo": "deny_helo",
         "deny-sender": "deny_sender", "deny-recipient": "deny_recipient"}


def _fail(message: str) -> int:
    print(f"postwarden: {message}", file=sys.stderr)
    return 1


def _validate(cfg: _config.Config, args: argparse.Namespace) -> tuple[str, str, str]:
    """(listener, kind, canonical value); raises ConfigError."""
    listener = args.listener or ""
    if listener and cfg.listener(listener) is None:
        raise _config.ConfigError("--listener", f"no listener named {listener!r}")
    kind = KINDS[args.kind]
    if kind in ("allow", "deny"):
        value = _config.check_cidr(args.kind, args.value)
    else:
        value = _config.check_pattern(args.kind, args.value)
    return listener, kind, value


def cmd_add(cfg: _config.Config, args: argparse.Namespace) -> int:
    try:
        listener, kind, value = _validate(cfg, args)
    except _config.ConfigError as exc:
        return _fail(str(exc))
    with factory.open_access(cfg) as store:
        added = store.add(kind, value, listener)
    print(f"{'added' if added else 'already present'}: {args.kind} {value}"
          + (f" (listener {listener})" if listener else ""))
    return 0


def cmd_del(cfg: _config.Config, args: argparse.Namespace) -> int:
    try:
        listener, kind, value = _validate(cfg, args)
    except _config.ConfigError as exc:
        return _fail(str(exc))
    with factory.open_access(cfg) as store:
        deleted = store.delete(kind, value, listener)
    if not deleted:
        return _fail(f"no such entry: {args.kind} {value}")
    print(f"deleted: {args.kind} {value}")
    return 0


def _config_rows(cfg: _config.Config, listener: str | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    sources = [("", cfg.access.lists), *sorted(cfg.access.listeners.items())]
    for name, lists in sources:
        if listener is not None and name != listener:
            continue
        for kind in _config.ACCESS_KINDS:
            rows.extend({"listener": name, "kind": kind.replace("_", "-"), "value": v,
                         "source": "config"} for v in getattr(lists, kind))
    return rows


def cmd_list(cfg: _config.Config, args: argparse.Namespace) -> int:
    listener = args.listener
    rows = _config_rows(cfg, listener)
    if factory.has_state(cfg):
        with factory.open_access(cfg) as store:
            rows.extend({"listener": e.listener, "kind": e.kind.replace("_", "-"),
                         "value": e.value, "source": "db"} for e in store.entries(listener))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['listener'] or '*':<12} {r['kind']:<15} {r['value']:<40} {r['source']}")
    return 0


def add_parser(sub: Any, wrap: Callable[[Handler], Callable[[argparse.Namespace], int]]
               ) -> None:
    """Register ``access`` under the main parser; ``wrap`` loads the config."""
    access = sub.add_parser("access", help="allow/deny lists (clients, HELO, senders, "
                            "recipients)").add_subparsers(dest="action", required=True,
                                                          metavar="ACTION")
    for name, func, what in (("add", cmd_add, "add an entry"),
                             ("del", cmd_del, "delete an entry")):
        sp = access.add_parser(name, help=what)
        sp.add_argument("--listener", default="", help="only for this listener")
        sp.add_argument("kind", choices=sorted(KINDS))
        sp.add_argument("value", help="address/CIDR, or pattern (glob or /regex/)")
        sp.set_defaults(func=wrap(func))
    sp = access.add_parser("list", help="list the entries (config and database)")
    sp.add_argument("--listener", default=None, help="only this listener's entries")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=wrap(cmd_list))
