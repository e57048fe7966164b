"""The queue runner with a real store, real Maildirs and real routing."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from postwarden.config import DeliveryConfig, QueueConfig, SmarthostConfig
from postwarden.delivery.maildir import MaildirDelivery, MaildirTransport
from postwarden.delivery.result import DeliveryResult
from postwarden.delivery.router import Route, Router, domain_of, transport_for
from postwarden.delivery.transport import Nexthop, parse_nexthop
from postwarden.envelope import Address, Envelope, Recipient
from postwarden.observe import log as logmod
from postwarden.queue import schedule
from postwarden.queue.runner import QueueRunner
from postwarden.storage.base import CommitMeta, QueuedMessage, RcptStatus, RecipientResult
from postwarden.storage.sqlite_queue import SqliteQueueStore

T = TypeVar("T")
LOCAL = "example.test"
HOSTNAME = "mail.example.test"
FAST = QueueConfig(scan_interval=3600.0, retry_min=60.0, retry_max=3600.0, workers=4)


def run(func: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await func()
    return asyncio.run(main())


def is_local(domain: str) -> bool:
    return domain == LOCAL


class Env:
    """A store, Maildir root and runner factory under one tmp directory."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mail = tmp / "mail"
        self.store: SqliteQueueStore | None = None

    async def open(self) -> SqliteQueueStore:
        self.store = SqliteQueueStore(self.tmp / "q.db", self.tmp / "spool", inline_max=16 * 1024)
        await self.store.start()
        return self.store

    def runner(self, config: QueueConfig = FAST, router: Router | None = None,
               maildir: MaildirDelivery | None = None,
               clock: Callable[[], float] = time.time) -> QueueRunner:
        assert self.store is not None
        router = router or Router(is_local)
        local = MaildirTransport(maildir or MaildirDelivery(self.mail), router.mailboxes)
        return QueueRunner(self.store, router, {"maildir": local}, config, hostname=HOSTNAME,
                           clock=clock, rng=random.Random(7))

    async def commit(self, body: bytes, *rcpts: str) -> str:
        assert self.store is not None
        writer = self.store.new_body()
        writer.write(body)
        env = Envelope(Address("alice", "sender.example"),
                       recipients=[Recipient(Address.parse_simple(r)) for r in rcpts])
        return await self.store.commit(writer, env, b"X-Queue: test\r\n", CommitMeta())

    def delivered(self, mailbox: str) -> list[bytes]:
        local, _, domain = mailbox.partition("@")
        new = self.mail / domain / local / "Maildir" / "new"
        return sorted(p.read_bytes() for p in new.iterdir()) if new.is_dir() else []


def results_counter(runner: QueueRunner, n: int) -> asyncio.Event:
    """An event set once results for ``n`` messages were recorded."""
    done = asyncio.Event()
    seen: list[str] = []

    def hook(msg: QueuedMessage, _results: list[RecipientResult]) -> None:
        seen.append(msg.queue_id)
        if len(seen) >= n:
            done.set()

    runner.on_results.append(hook)
    return done


def stored(body: bytes, mailbox: str) -> bytes:
    return (b"Return-Path: <alice@sender.example>\nDelivered-To: " + mailbox.encode()
            + b"\nX-Queue: test\n" + body.replace(b"\r\n", b"\n"))


def test_start_delivers_everything_queued_and_removes_it(tmp_path: Path) -> None:
    env = Env(tmp_path)
    bodies = [b"small\r\n", b"large line\r\n" * 10_000, b"third\r\n"]

    async def main() -> None:
        store = await env.open()
        for body in bodies:
            await env.commit(body, "bob@example.test", "Carol@Example.Test")
        runner = env.runner()
        done = results_counter(runner, 3)
        await runner.start()
        await asyncio.wait_for(done.wait(), 10)
        await runner.stop()
        assert await store.list() == []
        assert list((tmp_path / "spool").glob("*.spool")) == []
        await store.close()

    run(main)
    assert env.delivered("bob@example.test") == sorted(
        stored(b, "bob@example.test") for b in bodies)
    assert env.delivered("carol@example.test") == sorted(
        stored(b, "carol@example.test") for b in bodies)


def test_commit_wakes_the_runner_immediately(tmp_path: Path) -> None:
    env = Env(tmp_path)

    async def main() -> None:
        store = await env.open()
        runner = env.runner()  # scan_interval is an hour: only the wake-up helps
        done = results_counter(runner, 1)
        await runner.start()
        await env.commit(b"wake up\r\n", "bob@example.test")
        await asyncio.wait_for(done.wait(), 10)
        await runner.stop()
        await store.close()

    run(main)
    assert env.delivered("bob@example.test") == [stored(b"wake up\r\n", "bob@example.test")]


