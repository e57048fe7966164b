"""The ``postwarden`` command line: init, serve, check-config and the
administration of domains, accounts and aliases.

Every failure is one line on standard error (``postwarden: ...``) and an
exit status: 0 success, 1 a problem with the request, the config or the
system, 2 a usage error (argparse).  No traceback reaches the user unless
``POSTWARDEN_DEBUG=1`` is set.

Security exposure: run by the administrator, so its input is trusted, but it
creates secrets: ``init`` writes the TLS private key (mode 0600) and the data
directory (0700); generated passwords are printed once and never stored in
clear; ``--password-stdin`` keeps a password out of the process list and
the shell history.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sqlite3
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from postwarden import (
    __version__,
    bootstrap,
    cli_access,
    cli_admin,
    cli_ban,
    cli_dns,
    cli_nodes,
    cli_observe,
    cli_quarantine,
    cli_queue,
    cli_storage,
    sendtest,
)
from postwarden import config as _config
from postwarden.auth import password_policy, passwords
from postwarden.observe import audit
from postwarden.onboard import commands as onboard_commands
from postwarden.onboard import interactive as onboard_interactive
from postwarden.storage.base import StorageError
from postwarden.storage.factory import open_directory
from postwarden.storage.sqlite_directory import (
    MAX_APP_PASSWORDS,
    DirectoryError,
    SqliteDirectory,
    check_domain,
)
from postwarden.storage.sqlite_monitor import MonitorError
from postwarden.storage.sqlite_quarantine import QuarantineError
from postwarden.web.store import AdminError

PROG = "postwarden"
EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
# init without a terminal (make run, scripts): loopback and the standard ports.
INIT_DEFAULTS = {"listen_host": "127.0.0.1", **{
    f"{mode}_port": port for mode, port in _config.DEFAULT_PORTS.items()}}


class CliError(Exception):
    """A failure to report as one line, exit status 1."""


# --- helpers --------------------------------------------------------------


def _err(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr)


def _load(args: argparse.Namespace, *, check_files: bool = True) -> _config.Config:
    path = args.config or _config.default_path()
    return _config.load(path, check_files=check_files)


def _directory(cfg: _config.Config) -> SqliteDirectory:
    try:
        cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create data directory {cfg.data_dir}: {exc.strerror}") from None
    return open_directory(cfg)  # [storage] backend


def _read_password(stdin: TextIO) -> str:
    line = stdin.readline()
    password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise CliError("empty password on standard input")
    if any(ord(c) < 32 or ord(c) == 127 for c in password):
        raise CliError("the password contains control characters")
    return password


def _new_password(args: argparse.Namespace, cfg: _config.Config) -> tuple[str, bool]:
    """The password to set and whether it was generated (and must be shown).

    A password given on standard input must pass ``[passwords]`` rules
    (:mod:`postwarden.auth.password_policy`); generated ones always do."""
    given = _read_password(sys.stdin) if args.password_stdin else ""
    try:
        return password_policy.given_or_generated(given, cfg.passwords)
    except password_policy.PasswordRejected as exc:
        raise CliError(str(exc)) from None


def _show_password(address: str, password: str) -> None:
    print(f"\nPassword for {address} (shown only this once; store it now):\n")
    print(f"    {password}\n")


# --- init -----------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    if onboard_interactive.wanted(args):
        return onboard_interactive.run(args)
    directory: Path = args.dir.resolve()
    domain: str = args.domain
    hostname: str = args.hostname or f"mail.{domain}"
    for name in ("listen_host", "mx_port", "submission_port", "submissions_port"):
        if getattr(args, name) is None:  # not given: the non-interactive defaults
            setattr(args, name, INIT_DEFAULTS[name])
    path = directory / _config.DEFAULT_CONFIG
    # Check, then proceed: everything is validated before the first write.
    if path.exists() and not args.force:
        raise CliError(f"{path} already exists (use --force to overwrite it)")
    text = bootstrap.render_config(hostname=hostname, domain=domain, listen_host=args.listen_host,
                         mx_port=args.mx_port, submission_port=args.submission_port,
                         submissions_port=args.submissions_port, config_path=str(path),
                         data_dir=args.data_dir)
    cfg = _config.parse(tomllib.loads(text), path)
    if cfg.tls.cert is None or cfg.tls.key is None:  # pragma: no cover - the template has both
        raise CliError("internal error: the config template has no [tls]")

    bootstrap.write_install(directory, cfg, path, text,
                            self_signed_for=(hostname, args.listen_host))
    print(f"wrote {path}")
    print(f"wrote a self-signed certificate for {hostname}: {cfg.tls.cert} (key {cfg.tls.key})")

    postmaster = f"postmaster@{domain}"
    with _directory(cfg) as d:
        if d.find_account(postmaster) is not None:
            print(f"account {postmaster} already exists; password unchanged "
                  f"(postwarden user passwd {postmaster} sets a new one)")
            password = None
        else:
            password = passwords.generate_password()
            d.add_user(postmaster, passwords.hash_password(password))
            print(f"created account {postmaster}")
    keys = bootstrap.init_dkim(cfg.data_dir, domain)
    print(f"DKIM: mail from {domain} is signed with selector "
          f"{', '.join(k.selector for k in keys)} ({cfg.data_dir / 'dkim' / domain})")
    if password is not None:
        _show_password(postmaster, password)
    print("Next steps:")
    print(f"  postwarden -c {path} check-config")
    print(f"  postwarden -c {path} dns records    # MX, SPF, DKIM, DMARC... to publish")
    print(f"  postwarden -c {path} serve")
    print(f"  POSTWARDEN_PASSWORD='...' postwarden -c {path} send-test --to {postmaster}")
    print(f"  postwarden -c {path} client-config   # what to type into a mail client")
    print(f"  postwarden -c {path} doctor          # check the running installation")
    return EXIT_OK


# --- serve / check-config -------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    # The composition root, imported late (it pulls in the whole server).
    from postwarden.app import serve  # type: ignore[import-untyped, unused-ignore]

    worker = None
    if args.worker is not None:
        from postwarden.workers import WorkerArgs

        worker = WorkerArgs.decode(args.worker, args.notify_fd, args.worker_slot,
                                   args.table_fd, args.main_pid, args.steering_fd)
    status: int = serve(cfg, worker)
    return status


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(f"config OK: {cfg.path}")
    print(f"  hostname: {cfg.hostname}")
    print(f"  data_dir: {cfg.data_dir}")
    print(f"  domains: {', '.join(cfg.domains) if cfg.domains else '(none in config)'}")
    print("  listeners:")
    for lst in cfg.listeners:
        host = f"[{lst.host}]" if ":" in lst.host else lst.host
        notes = [lst.mode]
        if lst.implicit_tls:
            notes.append("implicit TLS")
        elif cfg.tls.cert is not None:
            notes.append("STARTTLS")
        if lst.auth_required:
            notes.append("AUTH required")
        if not lst.enabled:
            notes.append("disabled")
        print(f"    {lst.name:<12} {host}:{lst.port:<6} ({', '.join(notes)})")
    if cfg.tls.cert is not None:
        print(f"  tls: cert {cfg.tls.cert}, key {cfg.tls.key}, min {cfg.tls.min_version}")
    else:
        print("  tls: none (STARTTLS not offered)")
    return EXIT_OK


# --- user -----------------------------------------------------------------


def cmd_user_add(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    password, generated = _new_password(args, cfg)
    with _directory(cfg) as d:
        address = d.add_user(args.address, passwords.hash_password(password))
    print(f"created account {address}")
    if generated:
        _show_password(address, password)
    return EXIT_OK


def cmd_user_passwd(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    password, generated = _new_password(args, cfg)
    with _directory(cfg) as d:
        address = d.set_password(args.address, passwords.hash_password(password))
    print(f"password changed for {address}")
    if generated:
        _show_password(address, password)
    return EXIT_OK


def cmd_app_password_add(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    password = passwords.generate_password()
    with _directory(cfg) as d:
        app_id = d.add_app_password(args.address, passwords.hash_password(password),
                                    args.label)
    address = args.address.strip().lower()
    print(f"created application password {app_id} for {address}"
          + (f" ({args.label})" if args.label else ""))
    print(f"\nApplication password for {address} (SMTP AUTH with username {address}; "
          "shown only this once):\n")
    print(f"    {password}\n")
    return EXIT_OK


def cmd_app_password_list(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    with _directory(cfg) as d:
        rows = d.list_app_passwords(args.address)
    for app_id, label, created in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(created))
        print(f"{app_id}\t{when}\t{label}")
    return EXIT_OK


def cmd_app_password_revoke(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    with _directory(cfg) as d:
        address = d.revoke_app_password(args.address, args.id)
    print(f"revoked application password {args.id} of {address}")
    return EXIT_OK


def cmd_user_del(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    with _directory(cfg) as d:
        address = d.del_user(args.address)
    print(f"deleted account {address}")
    return EXIT_OK


def cmd_user_list(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    with _directory(cfg) as d:
        for acc in d.list_users():
            print(acc.address if acc.enabled else f"{acc.address} (disabled)")
    return EXIT_OK


# --- domain ---------------------------------------------------------------


def cmd_domain_add(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    with _directory(cfg) as d:
        name = d.add_domain(args.domain)
    print(f"added domain {name}")
    return EXIT_OK


def cmd_domain_del(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    with _directory(cfg) as d:
        name = d.del_domain(args.domain)
        still = d.is_local(name)
    print(f"deleted domain {name}" + (" (still local: listed in the config file)"
                                      if still else ""))
    return EXIT_OK


def cmd_domain_list(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    with _directory(cfg) as d:
        for name in d.list_domains():
            origin = "config" if name in d.config_domains else "database"
            print(f"{name}\t({origin})")
    return EXIT_OK


# --- alias ----------------------------------------------------------------


def cmd_alias_add(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    with _directory(cfg) as d:
        alias = d.add_alias(args.source, args.targets)
    print(f"alias {alias.source} -> {', '.join(alias.targets)}")
    return EXIT_OK


def cmd_alias_del(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    with _directory(cfg) as d:
        source = d.del_alias(args.source)
    print(f"deleted alias {source}")
    return EXIT_OK


def cmd_alias_list(args: argparse.Namespace) -> int:
    cfg = _load(args, check_files=False)
    with _directory(cfg) as d:
        for alias in d.list_aliases():
            print(f"{alias.source} -> {', '.join(alias.targets)}")
    return EXIT_OK


# --- parser ---------------------------------------------------------------


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range 0-65535")
    return port


def _domain_arg(text: str) -> str:
    try:
        return check_domain(text)
    except DirectoryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen_host(text: str) -> str:
    if text in ("localhost", "*"):
        return text
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _data_dir(text: str) -> str:
    if not text or any(c in text for c in '"\\\n') or not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r} is not a usable directory name")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="A secure, self-hosted SMTP server.")
    p.add_argument("-c", "--config", type=Path, default=None, metavar="PATH",
                   help=f"config file (default: ${_config.CONFIG_ENV} or "
                        f"./{_config.DEFAULT_CONFIG})")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="write a config, a certificate and the first account")
    init.add_argument("--dir", type=Path, required=True, help="directory to set up")
    init.add_argument("--domain", type=_domain_arg, default=None,
                      help="the mail domain (the part after @); required with "
                           "--non-interactive or without a terminal")
    init.add_argument("--hostname", type=_domain_arg, default=None,
                      help="this server's name (default: mail.DOMAIN)")
    init.add_argument("--listen-host", type=_listen_host, default=None,
                      help="IP address to listen on (default: 127.0.0.1, or '*' (all) when "
                           "interactive)")
    init.add_argument("--mx-port", type=_port, default=None,
                      help=f"default {_config.DEFAULT_PORTS['mx']}")
    init.add_argument("--submission-port", type=_port, default=None,
                      help=f"default {_config.DEFAULT_PORTS['submission']}")
    init.add_argument("--submissions-port", type=_port, default=None,
                      help=f"default {_config.DEFAULT_PORTS['submissions']}")
    init.add_argument("--data-dir", default="data", type=_data_dir,
                      help="queue, accounts and mailboxes (default: DIR/data; "
                           "/var/lib/postwarden with the systemd unit)")
    init.add_argument("--letsencrypt-dir", default=str(onboard_interactive.LETSENCRYPT_LIVE),
                      help="where certbot keeps certificates (interactive init uses the one "
                           "of the host name when it exists)")
    init.add_argument("--non-interactive", action="store_true",
                      help="never prompt (the default without a terminal)")
    init.add_argument("--force", action="store_true",
                      help="overwrite an existing config and certificate")
    init.set_defaults(func=cmd_init)

    serve = sub.add_parser("serve", help="run the server")
    serve.set_defaults(func=cmd_serve)
    # Set by the main process for its worker processes (workers.py).
    serve.add_argument("--worker", help=argparse.SUPPRESS)
    serve.add_argument("--notify-fd", type=int, default=-1, help=argparse.SUPPRESS)
    serve.add_argument("--worker-slot", type=int, default=0, help=argparse.SUPPRESS)
    serve.add_argument("--table-fd", type=int, default=-1, help=argparse.SUPPRESS)
    serve.add_argument("--main-pid", type=int, default=0, help=argparse.SUPPRESS)
    serve.add_argument("--steering-fd", type=int, default=-1, help=argparse.SUPPRESS)
    sub.add_parser("check-config", help="validate the config file").set_defaults(
        func=cmd_check_config)

    user = sub.add_parser("user", help="manage accounts").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for name, func, what in (("add", cmd_user_add, "create an account"),
                             ("passwd", cmd_user_passwd, "set a new password")):
        sp = user.add_parser(name, help=what)
        sp.add_argument("address")
        sp.add_argument("--password-stdin", action="store_true",
                        help="read the password from one line of standard input "
                             "(default: generate one and print it)")
        sp.set_defaults(func=func)
    sp = user.add_parser("del", help="delete an account")
    sp.add_argument("address")
    sp.set_defaults(func=cmd_user_del)
    user.add_parser("list", help="list accounts").set_defaults(func=cmd_user_list)
    app = user.add_parser(
        "app-password",
        help=f"application passwords for SMTP AUTH (up to {MAX_APP_PASSWORDS} per account)"
    ).add_subparsers(dest="app_action", required=True, metavar="ACTION")
    sp = app.add_parser("add", help="generate one and print it once")
    sp.add_argument("address")
    sp.add_argument("--label", default="", help="what it is for (e.g. 'phone')")
    sp.set_defaults(func=cmd_app_password_add)
    sp = app.add_parser("list", help="list an account's application passwords")
    sp.add_argument("address")
    sp.set_defaults(func=cmd_app_password_list)
    sp = app.add_parser("revoke", help="revoke one application password")
    sp.add_argument("address")
    sp.add_argument("id", type=int)
    sp.set_defaults(func=cmd_app_password_revoke)

    domain = sub.add_parser("domain", help="manage local domains").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for name, func in (("add", cmd_domain_add), ("del", cmd_domain_del)):
        sp = domain.add_parser(name, help=f"{name} a local domain")
        sp.add_argument("domain")
        sp.set_defaults(func=func)
    domain.add_parser("list", help="list local domains").set_defaults(func=cmd_domain_list)

    alias = sub.add_parser("alias", help="manage aliases").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    sp = alias.add_parser("add", help="create an alias or add targets to it")
    sp.add_argument("source", help="local@domain, or @domain for a catch-all")
    sp.add_argument("targets", nargs="+", metavar="TARGET")
    sp.set_defaults(func=cmd_alias_add)
    sp = alias.add_parser("del", help="delete an alias")
    sp.add_argument("source")
    sp.set_defaults(func=cmd_alias_del)
    alias.add_parser("list", help="list aliases").set_defaults(func=cmd_alias_list)

    cli_queue.add_parser(sub, _with_config)
    cli_quarantine.add_parser(sub, _with_config)
    cli_ban.add_parser(sub, _with_config)
    cli_access.add_parser(sub, _with_config)
    sendtest.add_parser(sub, _with_config)
    cli_dns.add_parsers(sub, _with_config)
    onboard_commands.add_parsers(sub, _with_config)
    cli_observe.add_parsers(sub, _with_config)
    cli_admin.add_parsers(sub, _with_config)
    cli_nodes.add_parser(sub, _with_config)
    cli_storage.add_parser(sub, _with_config)
    return p


def _with_config(handler: Callable[[_config.Config, argparse.Namespace], int]
                 ) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return handler(_load(args), args)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if (args.command == "init" and args.domain is None
                and not onboard_interactive.wanted(args)):
            parser.error("init: --domain is required with --non-interactive or without a "
                         "terminal")
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    code = EXIT_FAIL
    try:
        code = func(args)
        return code
    except _config.ConfigError as exc:
        _err(f"config error: {exc}")
    except (CliError, DirectoryError, cli_queue.QueueCommandError,
            cli_quarantine.QuarantineCommandError, QuarantineError, sendtest.SendTestError,
            cli_observe.ObserveCommandError,
            onboard_interactive.InitCancelled, AdminError, MonitorError,
            StorageError) as exc:
        _err(str(exc))
    except sqlite3.Error as exc:
        _err(f"database error: {exc}")
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        _err(f"error:{where}: {exc.strerror or exc}")
    except tomllib.TOMLDecodeError as exc:
        _err(f"error: {exc}")
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("POSTWARDEN_DEBUG") == "1":
            raise
        _err(f"internal error: {type(exc).__name__}: {exc} (set POSTWARDEN_DEBUG=1 "
             "for a traceback)")
    finally:
        _audit(args, code)
    return EXIT_FAIL


def _audit(args: argparse.Namespace, code: int) -> None:
    """The audit log entry of a command that changes something."""
    if audit.action_of(args) is None:
        return
    try:
        cfg = _load(args, check_files=False)
    except Exception:  # the command itself reported the problem
        return
    audit.record_cli(cfg, args, code)
