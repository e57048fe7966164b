"""The quarantine in PostgreSQL: messages a content filter held, shared by
the nodes.

:class:`PgQuarantine` has the interface of
:class:`~postwarden.storage.sqlite_quarantine.SqliteQuarantine` (the filter
service stores held messages through it; ``postwarden quarantine
list|show|release|delete`` and the web admin review them) on the
``quarantine`` table of the shared schema, so a message held by node A is
listed and released from any node, and ``release`` puts it in the shared
queue.  Each call is one short connection and one transaction: held
messages are rare, and the synchronous interface stays usable from the
filter service's thread as from the CLI.  Storing a held message is its
commit point: the client's 250 comes after the transaction committed.

Security exposure: holds untrusted message content and envelope strings as
opaque data (query parameters only).  The DSN is never logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any, Self, TypeVar

from postwarden.storage.pg_schema import in_transaction
from postwarden.storage.settings import StorageSettings
from postwarden.storage.sqlite_quarantine import HeldMessage, QuarantineError, SqliteQuarantine

T = TypeVar("T")
_COLUMNS = SqliteQuarantine.COLUMNS
_PLACES = ", ".join(f"${i}" for i in range(1, 16))


class PgQuarantine:
    """The shared quarantine (see the module docstring)."""

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings

    def close(self) -> None:
        """Nothing stays open between calls."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _run(self, action: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        return in_transaction(self.settings, action, lambda d: QuarantineError(f"quarantine: {d}"))

    def add(self, held: HeldMessage, message: bytes) -> None:
        async def action(conn: Any) -> None:
            await conn.execute(
                f"INSERT INTO quarantine ({_COLUMNS}, message) VALUES ({_PLACES})",
                *SqliteQuarantine.row(held), message)
        self._run(action)

    def list(self, limit: int = 1000) -> list[HeldMessage]:
        async def action(conn: Any) -> list[Any]:
            return list(await conn.fetch(
                f"SELECT {_COLUMNS} FROM quarantine ORDER BY ts, id LIMIT $1", limit))
        return [SqliteQuarantine.held(tuple(r)) for r in self._run(action)]

    def get(self, held_id: str) -> tuple[HeldMessage, bytes] | None:
        async def action(conn: Any) -> Any:
            return await conn.fetchrow(
                f"SELECT {_COLUMNS}, message FROM quarantine WHERE id = $1", held_id)
        row = self._run(action)
        if row is None:
            return None
        return SqliteQuarantine.held(tuple(row)[:-1]), bytes(row[-1])

    def delete(self, held_id: str) -> bool:
        async def action(conn: Any) -> str:
            return str(await conn.execute("DELETE FROM quarantine WHERE id = $1", held_id))
        return not self._run(action).endswith(" 0")

    def expire(self, older_than: float, now: float | None = None) -> int:
        """Remove messages held longer than ``older_than`` seconds; the count."""
        cutoff = (now if now is not None else time.time()) - older_than

        async def action(conn: Any) -> str:
            return str(await conn.execute("DELETE FROM quarantine WHERE ts < $1", cutoff))
        return int(self._run(action).rsplit(" ", 1)[-1])

