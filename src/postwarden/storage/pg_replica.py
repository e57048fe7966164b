"""A node's local copy of tables shared through PostgreSQL, kept current.

Some shared state is read far more often than it changes, and must answer
synchronously or while the database is briefly away: the directory
(every RCPT and AUTH) and the DKIM keys (every signed message).  A node
serves those from a local copy.  The shared tables come with a one-row
version table, bumped in the transaction of every change; a
:class:`VersionedReplica` reads the version every ``interval`` seconds and,
when it moved, reads the tables in one repeatable-read snapshot and
rewrites the copy.  A change made through any node thus applies on every
node within ``interval``; when the database cannot be reached the copy
keeps serving and the next tick tries again.

Subclasses say which version table to watch, how to read the tables
(``read``) and how to rewrite the copy (``apply``, run in a thread: it
writes files).

Security exposure: none of its own (the subclasses' copies hold what their
tables hold: password hashes, private keys).
"""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

import asyncpg

from postwarden.background import cancel_and_wait
from postwarden.observe.log import Logger

D = TypeVar("D")


class VersionedReplica(Generic[D]):
    """Keeps a local copy in step with shared tables (see the module docstring)."""

    version_table = ""
    name = ""  # of the log events: "<name>_loaded", "<name>_refresh_failed"

    def __init__(self, pool: asyncpg.Pool, log: Logger, interval: float) -> None:
        self.pool = pool
        self.log = log
        self.interval = interval
        self.version = -1
        self._task: asyncio.Task[None] | None = None

    async def read(self, conn: Any) -> tuple[int, D]:
        """The version and the tables, inside a read-only snapshot."""
        raise NotImplementedError

    def apply(self, data: D) -> dict[str, int]:
        """Rewrite the copy (in a thread); counts for the log line."""
        raise NotImplementedError

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name=f"{self.name}-refresh")

    async def refresh(self) -> bool:
        """Rewrite the copy if the tables changed; whether they did."""
        version = await self.pool.fetchval(f"SELECT version FROM {self.version_table}")
        if version == self.version:
            return False
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                                 readonly=True):
            version, data = await self.read(conn)
        counts = await asyncio.to_thread(self.apply, data)
        self.version = version
        self.log.info(f"{self.name}_loaded", version=version, **counts)
        return True

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception as exc:  # keep serving the copy; try again
                self.log.error(f"{self.name}_refresh_failed", error=str(exc) or repr(exc))

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
