"""The web admin's accounts, sessions, login failures, API keys and
delivery webhooks in PostgreSQL, shared by the nodes.

:class:`PgAdminStore` is :class:`~postwarden.web.store.SqliteAdminStore`
on the ``webadmin_*`` tables of the shared schema (version 4 of
:mod:`postwarden.storage.pg_schema`): the same methods, the same SQL,
run over a :class:`~postwarden.storage.pg_sync.PgSession`.  So an admin
created through any node logs in on every node, a browser session opened
on one node is valid on the others (behind a load balancer), an API key
works on every node, and too many failed logins lock the name on all of
them.

The one difference: the webhook outbox is read by every node's sender, so
:meth:`PgAdminStore.outbox_due` *claims* the due events (``FOR UPDATE
SKIP LOCKED``, their next try moved :data:`OUTBOX_LEASE` seconds ahead):
two nodes never post the same event at once, and an event claimed by a
node that died is posted by another after the lease.

Security exposure: as the SQLite store's (password hashes and token
digests, webhook signing secrets); every value is a bound parameter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from postwarden.storage.pg_sync import PgSession
from postwarden.storage.settings import StorageSettings
from postwarden.web.store import SchemaError, SqliteAdminStore

# Seconds a claimed webhook event waits before another node may post it.
OUTBOX_LEASE = 60.0


class PgAdminStore(SqliteAdminStore):
    """The web admin's tables in the shared schema (see the module docstring)."""

    def __init__(self, settings: StorageSettings,  # (not SQLite's: no file)
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.pg = PgSession(settings, SchemaError)

    def close(self) -> None:
        self.pg.close()

    @contextmanager
    def _write(self) -> Iterator[Any]:
        with self.pg.transaction() as db:
            yield db

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        return self.pg.execute(sql, args).fetchall()

    def outbox_due(self, now: float, limit: int) -> list[tuple[int, str, str, str, int]]:
        """(id, url, secret, payload, attempts) of the events due now,
        claimed by this node (see the module docstring)."""
        rows: Sequence[Any] = self.pg.execute(
            "UPDATE webadmin_webhook_outbox o SET next_try = ? FROM webadmin_webhooks w "
            "WHERE w.account = o.account AND o.id IN (SELECT id FROM webadmin_webhook_outbox "
            "WHERE next_try <= ? ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED) "
            "RETURNING o.id, w.url, w.secret, o.payload, o.attempts",
            (now + OUTBOX_LEASE, now, limit)).fetchall()
        return sorted((int(i), str(u), str(s), str(p), int(n)) for i, u, s, p, n in rows)
