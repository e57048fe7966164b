"""The admin listener (``[admin]``): ``/metrics``, ``/healthz``, ``/readyz``,
and the web admin with its HTTP API (:mod:`postwarden.web`, ``[admin] web``).

The same stack as the ``[http]`` listener (Starlette on uvicorn, on the
server's event loop, main process only), on an address of its own,
loopback by default (see :mod:`postwarden.observe.settings` for why it is
not the ``[http]`` listener).

* ``GET /metrics``: the Prometheus text exposition
  (:mod:`postwarden.observe.metrics`), figures of every process;
* ``GET /healthz``: 200 while the process runs;
* ``GET /readyz``: 200 when the listeners are bound, the storage is
  writable and the queue runner is alive, else 503; the body (JSON) says
  which check failed.

Security exposure: read-only; whoever reaches it learns traffic figures
and the health of the server.  Keep it on loopback (or behind an
authenticating proxy).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from postwarden import __version__
from postwarden.observe import health
from postwarden.observe.metrics import CONTENT_TYPE
from postwarden.web.security import BodyLimit, SecurityHeaders


def build_admin_app(server: Any) -> Starlette:
    """``server``: the running :class:`postwarden.app.Server`."""

    async def metrics(_: Request) -> Response:
        body = await asyncio.to_thread(server.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE)

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(_: Request) -> Response:
        ready, checks = await asyncio.to_thread(health.readiness, server)
        return JSONResponse({"ready": ready, "checks": checks, "pid": os.getpid(),
                             "version": __version__},
                            status_code=200 if ready else 503)

    routes: list[BaseRoute] = [Route("/metrics", metrics), Route("/healthz", healthz),
                               Route("/readyz", readyz)]
    if not server.config.admin.web:
        return Starlette(routes=routes)
    # The web admin and the HTTP API (postwarden.web), on the same listener.
    from postwarden.web.app import build_routes

    web_routes, on_stop = build_routes(server)
    big = server.config.limits.message_size_max * 4 // 3 + 65536  # base64 in JSON
    app = Starlette(routes=routes + web_routes, middleware=[
        Middleware(SecurityHeaders),
        Middleware(BodyLimit, big=big, big_paths=("/api/v1/messages",))])
    app.state.on_stop = on_stop  # called by HttpService.stop
    return app
