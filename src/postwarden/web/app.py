"""The web admin's pages: login, dashboard, queue, accounts, domains, aliases.

Routes (all under the ``[admin]`` listener, beside ``/metrics``):

* ``GET/POST /login``, ``POST /logout``;
* ``GET /``: the dashboard (queue size by state, alerts);
* ``GET /queue`` (``?state=&q=&sort=&page=``), ``GET /queue/{id}``,
  ``POST /queue/action``: hold, release, flush, delete, per message or in
  bulk;
* ``GET /accounts``, ``POST /accounts/{add,passwd,del,app-add,app-revoke}``;
* ``GET /domains``, ``POST /domains/{add,del}``;
* ``GET /aliases``, ``POST /aliases/{add,del}``;
* ``GET /keys``, ``POST /keys/{add,revoke}``: API keys;
* ``/admins``: admin accounts (:mod:`postwarden.web.admins`);
* ``/api/v1/...``: the JSON API (:mod:`postwarden.web.api`).

The pages call the same store methods as the command line
(:mod:`postwarden.cli`, :mod:`postwarden.cli_queue`), on the running
server's own stores, and write an audit entry (source ``web``, the admin's
name) after every change.

Security exposure: see :mod:`postwarden.web`.  A read-only admin sees the
pages without the forms, and a change it posts anyway is refused (403).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from postwarden import __version__
from postwarden.auth import password_policy, passwords
from postwarden.cli_queue import _headers as read_headers
from postwarden.observe import trace as trace_mod
from postwarden.observe.log import get_logger
from postwarden.storage import sqlite_queue_browse as browse
from postwarden.storage.factory import admin_store
from postwarden.storage.sqlite_directory import DirectoryError
from postwarden.web import dashboard, security
from postwarden.web.store import SCOPES, AdminError, Session, SqliteAdminStore

log = get_logger("web")
PAGE_SIZE = 50
FORM_MAX_FIELDS = 1000
_env = Environment(loader=PackageLoader("postwarden.web", "templates"),
                   autoescape=select_autoescape(default=True, default_for_string=True))


def _when(ts: float | None) -> str:
    return "-" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


_env.filters["when"] = _when
_env.filters["age"] = _age

Handler = Callable[[Request, Session], Awaitable[Response]]


class WebAdmin:
    """The pages, bound to a running :class:`postwarden.app.Server`."""

    def __init__(self, server: Any, store: SqliteAdminStore) -> None:
        self.server = server
        self.cfg = server.config
        self.store = store
        # Messages shown once on the next page of a session (by CSRF token).
        self._flash: dict[str, list[tuple[str, str]]] = {}

    # --- plumbing --------------------------------------------------------

    def render(self, request: Request, template: str, session: Session | None,
               status: int = 200, **ctx: Any) -> HTMLResponse:
        flashes = self._flash.pop(session.csrf, []) if session is not None else []
        html = _env.get_template(template).render(
            session=session, csrf=session.csrf if session else "", flashes=flashes,
            version=__version__, hostname=self.cfg.hostname, path=request.url.path, **ctx)
        return HTMLResponse(html, status_code=status)

    def flash(self, session: Session, kind: str, text: str) -> None:
        if len(self._flash) > 10000:  # abandoned sessions' messages
            self._flash.clear()
        self._flash.setdefault(session.csrf, []).append((kind, text))

    async def session_of(self, request: Request) -> Session | None:
        token = request.cookies.get(security.SESSION_COOKIE, "")
        return await asyncio.to_thread(self.store.session, token) if token else None

    def page(self, handler: Handler, *, change: bool = False
             ) -> Callable[[Request], Awaitable[Response]]:
        """A page needing a session; ``change``: a POST that changes
        something (CSRF token, same origin, the admin role)."""

        async def endpoint(request: Request) -> Response:
            session = await self.session_of(request)
            if session is None:
                if request.method == "GET":
                    where = urlencode({"next": request.url.path})
                    return RedirectResponse(f"/login?{where}", status_code=303)
                return self.render(request, "error.html", None, status=403,
                                   message="Your session has ended: log in again.")
            if request.method == "POST":
                form = await request.form(max_fields=FORM_MAX_FIELDS)
                if not (security.same_origin(request)
                        and security.token_ok(session.csrf, form)):
                    log.warning("web_csrf_refused", admin=session.name, path=request.url.path)
                    return self.render(request, "error.html", session, status=403,
                                       message="This form was not sent from this admin's "
                                               "pages (bad or missing CSRF token).")
                if change and not session.can_change:
                    return self.render(request, "error.html", session, status=403,
                                       message="Your account is read-only.")
                request.state.form = form
            return await handler(request, session)

        return endpoint

    async def audit(self, session: Session, action: str, target: str = "",
                    detail: dict[str, object] | None = None, result: str = "ok") -> None:
        monitor = self.server.monitor
        if monitor is not None:
            await asyncio.to_thread(monitor.audit, session.name, "web", action, target,
                                    detail or {}, result)

    def back(self, request: Request, default: str) -> RedirectResponse:
        form: FormData = request.state.form
        target = security.safe_target(str(form.get("back") or default), default)
        return RedirectResponse(target, status_code=303)

    # --- login -----------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        if await self.session_of(request) is not None:
            return RedirectResponse("/", status_code=303)
        return self._login_page(request)

    def _login_page(self, request: Request, error: str = "", status: int = 200,
                    name: str = "") -> Response:
        token = security.new_token()
        response = self.render(request, "login.html", None, status=status, login_csrf=token,
                               error=error, name=name,
                               next=request.query_params.get("next", "/"))
        security.set_cookie(response, request, security.LOGIN_COOKIE, token,
                            security.LOGIN_COOKIE_AGE)
        return response

    async def login(self, request: Request) -> Response:
        form = await request.form(max_fields=10)
        expected = request.cookies.get(security.LOGIN_COOKIE, "")
        if not (security.same_origin(request) and security.token_ok(expected, form)):
            return self._login_page(request, "The login form expired: try again.", 403)
        name = str(form.get("name", "")).strip()[:64]
        password = str(form.get("password", ""))
        ip = request.client.host if request.client else ""
        keys = [f"name:{name.lower()}", f"ip:{ip}"]
        admin = self.cfg.admin
        if await asyncio.to_thread(self.store.locked, keys, admin.login_failures,
                                   admin.login_window):
            log.warning("web_login_locked", admin=name, client_ip=ip)
            return self._login_page(request, "Too many failed logins: wait and try again "
                                    "later.", 429, name)
        user = await asyncio.to_thread(self.store.get, name)
        ok = await passwords.verify_password_async(user.password_hash if user else None,
                                                   password)
        if not ok or user is None:
            await asyncio.to_thread(self.store.failed, keys, admin.login_window)
            log.warning("web_login_failed", admin=name, client_ip=ip)
            return self._login_page(request, "Wrong name or password.", 401, name)
        await asyncio.to_thread(self.store.succeeded, keys)
        token, session = await asyncio.to_thread(self.store.new_session, user.name,
                                                 admin.session_lifetime)
        log.info("web_login", admin=user.name, client_ip=ip)
        await self.audit(session, "admin login", user.name, {"client_ip": ip})
        response = RedirectResponse(security.safe_target(str(form.get("next") or "/")),
                                    status_code=303)
        security.set_cookie(response, request, security.SESSION_COOKIE, token,
                            int(admin.session_lifetime))
        security.clear_cookie(response, request, security.LOGIN_COOKIE)
        return response

    async def logout(self, request: Request, session: Session) -> Response:
        token = request.cookies.get(security.SESSION_COOKIE, "")
        await asyncio.to_thread(self.store.end_session, token)
        await self.audit(session, "admin logout", session.name)
        response = RedirectResponse("/login", status_code=303)
        security.clear_cookie(response, request, security.SESSION_COOKIE)
        return response

    # --- dashboard -------------------------------------------------------

    async def dashboard(self, request: Request, session: Session) -> Response:
        def read() -> dashboard.Figures:
            monitor = self.server.monitor
            f = dashboard.figures(self.cfg, time.time(), monitor)
            f.alerts = list(monitor.firing().values()) if monitor is not None else []
            f.rejections = dashboard.rejections(self.server.metrics.exposition())
            return f

        return self.render(request, "dashboard.html", session, f=await asyncio.to_thread(read),
                           chart_w=dashboard.CHART_W, chart_h=dashboard.CHART_H)

    # --- trace -----------------------------------------------------------

    async def trace(self, request: Request, session: Session) -> Response:
        """Search the message history as ``postwarden trace`` does."""
        qp = request.query_params
        fields = {k: qp.get(k, "").strip()[:300] for k in ("id", "message_id", "from", "to")}
        try:
            hours = float(qp.get("hours", "24") or 24)
        except ValueError:
            hours = 24.0
        hours = min(max(hours, 0.1), 24 * 366)
        traces: list[trace_mod.Trace] = []
        searched = any(fields.values()) or "hours" in qp
        if searched:
            q = trace_mod.Query(queue_id=fields["id"], message_id=fields["message_id"],
                                sender=fields["from"], rcpt=fields["to"],
                                since=time.time() - hours * 3600, limit=100)
            try:
                traces = await asyncio.to_thread(trace_mod.search, self.cfg, q,
                                                 self.server.monitor)
            except FileNotFoundError:
                traces = []
        return self.render(request, "trace.html", session, fields=fields, hours=hours,
                           traces=traces, searched=searched)

    # --- queue -----------------------------------------------------------

    async def queue(self, request: Request, session: Session) -> Response:
        qp = request.query_params
        state = qp.get("state", "") if qp.get("state", "") in browse.STATES else ""
        sort = qp.get("sort", "oldest") if qp.get("sort") in browse.SORTS else "oldest"
        text = qp.get("q", "")[:200]
        try:
            page = max(1, int(qp.get("page", "1")))
        except ValueError:
            page = 1
        result = await browse.browse(self.server.store, state=state, text=text, sort=sort,
                                     offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE)
        pages = max(1, -(-result.total // PAGE_SIZE))

        def link(**change: Any) -> str:
            params = {"state": state, "q": text, "sort": sort, "page": page, **change}
            return "/queue?" + urlencode({k: v for k, v in params.items() if v not in ("", 1)
                                          or (k == "page" and v != 1)})

        return self.render(request, "queue.html", session, result=result, state=state,
                           sort=sort, text=text, page=page, pages=pages, link=link,
                           states=[s for s in browse.STATES if s], sorts=list(browse.SORTS),
                           now=time.time(), back=str(request.url.path) + (
                               "?" + request.url.query if request.url.query else ""))

    async def message(self, request: Request, session: Session) -> Response:
        queue_id = request.path_params["queue_id"]
        store = self.server.store
        msg = await store.get(queue_id)
        history = await store.history(queue_id)
        if msg is None and not history:
            return self.render(request, "error.html", session, status=404,
                               message=f"No message {queue_id} in the queue or its history.")
        headers = (await read_headers(store, queue_id)).decode("utf-8", "replace") \
            if msg is not None else ""
        return self.render(request, "message.html", session, msg=msg, queue_id=queue_id,
                           history=history, headers=headers, now=time.time())

    async def queue_action(self, request: Request, session: Session) -> Response:
        form: FormData = request.state.form
        action = str(form.get("action", ""))
        ids = [str(i) for i in form.getlist("id") if isinstance(i, str)][:browse.PAGE_MAX]
        store = self.server.store
        if action not in ("hold", "release", "flush", "delete") or not ids:
            self.flash(session, "error", "Choose messages and an action.")
            return self.back(request, "/queue")
        done = 0
        for queue_id in ids:
            if action == "hold":
                done += await store.set_held(queue_id, True)
            elif action == "release":
                done += await store.set_held(queue_id, False)
            elif action == "delete":
                done += await store.delete(queue_id)
            else:
                done += await store.flush(queue_id) > 0
        if action in ("release", "flush"):
            self.server.wake()
        past = {"hold": "held", "release": "released", "flush": "retried now",
                "delete": "deleted"}[action]
        await self.audit(session, f"queue {action}", ids[0] if len(ids) == 1 else
                         f"{len(ids)} messages", {"queue_ids": ids, "done": done})
        self.flash(session, "ok", f"{done} of {len(ids)} message(s) {past}.")
        return self.back(request, "/queue")

    # --- accounts, domains, aliases ------------------------------------

    async def _directory_change(self, request: Request, session: Session, action: str,
                                target: str, call: Callable[[], Any], done: str,
                                back: str) -> Response:
        try:
            await asyncio.to_thread(call)
        except (DirectoryError, password_policy.PasswordRejected) as exc:
            self.flash(session, "error", str(exc))
            await self.audit(session, action, target, result=f"failed: {exc}")
            return self.back(request, back)
        await self.audit(session, action, target)
        self.flash(session, "ok", done)
        return self.back(request, back)

    async def accounts(self, request: Request, session: Session) -> Response:
        d = self.server.directory

        def read() -> list[tuple[Any, list[tuple[int, str, float]]]]:
            return [(a, d.list_app_passwords(a.address)) for a in d.list_users()]

        accounts = await asyncio.to_thread(read)
        return self.render(request, "accounts.html", session, accounts=accounts,
                           domains=await asyncio.to_thread(d.list_domains),
                           webhooks=await asyncio.to_thread(self.store.webhooks))

    async def webhook_set(self, request: Request, session: Session) -> Response:
        from postwarden.web.webhooks import check_url, new_secret

        form: FormData = request.state.form
        address = str(form.get("address", "")).strip().lower()
        try:
            url = check_url(str(form.get("url", "")))
            if await self.server.directory.get_account(address) is None:
                raise AdminError(f"no account {address}")
            secret = new_secret()
            await asyncio.to_thread(self.store.set_webhook, address, url, secret)
        except AdminError as exc:
            self.flash(session, "error", str(exc))
            return self.back(request, "/accounts")
        await self.audit(session, "webhook set", address, {"url": url})
        self.flash(session, "ok", f"Delivery webhook of {address}: {url}")
        self.flash(session, "secret", f"Signing secret (shown only this once): {secret}")
        return self.back(request, "/accounts")

    async def webhook_del(self, request: Request, session: Session) -> Response:
        address = str(request.state.form.get("address", ""))
        try:
            await asyncio.to_thread(self.store.del_webhook, address)
        except AdminError as exc:
            self.flash(session, "error", str(exc))
            return self.back(request, "/accounts")
        await self.audit(session, "webhook del", address)
        self.flash(session, "ok", f"Removed the webhook of {address}.")
        return self.back(request, "/accounts")

    def password_of(self, form: FormData) -> tuple[str, bool]:
        """The password a form gives (checked against the policy), or a
        generated one: (password, generated)."""
        return password_policy.given_or_generated(str(form.get("password", "")),
                                                  self.cfg.passwords)

    async def account_add(self, request: Request, session: Session) -> Response:
        d = self.server.directory
        return await self._with_password(
            request, session, "user add",
            lambda address, hashed: d.add_user(address, hashed),
            "Created account {}.", "Password for {}", lower=True)

    async def account_passwd(self, request: Request, session: Session) -> Response:
        d = self.server.directory
        return await self._with_password(
            request, session, "user passwd",
            lambda address, hashed: d.set_password(address, hashed),
            "Password changed for {}.", "New password for {}")

    async def _with_password(self, request: Request, session: Session, action: str,
                             change: Callable[[str, str], object], done: str, shown: str,
                             lower: bool = False) -> Response:
        """Create an account or set its password: the one given (checked
        against the password policy) or a generated one, shown once."""
        form: FormData = request.state.form
        address = str(form.get("address", "")).strip()
        named = address.lower() if lower else address
        try:
            password, generated = self.password_of(form)
        except password_policy.PasswordRejected as exc:
            self.flash(session, "error", str(exc))
            return self.back(request, "/accounts")
        hashed = await asyncio.to_thread(passwords.hash_password, password)
        response = await self._directory_change(
            request, session, action, address, lambda: change(address, hashed),
            done.format(named), "/accounts")
        if generated and any(k == "ok" for k, _ in self._flash.get(session.csrf, [])):
            self.flash(session, "secret",
                       f"{shown.format(named)} (shown only this once): {password}")
        return response

    async def account_del(self, request: Request, session: Session) -> Response:
        address = str(request.state.form.get("address", ""))
        d = self.server.directory
        return await self._directory_change(request, session, "user del", address,
                                            lambda: d.del_user(address),
                                            f"Deleted account {address}.", "/accounts")

    async def app_add(self, request: Request, session: Session) -> Response:
        form: FormData = request.state.form
        address = str(form.get("address", ""))
        label = str(form.get("label", ""))[:100]
        d = self.server.directory
        password = passwords.generate_password()
        hashed = await asyncio.to_thread(passwords.hash_password, password)
        response = await self._directory_change(
            request, session, "user app-password add", address,
            lambda: d.add_app_password(address, hashed, label),
            f"Created an application password for {address}.", "/accounts")
        if any(k == "ok" for k, _ in self._flash.get(session.csrf, [])):
            self.flash(session, "secret", f"Application password for {address} (shown only "
                                          f"this once): {password}")
        return response

    async def app_revoke(self, request: Request, session: Session) -> Response:
        form: FormData = request.state.form
        address = str(form.get("address", ""))
        try:
            app_id = int(str(form.get("id", "")))
        except ValueError:
            app_id = -1
        d = self.server.directory
        return await self._directory_change(
            request, session, "user app-password revoke", address,
            lambda: d.revoke_app_password(address, app_id),
            f"Revoked application password {app_id} of {address}.", "/accounts")

    async def domains(self, request: Request, session: Session) -> Response:
        d = self.server.directory
        names = await asyncio.to_thread(d.list_domains)
        return self.render(request, "domains.html", session, domains=[
            (n, "config file" if n in d.config_domains else "database") for n in names])

    async def domain_add(self, request: Request, session: Session) -> Response:
        name = str(request.state.form.get("domain", "")).strip()
        d = self.server.directory
        return await self._directory_change(request, session, "domain add", name,
                                            lambda: d.add_domain(name),
                                            f"Added domain {name.lower()}.", "/domains")

    async def domain_del(self, request: Request, session: Session) -> Response:
        name = str(request.state.form.get("domain", ""))
        d = self.server.directory
        return await self._directory_change(request, session, "domain del", name,
                                            lambda: d.del_domain(name),
                                            f"Deleted domain {name}.", "/domains")

    async def aliases(self, request: Request, session: Session) -> Response:
        d = self.server.directory
        return self.render(request, "aliases.html", session,
                           aliases=await asyncio.to_thread(d.list_aliases))

    async def alias_add(self, request: Request, session: Session) -> Response:
        form: FormData = request.state.form
        source = str(form.get("source", "")).strip()
        targets = [t for t in str(form.get("targets", "")).replace(",", " ").split() if t]
        d = self.server.directory

        def add() -> None:
            if not targets:
                raise DirectoryError("give at least one target address")
            d.add_alias(source, targets)

        return await self._directory_change(request, session, "alias add", source, add,
                                            f"Alias {source.lower()} saved.", "/aliases")

    async def alias_del(self, request: Request, session: Session) -> Response:
        source = str(request.state.form.get("source", ""))
        d = self.server.directory
        return await self._directory_change(request, session, "alias del", source,
                                            lambda: d.del_alias(source),
                                            f"Deleted alias {source}.", "/aliases")

    # --- API keys ----------------------------------------------------------

    async def keys(self, request: Request, session: Session) -> Response:
        items = await asyncio.to_thread(self.store.list_keys)
        users = await asyncio.to_thread(self.server.directory.list_users)
        return self.render(request, "keys.html", session, keys=items, scopes=SCOPES,
                           accounts=[u.address for u in users])

    async def key_add(self, request: Request, session: Session) -> Response:
        form: FormData = request.state.form
        scope = str(form.get("scope", ""))
        account = str(form.get("account", "")).strip().lower() if scope == "send" else ""
        label = str(form.get("label", ""))[:100]
        try:
            if account and await self.server.directory.get_account(account) is None:
                raise AdminError(f"no account {account}")
            whole, key = await asyncio.to_thread(self.store.add_key, scope, label=label,
                                                 account=account, created_by=session.name)
        except AdminError as exc:
            self.flash(session, "error", str(exc))
            return self.back(request, "/keys")
        await self.audit(session, "api-key add", key.key_id, {"scope": scope})
        self.flash(session, "ok", f"Created API key {key.key_id} ({scope}).")
        self.flash(session, "secret", f"The key (shown only this once): {whole}")
        return self.back(request, "/keys")

    async def key_revoke(self, request: Request, session: Session) -> Response:
        key_id = str(request.state.form.get("key_id", ""))
        try:
            await asyncio.to_thread(self.store.revoke_key, key_id)
        except AdminError as exc:
            self.flash(session, "error", str(exc))
            return self.back(request, "/keys")
        await self.audit(session, "api-key revoke", key_id)
        self.flash(session, "ok", f"Revoked API key {key_id}.")
        return self.back(request, "/keys")

    # --- routes ----------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        p = self.page
        post = ["POST"]
        return [
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=post),
            Route("/logout", p(self.logout), methods=post),
            Route("/", p(self.dashboard)),
            Route("/queue", p(self.queue)),
            Route("/trace", p(self.trace)),
            Route("/queue/action", p(self.queue_action, change=True), methods=post),
            Route("/queue/{queue_id:str}", p(self.message)),
            Route("/accounts", p(self.accounts)),
            Route("/accounts/add", p(self.account_add, change=True), methods=post),
            Route("/accounts/passwd", p(self.account_passwd, change=True), methods=post),
            Route("/accounts/del", p(self.account_del, change=True), methods=post),
            Route("/accounts/app-add", p(self.app_add, change=True), methods=post),
            Route("/accounts/app-revoke", p(self.app_revoke, change=True), methods=post),
            Route("/accounts/webhook-set", p(self.webhook_set, change=True), methods=post),
            Route("/accounts/webhook-del", p(self.webhook_del, change=True), methods=post),
            Route("/domains", p(self.domains)),
            Route("/domains/add", p(self.domain_add, change=True), methods=post),
            Route("/domains/del", p(self.domain_del, change=True), methods=post),
            Route("/aliases", p(self.aliases)),
            Route("/aliases/add", p(self.alias_add, change=True), methods=post),
            Route("/aliases/del", p(self.alias_del, change=True), methods=post),
            Route("/keys", p(self.keys)),
            Route("/keys/add", p(self.key_add, change=True), methods=post),
            Route("/keys/revoke", p(self.key_revoke, change=True), methods=post),
            Mount("/static", StaticFiles(packages=[("postwarden.web", "static")]),
                  name="static"),
        ]


def build_routes(server: Any) -> tuple[list[BaseRoute], list[Callable[[], Awaitable[None]]]]:
    """The web admin's routes on ``server``'s stores, and what to call when
    the listener stops (the webhook sender, the admin store)."""
    from postwarden.web.admins import AdminsApi, AdminsPages
    from postwarden.web.api import ApiV1
    from postwarden.web.operations import OperationsPages
    from postwarden.web.send import SendApi
    from postwarden.web.webhooks import WebhookSender

    store = admin_store(server.config)  # shared by the nodes on PostgreSQL
    api = ApiV1(server, store)
    send = Route("/api/v1/messages", api.op(SendApi(server).send, "send"), methods=["POST"])
    web = WebAdmin(server, store)
    on_stop: list[Callable[[], Awaitable[None]]] = []
    if server.runner is not None:  # this process delivers: it reports deliveries
        hooks = WebhookSender(store, server.config.delivery.ca_file)
        server.runner.on_results.append(hooks.on_results)
        hooks.start()
        on_stop.append(hooks.stop)

    async def close() -> None:
        store.close()

    on_stop.append(close)
    return (api.routes([send, *AdminsApi(api).routes()]) + web.routes()
            + OperationsPages(web).routes() + AdminsPages(web).routes(), on_stop)
