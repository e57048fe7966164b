"""DSNs (RFC 3464, RFC 3461, RFC 6522): built, parsed back with ``email``,
and queued in a real store."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Awaitable, Callable
from email.message import EmailMessage, Message
from pathlib import Path
from typing import TypeVar

import pytest

from postwarden.config import QueueConfig
from postwarden.delivery.result import DeliveryResult
from postwarden.delivery.transport import Nexthop
from postwarden.envelope import Address, Envelope, MailParams, RcptParams, Recipient
from postwarden.queue.bounce import (
    RETURN_SIZE_MAX,
    Attempt,
    Notifier,
    notify_wants,
    read_original,
    select,
    send_report,
)
from postwarden.queue.dsn import (
    DsnKind,
    DsnRecipient,
    build_report,
    diagnostic_code,
    field,
    remote_mta,
)
from postwarden.storage.base import CommitMeta, QueuedMessage, QueuedRecipient
from postwarden.storage.sqlite_queue import SqliteQueueStore

T = TypeVar("T")
HOST = "mail.example.test"
ORIGINAL = (b"From: Alice <alice@sender.example>\r\nTo: bob@remote.example\r\n"
            b"Subject: lunch?\r\nMessage-ID: <m1@sender.example>\r\n\r\n"
            b"Shall we?\r\n")
T0 = 1_700_000_000.0


def run(func: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await func()
    return asyncio.run(main())


def message(sender: str = "alice@sender.example", params: MailParams | None = None,
            rcpts: tuple[QueuedRecipient, ...] = ()) -> QueuedMessage:
    return QueuedMessage(queue_id="QID0000000000001", sender=sender,
                         params=params or MailParams(), recipients=list(rcpts),
                         received_at=T0, size=len(ORIGINAL))


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects, msg.defects
    return msg


def subparts(part: Message) -> list[Message]:
    """The sub-messages of a multipart, message/* or delivery-status part."""
    payload = part.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


def parts(report: EmailMessage) -> list[Message]:
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    return subparts(report)


def status_blocks(part: Message) -> list[Message]:
    assert part.get_content_type() == "message/delivery-status"
    return subparts(part)


FAILED_BOB = DsnRecipient("bob@remote.example", "failed", "5.1.1",
                          "host mx.remote.example[192.0.2.1] said: 550 5.1.1 "
                          "<bob@remote.example>: user unknown (in reply to RCPT TO command)",
                          "mx.remote.example[192.0.2.1]:25", orcpt="rfc822;Bob@Remote.Example",
                          last_attempt=T0 + 60)


def test_failure_report_structure_with_full_message() -> None:
    report = build_report(DsnKind.FAILURE, message(params=MailParams(envid="ENV-42")),
                          [FAILED_BOB], hostname=HOST, now=T0 + 60, original=ORIGINAL,
                          full=True)
    msg = parse(report.data)
    assert report.params == MailParams()  # 7-bit, no SMTPUTF8 needed
    assert msg["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
    assert msg["To"].addresses[0].addr_spec == "alice@sender.example"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith(f"@{HOST}>")
    assert msg["Date"]
    text, status, original = parts(msg)
    assert text.get_content_type() == "text/plain"
    body = text.get_payload(decode=True)
    assert isinstance(body, bytes)
    assert body.startswith(f"This is the mail system at host {HOST}.".encode())
    assert (b"<bob@remote.example>: host mx.remote.example[192.0.2.1] said: 550 5.1.1 "
            b"<bob@remote.example>: user unknown (in reply to RCPT TO command)") in body
    per_message, bob = status_blocks(status)
    assert per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert bob["Final-Recipient"] == "rfc822; bob@remote.example"
    assert bob["Original-Recipient"] == "rfc822;Bob@Remote.Example"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.remote.example"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@remote.example>: user unknown"
    assert bob["Last-Attempt-Date"] == "Tue, 14 Nov 2023 22:14:20 +0000"
    assert bob["Will-Retry-Until"] is None
    assert original.get_content_type() == "message/rfc822"
    [inner] = subparts(original)
    assert inner["Subject"] == "lunch?"
    assert inner.get_payload() == "Shall we?\r\n"


def test_headers_only_part_and_no_envid() -> None:
    headers = ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    report = build_report(DsnKind.FAILURE, message(params=MailParams(ret="HDRS")), [FAILED_BOB],
                          hostname=HOST, now=T0, original=headers, full=False)
    _, status, original = parts(parse(report.data))
    assert status_blocks(status)[0]["Original-Envelope-Id"] is None
    assert original.get_content_type() == "text/rfc822-headers"
    returned = original.get_payload(decode=True)
    assert isinstance(returned, bytes)
    assert b"Subject: lunch?" in returned and b"Shall we?" not in returned


def test_delay_and_success_variants() -> None:
    delayed = DsnRecipient("bob@remote.example", "delayed", "4.4.1", "connection refused",
                           last_attempt=T0 + 5 * 3600, will_retry_until=T0 + 5 * 86400)
    report = build_report(DsnKind.DELAY, message(), [delayed], hostname=HOST,
                          now=T0 + 5 * 3600, original=b"Subject: x\r\n", full=False)
    msg = parse(report.data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    text, status, headers = parts(msg)
    body = text.get_payload(decode=True)
    assert isinstance(body, bytes)
    assert b"THIS IS A WARNING ONLY" in body
    assert b"could not be delivered for 5.0 hours" in body
    block = status_blocks(status)[1]
    assert (block["Action"], block["Status"]) == ("delayed", "4.4.1")
    assert block["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"
    assert block["Diagnostic-Code"] == "X-Postwarden; connection refused"
    assert block["Remote-MTA"] is None
    assert headers.get_content_type() == "text/rfc822-headers"

    ok = [DsnRecipient("bob@example.test", "delivered", "2.0.0", "delivered to maildir", "local"),
          DsnRecipient("carol@remote.example", "relayed", "2.0.0", "250 2.0.0 Ok: queued",
                       "mx.remote.example[192.0.2.1]:25")]
    msg = parse(build_report(DsnKind.SUCCESS, message(), ok, hostname=HOST, now=T0).data)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    text, status = parts(msg)  # no original at all
    _, bob, carol = status_blocks(status)
    assert (bob["Action"], carol["Action"]) == ("delivered", "relayed")
    assert carol["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued"


def test_hostile_values_cannot_add_headers_or_parts() -> None:
    evil = DsnRecipient("bob@remote.example", "failed", "5.0.0",
                        "550 no\r\nX-Injected: yes\r\n\r\n--boundary", "x")
    msg = message(params=MailParams(envid="E\r\nBcc: victim@example.org"))
    report = build_report(DsnKind.FAILURE, msg, [evil], hostname=HOST, now=T0,
                          original=ORIGINAL, full=True)
    parsed = parse(report.data)
    assert parsed["Bcc"] is None
    _, status, _ = parts(parsed)
    per_message, block = status_blocks(status)
    assert per_message["Original-Envelope-Id"] == "E Bcc: victim@example.org"
    assert block["X-Injected"] is None
    assert block["Diagnostic-Code"] == "smtp; 550 no X-Injected: yes --boundary"
    assert len(field("x" * 5000)) == 900


@pytest.mark.parametrize(("relay", "expected"), [
    ("mx.example.org[192.0.2.1]:25", "dns; mx.example.org"),
    ("[192.0.2.1]:25", "dns; [192.0.2.1]"),
    ("local", ""), ("none", ""), ("", ""), ("lmtp:unix:/run/dovecot/lmtp", ""),
])
def test_remote_mta_table(relay: str, expected: str) -> None:
    assert remote_mta(relay) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("550 5.1.1 unknown", "smtp; 550 5.1.1 unknown"),
    ("host x said: 452-4.2.2 full", "smtp; 452-4.2.2 full"),
    ("host x[192.0.2.1] said: 550 5.7.1 no (in reply to end of DATA command)",
     "smtp; 550 5.7.1 no"),
    ("550 5.7.1 see (in parentheses)", "smtp; 550 5.7.1 see (in parentheses)"),
    ("mailbox unavailable", "X-Postwarden; mailbox unavailable"),
    ("delivery time expired, last error: 4.4.1 refused", "X-Postwarden; delivery time "
     "expired, last error: 4.4.1 refused"),
])
def test_diagnostic_code_table(text: str, expected: str) -> None:
    assert diagnostic_code(text) == expected


def test_utf8_addresses_use_rfc6533_types() -> None:
    rcpt = DsnRecipient("jürgen@bücher.example", "failed", "5.1.1", "550 5.1.1 unknown")
    report = build_report(DsnKind.FAILURE, message(sender="zoë@sender.example"), [rcpt],
                          hostname=HOST, now=T0, original=ORIGINAL, full=True)
    assert report.params.smtputf8 and report.params.body == "8BITMIME"
    msg = parse(report.data)
    _, status, original = parts(msg)
    assert status.get_content_type() == "message/global-delivery-status"
    assert b"Final-Recipient: utf-8; j\xc3\xbcrgen@b\xc3\xbccher.example" in report.data
    assert original.get_content_type() == "message/global"


def test_no_report_to_the_null_sender() -> None:
    with pytest.raises(ValueError, match="null sender"):
        build_report(DsnKind.FAILURE, message(sender=""), [FAILED_BOB], hostname=HOST, now=T0)


@pytest.mark.parametrize(("kind", "notify", "wanted"), [
    (DsnKind.FAILURE, None, True),
    (DsnKind.DELAY, None, True),  # our choice when NOTIFY is absent (as Postfix)
    (DsnKind.SUCCESS, None, False),
    (DsnKind.FAILURE, ("NEVER",), False),
    (DsnKind.DELAY, ("NEVER",), False),
    (DsnKind.SUCCESS, ("SUCCESS",), True),
    (DsnKind.FAILURE, ("SUCCESS",), False),
    (DsnKind.FAILURE, ("SUCCESS", "FAILURE"), True),
    (DsnKind.DELAY, ("FAILURE",), False),
    (DsnKind.DELAY, ("DELAY",), True),
])
def test_notify_table(kind: DsnKind, notify: tuple[str, ...] | None, wanted: bool) -> None:
    assert notify_wants(kind, notify) is wanted


def _rcpt(i: int, address: str, notify: tuple[str, ...] | None = None,
          warned: bool = False) -> QueuedRecipient:
    return QueuedRecipient(i, address, RcptParams(notify=notify), warned=warned)


def test_select_rules() -> None:
    cfg = QueueConfig(delay_warning=3600.0)
    fail = DeliveryResult.failed("5.1.1", "550 5.1.1 unknown")
    defer = DeliveryResult.deferred("4.4.1", "refused")
    ok = DeliveryResult.delivered("250 ok", relay="mx[192.0.2.1]:25")
    ok_dsn = DeliveryResult.delivered("250 ok", relay="mx[192.0.2.1]:25", peer_dsn=True)
    smtp = Nexthop("mx", host="remote.example")
    attempts = [
        Attempt(_rcpt(1, "a@x"), fail, smtp),
        Attempt(_rcpt(2, "b@x", ("NEVER",)), fail, smtp),
        Attempt(_rcpt(3, "c@x"), defer, smtp),
        Attempt(_rcpt(4, "d@x", warned=True), defer, smtp),
        Attempt(_rcpt(5, "e@x", ("SUCCESS",)), ok, smtp),
        Attempt(_rcpt(6, "f@x", ("SUCCESS",)), ok_dsn, smtp),  # the peer reports it
        Attempt(_rcpt(7, "g@x"), ok, smtp),
    ]
    msg = message()

    def ids(kind: DsnKind, now: float) -> list[int]:
        return [a.rcpt.id for a in select(kind, msg, attempts, now, cfg)]

    assert ids(DsnKind.FAILURE, T0) == [1]
    assert ids(DsnKind.DELAY, T0 + 3599) == []
    assert ids(DsnKind.DELAY, T0 + 3600) == [3]
    assert ids(DsnKind.SUCCESS, T0) == [5]
    assert select(DsnKind.FAILURE, message(sender=""), attempts, T0, cfg) == []
    assert select(DsnKind.DELAY, msg, attempts, T0 + 9999, QueueConfig(delay_warning=0)) == []


# -- with a real store -------------------------------------------------------

async def open_store(tmp: Path) -> SqliteQueueStore:
    store = SqliteQueueStore(tmp / "q.db", tmp / "spool", inline_max=16 * 1024)
    await store.start()
    return store


async def commit(store: SqliteQueueStore, data: bytes, params: MailParams,
                 rcpt_params: RcptParams | None = None) -> QueuedMessage:
    body = store.new_body()
    body.write(data)
    env = Envelope(Address("alice", "sender.example"), params,
                   [Recipient(Address("bob", "remote.example"), rcpt_params or RcptParams())])
    queue_id = await store.commit(body, env, b"Received: by test\r\n", CommitMeta())
    msg = await store.get(queue_id)
    assert msg is not None
    return msg


async def queued_report(store: SqliteQueueStore, queue_id: str) -> tuple[QueuedMessage, bytes]:
    msg = await store.get(queue_id)
    assert msg is not None
    data = b"".join([c async for c in store.read_message(queue_id)])
    return msg, data


def test_send_report_queues_from_null_sender_ret_full_and_hdrs(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        full = await commit(store, ORIGINAL, MailParams(ret="FULL", envid="E1"))
        hdrs = await commit(store, ORIGINAL, MailParams(ret="HDRS"))
        big = await commit(store, ORIGINAL + b"x" * RETURN_SIZE_MAX, MailParams())
        for msg, ctype in ((full, "message/rfc822"), (hdrs, "text/rfc822-headers"),
                           (big, "text/rfc822-headers")):
            dsn_id = await send_report(store, DsnKind.FAILURE, msg, [FAILED_BOB],
                                       hostname=HOST, now=T0)
            dsn, data = await queued_report(store, dsn_id)
            assert dsn.sender == ""  # <>: a bounce of this bounce is impossible
            assert [r.address for r in dsn.recipients] == ["alice@sender.example"]
            assert dsn.listener == "bounce"
            text, _, original = parts(parse(data))
            assert original.get_content_type() == ctype
            if msg is big:
                body = text.get_payload(decode=True)
                assert isinstance(body, bytes) and b"too large to return" in body
        _, data = await queued_report(store, (await store.list())[3].queue_id)
        _, status, original = parts(parse(data))
        assert status_blocks(status)[0]["Original-Envelope-Id"] == "E1"
        [inner] = subparts(original)
        assert inner["Received"] == "by test"  # what we stored, as we stored it
        await store.close()

    run(main)


def test_read_original_headers_are_capped_at_a_line(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        huge = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"y" * 60) for i in range(2000))
        msg = await commit(store, huge + b"\r\nbody\r\n", MailParams())
        headers = await read_original(store, msg.queue_id, full=False)
        assert 60_000 < len(headers) <= 64 * 1024 and headers.endswith(b"\r\n")
        assert b"body" not in headers
        small = await commit(store, ORIGINAL, MailParams())
        assert await read_original(store, small.queue_id, full=False) == (
            b"Received: by test\r\n" + ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n")
        await store.close()

    run(main)


def test_notifier_combines_recipients_and_respects_never(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        msg = await commit(store, ORIGINAL, MailParams())
        notifier = Notifier(store, QueueConfig(), hostname=HOST)
        fail = DeliveryResult.failed("5.1.1", "550 5.1.1 unknown", relay="mx[192.0.2.1]:25")
        hop = Nexthop("mx", host="remote.example")
        attempts = [Attempt(_rcpt(1, "a@remote.example"), fail, hop),
                    Attempt(_rcpt(2, "b@remote.example", ("NEVER",)), fail, hop),
                    Attempt(_rcpt(3, "c@remote.example", ("FAILURE",)), fail, hop)]
        notices = await notifier.notify(msg, attempts, T0)
        assert [(e.event, e.rcpt) for e in notices.events] == [
            ("bounced", "a@remote.example"), ("bounced", "c@remote.example")]
        dsn_id = notices.events[0].reply
        _, data = await queued_report(store, dsn_id)
        _, status, _ = parts(parse(data))
        assert [b["Final-Recipient"] for b in status_blocks(status)[1:]] == [
            "rfc822; a@remote.example", "rfc822; c@remote.example"]
        # A bounce never bounces; a deleted message is not reported on.
        bounce = await store.get(dsn_id)
        assert bounce is not None
        assert (await notifier.notify(bounce, attempts, T0)).events == []
        await store.delete(msg.queue_id)
        assert (await notifier.notify(msg, attempts, T0)).events == []
        await store.close()

    run(main)
