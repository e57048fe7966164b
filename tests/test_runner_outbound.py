"""The runner with outbound next hops: real store, real routing, real Maildir,
and in-process transports that implement the Transport seam with scripted
answers (the SMTP/LMTP transports are tested against real peers elsewhere)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import random
from collections.abc import Awaitable, Callable
from email.message import EmailMessage, Message
from pathlib import Path
from typing import TypeVar

import pytest

from postwarden.config import DeliveryConfig, QueueConfig, SmarthostConfig
from postwarden.delivery.maildir import MaildirDelivery, MaildirTransport
from postwarden.delivery.result import DeliveryResult
from postwarden.delivery.router import Router
from postwarden.delivery.transport import DeliveryJob, Transport, parse_nexthop
from postwarden.envelope import Address, Envelope, MailParams, RcptParams, Recipient
from postwarden.queue import schedule
from postwarden.queue.runner import QueueRunner
from postwarden.storage.base import BodyWriter, CommitMeta, RcptStatus, StorageFull
from postwarden.storage.sqlite_queue import SqliteQueueStore

T = TypeVar("T")
LOCAL = "example.test"
HOSTNAME = "mail.example.test"
SENDER = "alice@sender.example"
RELAY = "mx.remote.example[192.0.2.1]:25"
T0 = 1_700_000_000.0
CONFIG = QueueConfig(scan_interval=3600.0, retry_min=60.0, retry_max=600.0,
                     lifetime=86400.0, delay_warning=0.0, workers=4)


def run(func: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await func()
    return asyncio.run(main())


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class ScriptedTransport:
    """A Transport whose answers per recipient address come from a script
    (the last answer repeats; default: delivered).  It reads every message
    it is given, as a real transport does, and keeps it."""

    def __init__(self, relay: str = RELAY) -> None:
        self.relay = relay
        self.script: dict[str, list[DeliveryResult]] = {}
        self.jobs: list[tuple[DeliveryJob, bytes]] = []

    def answer(self, address: str, *results: DeliveryResult) -> None:
        self.script[address] = list(results)

    def _next(self, address: str) -> DeliveryResult:
        queue = self.script.get(address)
        if not queue:
            return DeliveryResult.delivered("250 2.0.0 Ok: queued", relay=self.relay)
        return queue.pop(0) if len(queue) > 1 else queue[0]

    async def deliver(self, job: DeliveryJob) -> list[DeliveryResult]:
        data = b"".join([chunk async for chunk in job.open_message()])
        self.jobs.append((job, data))
        return [self._next(r.address) for r in job.recipients]

    def reports(self) -> list[EmailMessage]:
        """The DSNs it carried (queued by the runner), parsed."""
        out = []
        for job, data in self.jobs:
            if job.message.listener == "bounce":
                msg = email.message_from_bytes(data, policy=email.policy.default)
                assert isinstance(msg, EmailMessage) and not msg.defects
                out.append(msg)
        return out

    def originals(self) -> list[DeliveryJob]:
        return [job for job, _ in self.jobs if job.message.listener != "bounce"]


def deferred(text: str = "450 4.2.0 mailbox busy") -> DeliveryResult:
    return DeliveryResult.deferred("4.2.0", text, relay=RELAY)


def subparts(part: Message) -> list[Message]:
    payload = part.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


def recipient_blocks(report: EmailMessage) -> list[Message]:
    status = subparts(report)[1]
    assert status.get_content_type() == "message/delivery-status"
    return subparts(status)[1:]


class Env:
    def __init__(self, tmp: Path, config: QueueConfig = CONFIG,
                 delivery: DeliveryConfig | None = None) -> None:
        self.tmp = tmp
        self.clock = Clock()
        self.config = config
        self.delivery = delivery or DeliveryConfig()
        self.mx = ScriptedTransport()
        self.store: SqliteQueueStore | None = None

    async def open(self, cls: type[SqliteQueueStore] = SqliteQueueStore) -> SqliteQueueStore:
        self.store = cls(self.tmp / "q.db", self.tmp / "spool", 16 * 1024, clock=self.clock)
        await self.store.start()
        return self.store

    def runner(self, **transports: Transport) -> QueueRunner:
        assert self.store is not None
        router = Router(lambda d: d == LOCAL, delivery=self.delivery)
        local = MaildirTransport(MaildirDelivery(self.tmp / "mail"), router.mailboxes)
        table: dict[str, Transport] = {"maildir": local, "mx": self.mx}
        table.update(transports)
        return QueueRunner(self.store, router, table, self.config, hostname=HOSTNAME,
                           clock=self.clock, rng=random.Random(1))

    async def commit(self, *rcpts: str | Recipient, sender: str | None = SENDER,
                     params: MailParams | None = None) -> str:
        assert self.store is not None
        body = self.store.new_body()
        body.write(b"Subject: hello\r\n\r\nbody\r\n")
        recipients = [r if isinstance(r, Recipient) else Recipient(Address.parse_simple(r))
                      for r in rcpts]
        env = Envelope(Address.parse_simple(sender) if sender else None,
                       params or MailParams(), recipients)
        return await self.store.commit(body, env, b"", CommitMeta())

    async def events(self, queue_id: str) -> list[tuple[str, str]]:
        assert self.store is not None
        return [(e.event, e.rcpt) for e in await self.store.history(queue_id)]


def test_temporary_failure_then_success_on_the_next_attempt(tmp_path: Path) -> None:
    env = Env(tmp_path)

    async def main() -> None:
        store = await env.open()
        queue_id = await env.commit("dave@remote.example")
        env.mx.answer("dave@remote.example", deferred(), DeliveryResult.delivered(
            "250 2.0.0 Ok", relay=RELAY))
        runner = env.runner()
        await runner.run_until_idle()
        msg = await store.get(queue_id)
        assert msg is not None
        [dave] = msg.recipients
        assert (dave.status, dave.attempts, dave.relay) == (RcptStatus.DEFERRED, 1, RELAY)
        assert dave.last_reply == "4.2.0 450 4.2.0 mailbox busy"
        # The same jittered time the schedule gives with the same seed.
        assert dave.next_attempt == schedule.next_attempt(1, T0, 60.0, 600.0, random.Random(1))
        assert 60 * 0.85 <= dave.next_attempt - T0 <= 60 * 1.15
        await runner.run_until_idle()  # not due yet: nothing happens
        assert len(env.mx.jobs) == 1
        env.clock.now = dave.next_attempt
        await runner.run_until_idle()
        assert await store.get(queue_id) is None
        assert await env.events(queue_id) == [
            ("queued", "dave@remote.example"), ("deferred", "dave@remote.example"),
            ("delivered", "dave@remote.example"), ("removed", "")]
        history = await store.history(queue_id)
        assert (history[1].dsn, history[1].reply, history[1].relay) == (
            "4.2.0", "450 4.2.0 mailbox busy", RELAY)
        assert env.mx.reports() == []  # no DSN was asked for or due
        await store.close()

    run(main)


def test_permanent_failure_of_one_recipient_bounces_only_that_one(tmp_path: Path) -> None:
    env = Env(tmp_path)

    async def main() -> None:
        store = await env.open()
        queue_id = await env.commit("bob@remote.example", "carol@remote.example",
                                    "dave@remote.example", params=MailParams(envid="ENV7"))
        env.mx.answer("carol@remote.example", DeliveryResult.failed(
            "5.1.1", "550 5.1.1 <carol@remote.example>: user unknown", relay=RELAY))
        await env.runner().run_until_idle()
        assert await store.get(queue_id) is None
        [original] = env.mx.originals()
        assert len(original.recipients) == 3  # one job: one destination
        [bounce] = env.mx.reports()
        [bounce_job] = [job for job, _ in env.mx.jobs if job.message.sender == ""]
        assert [r.address for r in bounce_job.recipients] == [SENDER]
        assert bounce["Subject"] == "Undelivered Mail Returned to Sender"
        [carol] = recipient_blocks(bounce)
        assert carol["Final-Recipient"] == "rfc822; carol@remote.example"
        assert (carol["Action"], carol["Status"]) == ("failed", "5.1.1")
        assert carol["Diagnostic-Code"] == "smtp; 550 5.1.1 <carol@remote.example>: user unknown"
        assert carol["Remote-MTA"] == "dns; mx.remote.example"
        _, status, returned = subparts(bounce)
        assert subparts(status)[0]["Original-Envelope-Id"] == "ENV7"
        assert returned.get_content_type() == "message/rfc822"  # the full message
        events = await store.history(queue_id)
        bounced = [e for e in events if e.event == "bounced"]
        assert [(e.rcpt, e.reply) for e in bounced] == [
            ("carol@remote.example", bounce_job.message.queue_id)]
        assert await env.events(bounce_job.message.queue_id) == [
            ("queued", SENDER), ("delivered", SENDER), ("removed", "")]
        await store.close()

    run(main)


def test_expiry_bounces_with_the_last_error(tmp_path: Path) -> None:
    env = Env(tmp_path, QueueConfig(scan_interval=3600.0, retry_min=60.0, retry_max=60.0,
                                    lifetime=100.0, delay_warning=0.0))

    async def main() -> None:
        store = await env.open()
        queue_id = await env.commit("dave@remote.example")
        env.mx.answer("dave@remote.example", deferred("421 4.4.2 too busy"))
        env.mx.answer(SENDER, DeliveryResult.delivered("250 ok", relay=RELAY))
        runner = env.runner()
        await runner.run_until_idle()
        assert env.mx.reports() == []
        env.clock.now = T0 + 101
        await runner.run_until_idle()
        assert await store.get(queue_id) is None
        [bounce] = env.mx.reports()
        [dave] = recipient_blocks(bounce)
        assert (dave["Action"], dave["Status"]) == ("failed", "5.4.7")
        assert dave["Diagnostic-Code"] == "smtp; 421 4.4.2 too busy"
        assert [e for e, _ in await env.events(queue_id)] == [
            "queued", "deferred", "expired", "bounced", "removed"]
        await store.close()

    run(main)


def test_delay_warning_is_sent_once(tmp_path: Path) -> None:
    env = Env(tmp_path, QueueConfig(scan_interval=3600.0, retry_min=60.0, retry_max=60.0,
                                    lifetime=86400.0, delay_warning=100.0))

    async def main() -> None:
        store = await env.open()
        queue_id = await env.commit("dave@remote.example", Recipient(
            Address("erin", "remote.example"), RcptParams(notify=("FAILURE",))))
        env.mx.answer("dave@remote.example", deferred())
        env.mx.answer("erin@remote.example", deferred())
        runner = env.runner()
        for step in range(5):  # T0, +70, +140, +210, +280
            env.clock.now = T0 + 70 * step
            await runner.run_until_idle()
        [warning] = env.mx.reports()
        assert warning["Subject"] == "Delayed Mail (still being retried)"
        [dave] = recipient_blocks(warning)  # erin asked for FAILURE only
        assert dave["Final-Recipient"] == "rfc822; dave@remote.example"
        assert (dave["Action"], dave["Status"]) == ("delayed", "4.2.0")
        assert dave["Will-Retry-Until"] == "Wed, 15 Nov 2023 22:13:20 +0000"
        _, _, headers = subparts(warning)
        assert headers.get_content_type() == "text/rfc822-headers"
        msg = await store.get(queue_id)
        assert msg is not None
        assert [(r.address, r.warned) for r in msg.recipients] == [
            ("dave@remote.example", True), ("erin@remote.example", False)]
        assert [r for e, r in await env.events(queue_id) if e == "delay-warning"] == [
            "dave@remote.example"]
        await store.close()

    run(main)


def test_recipients_are_grouped_by_next_hop(tmp_path: Path) -> None:
    env = Env(tmp_path)

    async def main() -> None:
        store = await env.open()
        await env.commit("bob@one.example", "dave@two.example", "Carol@ONE.example")
        await env.runner().run_until_idle()
        jobs = sorted((job.nexthop.key, [r.address for r in job.recipients])
                      for job in env.mx.originals())
        assert jobs == [("mx:one.example", ["bob@one.example", "Carol@one.example"]),
                        ("mx:two.example", ["dave@two.example"])]
        assert await store.list() == []
        await store.close()

    run(main)


def test_transport_overrides_smarthost_and_local(tmp_path: Path) -> None:
    delivery = DeliveryConfig(
        smarthost=SmarthostConfig(parse_nexthop("smtp:[192.0.2.25]:587")),
        transports={"special.example": parse_nexthop("lmtp:[127.0.0.1]:24")})
    env = Env(tmp_path, delivery=delivery)
    smtp, lmtp = ScriptedTransport("[192.0.2.25]:587"), ScriptedTransport("[127.0.0.1]:24")

    async def main() -> None:
        store = await env.open()
        queue_id = await env.commit("x@special.example", "y@remote.example", "bob@example.test",
                                    "z@other.example")
        await env.runner(smtp=smtp, lmtp=lmtp).run_until_idle()
        assert [(j.nexthop.key, [r.address for r in j.recipients]) for j, _ in lmtp.jobs] == [
            ("lmtp:[127.0.0.1]:24", ["x@special.example"])]
        assert [(j.nexthop.key, [r.address for r in j.recipients]) for j, _ in smtp.jobs] == [
            ("smtp:[192.0.2.25]:587", ["y@remote.example", "z@other.example"])]
        assert env.mx.jobs == []
        assert (tmp_path / "mail" / "example.test" / "bob" / "Maildir" / "new").is_dir()
        relays = {e.rcpt: e.relay for e in await store.history(queue_id) if e.rcpt}
        assert relays == {"x@special.example": "[127.0.0.1]:24",
                          "y@remote.example": "[192.0.2.25]:587",
                          "z@other.example": "[192.0.2.25]:587", "bob@example.test": "local"}
        await store.close()

    run(main)


def test_success_notices_local_relayed_and_peer_dsn(tmp_path: Path) -> None:
    env = Env(tmp_path)
    success = RcptParams(notify=("SUCCESS", "FAILURE"), orcpt="rfc822;Team@example.test")

    async def main() -> None:
        store = await env.open()
        env.mx.answer("dsn@remote.example", DeliveryResult.delivered(
            "250 ok", relay=RELAY, peer_dsn=True))
        queue_id = await env.commit(
            Recipient(Address("bob", "example.test"), success),
            Recipient(Address("plain", "remote.example"), success),
            Recipient(Address("dsn", "remote.example"), success),
            Recipient(Address("quiet", "remote.example")))
        await env.runner().run_until_idle()
        [notice] = env.mx.reports()
        assert notice["Subject"] == "Successful Mail Delivery Report"
        bob, plain = recipient_blocks(notice)
        assert (bob["Final-Recipient"], bob["Action"]) == ("rfc822; bob@example.test",
                                                           "delivered")
        assert bob["Original-Recipient"] == "rfc822;Team@example.test"
        assert (plain["Final-Recipient"], plain["Action"]) == (
            "rfc822; plain@remote.example", "relayed")
        assert len(subparts(notice)) == 3  # headers only, never the full message
        assert [r for e, r in await env.events(queue_id) if e == "success-notice"] == [
            "bob@example.test", "plain@remote.example"]
        await store.close()

    run(main)


@pytest.mark.parametrize(("sender", "notify"), [(None, None), (SENDER, ("NEVER",))])
def test_no_bounce_for_null_sender_or_notify_never(tmp_path: Path, sender: str | None,
                                                  notify: tuple[str, ...] | None) -> None:
    env = Env(tmp_path)

    async def main() -> None:
        store = await env.open()
        queue_id = await env.commit(Recipient(Address("carol", "remote.example"),
                                              RcptParams(notify=notify)), sender=sender)
        env.mx.answer("carol@remote.example", DeliveryResult.failed("5.1.1", "550 5.1.1 no"))
        await env.runner().run_until_idle()
        assert env.mx.reports() == []
        assert await store.list() == []
        assert [e for e, _ in await env.events(queue_id)] == ["queued", "failed", "removed"]
        await store.close()

    run(main)


class NoRoomForBounces(SqliteQueueStore):
    """The real store, except that the disk is full for notifications."""

    async def commit(self, body: BodyWriter, envelope: Envelope, prepend: bytes,
                     meta: CommitMeta) -> str:
        if envelope.sender is None:
            body.abort()
            raise StorageFull("no space left on device")
        return await super().commit(body, envelope, prepend, meta)


def test_failure_stays_queued_when_its_bounce_cannot_be_queued(tmp_path: Path) -> None:
    env = Env(tmp_path)

    async def main() -> None:
        store = await env.open(NoRoomForBounces)
        queue_id = await env.commit("carol@remote.example")
        env.mx.answer("carol@remote.example", DeliveryResult.failed("5.1.1", "550 5.1.1 no"))
        await env.runner().run_until_idle()
        msg = await store.get(queue_id)
        assert msg is not None  # at least once: never a failure nobody hears of
        [carol] = msg.recipients
        assert carol.status is RcptStatus.DEFERRED
        assert carol.last_reply == "5.1.1 550 5.1.1 no"
        assert carol.next_attempt > T0
        await store.close()

    run(main)


class Crashing:
    """A transport with a bug, and one that answers too few results."""

    def __init__(self, short: bool = False) -> None:
        self.short = short

    async def deliver(self, job: DeliveryJob) -> list[DeliveryResult]:
        if self.short:
            return [DeliveryResult.delivered("ok", relay="x")]
        raise RuntimeError("bug")


def test_transport_bugs_defer_never_bounce(tmp_path: Path) -> None:
    delivery = DeliveryConfig(transports={"bug.example": parse_nexthop("lmtp:[127.0.0.1]:24"),
                                          "short.example": parse_nexthop("smtp:[127.0.0.1]")})
    env = Env(tmp_path, delivery=delivery)

    async def main() -> None:
        store = await env.open()
        queue_id = await env.commit("a@bug.example", "b@short.example", "c@short.example")
        await env.runner(lmtp=Crashing(), smtp=Crashing(short=True)).run_until_idle()
        msg = await store.get(queue_id)
        assert msg is not None
        assert [(r.address, r.status.value, r.last_reply) for r in msg.recipients] == [
            ("a@bug.example", "deferred", "4.3.0 delivery failed temporarily"),
            ("b@short.example", "delivered", "2.0.0 ok"),
            ("c@short.example", "deferred", "4.3.0 delivery failed temporarily")]
        assert env.mx.reports() == []
        await store.close()

    run(main)


class DeletingTransport(ScriptedTransport):
    """While it reads the message, the CLI (its own store instance on the
    same database) deletes it and the server's spool collection runs; then
    it reports success."""

    def __init__(self, tmp: Path, server: SqliteQueueStore) -> None:
        super().__init__()
        self.tmp = tmp
        self.server = server

    async def deliver(self, job: DeliveryJob) -> list[DeliveryResult]:
        chunks = job.open_message()
        data = await anext(chunks)
        cli = SqliteQueueStore(self.tmp / "q.db", self.tmp / "spool")
        await cli.start()
        assert not cli.owns_spool
        assert await cli.delete(job.message.queue_id)
        await cli.close()
        assert await self.server.collect_garbage(min_age=0) == 1
        data += b"".join([chunk async for chunk in chunks])
        self.jobs.append((job, data))
        return [self._next(r.address) for r in job.recipients]


def test_message_deleted_during_delivery_records_nothing(tmp_path: Path) -> None:
    env = Env(tmp_path)
    body = b"Subject: big\r\n\r\n" + b"x" * 100_000

    async def main() -> None:
        store = await env.open()
        writer = store.new_body()
        writer.write(body)  # a spool file
        envelope = Envelope(Address.parse_simple(SENDER),
                            recipients=[Recipient(Address("dave", "remote.example"))])
        queue_id = await store.commit(writer, envelope, b"", CommitMeta())
        assert len(list((tmp_path / "spool").glob("*.spool"))) == 1
        transport = DeletingTransport(tmp_path, store)
        await env.runner(mx=transport).run_until_idle()
        # The open file was read to the end; the result was not recorded.
        assert [data for _, data in transport.jobs] == [body]
        assert await env.events(queue_id) == [("queued", "dave@remote.example"), ("deleted", "")]
        assert list((tmp_path / "spool").glob("*.spool")) == []
        await store.close()

    run(main)