def test_remote_recipient_without_transport_stays_deferred(tmp_path: Path) -> None:
    env = Env(tmp_path)
    buf = io.StringIO()

    async def main() -> None:
        store = await env.open()
        queue_id = await env.commit(b"mixed\r\n", "bob@example.test", "dave@remote.example")
        runner = env.runner()  # a "maildir" transport only: no "mx"
        before = time.time()
        logmod.configure("json", "info", buf)
        try:
            await runner.run_until_idle()
        finally:
            logmod.configure("json", "info", sys.stderr)
        msg = await store.get(queue_id)
        assert msg is not None
        bob, dave = msg.recipients
        assert bob.status is RcptStatus.DELIVERED
        assert bob.relay == "local" and bob.final_ts > 0
        assert dave.status is RcptStatus.DEFERRED
        assert dave.last_reply == "4.3.5 no transport for this destination"
        assert dave.attempts == 1 and dave.final_ts == 0
        # 60 s backoff, jittered by at most 15 %.
        assert before + 60 * 0.85 <= dave.next_attempt <= time.time() + 60 * 1.15
        assert await store.due(time.time(), 10) == []
        await store.close()

    run(main)
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    delivered = next(e for e in events if e["event"] == "delivered")
    assert delivered["relay"] == "local"
    assert delivered["dsn"] == "2.0.0"
    assert delivered["to"] == "<bob@example.test>"
    assert delivered["status"].startswith("sent")
    assert delivered["queue_id"]
    assert "delay" in delivered
    missing = next(e for e in events if e["event"] == "no_transport")
    assert (missing["kind"], missing["nexthop"]) == ("mx", "mx:remote.example")
    deferred = next(e for e in events if e["event"] == "deferred")
    assert (deferred["dsn"], deferred["relay"]) == ("4.3.5", "none")
    assert deferred["status"] == "deferred (no transport for this destination)"


def test_expired_recipient_fails_and_message_goes(tmp_path: Path) -> None:
    env = Env(tmp_path)
    config = QueueConfig(scan_interval=3600.0, lifetime=100.0, workers=2)

    async def main() -> None:
        store = await env.open()
        queue_id = await env.commit(b"old\r\n", "dave@remote.example")
        seen: list[RecipientResult] = []
        runner = env.runner(config, clock=lambda: time.time() + 101)
        runner.on_results.append(
            lambda m, results: seen.extend(results) if m.queue_id == queue_id else None)
        await runner.run_until_idle()
        [result] = seen
        assert result.status is RcptStatus.FAILED
        assert result.reply.startswith("5.4.7 delivery time expired")
        assert await store.get(queue_id) is None
        # The sender was sent a bounce from <>; (with this clock) it expired
        # too, and nobody hears of that: no bounce of a bounce.
        events = await store.history(queue_id)
        assert [e.event for e in events] == ["queued", "expired", "bounced", "removed"]
        assert events[1].reply == ("delivery time expired, last error: "
                                   "4.3.5 no transport for this destination")
        bounce_id = events[2].reply
        assert [e.event for e in await store.history(bounce_id)] == [
            "queued", "expired", "removed"]
        assert "from=<>" in (await store.history(bounce_id))[0].reply
        assert await store.list() == []
        await store.close()

    run(main)


def test_alias_expansion_and_unknown_mailbox(tmp_path: Path) -> None:
    env = Env(tmp_path)
    aliases = {"team@example.test": ["bob@example.test", "carol@example.test"]}

    async def resolve(address: Address) -> list[str] | None:
        return aliases.get(address.key)

    async def main() -> None:
        store = await env.open()
        await env.commit(b"to the team\r\n", "team@example.test", "ghost@example.test")
        seen: list[RecipientResult] = []
        runner = env.runner(router=Router(is_local, resolve))
        runner.on_results.append(
            lambda m, results: seen.extend(results) if m.sender else None)
        await runner.run_until_idle()
        assert [r.status for r in seen] == [RcptStatus.DELIVERED, RcptStatus.FAILED]
        assert seen[1].reply == "5.1.1 mailbox unavailable"
        await store.close()

    run(main)
    assert len(env.delivered("bob@example.test")) == 1
    assert len(env.delivered("carol@example.test")) == 1


