"""Admin accounts (of the web admin, not mail accounts) in the web admin
and the JSON API: what ``postwarden admin add|passwd|del|list`` does.

Pages (role ``admin`` changes, ``read-only`` only looks):

* ``GET /admins``: the admin accounts, their role and creation;
* ``POST /admins/add`` (name, role, password or empty: one is generated
  and shown once), ``/admins/role``, ``/admins/passwd`` (ends the
  account's sessions), ``/admins/del``.

API (``admin`` scope): ``GET/POST /api/v1/admins``,
``POST /api/v1/admins/{name}/role``, ``POST /api/v1/admins/{name}/password``,
``DELETE /api/v1/admins/{name}``.

Every change is in the audit log.  Neither way may delete or make
read-only the last account of role ``admin`` (the command line can always
repair); an admin cannot delete itself from the pages, nor give itself a
generated password there (its session ends with the change: it would
never see it).

Security exposure: creates the accounts that steer the server.  Passwords
are argon2id-hashed and checked against ``[passwords]``; a generated one is
shown once and never stored or logged; the pages' forms carry the CSRF
token and need the ``admin`` role (:meth:`postwarden.web.app.WebAdmin.page`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from postwarden.auth import password_policy, passwords
from postwarden.web.api import ApiV1, read_json, text_field
from postwarden.web.store import ROLES, AdminError, AdminUser, ApiKey, Session

if TYPE_CHECKING:
    from postwarden.web.app import WebAdmin


def admin_dict(a: AdminUser) -> dict[str, Any]:
    return {"name": a.name, "role": a.role, "created": a.created}


class AdminsPages:
    def __init__(self, web: WebAdmin) -> None:
        self.web = web
        self.store = web.store

    async def admins(self, request: Request, session: Session) -> Response:
        items = await asyncio.to_thread(self.store.list_admins)
        return self.web.render(request, "admins.html", session, admins=items, roles=ROLES)

    async def _change(self, request: Request, session: Session, action: str, name: str,
                      call: Any, done: str, secret: str = "") -> Response:
        try:
            await asyncio.to_thread(call)
        except AdminError as exc:
            self.web.flash(session, "error", str(exc))
            await self.web.audit(session, action, name, result=f"failed: {exc}")
            return self.web.back(request, "/admins")
        await self.web.audit(session, action, name)
        self.web.flash(session, "ok", done)
        if secret:
            self.web.flash(session, "secret", secret)
        return self.web.back(request, "/admins")

    async def _password(self, session: Session, form: FormData
                        ) -> tuple[str, str, bool] | None:
        """(password, its hash, whether it was generated), or None with the
        policy's refusal flashed."""
        try:
            password, generated = self.web.password_of(form)
        except password_policy.PasswordRejected as exc:
            self.web.flash(session, "error", str(exc))
            return None
        hashed = await asyncio.to_thread(passwords.hash_password, password)
        return password, hashed, generated

    async def add(self, request: Request, session: Session) -> Response:
        form: FormData = request.state.form
        name, role = str(form.get("name", "")).strip(), str(form.get("role", "admin"))
        chosen = await self._password(session, form)
        if chosen is None:
            return self.web.back(request, "/admins")
        password, hashed, generated = chosen
        return await self._change(
            request, session, "admin add", name,
            lambda: self.store.add(name, hashed, role), f"Created admin {name} ({role}).",
            f"Password for admin {name} (shown only this once): {password}"
            if generated else "")

    async def role(self, request: Request, session: Session) -> Response:
        form: FormData = request.state.form
        name, role = str(form.get("name", "")), str(form.get("role", ""))
        return await self._change(
            request, session, "admin role", name,
            lambda: self.store.set_role(name, role, keep_an_admin=True),
            f"Admin {name} is now {role}.")

    async def passwd(self, request: Request, session: Session) -> Response:
        form: FormData = request.state.form
        name = str(form.get("name", ""))
        if name == session.name and not form.get("password"):
            self.web.flash(session, "error", "Give your own new password (a generated one "
                                             "would end this session before you saw it).")
            return self.web.back(request, "/admins")
        chosen = await self._password(session, form)
        if chosen is None:
            return self.web.back(request, "/admins")
        password, hashed, generated = chosen
        return await self._change(
            request, session, "admin passwd", name,
            lambda: self.store.set_password(name, hashed),
            f"Password changed for admin {name} (its sessions are ended).",
            f"New password for admin {name} (shown only this once): {password}"
            if generated else "")

    async def delete(self, request: Request, session: Session) -> Response:
        name = str(request.state.form.get("name", ""))

        def delete() -> None:
            if name == session.name:
                raise AdminError("you cannot delete your own admin account")
            self.store.delete(name, keep_an_admin=True)

        return await self._change(request, session, "admin del", name, delete,
                                  f"Deleted admin {name}.")

    def routes(self) -> list[BaseRoute]:
        p = self.web.page
        post = ["POST"]
        return [
            Route("/admins", p(self.admins)),
            Route("/admins/add", p(self.add, change=True), methods=post),
            Route("/admins/role", p(self.role, change=True), methods=post),
            Route("/admins/passwd", p(self.passwd, change=True), methods=post),
            Route("/admins/del", p(self.delete, change=True), methods=post),
        ]


