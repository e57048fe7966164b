"""``postwarden admin ...`` and ``postwarden api-key ...``: the accounts of
the web admin (not mail accounts) and the HTTP API's keys.

* ``admin add NAME [--role admin|read-only]``, ``admin passwd NAME``,
  ``admin del NAME``, ``admin list``;
* ``api-key add --scope read|send|admin [--account ADDRESS] [--label TEXT]``,
  ``api-key list``, ``api-key revoke KEY_ID``.

Security exposure: run by the administrator.  Passwords are generated and
printed once, or read from one line of standard input
(``--password-stdin``); an API key is printed once and only its digest is
stored.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from postwarden import config as _config
from postwarden.auth import password_policy, passwords
from postwarden.storage.factory import admin_store
from postwarden.storage.sqlite_directory import SqliteDirectory
from postwarden.web.store import ROLES, SCOPES, AdminError, SqliteAdminStore

Handler = Callable[[_config.Config, argparse.Namespace], int]


def _store(cfg: _config.Config) -> SqliteAdminStore:
    return admin_store(cfg)  # the shared tables on PostgreSQL


def _password(cfg: _config.Config, args: argparse.Namespace) -> tuple[str, bool]:
    line = ""
    if args.password_stdin:
        line = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
        if not line or any(ord(c) < 32 or ord(c) == 127 for c in line):
            raise AdminError("give one line of printable characters on standard input")
    try:
        return password_policy.given_or_generated(line, cfg.passwords)
    except password_policy.PasswordRejected as exc:
        raise AdminError(str(exc)) from None


def _show(name: str, password: str) -> None:
    print(f"\nPassword for admin {name} (shown only this once; store it now):\n")
    print(f"    {password}\n")


def cmd_add(cfg: _config.Config, args: argparse.Namespace) -> int:
    password, generated = _password(cfg, args)
    with _store(cfg) as s:
        name = s.add(args.name, passwords.hash_password(password), args.role)
    print(f"created admin {name} ({args.role})")
    if generated:
        _show(name, password)
    return 0


def cmd_passwd(cfg: _config.Config, args: argparse.Namespace) -> int:
    password, generated = _password(cfg, args)
    with _store(cfg) as s:
        name = s.set_password(args.name, passwords.hash_password(password))
    print(f"password changed for admin {name} (its sessions are ended)")
    if generated:
        _show(name, password)
    return 0


def cmd_del(cfg: _config.Config, args: argparse.Namespace) -> int:
    with _store(cfg) as s:
        name = s.delete(args.name)
    print(f"deleted admin {name}")
    return 0


def cmd_list(cfg: _config.Config, args: argparse.Namespace) -> int:
    with _store(cfg) as s:
        for a in s.list_admins():
            when = time.strftime("%Y-%m-%d", time.gmtime(a.created))
            print(f"{a.name}\t{a.role}\t{when}")
    return 0


def cmd_key_add(cfg: _config.Config, args: argparse.Namespace) -> int:
    account = (args.account or "").strip().lower()
    if account:
        with SqliteDirectory(cfg.db_path, cfg.domains) as d:
            if d.find_account(account) is None:
                raise AdminError(f"no account {account}")
    elif args.scope == "send":
        raise AdminError("a send key sends as an account: give --account ADDRESS")
    with _store(cfg) as s:
        whole, key = s.add_key(args.scope, label=args.label, account=account,
                               created_by="cli")
    print(f"created API key {key.key_id} (scope {key.scope}"
          + (f", sends as {account}" if account else "") + ")")
    print("\nThe key (send it as 'Authorization: Bearer KEY'; shown only this once):\n")
    print(f"    {whole}\n")
    return 0


def cmd_key_list(cfg: _config.Config, args: argparse.Namespace) -> int:
    with _store(cfg) as s:
        for k in s.list_keys():
            used = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.last_used)) \
                if k.last_used else "never"
            print(f"{k.key_id}\t{k.scope}\t{k.account or '-'}\t{k.label}\tlast used {used}")
    return 0


def cmd_key_revoke(cfg: _config.Config, args: argparse.Namespace) -> int:
    with _store(cfg) as s:
        key_id = s.revoke_key(args.key_id)
    print(f"revoked API key {key_id}")
    return 0


def add_parsers(sub: Any, wrap: Callable[[Handler], Callable[[argparse.Namespace], int]]
                ) -> None:
    admin = sub.add_parser("admin", help="accounts of the web admin").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for name, func, what in (("add", cmd_add, "create an admin account"),
                             ("passwd", cmd_passwd, "set a new password")):
        sp = admin.add_parser(name, help=what)
        sp.add_argument("name")
        sp.add_argument("--password-stdin", action="store_true",
                        help="read the password from one line of standard input "
                             "(default: generate one and print it)")
        if name == "add":
            sp.add_argument("--role", choices=ROLES, default="admin",
                            help="admin (default): may change things; read-only: may look")
        sp.set_defaults(func=wrap(func))
    sp = admin.add_parser("del", help="delete an admin account")
    sp.add_argument("name")
    sp.set_defaults(func=wrap(cmd_del))
    admin.add_parser("list", help="list admin accounts").set_defaults(func=wrap(cmd_list))

    key = sub.add_parser("api-key", help="keys of the HTTP API").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    sp = key.add_parser("add", help="create a key and print it once")
    sp.add_argument("--scope", choices=SCOPES, required=True,
                    help="read: look; send: POST /api/v1/messages as --account; admin: all")
    sp.add_argument("--account", default="", help="the mail account a send key sends as")
    sp.add_argument("--label", default="", help="what it is for")
    sp.set_defaults(func=wrap(cmd_key_add))
    key.add_parser("list", help="list keys").set_defaults(func=wrap(cmd_key_list))
    sp = key.add_parser("revoke", help="revoke a key")
    sp.add_argument("key_id")
    sp.set_defaults(func=wrap(cmd_key_revoke))