def test_corrupt_message_is_not_delivered(tmp_path: Path) -> None:
    env = Env(tmp_path)

    async def main() -> None:
        store = await env.open()
        queue_id = await env.commit(b"y" * 100_000, "bob@example.test")
        [spool] = list((tmp_path / "spool").glob("*.spool"))
        with open(spool, "r+b") as f:  # same size, one byte changed near the end
            f.seek(99_000)
            f.write(b"z")
        await env.runner().run_until_idle()
        assert await store.state(queue_id) == "corrupt"
        await store.close()

    run(main)
    maildir = tmp_path / "mail" / "example.test" / "bob" / "Maildir"
    for sub in ("new", "tmp"):  # nothing written (the Maildir need not even exist)
        assert not (maildir / sub).exists() or list((maildir / sub).iterdir()) == []


def test_restart_resumes_undelivered_messages(tmp_path: Path) -> None:
    env = Env(tmp_path)
    bodies = [f"message {i}\r\n".encode() * (1 + 3000 * (i % 5 == 0)) for i in range(30)]

    async def first_life() -> None:
        await env.open()
        for body in bodies:
            await env.commit(body, "bob@example.test")
        # Stop part-way: one worker, stopped after the first message.
        runner = env.runner(QueueConfig(scan_interval=3600.0, workers=1))
        done = results_counter(runner, 1)
        await runner.start()
        await asyncio.wait_for(done.wait(), 10)
        await runner.stop()
        assert env.store is not None
        assert 0 < len(await env.store.list()) < 30
        await env.store.close()

    async def second_life() -> None:
        store = await env.open()
        runner = env.runner()
        remaining = len(await store.list())
        done = results_counter(runner, remaining)
        await runner.start()
        await asyncio.wait_for(done.wait(), 10)
        await runner.stop()
        assert await store.list() == []
        await store.close()

    run(first_life)
    run(second_life)
    got = env.delivered("bob@example.test")
    assert sorted(set(got)) == sorted(stored(b, "bob@example.test") for b in bodies)


class TrackingMaildir(MaildirDelivery):
    """The real Maildir transport, recording how many deliveries overlap."""

    def __init__(self, mail_dir: Path) -> None:
        super().__init__(mail_dir)
        self.active: dict[str, int] = {}
        self.max_total = 0
        self.max_same = 0

    async def deliver(self, mailbox: str, sender: str,
                      message: AsyncIterable[bytes]) -> DeliveryResult:
        self.active[mailbox] = self.active.get(mailbox, 0) + 1
        self.max_same = max(self.max_same, self.active[mailbox])
        self.max_total = max(self.max_total, sum(self.active.values()))
        try:
            await asyncio.sleep(0.01)  # hold the worker so deliveries overlap
            return await super().deliver(mailbox, sender, message)
        finally:
            self.active[mailbox] -= 1


def assert_each_once(env: Env, tracking: TrackingMaildir, n: int, workers: int) -> None:
    """user0..user{n-1} got one copy each; ``workers`` deliveries ran at
    once at most, never two of one message."""
    assert tracking.max_total == workers
    assert tracking.max_same == 1
    for i in range(n):
        assert len(env.delivered(f"user{i}@example.test")) == 1


def test_workers_bound_concurrency_and_never_share_a_message(tmp_path: Path) -> None:
    env = Env(tmp_path)
    tracking = TrackingMaildir(env.mail)

    async def main() -> None:
        store = await env.open()
        for i in range(12):
            await env.commit(b"m\r\n", f"user{i}@example.test")
        runner = env.runner(QueueConfig(scan_interval=3600.0, workers=3), maildir=tracking)
        done = results_counter(runner, 12)
        await runner.start()
        for _ in range(20):  # try hard to make it dispatch in-flight messages again
            runner.wake()
            await asyncio.sleep(0.002)
        await asyncio.wait_for(done.wait(), 10)
        await runner.stop()
        await store.close()

    run(main)
    assert_each_once(env, tracking, 12, workers=3)


def test_messages_committed_while_every_worker_is_busy_are_delivered_once(
        tmp_path: Path) -> None:
    """Handed over at commit: with its workers busy the runner leaves them
    to the scan that follows a delivery (which also finds those in flight),
    and never starts one twice."""
    env = Env(tmp_path)
    tracking = TrackingMaildir(env.mail)

    async def main() -> None:
        store = await env.open()
        runner = env.runner(QueueConfig(scan_interval=3600.0, workers=2), maildir=tracking)
        done = results_counter(runner, 30)
        await runner.start()
        for burst in range(3):
            await asyncio.gather(*(env.commit(b"m\r\n", f"user{burst * 10 + i}@example.test")
                                   for i in range(10)))
        await asyncio.wait_for(done.wait(), 10)
        await runner.stop()
        assert await store.list() == []
        await store.close()

    run(main)
    assert_each_once(env, tracking, 30, workers=2)


