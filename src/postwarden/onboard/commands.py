"""``postwarden client-config``, ``doctor`` and ``migrate``: the commands of
onboarding and upkeep (registered on the main parser by :func:`add_parsers`).

Security exposure: administrator only; nothing here prints a secret.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from postwarden import config as _config
from postwarden.onboard.clientconfig import client_settings, render_table

Handler = Callable[[_config.Config, argparse.Namespace], int]


def cmd_client_config(cfg: _config.Config, args: argparse.Namespace) -> int:
    address = (args.address or "").strip().lower()
    if address:
        local, at, domain = address.rpartition("@")
        if not (at and local and domain):
            print(f"postwarden: {args.address!r} is not an address (local@domain)",
                  file=sys.stderr)
            return 1
        _warn_unknown(cfg, address)
    print(render_table(client_settings(cfg, address)), end="")
    return 0


def _warn_unknown(cfg: _config.Config, address: str) -> None:
    from postwarden.storage.factory import open_directory

    if not cfg.storage.postgres and not cfg.db_path.exists():
        return
    with open_directory(cfg) as directory:  # on PostgreSQL the shared one
        if directory.find_account(address) is None:
            print(f"postwarden: warning: {address} is not an account here "
                  f"(postwarden user add {address})", file=sys.stderr)


def cmd_doctor(cfg: _config.Config, args: argparse.Namespace) -> int:
    from postwarden.onboard.doctor import run

    return run(cfg, args)


def cmd_migrate(cfg: _config.Config, args: argparse.Namespace) -> int:
    from postwarden.storage.migrate import cli

    return cli(cfg, check_only=args.check, backup=not args.no_backup)


def add_parsers(sub: Any, wrap: Callable[[Handler], Callable[[argparse.Namespace], int]]
                ) -> None:
    sp = sub.add_parser("client-config",
                        help="the settings to type into a mail client (Outlook, Foxmail, ...)")
    sp.add_argument("address", nargs="?", help="the account (default: any account)")
    sp.set_defaults(func=wrap(cmd_client_config))

    sp = sub.add_parser("doctor", help="check the running installation; print what to fix")
    sp.add_argument("--outbound-ip", default=None, metavar="IP",
                    help="the address this server sends mail from (default: the public "
                         "listener address, else the address of the default route)")
    sp.add_argument("--timeout", type=float, default=5.0,
                    help="seconds for each network check (default 5)")
    sp.set_defaults(func=wrap(cmd_doctor))

    sp = sub.add_parser("migrate", help="upgrade the database schema (backup first)")
    sp.add_argument("--check", action="store_true",
                    help="only say whether an upgrade is needed (exit 1 if so)")
    sp.add_argument("--no-backup", action="store_true", help="do not copy the database first")
    sp.set_defaults(func=wrap(cmd_migrate))
