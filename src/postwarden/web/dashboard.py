"""The dashboard's figures, read from the message trace (the ``events``
table), the queue and the metrics of the running server:

* messages in (queued) and out (delivered) per minute over the last 24 h,
  drawn as an SVG chart on the server (no script needed);
* the delivery success rate over the same period, from the final results;
* queue size by state, the top senders, the top refusal reasons (since the
  server started, from its metrics) and the alerts firing.

Security exposure: read-only; the figures say who sends how much, which is
why the whole web admin needs a login.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from postwarden.observe import health
from postwarden.storage.base import is_sqlite
from postwarden.storage.factory import has_state, reading

if TYPE_CHECKING:
    from postwarden.config import Config

EMPTY_QUEUE: dict[str, Any] = {"messages": {}, "recipients": {}, "oldest_seconds": 0.0}

MINUTES = 24 * 60
CHART_W = MINUTES  # one unit a minute
CHART_H = 160
TOP = 10


@dataclass(slots=True)
class Figures:
    start: int  # the first minute shown (epoch minutes)
    incoming: list[int]
    outgoing: list[int]
    results: dict[str, int]
    queue: dict[str, Any]
    senders: list[tuple[str, int]]
    rejections: list[tuple[str, str, int]] = field(default_factory=list)
    alerts: list[Any] = field(default_factory=list)

    @property
    def total_in(self) -> int:
        return sum(self.incoming)

    @property
    def total_out(self) -> int:
        return sum(self.outgoing)

    @property
    def success_rate(self) -> float | None:
        """Delivered among the final results (delivered or bounced), percent."""
        final = self.results.get("delivered", 0) + self.results.get("bounced", 0)
        return None if not final else 100.0 * self.results.get("delivered", 0) / final

    @property
    def peak(self) -> int:
        return max([1, *self.incoming, *self.outgoing])

    def points(self, series: list[int]) -> str:
        """An SVG polyline's points (x: minute, y: count scaled to the chart)."""
        scale = (CHART_H - 10) / self.peak
        return " ".join(f"{x},{CHART_H - round(v * scale, 1)}" for x, v in enumerate(series))

    def ticks(self) -> list[tuple[int, str]]:
        """Hour marks every 3 hours: (x, "HH:MM")."""
        out = []
        for x in range(MINUTES):
            minute = self.start + x
            if minute % 180 == 0:
                out.append((x, time.strftime("%H:%M", time.localtime(minute * 60))))
        return out


def figures(cfg: Config, now: float, monitor: object = None) -> Figures:
    """The last day's figures from the configured backend (on PostgreSQL,
    the shared events: every node's mail; ``monitor``: see
    :func:`postwarden.storage.factory.reading`)."""
    start = int(now // 60) - MINUTES + 1
    incoming, outgoing = [0] * MINUTES, [0] * MINUTES
    if not has_state(cfg):  # nothing received yet
        return Figures(start, incoming, outgoing, {}, EMPTY_QUEUE, [])
    with reading(cfg, monitor) as db:
        sqlite = is_sqlite(db)
        # (SQLite's CAST truncates; PostgreSQL's rounds: floor() there.)
        minute_of = "CAST(ts / 60 AS INTEGER)" if sqlite else "floor(ts / 60)"
        same_sender = "sender COLLATE NOCASE" if sqlite else "lower(sender)"
        try:
            # A message is queued with one event per recipient: count
            # messages in, deliveries (recipients) out.
            for minute, count in db.execute(
                    f"SELECT {minute_of} AS m, count(*) FROM events "
                    "WHERE ts >= ? AND event = 'delivered' GROUP BY m", (start * 60,)):
                i = int(minute) - start
                if 0 <= i < MINUTES:
                    outgoing[i] = int(count)
            for minute, count in db.execute(
                    f"SELECT {minute_of} AS m, count(DISTINCT queue_id) FROM events "
                    "WHERE ts >= ? AND event = 'queued' GROUP BY m", (start * 60,)):
                i = int(minute) - start
                if 0 <= i < MINUTES:
                    incoming[i] = int(count)
            results = health.delivery_rates(db, start * 60)
            queue = health.queue_state(db, now)
            senders = [(str(s), int(c)) for s, c in db.execute(
                "SELECT min(sender), count(DISTINCT queue_id) AS n FROM events "
                "WHERE event = 'queued' AND sender <> '' AND ts >= ? "
                f"GROUP BY {same_sender} ORDER BY n DESC LIMIT ?", (start * 60, TOP))]
        except sqlite3.OperationalError:  # no events table yet (nothing received)
            results, queue, senders = {}, EMPTY_QUEUE, []
    return Figures(start, incoming, outgoing, results, queue, senders)


def rejections(exposition: bytes) -> list[tuple[str, str, int]]:
    """(reason, kind, count) of the refusals counted since the start, most first."""
    totals: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(exposition.decode("utf-8", "replace")):
        if family.name != "postwarden_messages_rejected":
            continue
        for s in family.samples:
            if s.name.endswith("_total"):
                key = (s.labels.get("reason", ""), s.labels.get("kind", ""))
                totals[key] = totals.get(key, 0) + s.value
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return [(reason, kind, int(n)) for (reason, kind), n in ranked if n > 0][:TOP]
