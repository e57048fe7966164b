"""The quarantine: messages a content filter held for review.

Owns the ``quarantine`` table of the shared database.  A held message is
stored whole (the header fields this server prepended, then the message as
received), with its envelope, the session's facts, the filters that held
it and their reasons.  Storing it is the commit point of a held message:
the client gets its 250 only after the row is committed (synchronous=FULL),
as for the queue.  ``postwarden quarantine release`` re-injects a message
into the delivery queue; ``delete`` and the retention period remove it.

Security exposure: holds untrusted message content and envelope strings as
opaque data (parameterised SQL only); the file is the private shared
database (0600).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Protocol, Self

from postwarden.storage.sqlite_shared import SharedTables


class QuarantineError(Exception):
    """The quarantine table cannot be used (a newer schema, a bad row)."""


@dataclass(frozen=True, slots=True)
class HeldMessage:
    id: str
    ts: float
    direction: str  # "inbound" or "outbound"
    sender: str
    recipients: tuple[str, ...]
    filters: tuple[str, ...]  # the filters that held it
    reasons: tuple[str, ...]  # "filter: reason"
    rules: tuple[str, ...]
    size: int
    client_ip: str = ""
    helo: str = ""
    auth_user: str = ""
    listener: str = ""
    # The envelope's parameters: {"mail": {...}, "rcpt": [{...}, ...]}.
    envelope: dict[str, object] = field(default_factory=dict)


def new_id() -> str:
    """Q + 12 upper-case hex characters (not a queue id: it never is one)."""
    return "Q" + secrets.token_hex(6).upper()


class QuarantineStore(Protocol):
    """What the filter service, the CLI and the web admin use of a
    quarantine: :class:`SqliteQuarantine`, or
    :class:`~postwarden.storage.pg_quarantine.PgQuarantine` shared by the
    nodes (chosen by :func:`postwarden.storage.factory.open_quarantine`)."""

    def add(self, held: HeldMessage, message: bytes) -> None: ...
    def list(self, limit: int = 1000) -> list[HeldMessage]: ...
    def get(self, held_id: str) -> tuple[HeldMessage, bytes] | None: ...
    def delete(self, held_id: str) -> bool: ...
    def expire(self, older_than: float, now: float | None = None) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...


class SqliteQuarantine(SharedTables):
    schema = """
        CREATE TABLE IF NOT EXISTS quarantine_schema (version INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS quarantine (
            id TEXT PRIMARY KEY,
            ts REAL NOT NULL,
            direction TEXT NOT NULL,
            sender TEXT NOT NULL,
            recipients TEXT NOT NULL,
            filters TEXT NOT NULL,
            reasons TEXT NOT NULL,
            rules TEXT NOT NULL,
            size INTEGER NOT NULL,
            client_ip TEXT NOT NULL DEFAULT '',
            helo TEXT NOT NULL DEFAULT '',
            auth_user TEXT NOT NULL DEFAULT '',
            listener TEXT NOT NULL DEFAULT '',
            envelope TEXT NOT NULL DEFAULT '{}',
            message BLOB NOT NULL
        );
        CREATE INDEX IF NOT EXISTS quarantine_ts ON quarantine (ts)
    """
    schema_table = "quarantine_schema"
    schema_version = 1
    schema_error = QuarantineError
    storage_error_label = "quarantine"

    COLUMNS = ("id, ts, direction, sender, recipients, filters, reasons, rules, size, "
                "client_ip, helo, auth_user, listener, envelope")

    def add(self, held: HeldMessage, message: bytes) -> None:
        with self._write() as db:
            db.execute(
                f"INSERT INTO quarantine ({self.COLUMNS}, message) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*self.row(held), message))

    def list(self, limit: int = 1000) -> list[HeldMessage]:
        rows = self._query(f"SELECT {self.COLUMNS} FROM quarantine ORDER BY ts, id LIMIT ?",
                           (limit,))
        return [self.held(row) for row in rows]

    def get(self, held_id: str) -> tuple[HeldMessage, bytes] | None:
        rows = self._query(f"SELECT {self.COLUMNS}, message FROM quarantine WHERE id = ?",
                           (held_id,))
        if not rows:
            return None
        row = rows[0]
        message = row[-1]
        assert isinstance(message, bytes)
        return self.held(row[:-1]), message

    def delete(self, held_id: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM quarantine WHERE id = ?", (held_id,)).rowcount > 0

    def expire(self, older_than: float, now: float | None = None) -> int:
        """Remove messages held longer than ``older_than`` seconds; the count."""
        cutoff = (now if now is not None else time.time()) - older_than
        with self._write() as db:
            return db.execute("DELETE FROM quarantine WHERE ts < ?", (cutoff,)).rowcount

    @staticmethod
    def row(held: HeldMessage) -> tuple[object, ...]:
        """The values of :attr:`COLUMNS` for ``held`` (both backends)."""
        return (held.id, held.ts, held.direction, held.sender, json.dumps(held.recipients),
                json.dumps(held.filters), json.dumps(held.reasons), json.dumps(held.rules),
                held.size, held.client_ip, held.helo, held.auth_user, held.listener,
                json.dumps(held.envelope))

    @staticmethod
    def held(row: tuple[object, ...]) -> HeldMessage:
        (hid, ts, direction, sender, rcpts, filters, reasons, rules, size, ip, helo, user,
         listener, envelope) = row
        try:
            return HeldMessage(
                str(hid), float(ts), str(direction), str(sender),  # type: ignore[arg-type]
                tuple(json.loads(str(rcpts))), tuple(json.loads(str(filters))),
                tuple(json.loads(str(reasons))), tuple(json.loads(str(rules))),
                int(size), str(ip), str(helo), str(user), str(listener),  # type: ignore[call-overload]
                json.loads(str(envelope)))
        except (ValueError, TypeError) as exc:
            raise QuarantineError(f"quarantined message {hid}: bad record: {exc}") from None
