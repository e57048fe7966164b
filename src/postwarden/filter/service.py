"""Content filtering as the session sees it: one call after DATA.

Owns what happens with a chain's verdict: which chain applies (inbound on
mx, outbound for authenticated submission), the log line that explains
it, the headers to prepend, storing a held message in the quarantine
(that is its commit point: the 250 names the quarantine id), the notice to
the postmaster for outbound review, and the Subject rewrite rspamd may ask
for (the body is rewritten into a new body writer).

Security exposure: the client sees only generic replies; reasons, rules
and signature names go to the log and the quarantine record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from postwarden import reply as R
from postwarden.config import Config
from postwarden.envelope import Address, ConnectionInfo, Envelope, Recipient
from postwarden.filter.attachments import AttachmentsFilter
from postwarden.filter.chain import ChainResult, FilterChain
from postwarden.filter.clamav import ClamavFilter
from postwarden.filter.dlp import DlpFilter
from postwarden.filter.rspamd import RspamdFilter
from postwarden.filter.rules import RulesFilter
from postwarden.filter.settings import FilterSettings
from postwarden.filter.verdict import Action, Filter, FilterMessage
from postwarden.message import cleanup
from postwarden.observe.log import get_logger
from postwarden.policy.dnsbl import Dnsbl
from postwarden.storage.base import BodyWriter, CommitMeta, QueueStore, StorageError
from postwarden.storage.sqlite_quarantine import HeldMessage, QuarantineStore, new_id

log = get_logger("filter")

EXPIRE_EVERY = 3600.0
# The action names the metrics count (``Action.name`` is a slow lookup).
_ACTION_NAMES = {action: action.name.lower() for action in Action}


@dataclass(frozen=True, slots=True)
class Decision:
    """``reply``: answer the client with it (reject, tempfail, or 250 for a
    held message) and do not queue; otherwise prepend ``headers`` and, when
    ``body`` is set, commit it instead of the original body."""

    reply: R.Reply | None = None
    headers: bytes = b""
    body: BodyWriter | None = None
    # For the message trace when it was more than a plain accept, e.g.
    # "rules:tag(6.2),attachments:accept|MISSING_DATE,NO_MESSAGE_ID".
    summary: str = ""


GO_ON = Decision()


def build_chain(names: Iterable[str], settings: FilterSettings,
                dnsbl_score: Callable[[str], Awaitable[int]] | None = None) -> FilterChain:
    filters: list[Filter] = []
    for name in names:
        if name == "rules":
            filters.append(RulesFilter(settings.rules, dnsbl_score))
        elif name == "attachments":
            filters.append(AttachmentsFilter(settings.attachments))
        elif name == "dlp":
            filters.append(DlpFilter(settings.dlp))
        elif name == "clamav":
            filters.append(ClamavFilter(settings.clamav))
        elif name == "rspamd":
            filters.append(RspamdFilter(settings.rspamd))
    return FilterChain(filters, timeout=settings.timeout, fail_open=settings.fail_open,
                       large_message=settings.large_message, skip_large=settings.skip_large)


def envelope_record(envelope: Envelope, recipients: Iterable[Recipient]) -> dict[str, object]:
    p = envelope.params
    return {"mail": {"size": p.size, "body": p.body, "smtputf8": p.smtputf8, "ret": p.ret,
                     "envid": p.envid},
            "rcpt": [{"address": str(r.address), "notify": list(r.params.notify)
                      if r.params.notify is not None else None, "orcpt": r.params.orcpt}
                     for r in recipients]}


class FilterService:
    def __init__(self, settings: FilterSettings, *, hostname: str, queue: QueueStore,
                 quarantine: QuarantineStore, postmaster: str,
                 dnsbl_score: Callable[[str], Awaitable[int]] | None = None) -> None:
        self.settings = settings
        self.hostname = hostname
        self.queue = queue
        self.quarantine = quarantine
        self.postmaster = settings.postmaster or postmaster
        self.inbound = build_chain(settings.inbound, settings, dnsbl_score)
        self.outbound = build_chain(settings.outbound, settings)
        self._expired_at = 0.0
        # Told (filter name, action) of every verdict (the metrics).
        self.on_verdict: Callable[[str, str], None] | None = None

    def chain_for(self, conn: ConnectionInfo, mode: str) -> tuple[str, FilterChain | None]:
        if conn.auth_user:
            return "outbound", self.outbound or None
        if mode == "mx":
            return "inbound", self.inbound or None
        return "", None

    async def check(self, conn: ConnectionInfo, mode: str, envelope: Envelope,
                    recipients: list[Recipient], data: bytes, prepended: bytes,
                    body: BodyWriter) -> Decision:
        direction, chain = self.chain_for(conn, mode)
        if chain is None:
            return GO_ON
        message = FilterMessage(
            data=data, direction=direction, client_ip=conn.peer_ip, helo=conn.helo,
            sender=str(envelope.sender or ""),
            recipients=tuple([str(r.address) for r in recipients]),
            auth_user=conn.auth_user, hostname=self.hostname, auth_results=prepended)
        result = await chain.run(message)
        on_verdict = self.on_verdict
        if on_verdict is not None:
            for name, verdict in result.verdicts:
                on_verdict(name, _ACTION_NAMES[verdict.action])
        rules = result.rules
        explained = bool(result.verdicts) and (result.action is not Action.ACCEPT
                                               or bool(rules))
        if explained:
            log.info("filtered", session=conn.session_id, client=conn.peer_ip,
                     direction=direction, action=result.action.name.lower(),
                     sender=message.sender, reasons=result.reasons or None,
                     rules=rules[:50] or None,
                     scores={n: v.score for n, v in result.verdicts if v.score is not None}
                     or None)
        if result.reply is not None:
            log.info("rejected", session=conn.session_id, client=conn.peer_ip, stage="filter",
                     code=result.reply.code, dsn=result.reply.enhanced, sender=message.sender,
                     reason="; ".join(result.reasons)[:1000])
            return Decision(reply=result.reply)
        headers = result.header_bytes()
        summary = ""
        if explained:
            # What the filters said, when it was more than a plain accept.
            summary = ",".join(
                f"{n}:{v.action.name.lower()}" + (f"({v.score:g})" if v.score is not None
                                                  else "")
                for n, v in result.verdicts)
            if rules:
                summary += "|" + ",".join(rules[:20])
        if result.notify:
            await self._notify(conn, message, result)
        if result.action is Action.QUARANTINE:
            return await self._hold(conn, direction, envelope, recipients,
                                    prepended + headers + data, result)
        if result.subject:
            new_body = self._rewrite_subject(data, result.subject, body)
            if new_body is not None:
                return Decision(headers=headers, body=new_body, summary=summary)
        if not headers and not summary:
            return GO_ON  # a plain accept (the same value, no new object)
        return Decision(headers=headers, summary=summary)

    async def _hold(self, conn: ConnectionInfo, direction: str, envelope: Envelope,
                    recipients: list[Recipient], content: bytes, result: ChainResult
                    ) -> Decision:
        held_id = new_id()
        only = str(recipients[0].address) if len(recipients) == 1 else None
        received = cleanup.received_header(self.hostname, conn, held_id, only,
                                           utf8=envelope.params.smtputf8)
        message = received + content
        held = HeldMessage(
            id=held_id, ts=time.time(), direction=direction,
            sender=str(envelope.sender or ""),
            recipients=tuple(str(r.address) for r in recipients),
            filters=tuple(result.held_by), reasons=tuple(result.reasons),
            rules=tuple(result.rules[:200]), size=len(message), client_ip=conn.peer_ip,
            helo=conn.helo, auth_user=conn.auth_user, listener=conn.listener,
            envelope=envelope_record(envelope, recipients))
        try:
            await asyncio.to_thread(self.quarantine.add, held, message)
        except Exception as exc:  # not stored: the client must try again
            log.error("quarantine_failed", session=conn.session_id,
                      error=f"{type(exc).__name__}: {exc}")
            return Decision(reply=R.TEMP_FAILURE)
        log.info("quarantined", session=conn.session_id, quarantine_id=held_id,
                 client=conn.peer_ip, sender=held.sender, nrcpt=len(recipients),
                 size=held.size, filters=list(held.filters), reasons=list(held.reasons))
        await self._expire()
        return Decision(reply=R.Reply(250, "2.0.0", f"Ok: queued as {held_id}"))

    async def _expire(self) -> None:
        now = time.time()
        if now - self._expired_at < EXPIRE_EVERY:
            return
        self._expired_at = now
        try:
            count = await asyncio.to_thread(self.quarantine.expire,
                                            self.settings.quarantine_retention)
        except Exception as exc:
            log.warning("quarantine_expire_failed", error=f"{type(exc).__name__}: {exc}")
            return
        if count:
            log.info("quarantine_expired", count=count)

    async def _notify(self, conn: ConnectionInfo, message: FilterMessage,
                      result: ChainResult) -> None:
        """A notice to the postmaster (from <>, so that it never bounces
        back and forth); the matched content is not quoted."""
        to = Address.parse_simple(self.postmaster)
        subject = (message.field_value(b"subject") or b"").decode("utf-8", "replace")[:200]
        text = (f"From: Mail Delivery System <MAILER-DAEMON@{self.hostname}>\r\n"
                f"To: <{to}>\r\n"
                f"Subject: Outgoing content review: message from {message.auth_user}\r\n"
                f"Date: {format_datetime(datetime.now(UTC))}\r\n"
                f"Message-ID: {cleanup.message_id(self.hostname)}\r\n"
                "Auto-Submitted: auto-generated\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 8bit\r\n\r\n"
                "A message matched the outgoing content review rules and was sent.\r\n\r\n"
                f"User:       {message.auth_user}\r\n"
                f"Client:     {conn.peer_ip}\r\n"
                f"Sender:     <{message.sender}>\r\n"
                f"Recipients: {', '.join(message.recipients[:20])}\r\n"
                f"Subject:    {subject}\r\n"
                f"Findings:   {'; '.join(result.reasons)}\r\n")
        body = None
        try:
            body = self.queue.new_body()
            body.write(text.encode("utf-8"))
            await self.queue.commit(body, Envelope(None, recipients=[Recipient(to)]), b"",
                                    CommitMeta(listener="filter", session_id=conn.session_id))
        except StorageError as exc:
            if body is not None:
                body.abort()
            log.error("notify_failed", session=conn.session_id, error=str(exc))
            return
        log.info("postmaster_notified", session=conn.session_id, to=str(to))

    def _rewrite_subject(self, data: bytes, subject: str, old: BodyWriter) -> BodyWriter | None:
        from postwarden.message import rawheaders

        line = f"Subject: {_one_line(subject)}\r\n".encode()
        f = rawheaders.parse_header(data).first(b"subject")  # the first Subject
        new = line + data if f is None else data[:f.start] + line + data[f.end:]
        try:
            body = self.queue.new_body()
            body.write(new)
        except StorageError as exc:
            log.warning("subject_rewrite_failed", error=str(exc))
            return None
        old.abort()
        return body


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")[:900]


def filter_service(cfg: Config, queue: QueueStore, quarantine: QuarantineStore,
                   dnsbl: Dnsbl | None = None) -> FilterService | None:
    """The server's filter service; None when no chain has a filter."""
    settings = cfg.filters
    if not settings.inbound and not settings.outbound:
        return None

    async def dnsbl_score(ip: str) -> int:
        assert dnsbl is not None
        return (await dnsbl.score(ip)).total

    domain = cfg.domains[0] if cfg.domains else cfg.hostname
    return FilterService(settings, hostname=cfg.hostname, queue=queue, quarantine=quarantine,
                         postmaster=f"postmaster@{domain}",
                         dnsbl_score=dnsbl_score if dnsbl is not None else None)
