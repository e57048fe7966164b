"""Bounces and other DSNs: which notifications a delivery pass owes the
sender, and queueing them (Postfix's bounce daemon).

The rules (RFC 3461 section 5 and 6, and what Postfix does):

* Never notify the null sender ``<>``: a notification is itself sent from
  ``<>``, so there is no bounce of a bounce (RFC 3461 6.1, RFC 5321 4.5.5).
* ``failed`` recipients get a bounce unless their NOTIFY is given without
  FAILURE (``NOTIFY=NEVER``: nothing at all).
* ``deferred`` recipients get one delay warning, once the message is
  ``delay_warning`` seconds old (0: never), if NOTIFY includes DELAY or is
  absent (RFC 3461 4.1 leaves that case to the server; Postfix warns when
  ``delay_warning_time`` is set).
* ``delivered`` recipients get a success notice only if NOTIFY includes
  SUCCESS and the next hop did not take the DSN request over
  (``peer_dsn``): action ``delivered`` (Maildir, LMTP), ``expanded`` (an
  alias to several mailboxes) or ``relayed`` (to an SMTP peer without DSN).
* Recipients of one message with the same kind of news share one DSN.

At least once: the runner commits the bounce (:meth:`Notifier.notify`)
*before* it records the failures.  A crash in between repeats the attempt
and may send a second bounce; it never loses one.  If the bounce cannot be
committed, its recipients are reported back so the runner keeps them
queued instead of recording a failure nobody hears about.

The original comes back in full (``message/rfc822``) only in a failure
report, unless RET=HDRS, and only up to :data:`RETURN_SIZE_MAX` (as
Postfix's ``bounce_size_limit``); otherwise its header block.  RFC 3461 4.3:
RET concerns failed DSNs; delay and success notices carry headers only.

Security exposure: the report quotes untrusted data (addresses, headers,
remote replies); :mod:`postwarden.queue.dsn` neutralises it.  A report goes
only to the envelope sender of a message we accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from postwarden.config import QueueConfig
from postwarden.delivery.result import DeliveryResult, DeliveryStatus
from postwarden.delivery.transport import Nexthop
from postwarden.envelope import Address, Envelope, Recipient
from postwarden.observe.log import get_logger
from postwarden.queue import schedule
from postwarden.queue.dsn import DsnKind, DsnRecipient, build_report
from postwarden.storage.base import (
    CommitMeta,
    DeliveryEvent,
    QueuedMessage,
    QueuedRecipient,
    QueueStore,
)

log = get_logger("bounce")

# Return the whole message in a bounce up to this size, else its headers.
RETURN_SIZE_MAX = 100 * 1024
# At most this much of the header block is returned.
HEADERS_MAX = 64 * 1024
WRITE_CHUNK = 64 * 1024
# The history event written on the original message for each kind.
EVENTS = {DsnKind.FAILURE: "bounced", DsnKind.DELAY: "delay-warning",
          DsnKind.SUCCESS: "success-notice"}
_FINAL_HOPS = ("maildir", "lmtp")  # delivery there is final: "delivered"


def notify_wants(kind: DsnKind, notify: tuple[str, ...] | None) -> bool:
    """RFC 3461 4.1: the NOTIFY parameter of one recipient asks for ``kind``."""
    if notify is None:  # absent: failures, and delays at our discretion
        return kind is not DsnKind.SUCCESS
    return kind.value.upper() in notify


@dataclass(slots=True)
class Attempt:
    """One recipient's outcome in one delivery pass of a message."""

    rcpt: QueuedRecipient
    result: DeliveryResult
    nexthop: Nexthop | None = None  # None: routing failed
    mailboxes: int = 0  # Maildir copies the address expanded to
    expired: bool = False  # a deferral turned failure by the queue lifetime


@dataclass(slots=True)
class Notices:
    """What :meth:`Notifier.notify` did, for the runner to record."""

    events: list[DeliveryEvent] = field(default_factory=list)
    warned: set[int] = field(default_factory=set)  # rcpt ids: delay warning queued
    unsent: set[int] = field(default_factory=set)  # rcpt ids: bounce NOT queued


def action_for(kind: DsnKind, a: Attempt) -> str:
    if kind is DsnKind.FAILURE:
        return "failed"
    if kind is DsnKind.DELAY:
        return "delayed"
    if a.nexthop is not None and a.nexthop.kind == "maildir" and a.mailboxes > 1:
        return "expanded"
    if a.nexthop is not None and a.nexthop.kind in _FINAL_HOPS:
        return "delivered"
    return "relayed"


def _reports(kind: DsnKind, msg: QueuedMessage, a: Attempt, now: float,
             config: QueueConfig) -> bool:
    status = a.result.status
    if kind is DsnKind.FAILURE:
        return status is DeliveryStatus.FAILED
    if kind is DsnKind.DELAY:
        return (status is DeliveryStatus.DEFERRED and not a.rcpt.warned
                and schedule.delay_warning_due(msg.received_at, now, config.delay_warning))
    return status is DeliveryStatus.DELIVERED and not a.result.peer_dsn