def test_a_late_hand_over_of_a_message_a_scan_delivered_is_ignored(tmp_path: Path) -> None:
    """A worker's pipe line read after a scan already delivered the message
    (the main process was behind): the message is not delivered twice."""
    env = Env(tmp_path)

    async def main() -> None:
        store = await env.open()
        # Before the runner: no hand-over.  Bob's copy is delivered, Dave's
        # deferred (no "mx" transport here): the message stays queued.
        await env.commit(b"once\r\n", "bob@example.test", "dave@remote.example")
        [msg] = await store.due(time.time() + 1, 10)
        runner = env.runner()
        done = results_counter(runner, 1)
        await runner.start()  # its first scan delivers it
        await asyncio.wait_for(done.wait(), 10)
        runner.hand_over(msg)  # the late line
        await asyncio.sleep(0.3)
        await runner.stop()
        left = await store.get(msg.queue_id)
        assert left is not None and left.recipients[1].attempts == 1
        await store.close()

    run(main)
    assert env.delivered("bob@example.test") == [stored(b"once\r\n", "bob@example.test")]


@pytest.mark.parametrize(("attempts", "delay"), [
    (1, 60.0), (2, 120.0), (3, 240.0), (4, 480.0), (5, 960.0), (6, 1920.0),
    (7, 3600.0), (8, 3600.0), (5000, 3600.0), (0, 60.0),
])
def test_backoff_table(attempts: int, delay: float) -> None:
    assert schedule.backoff(attempts, 60.0, 3600.0) == delay
    assert schedule.next_attempt(attempts, 1000.0, 60.0, 3600.0) == 1000.0 + delay


@pytest.mark.parametrize(("retry_min", "retry_max", "attempts", "delay"), [
    (0.0, 0.0, 1, schedule.RETRY_FLOOR),  # never a busy loop
    (0.0, 10.0, 3, 4.0),
    (300.0, 60.0, 4, 300.0),  # max below min: min wins
])
def test_backoff_edge_cases(retry_min: float, retry_max: float, attempts: int,
                            delay: float) -> None:
    assert schedule.backoff(attempts, retry_min, retry_max) == delay


def test_jitter_spreads_retries_reproducibly() -> None:
    times = [schedule.next_attempt(3, 0.0, 60.0, 3600.0, random.Random(seed))
             for seed in range(200)]
    assert all(240 * (1 - schedule.JITTER) <= t <= 240 * (1 + schedule.JITTER) for t in times)
    assert len(set(times)) > 150  # spread out, not one instant
    assert times == [schedule.next_attempt(3, 0.0, 60.0, 3600.0, random.Random(seed))
                     for seed in range(200)]
    assert schedule.jittered(0.5, random.Random(1)) == schedule.RETRY_FLOOR


@pytest.mark.parametrize(("received", "now", "delay_warning", "expected"), [
    (0.0, 99.0, 100.0, False), (0.0, 100.0, 100.0, True), (0.0, 1e9, 0.0, False)])
def test_delay_warning_due_table(received: float, now: float, delay_warning: float,
                                 expected: bool) -> None:
    assert schedule.delay_warning_due(received, now, delay_warning) is expected


@pytest.mark.parametrize(("received", "now", "lifetime", "expected"), [
    (0.0, 99.0, 100.0, False),
    (0.0, 100.0, 100.0, True),
    (0.0, 5 * 86400.0, 5 * 86400.0, True),
    (1000.0, 0.0, 100.0, False),  # clock went backwards: not expired
])
def test_expired_table(received: float, now: float, lifetime: float, expected: bool) -> None:
    assert schedule.expired(received, now, lifetime) is expected


SMARTHOST = DeliveryConfig(
    smarthost=SmarthostConfig(parse_nexthop("smtp:[192.0.2.25]:587")),
    transports={"lmtp.example": parse_nexthop("lmtp:unix:/run/dovecot/lmtp"),
                "example.test": parse_nexthop("lmtp:[127.0.0.1]:24"),
                "direct.example": parse_nexthop("smtp:[192.0.2.7]:2525"),
                "own-mx.example": parse_nexthop("mx"),
                "files.example": parse_nexthop("maildir"),
                ".sub.example": parse_nexthop("smtp:relay.example")})


