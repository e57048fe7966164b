"""The queue runner (Postfix's qmgr): takes due messages from the store,
routes each recipient, hands them to the transports, queues the DSNs owed
and records the results.

* On start it delivers everything due, so after a restart every queued,
  undelivered message resumes.
* A message committed in this process is handed over as it is committed
  (``store.on_queued``), one a worker process committed comes over its
  pipe (:mod:`postwarden.queue.handover`), and its delivery starts at once,
  without reading it back.  A commit it only hears of (``store.on_commit``
  of a store that cannot hand messages over) starts a scan of the store for
  due messages.  It also scans every ``scan_interval`` seconds, and when a
  delivery ends while due messages were left waiting for a free worker.
* Up to ``workers`` messages are delivered concurrently; a message is never
  delivered by two workers at once.  Within a message, recipients that
  share a next hop (``Nexthop.key``) go in one :class:`DeliveryJob` (one
  connection, one copy of the data), and the jobs run in parallel.
* The transport is chosen by ``Nexthop.kind`` (``maildir``, ``smtp``,
  ``mx``, ``lmtp``); a kind without a transport is a configuration error:
  its recipients are deferred (4.3.5) and stay queued, never bounced.
* Results go back to the store only after the transport finished (Maildir:
  file fsync'ed and renamed into ``new/``): delivery is at least once.
  Bounces are committed before the failures they report
  (:mod:`postwarden.queue.bounce`).
* Deferred recipients are retried with jittered backoff
  (:mod:`postwarden.queue.schedule`); past the queue lifetime they fail
  with 5.4.7, quoting the last temporary error.

Every attempt is logged as one line, ``delivered`` / ``deferred`` /
``failed``, with queue_id, rcpt, relay, delay, dsn and status, as Postfix's
``to=<...>, relay=..., delay=..., dsn=..., status=...``.

Security exposure: none directly; it moves trusted queue records between
the store and the transports, which validate what they write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, cast, runtime_checkable

from postwarden.config import QueueConfig
from postwarden.delivery.result import DeliveryResult, DeliveryStatus
from postwarden.delivery.router import Route, Router
from postwarden.delivery.transport import DeliveryJob, Nexthop, Transport
from postwarden.observe.log import get_logger
from postwarden.queue import schedule
from postwarden.queue.bounce import Attempt, Notices, Notifier
from postwarden.storage.base import (
    LeasingStore,
    QueuedMessage,
    QueuedRecipient,
    QueueStore,
    RcptStatus,
    RecipientResult,
    StorageError,
)

log = get_logger("queue")

STOP_TIMEOUT = 30.0
# How long a finished delivery is remembered, so that a late hand-over of a
# message a scan already delivered does not deliver it again (hand_over).
FINISHED_KEEP = 120.0
ROUTE_FAILED = DeliveryResult.deferred("4.3.0", "routing lookup failed", relay="none")
NO_TRANSPORT = DeliveryResult.deferred("4.3.5", "no transport for this destination",
                                       relay="none")
TRANSPORT_FAILED = DeliveryResult.deferred("4.3.0", "delivery failed temporarily",
                                           relay="none")
_STATUS_TEXT = {"delivered": "sent", "deferred": "deferred", "failed": "bounced"}

ResultHook = Callable[[QueuedMessage, list[RecipientResult]], None]


@runtime_checkable
class CommitNotifier(Protocol):
    """A store that calls back on every commit (the runner wakes on it)."""

    on_commit: list[Callable[[str], None]]


@runtime_checkable
class HandOver(Protocol):
    """A store that hands each message it commits to the runner (as
    :meth:`~postwarden.storage.base.QueueStore.due` would return it)."""

    on_queued: list[Callable[[QueuedMessage], None]]


class QueueRunner:
    """Delivers the queue.  ``transports`` maps ``Nexthop.kind`` to the
    transport for it; ``hostname`` names us in DSNs (Reporting-MTA, From:
    MAILER-DAEMON@hostname); ``rng`` spreads retry times (a seeded
    :class:`random.Random` makes them reproducible in tests)."""

    def __init__(self, store: QueueStore, router: Router, transports: Mapping[str, Transport],
                 config: QueueConfig, *, hostname: str,
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.router = router
        self.transports = dict(transports)
        self.config = config
        self.hostname = hostname
        self.clock = clock
        self.rng = rng or random.Random()
        self.notifier = Notifier(store, config, hostname=hostname)
        # Called on the loop after each message's results are recorded.
        self.on_results: list[ResultHook] = []
        # Told +1 when a delivery starts and -1 when it ends (the main
        # process's load, smtp/steering.py).
        self.on_load: Callable[[int], None] | None = None
        self._wake = asyncio.Event()
        # Checked once: isinstance() against a Protocol walks its attributes.
        self._leasing = isinstance(store, LeasingStore)
        # Handed over at commit (not for a shared queue: there, due work is
        # claimed with a lease, whichever node committed it).
        self._handed = isinstance(store, HandOver) and not self._leasing
        # Due messages may be waiting for a free worker: scan again when a
        # delivery ends.
        self._backlog = False
        # Deliveries ended lately (queue id -> time.monotonic()), oldest first.
        self._finished: dict[str, float] = {}
        self._in_flight: dict[str, asyncio.Task[bool]] = {}
        self._releasing: set[asyncio.Future[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- life cycle -----------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._stopping = False
        if self._handed:
            assert isinstance(self.store, HandOver)
            self.store.on_queued.append(self.hand_over)
        elif isinstance(self.store, CommitNotifier):
            self.store.on_commit.append(self.wake)
        self._task = asyncio.create_task(self._run(), name="queue-runner")

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop taking work; wait up to ``timeout`` for deliveries in flight
        (those cancelled stay queued and are retried after the restart)."""
        self._stopping = True
        if self._handed:
            assert isinstance(self.store, HandOver)
            with contextlib.suppress(ValueError):
                self.store.on_queued.remove(self.hand_over)
        elif isinstance(self.store, CommitNotifier):
            with contextlib.suppress(ValueError):
                self.store.on_commit.remove(self.wake)
        task, self._task = self._task, None
        if task is not None:
            self._wake.set()
            await task
        pending = list(self._in_flight.values())
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late)
                log.warning("runner_stop_timeout", cancelled=len(late))
        for transport in {id(t): t for t in self.transports.values()}.values():
            close = getattr(transport, "close", None)  # e.g. cached connections
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

    def wake(self, queue_id: str | None = None) -> None:
        """Look for due messages now (call on the event loop)."""
        self._wake.set()

    def hand_over(self, msg: QueuedMessage) -> None:
        """A message just committed, here or by a worker process: deliver
        it now if a worker is free, else leave it to the scan that follows
        (it is in the store).

        A scan may have found the message first: it is then in flight, or
        it ended less than FINISHED_KEEP seconds ago (remembered), and is
        not started again.  A message handed over later than that after its
        arrival is left to the scans (they deliver anything due)."""
        if self._stopping or self._task is None:
            return
        queue_id = msg.queue_id
        if queue_id in self._in_flight or queue_id in self._finished:
            return
        if time.time() - msg.received_at > FINISHED_KEEP / 2:
            self._wake.set()
            return
        if len(self._in_flight) < self.config.workers:
            self._start(msg)
        else:
            self._backlog = True
            self._wake.set()

    # -- scheduling -------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self.dispatch()
            except Exception as exc:  # keep running; the next scan retries
                log.error("queue_scan_failed", error=str(exc) or repr(exc))
            if self._stopping:
                break
            # asyncio.timeout, not wait_for: no task per wait.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.scan_interval):
                    await self._wake.wait()

    async def dispatch(self) -> int:
        """Start deliveries for due messages, up to the free workers."""
        free = self.config.workers - len(self._in_flight)
        if free <= 0:
            self._backlog = True
            return 0
        if self._leasing:
            # A shared queue: claim (lease) no more than we start now.
            due = await cast(LeasingStore, self.store).claim(self.clock(), free)
            self._backlog = len(due) >= free
        else:
            # Messages in flight are still due until their results are
            # stored: left out, not read again.
            due = await self.store.due(self.clock(), free, self._in_flight.keys())
            self._backlog = len(due) >= free
        started = 0
        for msg in due:
            if msg.queue_id in self._in_flight:
                continue
            if started >= free or self._stopping:
                self._backlog = True  # due, and no worker for it now
                break
            self._start(msg)
            started += 1
        return started

    def _start(self, msg: QueuedMessage) -> None:
        task = asyncio.create_task(self._deliver_message(msg), name=f"deliver-{msg.queue_id}")
        self._in_flight[msg.queue_id] = task
        task.add_done_callback(functools.partial(self._done, msg.queue_id))
        if self.on_load is not None:
            self.on_load(1)

    def _done(self, queue_id: str, task: asyncio.Task[bool]) -> None:
        self._in_flight.pop(queue_id, None)
        if self.on_load is not None:
            self.on_load(-1)
        if self._handed:
            self._remember(queue_id)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # a bug: the message stays queued, retried at the next scan
            log.error("delivery_crashed", queue_id=queue_id, error=repr(exc))
        if (exc is not None or not task.result()) and self._leasing:
            # Its lease would otherwise be renewed as long as we run.
            release = asyncio.ensure_future(self._release(queue_id))
            self._releasing.add(release)
            release.add_done_callback(self._releasing.discard)
        elif exc is None and task.result() and (self._backlog or not self._handed):
            # Refill the freed worker now, if messages may be waiting for it
            # (handed-over ones never do); not after a failed record, when
            # the message is still due and would be retried in a tight loop.
            self._wake.set()

    def _remember(self, queue_id: str) -> None:
        """Keep a finished delivery's id for FINISHED_KEEP seconds (see
        :meth:`hand_over`)."""
        now = time.monotonic()
        finished = self._finished
        finished.pop(queue_id, None)  # to the end: the dict stays oldest first
        finished[queue_id] = now
        while finished:
            oldest = next(iter(finished))
            if now - finished[oldest] <= FINISHED_KEEP:
                break
            del finished[oldest]

    async def _release(self, queue_id: str) -> None:
        try:
            await cast(LeasingStore, self.store).release(queue_id)
        except Exception as exc:  # the lease expires by itself
            log.error("release_failed", queue_id=queue_id, error=str(exc) or repr(exc))

    async def run_until_idle(self) -> None:
        """Deliver everything due now and wait for it (tests, ``queue flush``)."""
        while True:
            await self.dispatch()
            if not self._in_flight:
                return
            await asyncio.wait(list(self._in_flight.values()))

    # -- delivery ---------------------------------------------------------------

    async def _deliver_message(self, msg: QueuedMessage) -> bool:
        routes = [await self._route(msg, rcpt) for rcpt in msg.recipients]
        outcomes = await self._run_jobs(msg, routes)
        now = self.clock()
        attempts = [self._expire(msg, Attempt(rcpt, result, route.nexthop if route else None,
                                              len(route.mailboxes) if route else 0), now)
                    for rcpt, route, result in zip(msg.recipients, routes, outcomes, strict=True)]
        notices = await self.notifier.notify(msg, attempts, now)
        results = [self._record(msg, a, notices, now) for a in attempts]
        try:
            await self.store.record_results(msg.queue_id, results, notices.events)
        except StorageError as exc:
            # The transport succeeded, so this may cause a duplicate later
            # (at least once), never a loss.
            log.error("record_failed", queue_id=msg.queue_id, error=str(exc))
            return False
        for hook in list(self.on_results):
            try:
                hook(msg, results)
            except Exception as exc:
                log.error("on_results_failed", queue_id=msg.queue_id, error=repr(exc))
        return True

    async def _route(self, msg: QueuedMessage, rcpt: QueuedRecipient) -> Route | None:
        try:
            return await self.router.route(rcpt.address)
        except Exception as exc:  # a lookup failure is temporary, never a bounce
            log.warning("route_failed", queue_id=msg.queue_id, rcpt=rcpt.address, error=repr(exc))
            return None

    async def _run_jobs(self, msg: QueuedMessage, routes: Sequence[Route | None]
                        ) -> list[DeliveryResult]:
        """One job per next hop, in parallel; results in recipient order."""
        out: list[DeliveryResult] = [ROUTE_FAILED] * len(routes)
        groups: dict[str, tuple[Nexthop, list[int]]] = {}
        for i, route in enumerate(routes):
            if route is not None:
                groups.setdefault(route.nexthop.key, (route.nexthop, []))[1].append(i)
        jobs = [self._run_job(msg, hop, [msg.recipients[i] for i in idx])
                for hop, idx in groups.values()]
        # One next hop (nearly every message): awaited here, without the
        # task that gather() would create for it.
        answers = [await jobs[0]] if len(jobs) == 1 else await asyncio.gather(*jobs)
        for (_, idx), results in zip(groups.values(), answers, strict=True):
            for i, result in zip(idx, results, strict=True):
                out[i] = result
        return out

    async def _run_job(self, msg: QueuedMessage, hop: Nexthop,
                       rcpts: list[QueuedRecipient]) -> list[DeliveryResult]:
        transport = self.transports.get(hop.kind)
        if transport is None:
            log.error("no_transport", queue_id=msg.queue_id, nexthop=hop.key, kind=hop.kind)
            return [NO_TRANSPORT] * len(rcpts)
        queue_id = msg.queue_id
        job = DeliveryJob(msg, rcpts, hop, lambda: self.store.read_message(queue_id))
        try:
            results = await transport.deliver(job)
        except Exception as exc:  # a transport bug: temporary, never a bounce
            log.error("transport_crashed", queue_id=queue_id, nexthop=hop.key, error=repr(exc))
            return [TRANSPORT_FAILED] * len(rcpts)
        if len(results) != len(rcpts):
            log.error("transport_result_count", queue_id=queue_id, nexthop=hop.key,
                      expected=len(rcpts), got=len(results))
            results = [*results[: len(rcpts)],
                       *[TRANSPORT_FAILED] * (len(rcpts) - len(results))]
        return results

    def _expire(self, msg: QueuedMessage, a: Attempt, now: float) -> Attempt:
        """Past the lifetime, a deferral becomes a failure (RFC 3463 5.4.7)
        that still says what went wrong last."""
        result = a.result
        if (result.status is DeliveryStatus.DEFERRED
                and schedule.expired(msg.received_at, now, self.config.lifetime)):
            a.result = DeliveryResult.failed(
                "5.4.7", f"delivery time expired, last error: {result.reply}",
                relay=result.relay)
            a.expired = True
        return a

    def _record(self, msg: QueuedMessage, a: Attempt, notices: Notices,
                now: float) -> RecipientResult:
        rcpt, result = a.rcpt, a.result
        event = result.status.value
        history = "expired" if a.expired else ""
        status_text = f"{history or _STATUS_TEXT[event]} ({result.text})"
        status = result.rcpt_status
        next_attempt = 0.0
        if result.status is DeliveryStatus.FAILED and rcpt.id in notices.unsent:
            # No bounce could be queued: keep the recipient rather than
            # record a failure nobody is told about; it is retried.
            status, event, history = RcptStatus.DEFERRED, "deferred", ""
            status_text = f"deferred (bounce not queued; {result.text})"
        if status is RcptStatus.DEFERRED:
            next_attempt = schedule.next_attempt(rcpt.attempts + 1, now, self.config.retry_min,
                                                 self.config.retry_max, self.rng)
        relay = result.relay or "none"
        # Postfix's delivery line: to=<...>, relay=..., delay=..., dsn=..., status=...
        log.info(event, queue_id=msg.queue_id, to=f"<{rcpt.address}>", relay=relay,
                 delay=round(now - msg.received_at, 2), attempts=rcpt.attempts + 1,
                 dsn=result.dsn, status=status_text)
        return RecipientResult(rcpt.id, status, result.reply, next_attempt, relay=relay,
                               event=history, warned=rcpt.id in notices.warned)
