"""A connection to the shared PostgreSQL schema that synchronous code can
use as it uses a ``sqlite3.Connection``.

The monitoring store, the message trace, ``postwarden status``, the alert
rules and the web admin's figures are synchronous code written against
SQLite (``db.execute(sql, args).fetchall()``, ``?`` placeholders).
:class:`PgSession` gives them the same calls on PostgreSQL, so that one
piece of code reads either backend:

* ``execute(sql, args)`` turns the ``?`` placeholders into ``$1, $2...``
  and returns a :class:`Cursor` (``fetchone``, ``fetchall``, iteration,
  ``rowcount``);
* ``transaction()`` is a ``with`` block around ``BEGIN`` ... ``COMMIT``
  (``ROLLBACK`` on an exception), as ``BEGIN IMMEDIATE`` is for SQLite;
* the asyncpg connection lives on an event loop in a thread of its own,
  so the calls work from any thread, from a thread of
  ``asyncio.to_thread`` and from the server's event loop alike;
  :meth:`repeat` runs a query periodically in the background.

One session is one connection, used by one caller at a time (a lock), as
SQLite's shared connection is.  Queries fail with the ``error`` class the
owner names, carrying the driver's message but never the DSN.

Security exposure: the SQL is the callers' fixed text; every value is a
bound parameter.  The DSN may hold a password and is never shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Self, TypeVar

import asyncpg

from postwarden.storage.base import StorageError
from postwarden.storage.pg_schema import connect
from postwarden.storage.settings import StorageSettings

T = TypeVar("T")
# Seconds a query may take before the caller is told the database is away.
QUERY_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
_FETCHING = ("SELECT", "WITH", "VALUES")


@functools.lru_cache(maxsize=256)
def pg_sql(sql: str) -> str:
    """``sql`` with SQLite's ``?`` placeholders numbered for PostgreSQL
    (the callers' SQL has no ``?`` inside string literals)."""
    head, *rest = sql.split("?")
    return head + "".join(f"${i}{part}" for i, part in enumerate(rest, 1))


class Cursor:
    """The result of :meth:`PgSession.execute` (what sqlite3's cursor offers)."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: Sequence[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Any]:
        return list(self.rows)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)


def _rowcount(status: str) -> int:
    """The row count of a command status ("INSERT 0 1", "UPDATE 3")."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else -1


class PgSession:
    """One connection to ``settings``'s schema (created or migrated at
    open), for synchronous callers (see the module docstring)."""

    dialect = "postgres"

    def __init__(self, settings: StorageSettings,
                 error: type[Exception] = StorageError) -> None:
        self.settings = settings
        self.error = error
        self._lock = threading.RLock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-session",
                                        daemon=True)
        self._thread.start()
        self._conn: Any = None
        # asyncpg runs one operation at a time on a connection: statements
        # (repeated or not) and whole transactions take turns.
        self._busy = asyncio.Lock()
        self._in_transaction = False
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        # How many times the session connected: session state (an advisory
        # lock) belongs to one generation.
        self.generation = 0
        try:
            self._call(self._ready(), CONNECT_TIMEOUT + QUERY_TIMEOUT)
        except BaseException:
            self.close()
            raise

    async def _connect(self) -> Any:
        return await connect(self.settings, CONNECT_TIMEOUT)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = QUERY_TIMEOUT) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise self.error(f"PostgreSQL at [storage] dsn: no answer within "
                             f"{timeout:g} s") from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise self.error(f"PostgreSQL at [storage] dsn: {text}") from None

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            self._closed = True
            if self._loop.is_closed():
                return
            for task in self._tasks:
                self._loop.call_soon_threadsafe(task.cancel)
            if conn is not None:
                future = asyncio.run_coroutine_threadsafe(conn.close(timeout=5), self._loop)
                try:
                    future.result(10)
                except Exception:  # closing a broken connection: nothing more to do
                    conn.terminate()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _ready(self) -> None:
        """Connect again if the connection was lost (a database restart):
        the next statement after a failure works when the database is back."""
        if self._closed:
            raise asyncpg.InterfaceError("the session is closed")
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._connect()
            self.generation += 1

    async def _run(self, sql: str, args: Sequence[Any]) -> Cursor:
        if not self._in_transaction:
            await self._ready()
        text = pg_sql(sql)
        head = text.lstrip().split(None, 1)[0].upper() if text.strip() else ""
        if head in _FETCHING or " RETURNING " in text.upper():
            rows = await self._conn.fetch(text, *args)
            return Cursor(rows, len(rows))
        status = await self._conn.execute(text, *args)
        return Cursor((), _rowcount(str(status)))

    async def _guarded(self, sql: str, args: Sequence[Any]) -> Cursor:
        async with self._busy:
            return await self._run(sql, args)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        """Run one statement (``?`` placeholders) and wait for its result."""
        with self._lock:
            if self._in_transaction:
                return self._call(self._run(sql, args))
            return self._call(self._guarded(sql, args))

    async def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not self._in_transaction:
            await self._ready()
        await self._conn.executemany(pg_sql(sql), rows)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each of ``rows`` (inside a transaction)."""
        with self._lock:
            if not self._in_transaction:
                raise self.error("executemany outside a transaction")
            self._call(self._many(sql, rows))

    def repeat(self, interval: float, sql: str, done: Callable[[Cursor], None],
               failed: Callable[[Exception], None]) -> None:
        """Run ``sql`` now and every ``interval`` seconds until the session
        closes, on its own thread; ``done(cursor)`` after each success,
        ``failed(error)`` after each failure (the next round tries again)."""
        async def loop() -> None:
            while True:
                try:
                    done(await self._guarded(sql, ()))
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    failed(exc)
                await asyncio.sleep(interval)

        def start() -> None:
            self._tasks.add(self._loop.create_task(loop()))
        self._loop.call_soon_threadsafe(start)

    @contextmanager
    def transaction(self) -> Iterator[Self]:
        """A ``with`` block in one transaction (the callers' ``_write``)."""
        with self._lock:
            self._call(self._locked_begin())
            self._in_transaction = True
            try:
                yield self
            except BaseException:
                self._in_transaction = False
                with contextlib.suppress(Exception):  # a lost connection ended it
                    self._call(self._release("ROLLBACK"))
                raise
            self._in_transaction = False
            self._call(self._release("COMMIT"))

    async def _locked_begin(self) -> None:
        await self._busy.acquire()
        try:
            await self._ready()
            await self._conn.execute("BEGIN")
        except BaseException:
            self._busy.release()
            raise

    async def _release(self, command: str) -> None:
        try:
            await self._conn.execute(command)
        finally:
            self._busy.release()

