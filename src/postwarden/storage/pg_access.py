"""The access lists in PostgreSQL, shared by the nodes.

:class:`PgAccessStore` is :class:`~postwarden.storage.sqlite_access.
AccessStore` on the ``access_entries`` and ``access_version`` tables of the
shared schema (version 6 of :mod:`postwarden.storage.pg_schema`): the same
operations (:class:`~postwarden.storage.sqlite_access.AccessTables`), run
over a :class:`~postwarden.storage.pg_sync.PgSession`.  An entry added
through any node (``postwarden access add``, the web admin's Access page)
is listed by every node, and each server notices the new version within
:data:`~postwarden.policy.access.DB_CHECK_INTERVAL` and re-reads the
entries (:mod:`postwarden.policy.access`), so a client denied through
node A is refused by node B a second later.

Security exposure: as the SQLite store's (every value is a bound
parameter; the DSN is never shown).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from postwarden.storage.pg_sync import PgSession
from postwarden.storage.settings import StorageSettings
from postwarden.storage.sqlite_access import AccessTables


class PgAccessStore(AccessTables):
    """The access tables of the shared schema (one connection, kept until
    :meth:`close`)."""

    def __init__(self, settings: StorageSettings) -> None:
        self.session = PgSession(settings)

    def close(self) -> None:
        self.session.close()

    def _write(self) -> AbstractContextManager[Any]:
        return self.session.transaction()

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> Sequence[Any]:
        return self.session.execute(sql, args).fetchall()
