"""The audit log of administrative actions: who changed accounts, domains,
aliases, access lists, bans, suspensions, the queue, the quarantine and
the configuration, when, from where, and with what result.

Entries are rows of ``audit_log`` in the shared database
(:class:`~postwarden.storage.sqlite_monitor.SqliteMonitorStore`, or the
table every node shares on PostgreSQL), written by
the command line after every command that changes something
(:func:`record_cli`), by the server for what it decides itself (an
account suspended by the spike detector) and when it starts with a
config file whose content changed (:func:`config_loaded`); the web admin
writes them with ``source = "web"``.  ``postwarden audit`` shows them.

The actor is the login that ran the command (``SUDO_USER`` when run
through sudo).

Security exposure: never records a secret: passwords are read from
standard input, never from the command line, and arguments whose names
mention a password, secret or token are left out.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from postwarden.storage.factory import has_state, monitor_store

if TYPE_CHECKING:
    from postwarden.config import Config
    from postwarden.storage.sqlite_monitor import MonitorTables

# Commands that change something, except their read-only actions.
AUDITED = {"user", "domain", "alias", "queue", "quarantine", "ban", "access", "suspend",
           "migrate", "admin", "api-key"}
READ_ONLY = {"list", "show"}
_HIDDEN = ("password", "secret", "token", "func", "command", "action", "app_action",
           "config", "json")


def actor() -> str:
    sudo = os.environ.get("SUDO_USER")
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = str(os.getuid())
    return f"{sudo} (sudo as {user})" if sudo else user


def action_of(args: argparse.Namespace) -> str | None:
    """``"user add"``, ``"queue delete"``...; None for what is not audited."""
    command = getattr(args, "command", None)
    if command not in AUDITED:
        return None
    parts = [command]
    for name in ("action", "app_action"):
        value = getattr(args, name, None)
        if isinstance(value, str):
            parts.append(value)
    if parts[-1] in READ_ONLY:
        return None
    return " ".join(parts)


def arguments(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    """(target, other arguments) of a command, without secrets."""
    values: dict[str, object] = {}
    for name, value in vars(args).items():
        if any(h in name for h in _HIDDEN) or value is None or value is False:
            continue
        if isinstance(value, str | int | float | bool):
            values[name] = value
        elif isinstance(value, list | tuple):
            values[name] = [str(v) for v in value]
        elif isinstance(value, Path):
            values[name] = str(value)
    target = ""
    for key in ("address", "domain", "source", "queue_id", "id", "value", "network", "name",
                "key_id"):
        if key in values:
            target = str(values.pop(key))
            break
    return target, values


def record_cli(cfg: Config, args: argparse.Namespace, code: int) -> None:
    """After a command: an entry if it is one that changes something.  A
    SQLite database that does not exist yet is not created for it."""
    action = action_of(args)
    if action is None or not has_state(cfg):
        return
    target, detail = arguments(args)
    # The audit must never turn a done change into a failed command.
    with contextlib.suppress(Exception), monitor_store(cfg) as store:
        store.audit(actor(), "cli", action, target, detail,
                    "ok" if code == 0 else f"failed (exit {code})")


def config_loaded(store: MonitorTables, path: Path, node: str = "") -> None:
    """At server start: an entry when the config file's content differs
    from the last one recorded for it (or none was).  ``node``: the node's
    hostname when several nodes share the log (each has its own file; the
    target is then ``node:path``)."""
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return
    target = f"{node}:{path}" if node else str(path)
    last = store.last_audit("config changed", target)
    if last is not None and f'"{digest}"' in last.detail:
        return
    store.audit(actor(), "server", "config changed", target, {"sha256": digest})
