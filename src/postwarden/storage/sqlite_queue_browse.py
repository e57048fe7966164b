"""One page of the queue, filtered and sorted in SQL (the web admin's queue
page and ``GET /api/v1/queue``), fast with 100,000 queued messages: only
the page's messages and their recipients are read.

Security exposure: the filter text comes from an administrator's request;
it is bound as a parameter, and the sort key is chosen from a fixed table.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from postwarden.storage.base import QueuedMessage
from postwarden.storage.spool import storage_error
from postwarden.storage.sqlite_queue import SqliteQueueStore
from postwarden.storage.sqlite_schema import PENDING

PAGE_MAX = 500
# Sort keys a request may name -> the ORDER BY clause.
SORTS = {
    "oldest": "received_at, queue_id",
    "newest": "received_at DESC, queue_id DESC",
    "largest": "size DESC, queue_id",
    "sender": "sender, queue_id",
}
# State filters -> a WHERE condition on messages.
STATES = {
    "": "",
    "active": "held = 0 AND state = 'active'",
    "held": "held = 1",
    "deferred": ("EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id = messages.queue_id "
                 "AND r.status = 'deferred')"),
    "corrupt": "state = 'corrupt'",
}


@dataclass(frozen=True, slots=True)
class QueuePage:
    total: int
    messages: list[QueuedMessage]


async def browse(store: SqliteQueueStore, *, state: str = "", text: str = "",
                 sort: str = "oldest", offset: int = 0, limit: int = 50) -> QueuePage:
    """Messages in ``state`` whose queue id, sender or a recipient contains
    ``text``, in ``sort`` order, from ``offset``, at most ``limit``."""
    where: list[str] = []
    args: list[object] = []
    if STATES.get(state):
        where.append(STATES[state])
    text = text.strip()
    if text:
        like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append("(queue_id LIKE ? ESCAPE '\\' OR sender LIKE ? ESCAPE '\\' OR EXISTS "
                     "(SELECT 1 FROM recipients r WHERE r.queue_id = messages.queue_id "
                     "AND r.address LIKE ? ESCAPE '\\'))")
        args += [like, like, like]
    clause = ("WHERE " + " AND ".join(where)) if where else ""
    order = SORTS.get(sort, SORTS["oldest"])
    limit = max(1, min(limit, PAGE_MAX))
    conn = store._read()
    try:
        total = int(conn.execute(f"SELECT COUNT(*) FROM messages {clause}", args).fetchone()[0])
    except sqlite3.Error as exc:
        raise storage_error(exc, "queue read") from exc
    msgs = await store._select(f"{clause} ORDER BY {order} LIMIT ? OFFSET ?",
                               (*args, limit, max(0, offset)))
    return QueuePage(total, msgs)


__all__ = ["PENDING", "SORTS", "STATES", "QueuePage", "browse"]
