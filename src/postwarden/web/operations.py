"""The web admin's operations pages: quarantine, access lists and bans, DNS
records with their live check, and the settings overview.

* ``GET /quarantine``, ``POST /quarantine/{release,delete}``;
* ``GET /access``, ``POST /access/{add,del}``, ``POST /bans/{add,del}``;
* ``GET /dns`` (``?check=DOMAIN`` looks the records up);
* ``GET /settings``: the config file as loaded, secrets masked.

Each calls what the matching command does (:mod:`postwarden.cli_quarantine`,
:mod:`postwarden.cli_access`, :mod:`postwarden.cli_ban`,
:mod:`postwarden.cli_dns`).

Security exposure: as :mod:`postwarden.web.app`; the settings page never
shows a value whose key names a secret, password, token or key.
"""

from __future__ import annotations

import asyncio
import time
import tomllib
from typing import TYPE_CHECKING, Any

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from postwarden import cli_dns, cli_quarantine
from postwarden import config as _config
from postwarden.cli_access import KINDS as ACCESS_KINDS
from postwarden.storage import factory
from postwarden.storage.sqlite_protect import ProtectError
from postwarden.web.store import Session

if TYPE_CHECKING:
    from postwarden.web.app import WebAdmin

SECRET_WORDS = ("secret", "password", "token", "passphrase", "api_key", "private")
MASK = "••••••••"


def masked(value: Any, key: str = "") -> Any:
    """``value`` with every secret replaced by :data:`MASK`."""
    if isinstance(value, dict):
        return {k: masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, key) for v in value]
    if any(w in key.lower() for w in SECRET_WORDS) and value not in ("", None):
        return MASK
    return value