class AdminsApi:
    """``/api/v1/admins``: the same, for keys of scope ``admin``."""

    def __init__(self, api: ApiV1) -> None:
        self.api = api
        self.store = api.store
        self.cfg = api.cfg

    async def _password(self, data: dict[str, Any]) -> tuple[str, str, bool]:
        """(password, its hash, generated)"""
        password, generated = password_policy.given_or_generated(
            text_field(data, "password", required=False, limit=1024), self.cfg.passwords)
        return password, await asyncio.to_thread(passwords.hash_password, password), generated

    async def admins(self, request: Request, key: ApiKey) -> Response:
        items = await asyncio.to_thread(self.store.list_admins)
        return JSONResponse({"admins": [admin_dict(a) for a in items]})

    async def add(self, request: Request, key: ApiKey) -> Response:
        data = await read_json(request)
        name = text_field(data, "name", limit=64)
        role = text_field(data, "role", required=False, limit=20) or "admin"
        password, hashed, generated = await self._password(data)
        name = await asyncio.to_thread(self.store.add, name, hashed, role)
        await self.api.audit(key, "admin add", name, {"role": role})
        body: dict[str, Any] = {"name": name, "role": role}
        if generated:
            body["password"] = password
        return JSONResponse(body, status_code=201)

    async def role(self, request: Request, key: ApiKey) -> Response:
        data = await read_json(request)
        role = text_field(data, "role", limit=20)
        name = await asyncio.to_thread(self.store.set_role, request.path_params["name"],
                                       role, keep_an_admin=True)
        await self.api.audit(key, "admin role", name, {"role": role})
        return JSONResponse({"name": name, "role": role})

    async def passwd(self, request: Request, key: ApiKey) -> Response:
        data = await read_json(request)
        password, hashed, generated = await self._password(data)
        name = await asyncio.to_thread(self.store.set_password,
                                       request.path_params["name"], hashed)
        await self.api.audit(key, "admin passwd", name)
        body: dict[str, Any] = {"name": name, "sessions_ended": True}
        if generated:
            body["password"] = password
        return JSONResponse(body)

    async def delete(self, request: Request, key: ApiKey) -> Response:
        name = await asyncio.to_thread(self.store.delete, request.path_params["name"],
                                       keep_an_admin=True)
        await self.api.audit(key, "admin del", name)
        return JSONResponse({"name": name, "deleted": True})

    def routes(self) -> list[BaseRoute]:
        o = self.api.op
        v1 = "/api/v1/admins"
        return [
            Route(v1, o(self.admins, "admin"), methods=["GET"]),
            Route(v1, o(self.add, "admin"), methods=["POST"]),
            Route(f"{v1}/{{name:str}}/role", o(self.role, "admin"), methods=["POST"]),
            Route(f"{v1}/{{name:str}}/password", o(self.passwd, "admin"), methods=["POST"]),
            Route(f"{v1}/{{name:str}}", o(self.delete, "admin"), methods=["DELETE"]),
        ]
