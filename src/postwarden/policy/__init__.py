"""Policy checks: small async functions registered for a stage of the session.

A check gets a :class:`CheckContext` and returns a :class:`Verdict` with one
of four outcomes (accept, no opinion, reject, tempfail).  :class:`Policy`
runs the checks of a stage in order until one gives a final verdict.  A
check that raises or times out is a temporary failure (4xx), never an accept
and never a 5xx: temporary unless proven permanent.

Security exposure: this is where relaying and sender spoofing are refused;
a stage whose checks all have no opinion falls back to the stage's default,
which for recipients is *reject* (deny by default).
"""

from __future__ import annotations

import asyncio
import enum
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from postwarden import reply as R
from postwarden.config import Config, ListenerConfig
from postwarden.envelope import ConnectionInfo, Envelope, MailParams, RcptParams
from postwarden.observe.log import get_logger
from postwarden.smtp.address import Path
from postwarden.storage.base import Directory

log = get_logger("policy")

CHECK_TIMEOUT = 30.0

T = TypeVar("T")


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], first: Any) -> Generator[Any, Any, T]:
    """Await the rest of ``coro``, which has already yielded ``first`` to
    its first ``send`` (what ``yield from`` does after its first step):
    values go up to the task, results and exceptions (cancellation) down."""
    value = first
    while True:
        try:
            sent = yield value
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                value = coro.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                value = coro.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


async def bounded(awaitable: Awaitable[T], deadline: list[float]) -> T:
    """Await a check or handler under a shared deadline, without arming a
    timer for one that finishes without waiting.

    Most checks answer from memory or a local database and never suspend;
    an ``asyncio.timeout`` around each stage cost a timer, a context
    manager and two task look-ups per stage (several per message).  The
    coroutine is run to its first suspension here; only one that waits
    (DNS, a socket) continues under ``asyncio.timeout_at``.  ``deadline``
    holds the stage's deadline once one is needed (empty before): all the
    checks of a stage share one CHECK_TIMEOUT, counted from the first
    wait."""
    coro = awaitable if isinstance(awaitable, types.CoroutineType) else None
    if coro is None:  # not a native coroutine: the general path
        if not deadline:
            deadline.append(asyncio.get_running_loop().time() + CHECK_TIMEOUT)
        async with asyncio.timeout_at(deadline[0]):
            return await awaitable
    try:
        first = coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    if not deadline:
        deadline.append(asyncio.get_running_loop().time() + CHECK_TIMEOUT)
    async with asyncio.timeout_at(deadline[0]):
        return await _resume(coro, first)


class Stage(enum.Enum):
    CONNECT = "connect"  # before the greeting: a refusal closes the connection
    HELO = "helo"
    AUTH = "auth"  # after a correct password, before 235: a refusal is a 535
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class Event(enum.Enum):
    """What happened in a session, for the handlers that count and ban.

    Handlers get the context and keyword data and may return a reply that
    ends the session (421 or 554, e.g. when a client was just banned)."""

    AUTH_FAILED = "auth_failed"  # data: username
    AUTH_OK = "auth_ok"  # data: username
    RCPT_REJECTED = "rcpt_rejected"  # data: address, reply
    ACCEPTED = "accepted"  # data: queue_id, recipients (count), size
    PREGREET = "pregreet"  # the client spoke before the greeting
    HTTP = "http"  # the client spoke HTTP to the SMTP port
    DISCONNECT = "disconnect"


@dataclass(slots=True)
class CheckContext:
    """What a check may look at.  ``path``/``params`` are those of the
    command being checked (MAIL or RCPT)."""

    config: Config
    listener: ListenerConfig
    conn: ConnectionInfo
    directory: Directory
    envelope: Envelope | None = None
    path: Path | None = None
    mail_params: MailParams | None = None
    rcpt_params: RcptParams | None = None
    # Filled by the recipient check: the local mailboxes or the relayed address.
    targets: list[str] = field(default_factory=list)
    # For Stage.AUTH: the account that just gave a correct password.
    username: str = ""


Check = Callable[[CheckContext], Awaitable[R.Verdict]]
Handler = Callable[..., Awaitable[R.Reply | None]]


class Policy:
    """The ordered checks of every stage, and each stage's default verdict."""

    def __init__(self) -> None:
        self.checks: dict[Stage, list[Check]] = {s: [] for s in Stage}
        self.defaults: dict[Stage, R.Verdict] = {s: R.accept("default") for s in Stage}
        self.handlers: dict[Event, list[Handler]] = {e: [] for e in Event}

    def register(self, stage: Stage, check: Check) -> None:
        self.checks[stage].append(check)

    def on(self, event: Event, handler: Handler) -> None:
        self.handlers[event].append(handler)

    async def emit(self, event: Event, ctx: CheckContext, **data: object) -> R.Reply | None:
        """Tell every handler; the first reply a handler returns ends the
        session.  A failing handler is logged and ignored (events only count);
        all of them together get CHECK_TIMEOUT seconds."""
        handlers = self.handlers[event]
        if not handlers:
            return None
        first: R.Reply | None = None
        # One deadline for all the handlers, as for the checks of a stage.
        deadline: list[float] = []
        for handler in handlers:
            try:
                reply = await bounded(handler(ctx, **data), deadline)
            except Exception as exc:
                self._handler_failed(event, handler, ctx, exc)
                if isinstance(exc, TimeoutError) and deadline and (
                        asyncio.get_running_loop().time() >= deadline[0]):
                    break  # the shared deadline has passed: no more handlers
                continue
            if reply is not None and first is None:
                first = reply
        return first

    @staticmethod
    def _handler_failed(event: Event, handler: Handler | None, ctx: CheckContext,
                        exc: BaseException) -> None:
        log.error("event_handler_failed", on=event.value,
                  handler=getattr(handler, "__name__", repr(handler)),
                  session=ctx.conn.session_id, error=f"{type(exc).__name__}: {exc}")

    async def run(self, stage: Stage, ctx: CheckContext) -> R.Verdict:
        checks = self.checks[stage]
        if not checks:
            return self.defaults[stage]
        current: Check | None = None
        # One deadline for the whole stage, not one timer per check.
        deadline: list[float] = []
        try:
            for current in checks:
                verdict = await bounded(current(ctx), deadline)
                if verdict.final:
                    if verdict.outcome is not R.Outcome.ACCEPT and verdict.reply is None:
                        return R.Verdict(verdict.outcome, R.TEMP_FAILURE if verdict.outcome
                                         is R.Outcome.TEMPFAIL else R.ACCESS_DENIED,
                                         verdict.reason)
                    return verdict
        except TimeoutError:
            name = getattr(current, "__name__", repr(current))
            log.warning("check_timeout", check=name, session=ctx.conn.session_id)
            return R.tempfail(f"{name} timed out")
        except Exception as exc:  # a broken check must not accept mail
            name = getattr(current, "__name__", repr(current))
            log.error("check_failed", check=name, session=ctx.conn.session_id,
                      error=f"{type(exc).__name__}: {exc}")
            return R.tempfail(f"{name} failed")
        return self.defaults[stage]


def default_policy() -> Policy:
    """The checks every installation runs (deny by default for recipients)."""
    from postwarden.policy import relay, sender

    policy = Policy()
    policy.register(Stage.MAIL, sender.require_auth_on_submission)
    policy.register(Stage.MAIL, sender.bind_sender_to_login)
    policy.register(Stage.RCPT, relay.check_recipient)
    policy.defaults[Stage.RCPT] = R.reject(R.RELAY_DENIED, "no check accepted the recipient")
    return policy
