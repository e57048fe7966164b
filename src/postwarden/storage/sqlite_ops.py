"""The write transactions of the SQLite queue besides the commit itself.

Each function takes the writer's connection (inside the writer thread's
transaction) and writes a change together with the history event that
describes it, so the history never claims what did not happen and never
misses what did.  Every function is a no-op, answering "not found", when
the message is gone: the CLI (another process) may have deleted it while
the server was delivering it.

Security exposure: none of its own; all values are SQL parameters.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from postwarden.storage.base import DeliveryEvent, RcptStatus, RecipientResult
from postwarden.storage.sqlite_schema import PENDING, insert_events, split_reply

STATE_ACTIVE = "active"
_FINAL = (RcptStatus.DELIVERED, RcptStatus.FAILED)


def _exists(conn: sqlite3.Connection, queue_id: str) -> bool:
    row = conn.execute("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
    return row is not None


def delete_row(conn: sqlite3.Connection, queue_id: str) -> tuple[bool, str | None]:
    """Remove the message row (recipients cascade): ``(found, spool_name)``."""
    row = conn.execute("SELECT spool_name FROM messages WHERE queue_id = ?",
                       (queue_id,)).fetchone()
    if row is None:
        return False, None
    conn.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,))
    return True, row[0]


def record_results(conn: sqlite3.Connection, queue_id: str, results: Sequence[RecipientResult],
                   events: Sequence[DeliveryEvent], now: float) -> tuple[bool, str | None]:
    """Store attempt outcomes and their events; remove the message when no
    recipient is pending.  ``(removed, spool_name)``."""
    if not _exists(conn, queue_id):
        return False, None
    history: list[DeliveryEvent] = []
    for r in results:
        row = conn.execute("SELECT address FROM recipients WHERE id = ? AND queue_id = ?",
                           (r.rcpt_id, queue_id)).fetchone()
        if row is None:
            continue
        conn.execute(
            "UPDATE recipients SET status = ?, attempts = attempts + 1, next_attempt = ?, "
            "last_reply = ?, relay = ?, last_attempt = ?, final_ts = ?, "
            "warned = MAX(warned, ?) WHERE id = ?",
            (r.status.value, r.next_attempt, r.reply, r.relay, now,
             now if r.status in _FINAL else 0.0, int(r.warned), r.rcpt_id))
        dsn, text = split_reply(r.reply)
        history.append(DeliveryEvent(now, queue_id, r.event or r.status.value, row[0],
                                     r.relay, dsn, text))
    insert_events(conn, [*history, *events])
    pending = conn.execute(
        f"SELECT 1 FROM recipients WHERE queue_id = ? AND status IN {PENDING} LIMIT 1",
        (queue_id,)).fetchone()
    if pending is not None:
        return False, None
    insert_events(conn, [DeliveryEvent(now, queue_id, "removed")])
    return delete_row(conn, queue_id)


def delete(conn: sqlite3.Connection, queue_id: str, now: float) -> tuple[bool, str | None]:
    found, spool_name = delete_row(conn, queue_id)
    if found:
        insert_events(conn, [DeliveryEvent(now, queue_id, "deleted")])
    return found, spool_name


def set_held(conn: sqlite3.Connection, queue_id: str, held: bool, now: float) -> bool:
    cur = conn.execute("UPDATE messages SET held = ? WHERE queue_id = ?", (int(held), queue_id))
    if cur.rowcount == 0:
        return False
    insert_events(conn, [DeliveryEvent(now, queue_id, "held" if held else "released")])
    return True


def requeue(conn: sqlite3.Connection, queue_id: str, now: float) -> bool:
    """Pending recipients start over (attempt count 0, due now); unhold."""
    cur = conn.execute("UPDATE messages SET held = 0 WHERE queue_id = ?", (queue_id,))
    if cur.rowcount == 0:
        return False
    conn.execute(f"UPDATE recipients SET attempts = 0, next_attempt = 0 "
                 f"WHERE queue_id = ? AND status IN {PENDING}", (queue_id,))
    insert_events(conn, [DeliveryEvent(now, queue_id, "requeued")])
    return True


def flush(conn: sqlite3.Connection, queue_id: str | None, now: float) -> int:
    """Pending recipients of active, unheld messages (one or all) become due
    now; the number of those that were not due yet or are due now."""
    where = "m.held = 0 AND m.state = ?"
    args: tuple[object, ...] = (STATE_ACTIVE,)
    if queue_id is not None:
        where += " AND m.queue_id = ?"
        args += (queue_id,)
    cur = conn.execute(
        f"UPDATE recipients SET next_attempt = MIN(next_attempt, ?) "
        f"WHERE status IN {PENDING} AND queue_id IN "
        f"(SELECT m.queue_id FROM messages m WHERE {where})", (now, *args))
    return max(cur.rowcount, 0)


def prune_events(conn: sqlite3.Connection, before: float) -> int:
    """Forget events older than ``before`` whose message is gone."""
    cur = conn.execute(
        "DELETE FROM events WHERE ts < ? AND queue_id NOT IN (SELECT queue_id FROM messages)",
        (before,))
    return max(cur.rowcount, 0)
