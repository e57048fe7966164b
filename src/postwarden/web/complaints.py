"""Complaints: feedback reports (ARF, RFC 5965) about mail our accounts
sent become ``complained`` events on the account's delivery webhook.

Where in the flow: a report is recognised at the end of an inbound (``mx``
listener, unauthenticated) transaction, after its commit
(:func:`postwarden.smtp.commit.queue_message`): the report is mail for one
of our domains like any other (the address registered at a mailbox
provider's feedback loop, say ``fbl@example.org``), and is delivered as
usual whatever it says.  Its examination runs in the background, in the
process that accepted it, and never changes the reply or the delivery.

Matching (RFC 6650 3: a report is about a message the operator sent): the
reported message's ``Received`` fields written by postwarden name our
queue id, and its history (the trace) must hold that message, queued by an
authenticated account, with the same Message-ID when both name one; else
the reported Message-ID alone is looked up in the history
(``find_message_id``), for reports that carry the original's header
without our ``Received`` field.  Then:

* a ``complained`` line joins the message's history (recipient, feedback
  type, the report's queue id);
* ``postwarden_feedback_reports_total{result}`` counts it (``matched``,
  ``unmatched``, ``malformed``);
* when the account has a webhook, the event goes to the webhook outbox
  (``webadmin_webhook_outbox``), which the main process's
  :class:`~postwarden.web.webhooks.WebhookSender` posts, signed and
  retried like the delivery events.  On PostgreSQL the outbox is shared
  (:mod:`postwarden.storage.pg_admin`): a report accepted by a node that
  does not deliver (``[queue] workers = 0``) is posted by a node that does.

A report that is malformed or matches nothing changes nothing: one log
line, the counter.

Security exposure: anybody can send a report, and claim anything in it.
Only a complaint about a message this server's history shows it sent for
an account reaches that account's webhook: the sender must name a queue id
(80 random bits) or the Message-ID of such a message, which only the
message's recipients (and the mail servers on its path) have seen.  Reports
are parsed within bounds (:mod:`postwarden.message.feedback`); a failure
here is logged, never raised into the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from postwarden.message import feedback
from postwarden.observe import trace
from postwarden.observe.log import get_logger
from postwarden.storage.base import DeliveryEvent, QueueStore
from postwarden.web.store import SqliteAdminStore

log = get_logger("feedback")

# Reports examined at once per process; more are logged and skipped.
CONCURRENT_MAX = 20


@dataclass(frozen=True, slots=True)
class Sent:
    """A message we sent, as its history tells."""

    queue_id: str
    account: str
    sender: str
    message_id: str
    recipients: tuple[str, ...]


def sent_message(queue_id: str, events: list[DeliveryEvent], message_id: str) -> Sent | None:
    """The message of ``events`` when an account sent it (its ``queued``
    events name the authenticated user) and its Message-ID is
    ``message_id`` (either being unknown matches)."""
    queued = [e for e in events if e.event == "queued"]
    if not queued:
        return None
    first = queued[0]
    user = trace.user_of(first.detail)
    if not user:
        return None  # mail that came in, not mail we sent
    if message_id and first.message_id and first.message_id != message_id:
        return None
    return Sent(queue_id, user, first.sender, first.message_id,
                tuple(e.rcpt for e in queued if e.rcpt))


class Complaints:
    """Examines the feedback reports one process accepts."""

    def __init__(self, queue: QueueStore, store: SqliteAdminStore, metrics: Any,
                 clock: Callable[[], float] = time.time) -> None:
        """``store``: the web admin's store of ``[storage]`` (the webhooks and
        their outbox; on PostgreSQL the shared tables, so a report accepted
        by any node reaches the webhook through the nodes that post)."""
        self.queue = queue
        self.metrics = metrics
        self.clock = clock
        self.store = store
        self._tasks: set[asyncio.Task[str]] = set()

    def received(self, report_id: str, data: bytes) -> None:
        """A report was committed as ``report_id``: examine it in the
        background (call on the event loop)."""
        if len(self._tasks) >= CONCURRENT_MAX:
            log.warning("feedback_skipped", queue_id=report_id, reason="too many at once")
            return
        task = asyncio.get_running_loop().create_task(self.examine(report_id, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def examine(self, report_id: str, data: bytes) -> str:
        """The result (``matched``, ``unmatched``, ``malformed``, ``failed``);
        never raises."""
        try:
            result = await self._examine(report_id, data)
        except Exception as exc:  # a database hiccup: the report stays delivered
            log.error("feedback_failed", queue_id=report_id, error=repr(exc))
            return "failed"
        self.metrics.feedback(result)
        return result

    async def _examine(self, report_id: str, data: bytes) -> str:
        report = await asyncio.to_thread(feedback.parse, data)
        if report is None:
            log.info("feedback_malformed", queue_id=report_id)
            return "malformed"
        sent = await self._match(report)
        if sent is None:
            log.info("feedback_unmatched", queue_id=report_id, type=report.feedback_type,
                     message_id=report.message_id or None,
                     named=list(report.queue_ids) or None)
            return "unmatched"
        # The recipient the report names, as the message had it when it was one.
        named = {a.lower(): a for a in sent.recipients}
        recipient = next((named[r.lower()] for r in (*report.recipients, report.recipient)
                          if r.lower() in named), report.recipient)
        now = self.clock()
        await self.queue.add_events([DeliveryEvent(
            now, sent.queue_id, "complained", rcpt=recipient,
            detail=f"feedback_type={report.feedback_type} report={report_id}"
                   + (f" user_agent={report.user_agent!r}" if report.user_agent else ""))])
        hooked = sent.account in await asyncio.to_thread(self.store.webhook_accounts)
        if hooked:
            payload = {"event": "complained", "queue_id": sent.queue_id,
                       "account": sent.account, "sender": sent.sender,
                       "recipient": recipient, "feedback_type": report.feedback_type,
                       "message_id": sent.message_id or report.message_id,
                       "report_queue_id": report_id, "user_agent": report.user_agent,
                       "timestamp": now}
            await asyncio.to_thread(self.store.outbox_add,
                                    [(sent.account, json.dumps(payload, sort_keys=True))])
        log.info("complained", queue_id=sent.queue_id, account=sent.account,
                 rcpt=recipient, type=report.feedback_type, report=report_id,
                 webhook=hooked)
        return "matched"

    async def _match(self, report: feedback.Report) -> Sent | None:
        for queue_id in report.queue_ids:
            sent = sent_message(queue_id, await self.queue.history(queue_id),
                                report.message_id)
            if sent is not None:
                return sent
        if not report.message_id:
            return None
        for queue_id in await self.queue.find_message_id(report.message_id, 5):
            sent = sent_message(queue_id, await self.queue.history(queue_id),
                                report.message_id)
            if sent is not None:
                return sent
        return None

    async def close(self) -> None:
        """Wait for the reports being examined (they are short), then close."""
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait(list(self._tasks), timeout=5)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.to_thread(self.store.close)