def select(kind: DsnKind, msg: QueuedMessage, attempts: Sequence[Attempt], now: float,
           config: QueueConfig) -> list[Attempt]:
    """The attempts that ``kind`` of notification reports on."""
    if not msg.sender:
        return []
    return [a for a in attempts
            if notify_wants(kind, a.rcpt.params.notify) and _reports(kind, msg, a, now, config)]


async def read_original(store: QueueStore, queue_id: str, full: bool) -> bytes:
    """The whole message (``full``) or its header block, at most
    :data:`HEADERS_MAX` of it (cut at a line end)."""
    buf = bytearray()
    chunks = store.read_message(queue_id)
    try:
        async for chunk in chunks:
            buf += chunk
            if full:
                continue
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                return bytes(buf[: end + 2])
            if len(buf) > HEADERS_MAX:
                break
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    if full:
        return bytes(buf)
    cut = buf.rfind(b"\r\n", 0, HEADERS_MAX)
    return bytes(buf[: cut + 2]) if cut >= 0 else bytes(buf[:HEADERS_MAX])


async def send_report(store: QueueStore, kind: DsnKind, msg: QueuedMessage,
                      recipients: Sequence[DsnRecipient], *, hostname: str,
                      now: float) -> str:
    """Build the DSN and commit it to the queue (from ``<>`` to the sender);
    its queue id.  Raises :class:`~postwarden.storage.base.StorageError`."""
    wants_full = kind is DsnKind.FAILURE and msg.params.ret != "HDRS"
    full = wants_full and msg.size <= RETURN_SIZE_MAX
    try:
        original: bytes | None = await read_original(store, msg.queue_id, full)
    except Exception as exc:  # corrupt or gone: report without it
        log.warning("dsn_original_unreadable", queue_id=msg.queue_id, error=str(exc))
        original = None
    report = build_report(kind, msg, recipients, hostname=hostname, now=now,
                          original=original, full=full, truncated=wants_full and not full)
    body = store.new_body()
    try:
        for start in range(0, len(report.data), WRITE_CHUNK):
            body.write(report.data[start:start + WRITE_CHUNK])
    except BaseException:
        body.abort()
        raise
    envelope = Envelope(None, report.params, [Recipient(Address.parse_simple(msg.sender))])
    return await store.commit(body, envelope, b"", CommitMeta(listener="bounce"))


class Notifier:
    """Queues the DSNs a delivery pass owes (see the module docstring)."""

    def __init__(self, store: QueueStore, config: QueueConfig, *, hostname: str) -> None:
        self.store = store
        self.config = config
        self.hostname = hostname

    async def notify(self, msg: QueuedMessage, attempts: Sequence[Attempt],
                     now: float) -> Notices:
        notices = Notices()
        if not msg.sender:
            return notices
        planned = [(kind, select(kind, msg, attempts, now, self.config)) for kind in DsnKind]
        planned = [(kind, chosen) for kind, chosen in planned if chosen]
        if not planned or await self.store.get(msg.queue_id) is None:
            return notices  # nothing to say, or deleted meanwhile (no bounce)
        for kind, chosen in planned:
            rcpts = [self._recipient(kind, msg, a, now) for a in chosen]
            try:
                dsn_id = await send_report(self.store, kind, msg, rcpts,
                                           hostname=self.hostname, now=now)
            except Exception as exc:
                log.error("dsn_failed", queue_id=msg.queue_id, kind=kind.value,
                          error=str(exc) or repr(exc))
                if kind is DsnKind.FAILURE:
                    notices.unsent.update(a.rcpt.id for a in chosen)
                continue
            log.info("dsn_queued", queue_id=msg.queue_id, dsn_queue_id=dsn_id,
                     kind=kind.value, to=f"<{msg.sender}>", nrcpt=len(chosen))
            if kind is DsnKind.DELAY:
                notices.warned.update(a.rcpt.id for a in chosen)
            notices.events += [
                DeliveryEvent(now, msg.queue_id, EVENTS[kind], a.rcpt.address, a.result.relay,
                              a.result.dsn, dsn_id) for a in chosen]
        return notices

    def _recipient(self, kind: DsnKind, msg: QueuedMessage, a: Attempt,
                   now: float) -> DsnRecipient:
        until = msg.received_at + self.config.lifetime if kind is DsnKind.DELAY else None
        return DsnRecipient(
            address=a.rcpt.address, action=action_for(kind, a), status=a.result.dsn,
            diagnostic=a.result.text, relay=a.result.relay, orcpt=a.rcpt.params.orcpt,
            last_attempt=now, will_retry_until=until)
