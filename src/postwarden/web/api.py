"""The JSON API under ``/api/v1``, described by ``/api/v1/openapi.json``.

Authenticated by API keys (``Authorization: Bearer pwk_...``, created with
``postwarden api-key add`` or on the web admin's API keys page), scoped:

* ``read``: every ``GET``;
* ``admin``: every ``GET`` and every change (queue actions, accounts,
  domains, aliases, quarantine, bans, keys, webhooks) and the settings;
* ``send``: ``POST /api/v1/messages`` only, as the key's account.

The operations call the same store methods as the pages and the command
line, and every change is in the audit log (source ``api``, actor
``key:KEY_ID``).

Security exposure: reachable by whoever reaches the ``[admin]`` listener.
Requests without a valid key get 401 before anything is read; request
bodies are read up to :data:`MAX_BODY` bytes; errors are one JSON line
that names the problem, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import time
import tomllib
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from postwarden import cli_quarantine
from postwarden.auth import password_policy, passwords
from postwarden.cli_queue import message_dict
from postwarden.observe import health
from postwarden.observe import trace as trace_mod
from postwarden.storage import sqlite_queue_browse as browse
from postwarden.storage.factory import ban_admin, reading, signing_keys
from postwarden.storage.sqlite_directory import DirectoryError
from postwarden.storage.sqlite_protect import ProtectError
from postwarden.storage.sqlite_quarantine import SqliteQuarantine
from postwarden.web import openapi
from postwarden.web.store import AdminError, ApiKey, SqliteAdminStore

MAX_BODY = 1024 * 1024
QUEUE_ACTIONS = ("hold", "release", "flush", "delete")

Operation = Callable[[Request, ApiKey], Awaitable[Response]]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


async def read_json(request: Request, limit: int = MAX_BODY) -> dict[str, Any]:
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"request body larger than {limit} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def text_field(data: dict[str, Any], key: str, *, required: bool = True,
               limit: int = 1000) -> str:
    value = data.get(key, "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise ApiError(422, f"{key}: {'required ' if required else ''}string expected")
    if len(value) > limit:
        raise ApiError(422, f"{key}: at most {limit} characters")
    return value


class ApiV1:
    def __init__(self, server: Any, store: SqliteAdminStore) -> None:
        self.server = server
        self.cfg = server.config
        self.store = store

    def op(self, handler: Operation, scope: str) -> Callable[[Request], Awaitable[Response]]:
        """``scope``: "read" (read or admin keys), "admin", or "send"."""

        async def endpoint(request: Request) -> Response:
            auth = request.headers.get("authorization", "")
            kind, _, token = auth.partition(" ")
            key = (await asyncio.to_thread(self.store.check_key, token.strip())
                   if kind.lower() == "bearer" and token else None)
            if key is None:
                return error(401, "a valid API key is required (Authorization: Bearer KEY)",
                             **{"WWW-Authenticate": 'Bearer realm="postwarden"'})
            allowed = {"read": ("read", "admin"), "admin": ("admin",), "send": ("send",)}[scope]
            if key.scope not in allowed:
                return error(403, f"this key's scope ({key.scope}) does not allow this")
            try:
                return await handler(request, key)
            except ApiError as exc:
                return error(exc.status, str(exc))
            except (DirectoryError, AdminError, password_policy.PasswordRejected) as exc:
                return error(422, str(exc))

        return endpoint

    async def audit(self, key: ApiKey, action: str, target: str,
                    detail: dict[str, object] | None = None) -> None:
        monitor = self.server.monitor
        if monitor is not None:
            await asyncio.to_thread(monitor.audit, f"key:{key.key_id}", "api", action, target,
                                    detail or {}, "ok")

    # --- status and queue ----------------------------------------------

    async def status(self, request: Request, key: ApiKey) -> Response:
        def figures() -> dict[str, Any]:
            monitor = self.server.monitor
            with reading(self.cfg, monitor) as db:  # the shared queue on PostgreSQL
                q = health.queue_state(db, time.time())
            alerts = list(monitor.firing().values()) if monitor is not None else []
            return {"queue": q, "alerts": [{"key": a.key, "rule": a.rule,
                                            "severity": a.severity, "summary": a.summary,
                                            "since": a.since} for a in alerts]}

        return JSONResponse(await asyncio.to_thread(figures))

    async def queue(self, request: Request, key: ApiKey) -> Response:
        qp = request.query_params
        state, sort = qp.get("state", ""), qp.get("sort", "oldest")
        if state not in browse.STATES:
            raise ApiError(422, f"state: one of {', '.join(s for s in browse.STATES if s)}")
        if sort not in browse.SORTS:
            raise ApiError(422, f"sort: one of {', '.join(browse.SORTS)}")
        try:
            offset = int(qp.get("offset", "0"))
            limit = int(qp.get("limit", "50"))
        except ValueError:
            raise ApiError(422, "offset and limit: whole numbers") from None
        if not (0 <= offset <= 10**9 and 1 <= limit <= browse.PAGE_MAX):
            raise ApiError(422, f"offset >= 0, 1 <= limit <= {browse.PAGE_MAX}")
        page = await browse.browse(self.server.store, state=state, text=qp.get("q", "")[:200],
                                   sort=sort, offset=offset, limit=limit)
        now = time.time()
        return JSONResponse({"total": page.total, "offset": offset,
                             "messages": [message_dict(m, now) for m in page.messages]})

    async def message(self, request: Request, key: ApiKey) -> Response:
        queue_id = request.path_params["queue_id"]
        store = self.server.store
        msg = await store.get(queue_id)
        history = await store.history(queue_id)
        if msg is None and not history:
            raise ApiError(404, f"no message {queue_id}")
        return JSONResponse({
            "queue_id": queue_id,
            "message": message_dict(msg, time.time()) if msg is not None else None,
            "history": [{"ts": e.ts, "event": e.event, "rcpt": e.rcpt, "relay": e.relay,
                         "dsn": e.dsn, "reply": e.reply} for e in history]})

    async def queue_action(self, request: Request, key: ApiKey) -> Response:
        queue_id = request.path_params["queue_id"]
        action = request.path_params["action"]
        if action not in QUEUE_ACTIONS:
            raise ApiError(404, f"no action {action}: one of {', '.join(QUEUE_ACTIONS)}")
        store = self.server.store
        if action == "flush":
            done = await store.flush(queue_id) > 0
        elif action == "delete":
            done = await store.delete(queue_id)
        else:
            done = await store.set_held(queue_id, action == "hold")
        if not done:
            raise ApiError(404, f"no message {queue_id}" + (
                " with a deferred recipient" if action == "flush" else ""))
        if action in ("release", "flush"):
            self.server.wake()
        await self.audit(key, f"queue {action}", queue_id)
        return JSONResponse({"queue_id": queue_id, "action": action, "done": True})

    # --- accounts, domains, aliases ------------------------------------

    async def accounts(self, request: Request, key: ApiKey) -> Response:
        d = self.server.directory
        users = await asyncio.to_thread(d.list_users)
        return JSONResponse({"accounts": [{"address": a.address, "enabled": a.enabled}
                                          for a in users]})

    async def account_add(self, request: Request, key: ApiKey) -> Response:
        data = await read_json(request)
        address = text_field(data, "address", limit=254)
        password, generated = password_policy.given_or_generated(
            text_field(data, "password", required=False, limit=1024), self.cfg.passwords)
        hashed = await asyncio.to_thread(passwords.hash_password, password)
        d = self.server.directory
        address = await asyncio.to_thread(d.add_user, address, hashed)
        await self.audit(key, "user add", address)
        body: dict[str, Any] = {"address": address}
        if generated:
            body["password"] = password
        return JSONResponse(body, status_code=201)

    async def account_del(self, request: Request, key: ApiKey) -> Response:
        d = self.server.directory
        address = await asyncio.to_thread(d.del_user, request.path_params["address"])
        await self.audit(key, "user del", address)
        return JSONResponse({"address": address, "deleted": True})

    async def domains(self, request: Request, key: ApiKey) -> Response:
        d = self.server.directory
        names = await asyncio.to_thread(d.list_domains)
        return JSONResponse({"domains": [
            {"domain": n, "origin": "config" if n in d.config_domains else "database"}
            for n in names]})

    async def domain_add(self, request: Request, key: ApiKey) -> Response:
        data = await read_json(request)
        d = self.server.directory
        name = await asyncio.to_thread(d.add_domain, text_field(data, "domain", limit=253))
        await self.audit(key, "domain add", name)
        return JSONResponse({"domain": name}, status_code=201)

    async def domain_del(self, request: Request, key: ApiKey) -> Response:
        d = self.server.directory
        name = await asyncio.to_thread(d.del_domain, request.path_params["domain"])
        await self.audit(key, "domain del", name)
        return JSONResponse({"domain": name, "deleted": True})

    async def aliases(self, request: Request, key: ApiKey) -> Response:
        d = self.server.directory
        items = await asyncio.to_thread(d.list_aliases)
        return JSONResponse({"aliases": [{"source": a.source, "targets": list(a.targets)}
                                         for a in items]})

    async def alias_add(self, request: Request, key: ApiKey) -> Response:
        data = await read_json(request)
        source = text_field(data, "source", limit=254)
        targets = data.get("targets")
        if (not isinstance(targets, list) or not targets or len(targets) > 1000
                or not all(isinstance(t, str) and t for t in targets)):
            raise ApiError(422, "targets: a non-empty list of addresses")
        d = self.server.directory
        alias = await asyncio.to_thread(d.add_alias, source, targets)
        await self.audit(key, "alias add", alias.source)
        return JSONResponse({"source": alias.source, "targets": list(alias.targets)},
                            status_code=201)

    async def alias_del(self, request: Request, key: ApiKey) -> Response:
        d = self.server.directory
        source = await asyncio.to_thread(d.del_alias, request.path_params["source"])
        await self.audit(key, "alias del", source)
        return JSONResponse({"source": source, "deleted": True})

    # --- keys ------------------------------------------------------------

    async def keys(self, request: Request, key: ApiKey) -> Response:
        items = await asyncio.to_thread(self.store.list_keys)
        return JSONResponse({"keys": [key_dict(k) for k in items]})

    async def key_add(self, request: Request, key: ApiKey) -> Response:
        data = await read_json(request)
        scope = text_field(data, "scope", limit=10)
        account = text_field(data, "account", required=False, limit=254).strip().lower()
        label = text_field(data, "label", required=False, limit=100)
        if account and await self.server.directory.get_account(account) is None:
            raise ApiError(422, f"account: no account {account}")
        whole, new = await asyncio.to_thread(self.store.add_key, scope, label=label,
                                             account=account, created_by=f"key:{key.key_id}")
        await self.audit(key, "api-key add", new.key_id, {"scope": scope})
        return JSONResponse({**key_dict(new), "key": whole}, status_code=201)

    async def key_del(self, request: Request, key: ApiKey) -> Response:
        key_id = await asyncio.to_thread(self.store.revoke_key, request.path_params["key_id"])
        await self.audit(key, "api-key revoke", key_id)
        return JSONResponse({"key_id": key_id, "deleted": True})

    # --- trace, quarantine, bans, settings -----------------------------------

    async def trace(self, request: Request, key: ApiKey) -> Response:
        qp = request.query_params
        try:
            hours = float(qp.get("hours", "24"))
            limit = int(qp.get("limit", "50"))
        except ValueError:
            raise ApiError(422, "hours: a number; limit: a whole number") from None
        if not (0 < hours <= 24 * 366 and 1 <= limit <= 500):
            raise ApiError(422, "0 < hours <= 8784, 1 <= limit <= 500")
        q = trace_mod.Query(queue_id=qp.get("id", "")[:100],
                            message_id=qp.get("message_id", "")[:300],
                            sender=qp.get("from", "")[:300], rcpt=qp.get("to", "")[:300],
                            since=time.time() - hours * 3600, limit=limit)
        try:
            traces = await asyncio.to_thread(trace_mod.search, self.cfg, q,
                                             self.server.monitor)
        except FileNotFoundError:
            traces = []
        return JSONResponse({"messages": [t.summary() for t in traces]})

    async def quarantine(self, request: Request, key: ApiKey) -> Response:
        def read() -> list[dict[str, Any]]:
            with SqliteQuarantine(self.cfg.db_path) as q:
                return [cli_quarantine.held_dict(h) for h in q.list(limit=500)]

        return JSONResponse({"held": await asyncio.to_thread(read)})

    async def quarantine_action(self, request: Request, key: ApiKey) -> Response:
        held_id, action = request.path_params["held_id"], request.path_params["action"]
        if action not in ("release", "delete"):
            raise ApiError(404, f"no action {action}: release or delete")
        with SqliteQuarantine(self.cfg.db_path) as q:
            try:
                if action == "release":
                    queue_id = await cli_quarantine.release(self.cfg, q, self.server.store,
                                                            held_id)
                    self.server.wake()
                elif await asyncio.to_thread(q.delete, held_id):
                    queue_id = ""
                else:
                    raise ApiError(404, f"no message {held_id} in the quarantine")
            except cli_quarantine.QuarantineCommandError as exc:
                raise ApiError(404, str(exc)) from None
        await self.audit(key, f"quarantine {action}", held_id)
        return JSONResponse({"id": held_id, "action": action, "queue_id": queue_id or None})

    def _bans(self) -> Any:
        """The bans to change: the shared table on PostgreSQL, else the
        server's store (not closed: it is the server's)."""
        return ban_admin(self.cfg, self.server.protect)

    async def bans(self, request: Request, key: ApiKey) -> Response:
        items = await asyncio.to_thread(self._bans().list_bans)
        return JSONResponse({"bans": [{"network": b.network, "reason": b.reason,
                                       "level": b.level, "until": b.until,
                                       "created": b.created} for b in items]})

    async def ban_add(self, request: Request, key: ApiKey) -> Response:
        data = await read_json(request)
        address = text_field(data, "address", limit=100)
        reason = text_field(data, "reason", required=False, limit=200) or "banned by the API"
        hours = data.get("hours")
        if hours is not None and (isinstance(hours, bool) or not isinstance(hours, int | float)
                                  or not 0 < hours < 10 * 366 * 24):
            raise ApiError(422, "hours: a positive number (absent: permanent)")
        try:
            ban = await asyncio.to_thread(self._bans().add_ban, address, reason,
                                          None if hours is None else float(hours) * 3600)
        except ProtectError as exc:
            raise ApiError(422, str(exc)) from None
        await self.audit(key, "ban add", address)
        return JSONResponse({"network": ban.network, "until": ban.until}, status_code=201)

    async def ban_del(self, request: Request, key: ApiKey) -> Response:
        address = request.path_params["address"]
        try:
            found = await asyncio.to_thread(self._bans().del_ban, address)
        except ProtectError as exc:
            raise ApiError(422, str(exc)) from None
        if not found:
            raise ApiError(404, f"no ban for {address}")
        await self.audit(key, "ban del", address)
        return JSONResponse({"network": address, "deleted": True})

    async def dns(self, request: Request, key: ApiKey) -> Response:
        """The records a local domain needs and, with ``?check=1``, what the
        configured resolver finds for each (as the DNS page and ``dns
        check``)."""
        from postwarden import cli_dns

        domain = request.path_params["domain"].strip().lower().rstrip(".")
        if domain not in await asyncio.to_thread(self.server.directory.list_domains):
            raise ApiError(404, f"{domain}: not a local domain")
        store = signing_keys(self.cfg)  # on PostgreSQL: the shared keys
        expected = await asyncio.to_thread(cli_dns.expected_records, self.cfg, domain, store)
        records = [{"kind": r.kind, "name": r.name, "type": r.rtype, "value": r.value,
                    "required": r.required} for r in expected]
        body: dict[str, Any] = {"domain": domain, "records": records}
        if request.query_params.get("check") in ("1", "true", "yes"):
            try:
                results = await cli_dns.check_domain(self.cfg, domain, store,
                                                     cli_dns._Lookup(self.cfg))
            except cli_dns.DnsCommandError as exc:
                raise ApiError(503, str(exc)) from None
            body["check"] = [{"kind": c.kind, "name": c.name, "status": c.status,
                              "required": c.required, "expected": c.expected,
                              "found": c.found, "detail": c.detail} for c in results]
        return JSONResponse(body)

    async def settings(self, request: Request, key: ApiKey) -> Response:
        from postwarden.web.operations import masked

        def read() -> Any:
            with open(self.cfg.path, "rb") as f:
                return masked(tomllib.load(f))

        return JSONResponse({"path": str(self.cfg.path), "config": await asyncio.to_thread(read)})

    # --- webhooks ------------------------------------------------------------

    async def webhooks(self, request: Request, key: ApiKey) -> Response:
        hooks = await asyncio.to_thread(self.store.webhooks)
        return JSONResponse({"webhooks": [{"account": a, "url": u} for a, u in hooks.items()]})

    async def webhook_set(self, request: Request, key: ApiKey) -> Response:
        from postwarden.web.webhooks import check_url, new_secret

        data = await read_json(request)
        account = text_field(data, "account", limit=254).strip().lower()
        url = check_url(text_field(data, "url", limit=2000))
        if await self.server.directory.get_account(account) is None:
            raise ApiError(422, f"account: no account {account}")
        secret = new_secret()
        await asyncio.to_thread(self.store.set_webhook, account, url, secret)
        await self.audit(key, "webhook set", account, {"url": url})
        return JSONResponse({"account": account, "url": url, "secret": secret},
                            status_code=201)

    async def webhook_del(self, request: Request, key: ApiKey) -> Response:
        account = await asyncio.to_thread(self.store.del_webhook,
                                          request.path_params["account"])
        await self.audit(key, "webhook del", account)
        return JSONResponse({"account": account, "deleted": True})

    async def openapi_doc(self, request: Request) -> Response:
        return JSONResponse(openapi.document())

    # --- routes ----------------------------------------------------------

    def routes(self, extra: list[BaseRoute] | None = None) -> list[BaseRoute]:
        o = self.op
        v1 = "/api/v1"
        return [
            Route(f"{v1}/openapi.json", self.openapi_doc),
            Route(f"{v1}/status", o(self.status, "read")),
            Route(f"{v1}/queue", o(self.queue, "read")),
            Route(f"{v1}/queue/{{queue_id:str}}", o(self.message, "read")),
            Route(f"{v1}/queue/{{queue_id:str}}/{{action:str}}", o(self.queue_action, "admin"),
                  methods=["POST"]),
            Route(f"{v1}/accounts", o(self.accounts, "read"), methods=["GET"]),
            Route(f"{v1}/accounts", o(self.account_add, "admin"), methods=["POST"]),
            Route(f"{v1}/accounts/{{address:str}}", o(self.account_del, "admin"),
                  methods=["DELETE"]),
            Route(f"{v1}/domains", o(self.domains, "read"), methods=["GET"]),
            Route(f"{v1}/domains", o(self.domain_add, "admin"), methods=["POST"]),
            Route(f"{v1}/domains/{{domain:str}}", o(self.domain_del, "admin"),
                  methods=["DELETE"]),
            Route(f"{v1}/aliases", o(self.aliases, "read"), methods=["GET"]),
            Route(f"{v1}/aliases", o(self.alias_add, "admin"), methods=["POST"]),
            Route(f"{v1}/aliases/{{source:str}}", o(self.alias_del, "admin"),
                  methods=["DELETE"]),
            Route(f"{v1}/keys", o(self.keys, "admin"), methods=["GET"]),
            Route(f"{v1}/keys", o(self.key_add, "admin"), methods=["POST"]),
            Route(f"{v1}/keys/{{key_id:str}}", o(self.key_del, "admin"), methods=["DELETE"]),
            Route(f"{v1}/trace", o(self.trace, "read")),
            Route(f"{v1}/quarantine", o(self.quarantine, "read")),
            Route(f"{v1}/quarantine/{{held_id:str}}/{{action:str}}",
                  o(self.quarantine_action, "admin"), methods=["POST"]),
            Route(f"{v1}/bans", o(self.bans, "read"), methods=["GET"]),
            Route(f"{v1}/bans", o(self.ban_add, "admin"), methods=["POST"]),
            Route(f"{v1}/bans/{{address:path}}", o(self.ban_del, "admin"), methods=["DELETE"]),
            Route(f"{v1}/settings", o(self.settings, "admin")),
            Route(f"{v1}/dns/{{domain:str}}", o(self.dns, "read")),
            Route(f"{v1}/webhooks", o(self.webhooks, "read"), methods=["GET"]),
            Route(f"{v1}/webhooks", o(self.webhook_set, "admin"), methods=["POST"]),
            Route(f"{v1}/webhooks/{{account:str}}", o(self.webhook_del, "admin"),
                  methods=["DELETE"]),
            *(extra or []),
        ]


def key_dict(k: ApiKey) -> dict[str, Any]:
    return {"key_id": k.key_id, "scope": k.scope, "account": k.account, "label": k.label,
            "created": k.created, "created_by": k.created_by, "last_used": k.last_used}
