"""``postwarden storage copy-to-postgres``: from one SQLite node to the
shared PostgreSQL backend (:mod:`postwarden.storage.pg_copy`).

The target is ``--dsn`` (and ``--schema``), or the config's ``[storage]``
when it already says ``backend = "postgres"``; the source is always the
SQLite file, spool and DKIM keys of the config's ``data_dir``.

Security exposure: administrator only; the DSN is never printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from postwarden import config as _config
from postwarden.storage.settings import StorageSettings

Handler = Callable[[_config.Config, argparse.Namespace], int]


def _target(cfg: _config.Config, args: argparse.Namespace) -> StorageSettings:
    if args.dsn is None:
        if not cfg.storage.postgres:
            raise ValueError('--dsn: is required (the config\'s [storage] is "sqlite")')
        if args.schema is not None:
            return StorageSettings.from_table({"backend": "postgres", "dsn": cfg.storage.dsn,
                                               "schema": args.schema})
        return cfg.storage
    table = {"backend": "postgres", "dsn": args.dsn}
    if args.schema is not None:
        table["schema"] = args.schema
    return StorageSettings.from_table(table)


def cmd_copy(cfg: _config.Config, args: argparse.Namespace) -> int:
    from postwarden.storage.pg_copy import CopyError, copy_to_postgres

    try:
        target = _target(cfg, args)
    except ValueError as exc:
        key, _, reason = str(exc).partition(": ")
        print(f"postwarden: storage copy-to-postgres: {key.replace('dsn', '--dsn')}: "
              f"{reason}", file=sys.stderr)
        return 1
    try:
        counts, missing = copy_to_postgres(cfg, target, force=args.force)
    except CopyError as exc:
        print(f"postwarden: storage copy-to-postgres: {exc}", file=sys.stderr)
        return 1
    print(f"copied {cfg.db_path} into PostgreSQL schema {target.schema!r}:")
    for what, n in counts.items():
        print(f"  {n:>8}  {what}")
    for queue_id in missing:
        print(f"postwarden: warning: message {queue_id}: its spool file was missing; it is "
              "copied without a body and will be marked corrupt", file=sys.stderr)
    print('next: set [storage] backend = "postgres" (dsn, schema) in the config of each node, '
          "then start them")
    return 0


def add_parser(sub: Any, wrap: Callable[[Handler], Callable[[argparse.Namespace], int]]
               ) -> None:
    """Register ``storage`` (``wrap`` loads the config)."""
    st = sub.add_parser("storage", help="move a node's state between storage backends"
                        ).add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = st.add_parser("copy-to-postgres",
                       help="copy this stopped SQLite node into an empty PostgreSQL schema")
    sp.add_argument("--dsn", default=None,
                    help="postgresql://user@host:5432/db (default: the config's [storage])")
    sp.add_argument("--schema", default=None, help="PostgreSQL schema (default: postwarden)")
    sp.add_argument("--force", action="store_true",
                    help="replace what a non-empty target schema holds")
    sp.set_defaults(func=wrap(cmd_copy))
