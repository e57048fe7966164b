"""Delivery webhooks: per mail account, an HTTPS endpoint told about the
fate of the mail the account sent.

Events (JSON): ``delivered``, ``deferred``, ``bounced`` (a recipient
failed for good), each with the queue id, the recipient, the remote reply
and the time; ``complained``, a feedback report about the account's mail
(:mod:`postwarden.web.complaints` puts those in the outbox, from whichever
process accepted the report).  Each POST carries
``X-Postwarden-Timestamp`` and ``X-Postwarden-Signature: sha256=HEX``, the
HMAC-SHA256 of ``timestamp + "." + body`` with the webhook's secret (the
same scheme as the alert webhook, :func:`postwarden.observe.alerts.sign`).

The queue runner's results hook hands events to :class:`WebhookSender`,
which keeps them in an outbox table (``webadmin_webhook_outbox``) and posts
them from the main process, retrying with exponential backoff
(:data:`RETRY_FIRST` doubling up to :data:`RETRY_MAX`) for
:data:`MAX_ATTEMPTS` attempts.  An event not yet in the outbox when the
process stops is lost: webhooks are a notification, the trace keeps the
record.

Security exposure: posts to URLs set by the administrator (HTTPS only,
certificates verified against ``[delivery] ca_file`` or the system store);
a slow endpoint costs a worker thread for at most :data:`TIMEOUT` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from postwarden.background import cancel_and_wait
from postwarden.delivery.smtp_client import client_tls_context
from postwarden.observe.alerts import sign
from postwarden.observe.log import get_logger
from postwarden.web.store import AdminError, SqliteAdminStore

log = get_logger("webhooks")

EVENTS = {"delivered": "delivered", "deferred": "deferred", "failed": "bounced"}
RETRY_FIRST = 30.0
RETRY_MAX = 6 * 3600.0
MAX_ATTEMPTS = 12
TIMEOUT = 10.0
BATCH = 50
INTERVAL = 1.0


def check_url(url: str) -> str:
    url = url.strip()
    if not url.startswith("https://") or len(url) > 2000 or not url.isprintable() \
            or " " in url:
        raise AdminError("the webhook URL must be an https:// URL")
    return url


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(24)


def post(url: str, secret: str, body: bytes, context: ssl.SSLContext | None) -> None:
    """One signed POST (blocking; raises OSError on failure or a non-2xx answer)."""
    timestamp = str(int(time.time()))
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "postwarden-webhooks",
        "X-Postwarden-Timestamp": timestamp,
        "X-Postwarden-Signature": "sha256=" + sign(secret, timestamp, body)})
    with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
        if not 200 <= response.status < 300:
            raise OSError(f"webhook answered {response.status}")


class WebhookSender:
    """Collects delivery results and posts them (the main process only)."""

    def __init__(self, store: SqliteAdminStore, ca_file: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.context = client_tls_context("verify", ca_file)
        self._pending: list[tuple[str, dict[str, object]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._accounts: dict[str, bool] = {}
        self._accounts_read = 0.0

    def _has_webhook(self, account: str) -> bool:
        now = time.monotonic()
        if now - self._accounts_read > 5:
            self._accounts = {a: True for a in self.store.webhook_accounts()}
            self._accounts_read = now
        return account in self._accounts

    def on_results(self, msg: Any, results: list[Any]) -> None:
        """``QueueRunner.on_results``: the events of an account's message."""
        account = msg.auth_user
        if not account or not self._has_webhook(account):
            return
        rcpts = {r.id: r.address for r in msg.recipients}
        for r in results:
            event = EVENTS.get(r.status.value)
            if event is None:
                continue
            self._pending.append((account, {
                "event": event, "queue_id": msg.queue_id, "account": account,
                "sender": msg.sender, "recipient": rcpts.get(r.rcpt_id, ""),
                "reply": r.reply, "relay": r.relay, "timestamp": self.clock()}))
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            try:
                await self.flush()
            except Exception as exc:  # keep going: a database hiccup, a bad row
                log.error("webhook_loop_failed", error=repr(exc))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), INTERVAL)

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.to_thread(self.store.outbox_add, [
                (account, json.dumps(payload, sort_keys=True)) for account, payload in pending])
        due = await asyncio.to_thread(self.store.outbox_due, self.clock(), BATCH)
        for row_id, url, secret, payload, attempts in due:
            try:
                await asyncio.to_thread(post, url, secret, payload.encode(), self.context)
            except (OSError, ValueError, urllib.error.URLError) as exc:
                attempts += 1
                if attempts >= MAX_ATTEMPTS:
                    log.error("webhook_given_up", url=url, attempts=attempts, error=str(exc))
                    await asyncio.to_thread(self.store.outbox_done, row_id)
                else:
                    delay = min(RETRY_FIRST * 2 ** (attempts - 1), RETRY_MAX)
                    log.info("webhook_retry", url=url, attempts=attempts, delay=delay,
                             error=str(exc)[:200])
                    await asyncio.to_thread(self.store.outbox_retry, row_id, attempts,
                                            self.clock() + delay)
            else:
                await asyncio.to_thread(self.store.outbox_done, row_id)