def flatten(table: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for k, v in table.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out += flatten(v, name)
        else:
            out.append((name, repr(v) if not isinstance(v, str) else f'"{v}"'))
    return out


class OperationsPages:
    def __init__(self, web: WebAdmin) -> None:
        self.web = web
        self.server = web.server
        self.cfg = web.cfg

    # --- quarantine ------------------------------------------------------

    async def quarantine(self, request: Request, session: Session) -> Response:
        def read() -> list[Any]:
            with factory.open_quarantine(self.cfg) as q:
                q.expire(self.cfg.filters.quarantine_retention)
                return q.list(limit=500)

        return self.web.render(request, "quarantine.html", session,
                               held=await asyncio.to_thread(read))

    async def quarantine_action(self, request: Request, session: Session) -> Response:
        form: FormData = request.state.form
        held_id = str(form.get("id", ""))
        release = request.url.path.endswith("/release")
        with factory.open_quarantine(self.cfg) as q:
            try:
                if release:
                    queue_id = await cli_quarantine.release(self.cfg, q, self.server.store,
                                                            held_id)
                    self.server.wake()
                    done = f"Released {held_id} as {queue_id}."
                elif await asyncio.to_thread(q.delete, held_id):
                    done = f"Deleted {held_id}."
                else:
                    raise cli_quarantine.QuarantineCommandError(
                        f"no message {held_id} in the quarantine")
            except cli_quarantine.QuarantineCommandError as exc:
                self.web.flash(session, "error", str(exc))
                return self.web.back(request, "/quarantine")
        await self.web.audit(session, "quarantine release" if release else "quarantine delete",
                             held_id)
        self.web.flash(session, "ok", done)
        return self.web.back(request, "/quarantine")

    # --- access lists and bans ---------------------------------------------

    async def access(self, request: Request, session: Session) -> Response:
        def read() -> tuple[list[dict[str, str]], list[Any]]:
            rows = [{"listener": r["listener"], "kind": r["kind"], "value": r["value"],
                     "source": r["source"]} for r in _config_rows(self.cfg)]
            with factory.open_access(self.cfg) as store:
                rows += [{"listener": e.listener, "kind": e.kind.replace("_", "-"),
                          "value": e.value, "source": "database"} for e in store.entries()]
            return rows, factory.ban_admin(self.cfg, self.server.protect).list_bans()

        rows, bans = await asyncio.to_thread(read)
        return self.web.render(request, "access.html", session, rows=rows, bans=bans,
                               kinds=list(ACCESS_KINDS), now=time.time(),
                               listeners=[lst.name for lst in self.cfg.listeners])

    async def access_change(self, request: Request, session: Session) -> Response:
        form: FormData = request.state.form
        kind_shown = str(form.get("kind", ""))
        raw = str(form.get("value", "")).strip()
        listener = str(form.get("listener", ""))
        add = request.url.path.endswith("/add")
        try:
            kind = ACCESS_KINDS.get(kind_shown)
            if kind is None:
                raise _config.ConfigError("kind", f"one of {', '.join(ACCESS_KINDS)}")
            if listener and self.cfg.listener(listener) is None:
                raise _config.ConfigError("listener", f"no listener named {listener!r}")
            value = (_config.check_cidr(kind_shown, raw) if kind in ("allow", "deny")
                     else _config.check_pattern(kind_shown, raw))
        except _config.ConfigError as exc:
            self.web.flash(session, "error", str(exc))
            return self.web.back(request, "/access")

        def change() -> bool:
            with factory.open_access(self.cfg) as store:
                return store.add(kind, value, listener) if add else \
                    store.delete(kind, value, listener)

        changed = await asyncio.to_thread(change)
        await self.web.audit(session, f"access {'add' if add else 'del'}", value,
                             {"kind": kind_shown, "listener": listener})
        self.web.flash(session, "ok" if changed else "error",
                       f"{'Added' if add else 'Deleted'}: {kind_shown} {value}" if changed
                       else f"No change: {kind_shown} {value}")
        return self.web.back(request, "/access")

    async def ban_change(self, request: Request, session: Session) -> Response:
        form: FormData = request.state.form
        address = str(form.get("address", "")).strip()
        add = request.url.path.endswith("/add")
        protect = factory.ban_admin(self.cfg, self.server.protect)  # not closed
        try:
            if add:
                hours_text = str(form.get("hours", "")).strip()
                seconds = float(hours_text) * 3600 if hours_text else None
                if seconds is not None and not 0 < seconds < 10 * 365 * 86400:
                    raise ProtectError("hours: a positive number (empty: permanent)")
                reason = str(form.get("reason", "")).strip()[:200] or "banned in the web admin"
                ban = await asyncio.to_thread(protect.add_ban, address, reason, seconds)
                done = f"Banned {ban.shown}."
            else:
                if not await asyncio.to_thread(protect.del_ban, address):
                    raise ProtectError(f"no ban for {address}")
                done = f"Unbanned {address}."
        except (ProtectError, ValueError) as exc:
            self.web.flash(session, "error", str(exc))
            return self.web.back(request, "/access")
        await self.web.audit(session, f"ban {'add' if add else 'del'}", address)
        self.web.flash(session, "ok", done)
        return self.web.back(request, "/access")

    # --- DNS -------------------------------------------------------------

    async def dns(self, request: Request, session: Session) -> Response:
        domains = await asyncio.to_thread(self.server.directory.list_domains)
        # The keys this node signs with: on PostgreSQL its copy of the
        # shared keys, current within a second (storage.pg_dkim).
        store = factory.signing_keys(self.cfg)
        records = await asyncio.to_thread(  # (PostgreSQL: the directory read in a thread)
            lambda: {d: cli_dns.expected_records(self.cfg, d, store) for d in domains})
        hosts = cli_dns.host_records(self.cfg)
        checked = request.query_params.get("check", "")
        results = None
        if checked in domains:
            results = await cli_dns.check_domain(self.cfg, checked, store,
                                                 cli_dns._Lookup(self.cfg))
        return self.web.render(request, "dns.html", session, records=records, hosts=hosts,
                               checked=checked, results=results)

    # --- settings --------------------------------------------------------

    async def settings(self, request: Request, session: Session) -> Response:
        def read() -> list[tuple[str, str]]:
            with open(self.cfg.path, "rb") as f:
                return flatten(masked(tomllib.load(f)))

        try:
            rows = await asyncio.to_thread(read)
            problem = ""
        except (OSError, tomllib.TOMLDecodeError) as exc:
            rows, problem = [], str(exc)
        return self.web.render(request, "settings.html", session, rows=rows,
                               config_path=str(self.cfg.path), problem=problem)

    def routes(self) -> list[BaseRoute]:
        p = self.web.page
        post = ["POST"]
        return [
            Route("/quarantine", p(self.quarantine)),
            Route("/quarantine/release", p(self.quarantine_action, change=True), methods=post),
            Route("/quarantine/delete", p(self.quarantine_action, change=True), methods=post),
            Route("/access", p(self.access)),
            Route("/access/add", p(self.access_change, change=True), methods=post),
            Route("/access/del", p(self.access_change, change=True), methods=post),
            Route("/bans/add", p(self.ban_change, change=True), methods=post),
            Route("/bans/del", p(self.ban_change, change=True), methods=post),
            Route("/dns", p(self.dns)),
            Route("/settings", p(self.settings)),
        ]


def _config_rows(cfg: _config.Config) -> list[dict[str, str]]:
    from postwarden.cli_access import _config_rows as rows

    return [{**r, "source": "config file"} for r in rows(cfg, None)]
