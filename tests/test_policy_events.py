"""Policy events (policy/__init__.py Policy.emit): every handler is told,
a failing one is logged and skipped, and the first reply wins."""

from __future__ import annotations

import asyncio
import io
import types
from typing import Any, cast

import pytest
from tests.conftest import json_log_events

import postwarden.policy as policy_mod
from postwarden import reply as R
from postwarden.policy import CheckContext, Event, Policy

CTX = cast(CheckContext, types.SimpleNamespace(conn=types.SimpleNamespace(session_id="S1")))
BYE = R.Reply(421, "4.7.0", "bye")


def failures(buf: io.StringIO) -> list[dict[str, Any]]:
    return [e for e in json_log_events(buf) if e["event"] == "event_handler_failed"]


def test_a_failing_handler_is_skipped_and_the_others_still_run(log_lines: io.StringIO) -> None:
    told: list[str] = []

    async def broken(ctx: CheckContext, **data: Any) -> R.Reply | None:
        raise RuntimeError("boom")

    async def counting(ctx: CheckContext, **data: Any) -> R.Reply | None:
        told.append(str(data["queue_id"]))
        return BYE

    async def later(ctx: CheckContext, **data: Any) -> R.Reply | None:
        told.append("later")
        return R.Reply(554, "5.7.1", "not this one")

    p = Policy()
    for h in (broken, counting, later):
        p.on(Event.ACCEPTED, h)
    assert asyncio.run(p.emit(Event.ACCEPTED, CTX, queue_id="Q1")) is BYE
    assert told == ["Q1", "later"]
    [failed] = failures(log_lines)
    assert (failed["handler"], failed["error"]) == ("broken", "RuntimeError: boom")


def test_handlers_that_hang_are_cut_off(monkeypatch: pytest.MonkeyPatch,
                                        log_lines: io.StringIO) -> None:
    monkeypatch.setattr(policy_mod, "CHECK_TIMEOUT", 0.2)

    async def hangs(ctx: CheckContext, **data: Any) -> R.Reply | None:
        await asyncio.sleep(60)
        return None

    p = Policy()
    p.on(Event.DISCONNECT, hangs)
    assert asyncio.run(asyncio.wait_for(p.emit(Event.DISCONNECT, CTX), 5)) is None
    [failed] = failures(log_lines)
    assert (failed["handler"], failed["error"], failed["on"]) == ("hangs", "TimeoutError: ",
                                                                  "disconnect")


# -- Policy.run: the checks of a stage, run to their first wait without a timer ----------


def _run_stage(p: Policy, timeout: float = 5) -> R.Verdict:
    return asyncio.run(asyncio.wait_for(p.run(policy_mod.Stage.MAIL, CTX), timeout))


def test_checks_that_wait_and_checks_that_do_not_run_in_order() -> None:
    order: list[str] = []

    async def instant(ctx: CheckContext) -> R.Verdict:
        order.append("instant")
        return R.NO_OPINION

    async def waits(ctx: CheckContext) -> R.Verdict:
        order.append("waits")
        for _ in range(3):  # several suspensions, each resumed with its result
            await asyncio.sleep(0.01)
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, fut.set_result, "ready")
        order.append(await fut)
        return R.NO_OPINION

    async def decides(ctx: CheckContext) -> R.Verdict:
        order.append("decides")
        return R.reject(R.ACCESS_DENIED, "no")

    p = Policy()
    for check in (instant, waits, decides, instant):
        p.register(policy_mod.Stage.MAIL, check)
    verdict = _run_stage(p)
    assert verdict.outcome is R.Outcome.REJECT and verdict.reason == "no"
    assert order == ["instant", "waits", "ready", "decides"]


def test_an_exception_thrown_into_a_waiting_check_reaches_it() -> None:
    async def catches(ctx: CheckContext) -> R.Verdict:
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, fut.set_exception, OSError("gone"))
        try:
            await fut
        except OSError as exc:
            return R.tempfail(f"lookup failed: {exc}")
        return R.accept("unreachable")

    p = Policy()
    p.register(policy_mod.Stage.MAIL, catches)
    verdict = _run_stage(p)
    assert (verdict.outcome, verdict.reason) == (R.Outcome.TEMPFAIL, "lookup failed: gone")
    assert verdict.reply == R.TEMP_FAILURE


def test_a_stage_shares_one_deadline_counted_from_its_first_wait(
        monkeypatch: pytest.MonkeyPatch, log_lines: io.StringIO) -> None:
    monkeypatch.setattr(policy_mod, "CHECK_TIMEOUT", 0.3)

    async def slowish(ctx: CheckContext) -> R.Verdict:
        await asyncio.sleep(0.2)  # each alone is within the timeout ...
        return R.NO_OPINION

    p = Policy()
    p.register(policy_mod.Stage.MAIL, slowish)
    p.register(policy_mod.Stage.MAIL, slowish)  # ... both together are not
    verdict = _run_stage(p)
    assert verdict.outcome is R.Outcome.TEMPFAIL and verdict.reason == "slowish timed out"
    assert [e["check"] for e in json_log_events(log_lines)
            if e["event"] == "check_timeout"] == ["slowish"]


def test_cancelling_the_session_cancels_a_waiting_check() -> None:
    cleaned: list[str] = []

    async def hangs(ctx: CheckContext) -> R.Verdict:
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.append("finally ran")
        return R.accept("unreachable")

    async def main() -> None:
        p = Policy()
        p.register(policy_mod.Stage.MAIL, hangs)
        task = asyncio.ensure_future(p.run(policy_mod.Stage.MAIL, CTX))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), 5))
    assert cleaned == ["finally ran"]


def test_a_check_that_raises_before_waiting_is_a_temporary_failure(
        log_lines: io.StringIO) -> None:
    async def broken(ctx: CheckContext) -> R.Verdict:
        raise KeyError("x")

    p = Policy()
    p.register(policy_mod.Stage.MAIL, broken)
    verdict = _run_stage(p)
    assert verdict.outcome is R.Outcome.TEMPFAIL and verdict.reason == "broken failed"


def test_a_handler_raising_timeout_itself_does_not_stop_the_others(
        log_lines: io.StringIO) -> None:
    told: list[str] = []

    async def own_timeout(ctx: CheckContext, **data: Any) -> R.Reply | None:
        await asyncio.sleep(0)
        raise TimeoutError("its own socket timed out")

    async def counting(ctx: CheckContext, **data: Any) -> R.Reply | None:
        told.append("counted")
        return None

    p = Policy()
    p.on(Event.DISCONNECT, own_timeout)
    p.on(Event.DISCONNECT, counting)
    assert asyncio.run(p.emit(Event.DISCONNECT, CTX)) is None
    assert told == ["counted"]
