"""The filter chain: the configured filters of one direction, run in order.

Owns the combination of verdicts.  Each filter's verdict is kept; the chain
stops at the first reject or tempfail (nothing a later filter says can
undo it) and otherwise returns the strongest action seen (accept < add
headers < quarantine) with every header and reason gathered.

Failures follow "temporary unless proven permanent": a filter that raises
:class:`~postwarden.filter.verdict.FilterUnavailable`, any other exception,
or does not answer within ``timeout`` makes the chain answer 451 4.3.0 --
unless the filter is listed in ``fail_open``, in which case the message
goes on with an ``X-Postwarden-Filter: NAME unavailable`` header.
Messages larger than ``large_message`` skip the filters in ``skip_large``
(recorded as ``X-Postwarden-Filter: NAME skipped``).

Synchronous filters (the built-in ones) are called directly, so the
default chain does not yield to the event loop.

Security exposure: decides whether untrusted content is accepted; never
turns a failure into an accept unless the administrator said so.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

from postwarden import reply as R
from postwarden.filter.verdict import (
    FILTER_UNAVAILABLE,
    Action,
    Filter,
    FilterMessage,
    FilterUnavailable,
    FilterVerdict,
)
from postwarden.observe.log import get_logger

log = get_logger("filter")


@dataclass(slots=True)
class ChainResult:
    action: Action = Action.ACCEPT
    reply: R.Reply | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    verdicts: list[tuple[str, FilterVerdict]] = field(default_factory=list)
    held_by: list[str] = field(default_factory=list)  # filters that quarantined
    notify: bool = False
    subject: str = ""

    @property
    def reasons(self) -> list[str]:
        return [f"{name}: {v.reason}" for name, v in self.verdicts if v.action > Action.ACCEPT
                or v.notify]

    @property
    def rules(self) -> list[str]:
        return [rule for _, v in self.verdicts for rule in v.rules]

    def header_bytes(self) -> bytes:
        if not self.headers:
            return b""
        return "".join(f"{k}: {_one_line(v)}\r\n" for k, v in self.headers).encode("utf-8")


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")[:900]


class FilterChain:
    def __init__(self, filters: Sequence[Filter], *, timeout: float, fail_open: Sequence[str] = (),
                 large_message: int = 0, skip_large: Sequence[str] = ()) -> None:
        self.filters = list(filters)
        self.timeout = timeout
        self.fail_open = frozenset(fail_open)
        self.large_message = large_message
        self.skip_large = frozenset(skip_large)

    def __bool__(self) -> bool:
        return bool(self.filters)

    async def run(self, message: FilterMessage) -> ChainResult:
        result = ChainResult()
        large = bool(self.large_message) and message.size > self.large_message
        for flt in self.filters:
            name = flt.name
            if large and name in self.skip_large:
                result.headers.append(("X-Postwarden-Filter", f"{name} skipped (message size)"))
                continue
            try:
                answer = flt.check(message)
                if type(answer) is FilterVerdict:  # a built-in filter: no await
                    verdict = answer
                elif inspect.isawaitable(answer):
                    async with asyncio.timeout(self.timeout):
                        verdict = await answer
                else:
                    verdict = answer
            except (FilterUnavailable, TimeoutError, Exception) as exc:
                detail = "timeout" if isinstance(exc, TimeoutError) else (
                    str(exc) if isinstance(exc, FilterUnavailable)
                    else f"{type(exc).__name__}: {exc}")
                if name in self.fail_open:
                    log.warning("filter_unavailable", filter=name, error=detail[:300],
                                fail_open=True)
                    result.headers.append(("X-Postwarden-Filter",
                                           f"{name} unavailable; message not checked"))
                    continue
                log.error("filter_unavailable", filter=name, error=detail[:300],
                          fail_open=False)
                verdict = FilterVerdict(Action.TEMPFAIL, f"unavailable: {detail[:200]}",
                                        FILTER_UNAVAILABLE)
            result.verdicts.append((name, verdict))
            if verdict.action in (Action.REJECT, Action.TEMPFAIL):
                result.action = verdict.action
                result.reply = verdict.reply or (R.TEMP_FAILURE if verdict.action is
                                                 Action.TEMPFAIL else R.ACCESS_DENIED)
                return result
            result.headers.extend(verdict.headers)
            if verdict.action > result.action:
                result.action = verdict.action
            if verdict.action is Action.QUARANTINE:
                result.held_by.append(name)
            if verdict.notify:
                result.notify = True
            if verdict.subject and not result.subject:
                result.subject = verdict.subject
        return result
