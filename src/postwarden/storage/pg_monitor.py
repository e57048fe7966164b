"""Monitoring state in PostgreSQL: alerts, suspended accounts, sending
baselines and the audit log, shared by the nodes.

:class:`PgMonitorStore` is :class:`~postwarden.storage.sqlite_monitor.
SqliteMonitorStore` on the tables of the shared schema (version 4 of
:mod:`postwarden.storage.pg_schema`): the operations are the same code
(:class:`~postwarden.storage.sqlite_monitor.MonitorTables`), run over a
:class:`~postwarden.storage.pg_sync.PgSession`.  What changes with several
nodes:

- an alert is recorded by an ``INSERT ... ON CONFLICT DO NOTHING``: of two
  nodes firing the same alert, one inserts the row and notifies, the other
  finds it;
- a suspension written through one node (the spike detector, ``postwarden
  suspend add``) is refused by every node: a server's store (``watch``)
  reloads the suspended accounts every :data:`~postwarden.storage.
  sqlite_monitor.SUSPENDED_CACHE_SECONDS` in the background (the SMTP
  check reads the cache and never waits for the database), and its own
  suspensions apply at once;
- :meth:`PgMonitorStore.lead` tells whether this node evaluates the alert
  rules on shared state (queue, deliveries, account rates): the node that
  holds a session-level advisory lock, so exactly one node does, and
  another takes over when it stops or dies (PostgreSQL ends the dead
  node's session and its lock with it).

Security exposure: as the SQLite store's: the audit log never holds a
secret; every value is a bound parameter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from postwarden.observe.log import get_logger
from postwarden.storage.pg_sync import Cursor, PgSession
from postwarden.storage.settings import StorageSettings
from postwarden.storage.sqlite_monitor import (
    SUSPENDED_CACHE_SECONDS,
    MonitorError,
    MonitorTables,
)

log = get_logger("monitor")

# pg_try_advisory_lock(classid, objid): the class of postwarden's alert
# leadership; objid is hashtext(schema), so that schemas sharing a
# database (one per test, or per installation) each have a leader.
_LEADER_CLASS = 0x70770A1E
_SUSPENDED = "SELECT account FROM monitor_suspended WHERE lifted IS NULL"


class PgMonitorStore(MonitorTables):
    """The monitoring tables of the shared schema (see the module docstring)."""

    def __init__(self, settings: StorageSettings, clock: Callable[[], float] = time.time,
                 *, watch: bool = False) -> None:
        self.clock = clock
        self.session = PgSession(settings, MonitorError)
        self.schema = settings.schema
        self._suspended = frozenset()
        self._suspended_at = -1e9
        self._leader = -1  # the session generation holding the leader lock
        self._watching = watch
        try:
            self.load_suspended()
        except BaseException:
            self.session.close()
            raise
        if watch:
            self.session.repeat(SUSPENDED_CACHE_SECONDS, _SUSPENDED, self._cache,
                                self._reload_failed)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> PgMonitorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self) -> AbstractContextManager[Any]:
        return self.session.transaction()

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> Sequence[Any]:
        return self.session.execute(sql, args).fetchall()

    # -- suspended accounts -----------------------------------------------------

    def _cache(self, cursor: Cursor) -> None:
        self._suspended = frozenset(str(r[0]) for r in cursor)
        self._suspended_at = time.monotonic()

    def load_suspended(self) -> None:
        """Read the suspended accounts now (at start, and after a change)."""
        self._cache(self.session.execute(_SUSPENDED))

    def suspended(self, account: str) -> bool:
        """Is ``account`` suspended?  A server's store answers from the
        cache its background reload keeps (never waiting for the database:
        the SMTP check calls this on the event loop; when the database is
        away, the last known set holds); a command's reads when the cache
        is older than a second."""
        if not self._watching and (
                time.monotonic() - self._suspended_at > SUSPENDED_CACHE_SECONDS):
            self.load_suspended()
        return account.lower() in self._suspended

    def _reload_failed(self, exc: Exception) -> None:
        log.error("suspended_reload_failed", error=f"{type(exc).__name__}: {exc}")

    def suspend(self, account: str, reason: str, by: str = "", *,
                unless_lifted_within: float = 0.0) -> bool:
        done = super().suspend(account, reason, by, unless_lifted_within=unless_lifted_within)
        self.load_suspended()
        return done

    def unsuspend(self, account: str) -> bool:
        done = super().unsuspend(account)
        self.load_suspended()
        return done

    def state(self) -> dict[str, Any]:
        """Bans, suspended accounts and alerts firing, counted (``/metrics``)."""
        from postwarden.observe.health import protection_state

        return protection_state(self.session, self.clock())

    # -- which node evaluates the shared rules ------------------------------------

    def lead(self) -> bool:
        """Whether this node evaluates the alert rules on shared state: True
        while this session holds the schema's leader lock (taken here when
        free).  Held until the session ends."""
        if self._leader != self.session.generation:
            row = self.session.execute("SELECT pg_try_advisory_lock(?, hashtext(?))",
                                       (_LEADER_CLASS, self.schema)).fetchone()
            if row[0]:  # (generation read after the query: it may have reconnected)
                self._leader = self.session.generation
                log.info("alerts_leader", schema=self.schema)
        return self._leader == self.session.generation
