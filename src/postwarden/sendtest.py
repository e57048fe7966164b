"""``postwarden send-test``: prove that mail goes through, end to end.

Submits one test message through the server's own listener (submission with
STARTTLS and AUTH by default, or mx), reads the queue id from the 250 reply,
then follows the message through the queue history until it is delivered,
bounced, or the time runs out, and says where it went.  Exit status 0 only
when every recipient got it.

The TLS certificate is checked against the configured certificate itself
(so a self-signed one from ``postwarden init`` works) or the system's
trust store (a certificate from a public CA).

Security exposure: takes a password (``POSTWARDEN_PASSWORD`` or a prompt,
never an argument, so it stays out of the process list and shell history).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import re
import secrets
import smtplib
import socket
import ssl
import sys
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

from postwarden import config as _config
from postwarden.storage.base import DeliveryEvent
from postwarden.storage.sqlite_queue import SqliteQueueStore

FINAL = {"delivered", "failed", "expired", "deleted"}
_QUEUED_AS = re.compile(rb"queued as ([A-Z0-9]+)")


class SendTestError(Exception):
    """The test could not be submitted (one line, exit status 1)."""


def _connect_host(host: str) -> str:
    return {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def tls_context(cfg: _config.Config) -> ssl.SSLContext:
    """Trust the system store plus our own certificate (self-signed or leaf)."""
    ctx = ssl.create_default_context()
    if cfg.tls.cert is not None:
        ctx.load_verify_locations(cafile=str(cfg.tls.cert))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


class _ImplicitTls(smtplib.SMTP_SSL):
    """SMTP over implicit TLS that checks the certificate for ``tls_name``
    (the configured hostname), whatever address it connects to."""

    def __init__(self, tls_name: str, *args: Any, **kwargs: Any) -> None:
        self.tls_name = tls_name
        super().__init__(*args, **kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout, self.source_address)
        return self.context.wrap_socket(sock, server_hostname=self.tls_name)


class _StartTls(smtplib.SMTP):
    """SMTP whose STARTTLS checks the certificate for ``tls_name``: smtplib
    checks it against the name it connected to (``_host``)."""

    _host: str

    def __init__(self, tls_name: str, *args: Any, **kwargs: Any) -> None:
        self.tls_name = tls_name
        super().__init__(*args, **kwargs)

    def connect(self, host: str = "localhost", port: int = 0,
                source_address: Any = None) -> tuple[int, bytes]:
        reply = super().connect(host, port, source_address)
        self._host = self.tls_name
        return reply


def build_message(sender: str, to: str, hostname: str, token: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"postwarden test message {token}"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(idstring=token, domain=hostname)
    msg.set_content(f"This is a test message sent by 'postwarden send-test' from {hostname}.\n"
                    f"Test token: {token}\n")
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def submit(cfg: _config.Config, via: str, sender: str, to: str, user: str | None,
           password: str | None, timeout: float = 30) -> str:
    listener = next((lst for lst in cfg.listeners if lst.mode == via and lst.enabled), None)
    if listener is None:
        raise SendTestError(f"no enabled {via} listener in {cfg.path}")
    host = _connect_host(listener.host)
    token = secrets.token_hex(6)
    data = build_message(sender, to, cfg.hostname, token)
    ctx = tls_context(cfg)
    try:
        if listener.implicit_tls:
            client: smtplib.SMTP = _ImplicitTls(cfg.hostname, host, listener.port,
                                                timeout=timeout, context=ctx)
        else:
            client = _StartTls(cfg.hostname, host, listener.port, timeout=timeout)
        with client:
            client.ehlo(cfg.hostname)
            if not listener.implicit_tls and client.has_extn("starttls"):
                client.starttls(context=ctx)
                client.ehlo(cfg.hostname)
            if listener.auth_required:
                if not user or password is None:
                    raise SendTestError("submission needs --user and a password "
                                        "(POSTWARDEN_PASSWORD or the prompt)")
                client.login(user, password)
            client.mail(sender)
            code, reply = client.rcpt(to)
            if code >= 400:
                raise SendTestError(f"recipient refused: {code} {reply.decode(errors='replace')}")
            code, reply = client.data(data)
            if code != 250:
                raise SendTestError(f"message refused: {code} {reply.decode(errors='replace')}")
    except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
        if isinstance(exc, SendTestError):
            raise
        raise SendTestError(f"cannot submit to {host}:{listener.port} ({via}): {exc}") from None
    match = _QUEUED_AS.search(reply)
    if not match:
        raise SendTestError(f"accepted, but no queue id in the reply: {reply!r}")
    return match.group(1).decode()


async def follow(cfg: _config.Config, queue_id: str, timeout: float,
                 poll: float = 0.2) -> list[DeliveryEvent]:
    """The history of ``queue_id`` once every recipient reached a final state
    (or when the time is up)."""
    deadline = time.monotonic() + timeout
    store = SqliteQueueStore(cfg.db_path, cfg.spool_dir)
    await store.start()
    try:
        while True:
            events: list[DeliveryEvent] = await store.history(queue_id)
            msg = await store.get(queue_id)
            if msg is None and any(e.event in FINAL for e in events):
                return events
            if time.monotonic() > deadline:
                return events
            await asyncio.sleep(poll)
    finally:
        await store.close()


def report(events: list[DeliveryEvent], to: str) -> tuple[bool, list[str]]:
    lines: list[str] = []
    last: dict[str, DeliveryEvent] = {}
    for ev in events:
        if ev.rcpt:
            last[ev.rcpt] = ev
    ok = bool(last) and all(ev.event == "delivered" for ev in last.values())
    for rcpt, ev in last.items():
        where = ev.relay or "?"
        if ev.event == "delivered":
            target = "a local mailbox" if where == "local" else where
            lines.append(f"delivered: <{rcpt}> to {target} ({ev.dsn} {ev.reply})")
        elif ev.event == "deferred":
            lines.append(f"NOT delivered yet: <{rcpt}> deferred via {where}: {ev.dsn} {ev.reply}")
        else:
            lines.append(f"NOT delivered: <{rcpt}> {ev.event}: {ev.dsn} {ev.reply}")
    if not last:
        lines.append(f"NOT delivered: no delivery attempt for <{to}> was recorded in time")
    return ok, lines


def cmd_send_test(cfg: _config.Config, args: argparse.Namespace) -> int:
    domain = cfg.domains[0] if cfg.domains else cfg.hostname
    sender = args.sender or args.user or f"postmaster@{domain}"
    user = args.user or (args.sender if args.via == "submission" else None) or \
        (f"postmaster@{domain}" if args.via == "submission" else None)
    password = None
    if args.via == "submission":
        password = os.environ.get("POSTWARDEN_PASSWORD")
        if password is None and sys.stdin.isatty():
            password = getpass.getpass(f"Password for {user}: ")
    queue_id = submit(cfg, args.via, sender, args.to, user, password)
    print(f"submitted via {args.via} as {queue_id}: <{sender}> -> <{args.to}>")
    events = asyncio.run(follow(cfg, queue_id, args.timeout))
    ok, lines = report(events, args.to)
    for line in lines:
        print(line)
    return 0 if ok else 1


def add_parser(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
               wrap: object) -> None:
    sp = sub.add_parser("send-test", help="send a test mail and follow it to its destination")
    sp.add_argument("--to", required=True, help="recipient address")
    sp.add_argument("--from", dest="sender", help="sender address (default: the login)")
    sp.add_argument("--via", choices=("submission", "mx"), default="submission",
                    help="listener to submit through (default: submission)")
    sp.add_argument("--user", help="login for submission (default: --from or postmaster); "
                                   "password from POSTWARDEN_PASSWORD or a prompt")
    sp.add_argument("--timeout", type=float, default=60.0,
                    help="seconds to wait for the delivery (default 60)")
    sp.set_defaults(func=wrap(cmd_send_test))  # type: ignore[operator]
