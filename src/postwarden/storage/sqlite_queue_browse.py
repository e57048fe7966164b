"""One page of the queue, filtered and sorted in SQL (the web admin's queue
page and ``GET /api/v1/queue``), fast with 100,000 queued messages: only
the page's messages and their recipients are read.  The same filter and
order run on the shared queue of the PostgreSQL backend
(:meth:`~postwarden.storage.pg_queue.PgQueueStore.page`).

Security exposure: the filter text comes from an administrator's request;
it is bound as a parameter, and the sort key is chosen from a fixed table.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from postwarden.storage.base import QueuedMessage
from postwarden.storage.spool import storage_error
from postwarden.storage.sqlite_queue import SqliteQueueStore
from postwarden.storage.sqlite_schema import PENDING

if TYPE_CHECKING:
    from postwarden.storage.pg_queue import PgQueueStore

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
    "active": "held = FALSE AND state = 'active'",
    "held": "held = TRUE",
    "deferred": ("EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id = messages.queue_id "
                 "AND r.status = 'deferred')"),
    "corrupt": "state = 'corrupt'",
}


@dataclass(frozen=True, slots=True)
class QueuePage:
    total: int
    messages: list[QueuedMessage]


async def browse(store: SqliteQueueStore | PgQueueStore, *, state: str = "", text: str = "",
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
        # SQLite's LIKE ignores ASCII case; PostgreSQL's ILIKE does.
        op = "LIKE" if isinstance(store, SqliteQueueStore) else "ILIKE"
        where.append(f"(queue_id {op} ? ESCAPE '\\' OR sender {op} ? ESCAPE '\\' OR EXISTS "
                     "(SELECT 1 FROM recipients r WHERE r.queue_id = messages.queue_id "
                     f"AND r.address {op} ? ESCAPE '\\'))")
        args += [like, like, like]
    clause = ("WHERE " + " AND ".join(where)) if where else ""
    order = SORTS.get(sort, SORTS["oldest"])
    limit = max(1, min(limit, PAGE_MAX))
    if not isinstance(store, SqliteQueueStore):  # PostgreSQL: the shared queue
        total, found = await store.page(clause, args, order, limit, max(0, offset))
        return QueuePage(total, found)
    conn = store._read()
    try:
        total = int(conn.execute(f"SELECT COUNT(*) FROM messages {clause}", args).fetchone()[0])
    except sqlite3.Error as exc:
        raise storage_error(exc, "queue read") from exc
    msgs = await store._select(f"{clause} ORDER BY {order} LIMIT ? OFFSET ?",
                               (*args, limit, max(0, offset)))
    return QueuePage(total, msgs)


__all__ = ["PENDING", "SORTS", "STATES", "QueuePage", "browse"]
