"""Session cookies, CSRF tokens and the response headers of the web admin.

* The session cookie holds a random token (its digest is in the database,
  :mod:`postwarden.web.store`); it is ``HttpOnly``, ``SameSite=Strict``,
  ``Path=/``, and ``Secure`` when the listener speaks TLS.
* Every form carries the session's CSRF token (synchronizer token); the
  login form, before there is a session, a token also set in a short-lived
  cookie (double submit).  A POST whose token does not match, or whose
  ``Origin`` names another host, is refused with 403.
* Every response forbids framing and inline scripts (CSP), sniffing, and
  sending the referrer to other sites.

Security exposure: tokens are compared in constant time; nothing here logs
a token.
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SESSION_COOKIE = "pw_session"
LOGIN_COOKIE = "pw_login"
LOGIN_COOKIE_AGE = 3600
CSRF_FIELD = "csrf"
# Form posts and API requests other than sending mail.
FORM_BODY_MAX = 1024 * 1024

HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    # same-origin, not no-referrer: with no-referrer browsers send "Origin: null".
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    """ASGI middleware adding :data:`HEADERS` to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in HEADERS if k not in present]
            await send(message)

        await self.app(scope, receive, with_headers)


class BodyLimit:
    """ASGI middleware: request bodies above ``limit`` bytes (``big`` for
    the paths in ``big_paths``) get 413, or are cut off when they come
    without a Content-Length (the application sees the client leave)."""

    def __init__(self, app: ASGIApp, limit: int = FORM_BODY_MAX, big: int = FORM_BODY_MAX,
                 big_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.limit = limit
        self.big = big
        self.big_paths = big_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.big if scope.get("path", "") in self.big_paths else self.limit
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            response = Response(f"request body larger than {limit} bytes\n", status_code=413,
                                media_type="text/plain")
            await response(scope, receive, send)
            return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, bounded, send)


def safe_target(target: str, default: str = "/") -> str:
    """A local path to redirect to, never another site (``//host``, ``/\\host``)."""
    if (not target.startswith("/") or target.startswith(("//", "/\\"))
            or any(c in target for c in "\\\r\n\t") or not target.isprintable()):
        return default
    return target


def is_tls(request: Request) -> bool:
    return request.url.scheme == "https"


def set_cookie(response: Response, request: Request, name: str, value: str,
               max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", secure=is_tls(request),
                        httponly=True, samesite="strict")


def clear_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(name, path="/", secure=is_tls(request), httponly=True,
                           samesite="strict")


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site."""
    origin = request.headers.get("origin")
    if origin is None:  # not sent by every browser for same-origin requests
        return True
    host = request.headers.get("host", "")
    try:
        return urlsplit(origin).netloc.lower() == host.lower()
    except ValueError:
        return False


def token_ok(expected: str, form: Any) -> bool:
    given = form.get(CSRF_FIELD) if form is not None else None
    return (isinstance(given, str) and bool(expected)
            and secrets.compare_digest(given.encode(), expected.encode()))


def new_token() -> str:
    return secrets.token_urlsafe(32)
