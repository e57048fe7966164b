"""The message trace: every message's history, found by id, Message-ID,
sender, recipient and time.

The history is the queue's ``events`` table
(:mod:`postwarden.storage.sqlite_schema`), written in the same transactions
as the queue changes it records: at the commit one ``queued`` event per
recipient carrying the sender, the Message-ID and how the message came
(listener, client, HELO, TLS, authenticated user, the sender
authentication and filter verdicts); then every delivery attempt with the
remote reply, bounces, holds, deletions.  It outlives the message and is
pruned after ``[trace] retention``.

:func:`search` answers from indexes only: the sender, recipient and
Message-ID indexes (each ordered by time) or the time index find the
matching queue ids, then the ``events_queue`` index gives their histories.
The benchmark (``python -m bench.trace``) searches a million events.
The same queries run on the shared events of the PostgreSQL backend (its
schema has the same indexes, the case-insensitive ones on ``lower()``), so
``postwarden trace`` on any node finds mail accepted by any other.

Security exposure: reads the database as the administrator; the values
shown came from untrusted clients and are printed escaped (``repr`` of
control characters) so that they cannot drive the terminal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from postwarden.envelope import ConnectionInfo
from postwarden.storage.base import DeliveryEvent, Reader, is_sqlite
from postwarden.storage.sqlite_schema import EVENT_COLS, event_from_row

if TYPE_CHECKING:
    from postwarden.config import Config

_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:[ \t]*(?:\r?\n[ \t]+)?(<[^<>\s]{1,250}>)",
                         re.IGNORECASE | re.MULTILINE)
DEFAULT_LIMIT = 50
HISTORY_BATCH = 200


def message_id_of(*heads: bytes) -> str:
    """The Message-ID of a header block (the first found in ``heads``)."""
    for head in heads:
        if head:
            m = _MESSAGE_ID.search(head)
            if m is not None:
                return m.group(1).decode("ascii", "replace")
    return ""


def received_detail(conn: ConnectionInfo, auth_log: Mapping[str, object]) -> str:
    """How a message came, for its ``queued`` event: ``listener=submission
    helo=laptop tls=TLSv1.3/TLS_AES_256_GCM_SHA384 user=alice@example.org
    spf=pass ...``.  Passwords are never part of it."""
    parts = [f"listener={conn.listener}", f"client={conn.peer_ip}"]
    if conn.helo:
        parts.append(f"helo={conn.helo}")
    parts.append(f"tls={conn.tls_version}/{conn.tls_cipher}" if conn.tls_version
                 else "tls=no")
    if conn.auth_user:
        parts.append(f"user={conn.auth_user}")
    parts.extend(f"{k}={v}" for k, v in auth_log.items())
    parts.append(f"session={conn.session_id}")
    return " ".join(parts)


# received_detail's own prefix, up to the authenticated user: anchored, so
# that a value from the client further on (a checker's verdict, a HELO
# name with a tab) cannot pass for it.
_DETAIL_USER = re.compile(r"listener=\S+ client=\S* (?:helo=\S+ )?tls=\S+ user=(\S+) ")


def user_of(detail: str) -> str:
    """The authenticated user a ``queued`` event's detail names ("" for
    mail that came in unauthenticated)."""
    m = _DETAIL_USER.match(detail)
    return m.group(1) if m is not None else ""


@dataclass(frozen=True, slots=True)
class Query:
    """What ``postwarden trace`` looks for; empty fields match anything."""

    queue_id: str = ""
    message_id: str = ""
    sender: str = ""
    rcpt: str = ""
    since: float | None = None
    until: float | None = None
    limit: int = DEFAULT_LIMIT


@dataclass(slots=True)
class Trace:
    """One message's history, oldest first."""

    queue_id: str
    events: list[DeliveryEvent] = field(default_factory=list)

    @property
    def first(self) -> DeliveryEvent | None:
        return self.events[0] if self.events else None

    def summary(self) -> dict[str, object]:
        queued = [e for e in self.events if e.event == "queued"]
        return {
            "queue_id": self.queue_id,
            "received": queued[0].ts if queued else None,
            "sender": queued[0].sender if queued else "",
            "message_id": queued[0].message_id if queued else "",
            "recipients": [e.rcpt for e in queued if e.rcpt],
            "events": [
                {k: v for k, v in (("ts", e.ts), ("event", e.event), ("rcpt", e.rcpt),
                                   ("relay", e.relay), ("dsn", e.dsn), ("reply", e.reply),
                                   ("detail", e.detail)) if v not in ("", None)}
                for e in self.events],
        }