@pytest.mark.parametrize(("delivery", "address", "key", "mailboxes"), [
    (DeliveryConfig(), "Bob@EXAMPLE.test", "maildir", ("bob@example.test",)),
    (DeliveryConfig(), "postmaster", "maildir", ("postmaster",)),
    (DeliveryConfig(), "x@Remote.Example.", "mx:remote.example", ()),
    (SMARTHOST, "x@remote.example", "smtp:[192.0.2.25]:587", ()),
    (SMARTHOST, "x@lmtp.example", "lmtp:unix:/run/dovecot/lmtp", ()),
    (SMARTHOST, "bob@example.test", "lmtp:[127.0.0.1]:24", ()),  # override beats local
    (SMARTHOST, "x@direct.example", "smtp:[192.0.2.7]:2525", ()),
    (SMARTHOST, "x@own-mx.example", "mx:own-mx.example", ()),  # override beats smarthost
    (SMARTHOST, "X@files.example", "maildir", ("x@files.example",)),
    (SMARTHOST, "x@a.sub.example", "smtp:relay.example:25", ()),  # parent-domain key
    (SMARTHOST, "x@sub.example", "smtp:[192.0.2.25]:587", ()),  # ".sub" is not "sub"
])
def test_routing_table(delivery: DeliveryConfig, address: str, key: str,
                       mailboxes: tuple[str, ...]) -> None:
    route = run(lambda: Router(is_local, delivery=delivery).route(address))
    assert (route.nexthop.key, route.mailboxes) == (key, mailboxes)
    assert route.local is (key == "maildir")


def test_transport_for_prefers_the_exact_domain() -> None:
    hops = {"a.example": Nexthop("maildir"), ".a.example": Nexthop("mx")}
    assert transport_for("a.example", hops) == Nexthop("maildir")
    assert transport_for("b.a.example", hops) == Nexthop("mx")
    assert transport_for("example", hops) is None
    assert transport_for("", hops) is None


def test_router_lookups() -> None:
    async def async_local(domain: str) -> bool:
        return domain == LOCAL

    async def resolve(address: Address) -> list[str] | None:
        return {"team@example.test": ["bob@example.test", "carol@example.test"]}.get(
            address.key)

    async def main() -> None:
        assert domain_of("Bob@Example.TEST.") == "example.test"
        router = Router(async_local, resolve)
        assert await router.route("Team@EXAMPLE.test") == Route(
            Nexthop("maildir"), "example.test", ("bob@example.test", "carol@example.test"))
        assert await router.route("ghost@example.test") == Route(
            Nexthop("maildir"), "example.test", ())
        assert await router.route("x@remote.example") == Route(
            Nexthop("mx", host="remote.example"), "remote.example")

    run(main)


def test_spool_and_mail_dirs_are_private(tmp_path: Path) -> None:
    env = Env(tmp_path)

    async def main() -> None:
        store = await env.open()
        await env.commit(b"p\r\n", "bob@example.test")
        await env.runner().run_until_idle()
        await store.close()

    run(main)
    for d in (tmp_path / "spool", tmp_path / "mail" / "example.test"):
        assert os.stat(d).st_mode & 0o077 == 0


class StuckMaildir(MaildirDelivery):
    """The real transport, but the first delivery hangs until cancelled."""

    def __init__(self, mail_dir: Path) -> None:
        super().__init__(mail_dir)
        self.entered = asyncio.Event()

    async def deliver(self, mailbox: str, sender: str,
                      message: AsyncIterable[bytes]) -> DeliveryResult:
        self.entered.set()
        await asyncio.Event().wait()
        return await super().deliver(mailbox, sender, message)


def test_stop_timeout_cancels_and_the_message_stays_queued(tmp_path: Path) -> None:
    env = Env(tmp_path)

    async def main() -> None:
        store = await env.open()
        queue_id = await env.commit(b"slow\r\n", "bob@example.test")
        stuck = StuckMaildir(env.mail)
        runner = env.runner(maildir=stuck)
        await runner.start()
        await asyncio.wait_for(stuck.entered.wait(), 10)
        await runner.stop(timeout=0.05)
        msg = await store.get(queue_id)
        assert msg is not None and msg.recipients[0].status is RcptStatus.QUEUED
        # The next life delivers it.
        await env.runner().run_until_idle()
        assert await store.get(queue_id) is None
        await store.close()

    run(main)
    assert env.delivered("bob@example.test") == [stored(b"slow\r\n", "bob@example.test")]
