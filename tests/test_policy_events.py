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