def _time_clause(q: Query, column: str = "ts") -> tuple[str, list[object]]:
    clause, args = "", list[object]()
    if q.since is not None:
        clause += f" AND {column} >= ?"
        args.append(q.since)
    if q.until is not None:
        clause += f" AND {column} <= ?"
        args.append(q.until)
    return clause, args


def find_ids(db: Reader, q: Query) -> list[str]:
    """The queue ids matching ``q``, newest first (at most ``q.limit``).

    Each criterion is answered by its index; several are intersected."""
    sqlite = is_sqlite(db)

    def nocase(column: str) -> str:  # the expression the column's index is on
        return f"{column} = ? COLLATE NOCASE" if sqlite else f"lower({column}) = lower(?)"

    when, when_args = _time_clause(q)
    selects: list[tuple[str, list[object]]] = []
    if q.queue_id:
        selects.append(("SELECT queue_id FROM events WHERE queue_id = ?",
                        [q.queue_id.upper()]))
    if q.message_id:
        mid = q.message_id.strip()
        if not mid.startswith("<"):
            mid = f"<{mid}>"
        # (The partial indexes are used only when the query says the value
        # is not empty.)
        selects.append(("SELECT queue_id FROM events WHERE message_id = ?"
                        f" AND message_id <> ''{when}",
                        [mid, *when_args]))
    if q.sender:
        selects.append((f"SELECT queue_id FROM events WHERE {nocase('sender')}"
                        f" AND sender <> ''{when}", [_bare(q.sender), *when_args]))
    if q.rcpt:
        selects.append((f"SELECT queue_id FROM events WHERE {nocase('rcpt')}"
                        f" AND rcpt <> ''{when}", [_bare(q.rcpt), *when_args]))
    if not selects:
        # Time only: the messages received in the period (the queued events).
        selects.append((f"SELECT queue_id FROM events WHERE event = 'queued'{when}",
                        when_args))
    # A message matches when every criterion matched one of its events.
    sql = " INTERSECT ".join(s for s, _ in selects)
    args = [a for _, sel_args in selects for a in sel_args]
    # (CROSS JOIN makes SQLite scan the few ids first; PostgreSQL plans
    # the order itself and spells it JOIN.)
    rows = db.execute(
        f"SELECT i.queue_id FROM (SELECT DISTINCT queue_id FROM ({sql}) m) i "
        f"{'CROSS JOIN' if sqlite else 'JOIN'} events e ON e.id = "
        "(SELECT max(id) FROM events WHERE queue_id = i.queue_id) "
        "ORDER BY e.ts DESC LIMIT ?", (*args, q.limit)).fetchall()
    return [r[0] for r in rows]


def _bare(address: str) -> str:
    return address.strip().removeprefix("<").removesuffix(">")


def histories(db: Reader, queue_ids: Sequence[str]) -> list[Trace]:
    """The histories of ``queue_ids``, in that order: a query per
    :data:`HISTORY_BATCH` messages (one round trip each to PostgreSQL)."""
    events: dict[str, list[DeliveryEvent]] = {q: [] for q in queue_ids}
    ids = list(events)
    for start in range(0, len(ids), HISTORY_BATCH):
        batch = ids[start:start + HISTORY_BATCH]
        marks = ", ".join("?" * len(batch))
        for row in db.execute(f"SELECT {EVENT_COLS} FROM events WHERE queue_id IN ({marks})"
                              " ORDER BY id", batch):
            events[row[1]].append(event_from_row(row))
    return [Trace(queue_id, events[queue_id]) for queue_id in queue_ids]


def search(cfg: Config, q: Query, monitor: object = None) -> list[Trace]:
    """The messages matching ``q`` with their histories, from the
    configured backend (the SQLite file read-only, or the shared events;
    ``monitor``: a running server's monitoring store, whose connection is
    used, see :func:`postwarden.storage.factory.reading`)."""
    from postwarden.storage.factory import has_state, reading

    if not has_state(cfg):
        raise FileNotFoundError(2, "no database (has the server run yet?)", str(cfg.db_path))
    with reading(cfg, monitor) as db:
        return histories(db, find_ids(db, q))
