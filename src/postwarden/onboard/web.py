"""The HTTP listener: autoconfiguration and the MTA-STS policy.

A small Starlette application served by uvicorn on the server's own event
loop (started by :class:`postwarden.app.Server` when ``[http] enabled``).
Routes:

* ``GET /mail/config-v1.1.xml`` and
  ``GET /.well-known/autoconfig/mail/config-v1.1.xml``: Thunderbird
  (the domain from ``?emailaddress=`` or the ``Host``, minus ``autoconfig.``);
* ``POST /autodiscover/autodiscover.xml`` (any case): Outlook POX;
* ``GET /mobileconfig?email=ADDRESS``: an Apple configuration profile;
* ``GET /.well-known/mta-sts.txt``: the MTA-STS policy (RFC 8461 3.3),
  for ``Host: mta-sts.DOMAIN`` of a local domain (or any host when the
  request names none of ours, e.g. a proxy that rewrites it).

Plain HTTP on loopback by default: RFC 8461 and the clients require HTTPS,
which the domain's web server terminates before proxying here
(docs/deploy.md).  Further applications (the admin web app) can be mounted
on :attr:`HttpService.app`.

Security exposure: reachable by anyone the administrator exposes it to.
It answers only for local domains, says nothing about accounts, reads at
most :data:`~postwarden.onboard.autoconfig.AUTODISCOVER_MAX_BODY` bytes of
a request body, and has no state to change.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from postwarden import config as _config
from postwarden.observe.log import get_logger
from postwarden.onboard import autoconfig

log = get_logger("http")

IsLocal = Callable[[str], Awaitable[bool]]
XML = "application/xml; charset=utf-8"


def _host(request: Request) -> str:
    return request.headers.get("host", "").rsplit(":", 1)[0].strip().rstrip(".").lower()


def build_app(cfg: _config.Config, is_local: IsLocal,
              ports: Callable[[], dict[str, int]] = dict) -> Starlette:
    """The ASGI application; ``ports`` gives the listeners' bound ports."""

    async def local(domain: str) -> bool:
        return bool(domain) and await is_local(domain)

    def not_here(what: str) -> Response:
        return PlainTextResponse(f"{what}\n", status_code=404)

    async def thunderbird(request: Request) -> Response:
        address = request.query_params.get("emailaddress", "")
        domain = address.rpartition("@")[2].lower() if "@" in address else (
            _host(request).removeprefix("autoconfig."))
        if not await local(domain):
            return not_here("no mail service for this domain")
        try:
            body = autoconfig.thunderbird(cfg, domain, ports())
        except autoconfig.NoIncomingServer as exc:
            return not_here(str(exc))
        log.info("autoconfig", client="thunderbird", domain=domain)
        return Response(body, media_type=XML)

    async def outlook(request: Request) -> Response:
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > autoconfig.AUTODISCOVER_MAX_BODY:
                break
        try:
            address = autoconfig.autodiscover_address(bytes(raw))
        except autoconfig.BadRequest as exc:
            log.info("autoconfig_refused", client="outlook", reason=str(exc))
            return Response(autoconfig.autodiscover_error(600, "Invalid Request"),
                            media_type=XML)
        if not await local(address.rpartition("@")[2]):
            return Response(autoconfig.autodiscover_error(603, "Not served here"),
                            media_type=XML)
        try:
            body = autoconfig.autodiscover(cfg, address, ports())
        except autoconfig.NoIncomingServer as exc:
            return not_here(str(exc))
        log.info("autoconfig", client="outlook", domain=address.rpartition("@")[2])
        return Response(body, media_type=XML)

    async def apple(request: Request) -> Response:
        address = request.query_params.get("email", "").strip().lower()
        local_part, at, domain = address.rpartition("@")
        if not (at and local_part and len(address) <= 254
                and all(c.isprintable() and c not in ' "<>\\' for c in address)):
            return PlainTextResponse("give ?email=ADDRESS\n", status_code=400)
        if not await local(domain):
            return not_here("no mail service for this domain")
        try:
            body = autoconfig.mobileconfig(cfg, address, ports())
        except autoconfig.NoIncomingServer as exc:
            return not_here(str(exc))
        log.info("autoconfig", client="apple", domain=domain)
        return Response(body, media_type=autoconfig.MOBILECONFIG_TYPE, headers={
            "Content-Disposition": f'attachment; filename="{domain}.mobileconfig"'})

    async def mta_sts(request: Request) -> Response:
        host = _host(request)
        if host.startswith("mta-sts.") and not await local(host.removeprefix("mta-sts.")):
            return not_here("no MTA-STS policy for this domain")
        return PlainTextResponse(autoconfig.mta_sts_policy(cfg))

    routes = [Route("/.well-known/mta-sts.txt", mta_sts)]
    if cfg.http.autoconfig:
        routes += [
            Route("/mail/config-v1.1.xml", thunderbird),
            Route("/.well-known/autoconfig/mail/config-v1.1.xml", thunderbird),
            Route("/mobileconfig", apple),
        ] + [Route(path, outlook, methods=["POST"]) for path in (
            "/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml",
            "/AutoDiscover/AutoDiscover.xml")]
    return Starlette(routes=routes)


class HttpService:
    """uvicorn on the running event loop, on a socket bound here (so that
    ``address = "...:0"`` works and the bound port is known)."""

    def __init__(self, cfg: _config.Config, is_local: IsLocal,
                 ports: Callable[[], dict[str, int]] = dict, *,
                 app: Starlette | None = None, key: str = "http.address") -> None:
        """``app`` and ``key``: another application on another address (the
        ``[admin]`` listener, postwarden.observe.admin)."""
        self.cfg = cfg
        self.app = app if app is not None else build_app(cfg, is_local, ports)
        self.key = key
        self.address = cfg.admin.address if key == "admin.address" else cfg.http.address
        self.port = 0
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        host, port = _config.parse_hostport(self.key, self.address)
        host = {"*": "::", "localhost": "127.0.0.1"}.get(host, host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise _config.ConfigError(self.key,
                                      f"cannot listen on {host}:{port}: {exc.strerror}"
                                      ) from None
        self._sock = sock
        self.port = sock.getsockname()[1]
        certfile = keyfile = None
        if self.key == "admin.address" and self.cfg.admin.tls_cert:
            # HTTPS for the web admin ([admin] tls_cert / tls_key).
            base = self.cfg.path.parent
            certfile = str(base / self.cfg.admin.tls_cert)
            keyfile = str(base / self.cfg.admin.tls_key)
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                server_header=False, proxy_headers=False,
                                ssl_certfile=certfile, ssl_keyfile=keyfile)
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._server = server
        # uvicorn's tick loop (Date header, graceful exit); not serve(),
        # which would take over the process's signal handlers.
        self._task = asyncio.create_task(server.main_loop())
        log.info("http_ready", address=host, port=self.port, listener=self.key.split(".")[0])

    async def stop(self) -> None:
        server = self._server
        if server is None:
            return
        server.should_exit = True
        if self._task is not None:
            await self._task
        await server.shutdown(sockets=[self._sock] if self._sock else None)
        if self._sock is not None:
            self._sock.close()
        self._server = None
        for hook in getattr(self.app.state, "on_stop", []):  # the web admin's tasks
            await hook()
