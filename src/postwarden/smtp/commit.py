"""The end of a transaction, shared by SMTP and the HTTP send API: content
filters, the trace header, the submission headers and the DKIM signature
of our users' mail, and the queue's commit point.

:func:`queue_message` takes a message whose envelope the policy has
accepted and whose content is in a body writer, and answers the reply to
give: 250 with the queue id only once the message is durable.

Security exposure: the content is the client's; filters run before
signing, so that nothing they reject is signed, and a message that cannot
be signed is not queued unsigned (receivers would reject it by DMARC).
A feedback report arriving from outside is handed, once committed, to
:mod:`postwarden.web.complaints`; nothing it says changes the reply.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from postwarden import reply as R
from postwarden.config import MODE_MX, ListenerConfig
from postwarden.envelope import ConnectionInfo, Envelope, Recipient
from postwarden.ids import new_queue_id
from postwarden.limits import INLINE_BODY_MAX
from postwarden.message import cleanup, feedback
from postwarden.message.dkim_sign import DkimSignError, from_domain, sign_message_async
from postwarden.observe import trace
from postwarden.observe.log import get_logger
from postwarden.storage.base import BodyWriter, CommitMeta, StorageError, StorageFull

log = get_logger("smtp")


@dataclass(slots=True)
class Pending:
    """An accepted envelope and its written content, ready to queue."""

    envelope: Envelope  # the transaction's (sender, parameters)
    recipients: list[Recipient]  # after alias expansion
    body: BodyWriter
    scanner: cleanup.HeaderScanner
    original_head: bytes  # the header block as received
    eight_bit: bool
    size: int
    auth_log: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Queued:
    reply: R.Reply
    queue_id: str | None = None  # set when committed


async def written(body: BodyWriter) -> bytes:
    """The message as written to the body (read in a thread when large)."""
    if body.size > INLINE_BODY_MAX:
        return await asyncio.to_thread(body.read_back)
    return body.read_back()


async def dkim_lines(ctx: Any, p: Pending, added: bytes) -> bytes:
    """DKIM-Signature lines for mail from our users (RFC 6376), computed
    over the message as it will leave, including added headers."""
    keys = ctx.dkim_keys
    if keys is None or not ctx.config.dkim.sign:
        return b""
    message = added + await written(p.body)
    sender = str(p.envelope.sender or "")
    candidates = {from_domain(message), sender.rpartition("@")[2].lower()}
    local = {d for d in candidates if d and await ctx.directory.is_local_domain(d)}
    if not local:
        return b""
    return await sign_message_async(message, sender, keys, local.__contains__)


async def queue_message(ctx: Any, conn: ConnectionInfo, listener: ListenerConfig,
                        p: Pending, extra: bytes, m: Any) -> Queued:
    """Filters, headers, signature, commit; ``ctx`` is the
    :class:`~postwarden.smtp.session.ServerContext`, ``extra`` the lines
    already to prepend (Authentication-Results), ``m`` the listener's
    metrics."""
    sid = conn.session_id
    if ctx.filters is not None:  # content filters (before DKIM signing)
        filtered = await ctx.filters.check(
            conn, listener.mode, p.envelope, p.recipients,
            await written(p.body), extra, p.body)
        if filtered.reply is not None:
            p.body.abort()
            m.rejected("filter", filtered.reply.code)
            return Queued(filtered.reply)
        p.body = filtered.body or p.body
        extra += filtered.headers
        if filtered.summary:  # for the trace and the log line
            p.auth_log["filters"] = filtered.summary
    queue_id = new_queue_id()
    params = p.envelope.params
    if p.eight_bit and params.body != "8BITMIME":
        # 8-bit content sent without BODY=8BITMIME: record what it is, so
        # that outbound delivery declares it or converts it (RFC 6152 3).
        params = dataclasses.replace(params, body="8BITMIME")
    envelope = Envelope(p.envelope.sender, params, p.recipients)
    only = envelope.recipients[0].address if len(envelope.recipients) == 1 else None
    prepend = cleanup.received_header(
        ctx.config.hostname, conn, queue_id, str(only) if only else None,
        utf8=envelope.params.smtputf8)
    prepend += extra
    if conn.auth_user:
        added = cleanup.submission_headers(p.scanner, ctx.config.hostname)
        try:
            prepend += await dkim_lines(ctx, p, added) + added
        except DkimSignError as exc:
            # As Postfix with a signing milter: a message we cannot sign is
            # not sent unsigned (receivers would reject it by DMARC).
            p.body.abort()
            log.error("dkim_sign_failed", session=sid, error=str(exc))
            return Queued(R.TEMP_FAILURE)
    # A feedback report (RFC 5965) reaching our domains is examined after
    # its commit (postwarden.web.complaints); read it while it is at hand.
    report = (await written(p.body))[:feedback.REPORT_MAX] if (
        ctx.complaints is not None and listener.mode == MODE_MX and not conn.auth_user
        and feedback.is_report(p.original_head)) else None
    meta = CommitMeta(client_ip=conn.peer_ip, helo=conn.helo,
                      auth_user=conn.auth_user, listener=listener.name,
                      session_id=sid, queue_id=queue_id,
                      message_id=trace.message_id_of(p.original_head, prepend),
                      detail=trace.received_detail(conn, p.auth_log))
    try:
        queue_id = await ctx.queue.commit(p.body, envelope, prepend, meta)
    except StorageError as exc:
        reply = R.STORAGE_FULL if isinstance(exc, StorageFull) else R.TEMP_FAILURE
        log.error("commit_failed", session=sid, error=f"{type(exc).__name__}: {exc}",
                  code=reply.code)
        return Queued(reply)
    if report is not None:
        ctx.complaints.received(queue_id, report)
    m.accepted.inc()
    m.recipients.inc(len(envelope.recipients))
    m.bytes.inc(p.size)
    log.info("accepted", session=sid, queue_id=queue_id, client=conn.peer_ip,
             sender=str(p.envelope.sender or ""), user=conn.auth_user or None,
             nrcpt=len(envelope.recipients), size=p.size,
             rcpts=[str(r.address) for r in envelope.recipients][:20], **p.auth_log)
    return Queued(R.Reply(250, "2.0.0", f"Ok: queued as {queue_id}"), queue_id)
