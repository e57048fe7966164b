"""The storage interface: what every backend (SQLite now, PostgreSQL later)
provides to the rest of postwarden.

Two seams:

* :class:`QueueStore` owns the commit point.  ``commit`` returns only once the
  message body, the header lines prepended by cleanup and the envelope are on
  stable storage.  Bodies are written through a :class:`BodyWriter` while the
  client streams DATA/BDAT, so memory per session stays bounded.
* :class:`Directory` owns domains, accounts (with password hashes) and aliases.

And one for reading figures: a :class:`Reader` is what both a
``sqlite3.Connection`` and a :class:`~postwarden.storage.pg_sync.PgSession`
are, so that the trace, the status figures and the alert rules are one
piece of code for both backends.

Security exposure: stores untrusted message content and envelope strings; it
must treat them as opaque data (parameterised SQL, no paths built from them).
"""

from __future__ import annotations

import builtins
import enum
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from postwarden.envelope import Address, Envelope, MailParams, RcptParams


class StorageError(Exception):
    """Storage failed (temporary: the client is told 4xx)."""


class StorageFull(StorageError):
    """No space left on the device holding the spool or database."""


class Reader(Protocol):
    """A connection taking ``execute(sql, args)`` with ``?`` placeholders;
    the result has ``fetchone``, ``fetchall`` and iterates over rows."""

    def execute(self, sql: str, args: Any = (), /) -> Any: ...


def is_sqlite(db: Reader) -> bool:
    """Whether ``db`` is a SQLite connection (for the few spellings the two
    dialects do not share)."""
    return getattr(db, "dialect", "sqlite") == "sqlite"


class BodyWriter(Protocol):
    """Receives a message body chunk by chunk before the commit."""

    @property
    def size(self) -> int: ...

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; raises :class:`StorageFull` or :class:`StorageError`."""

    def read_back(self) -> bytes:
        """Everything written so far (blocking when the body is on disk)."""

    def abort(self) -> None:
        """Discard what was written (message not accepted)."""


class RcptStatus(enum.Enum):
    QUEUED = "queued"  # never tried
    DEFERRED = "deferred"  # tried, temporary failure, will retry
    DELIVERED = "delivered"
    FAILED = "failed"  # permanent failure (bounce to be sent)


@dataclass(slots=True)
class QueuedRecipient:
    id: int
    address: str  # as given in RCPT TO (local@domain)
    params: RcptParams
    status: RcptStatus = RcptStatus.QUEUED
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""
    relay: str = ""  # who answered the last attempt ("local", "mx.example.org[192.0.2.1]:25")
    last_attempt: float = 0.0  # time of the last attempt (0: never tried)
    final_ts: float = 0.0  # time it became delivered or failed (0: still pending)
    warned: bool = False  # a delay warning (RFC 3464 action "delayed") went out


@dataclass(slots=True)
class QueuedMessage:
    queue_id: str
    sender: str  # "" is the null reverse-path <>
    params: MailParams
    recipients: list[QueuedRecipient]
    received_at: float
    size: int  # bytes of prepended headers + body
    client_ip: str = ""
    helo: str = ""
    auth_user: str = ""
    listener: str = ""
    held: bool = False


@dataclass(frozen=True, slots=True)
class CommitMeta:
    """Facts about the submission stored with the envelope."""

    client_ip: str = ""
    helo: str = ""
    auth_user: str = ""
    listener: str = ""
    session_id: str = ""
    # The queue id to use (the session names it in the Received header before
    # the commit); empty: the store generates one.
    queue_id: str = ""
    # For the message trace: the Message-ID header field, and how the
    # message came ("tls=TLSv1.3 spf=pass ...").
    message_id: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The outcome of one delivery attempt for one recipient."""

    rcpt_id: int
    status: RcptStatus
    reply: str = ""  # "<dsn> <text>": the remote/local reply or error, for logs and bounces
    next_attempt: float = 0.0  # for DEFERRED
    relay: str = ""  # who answered ("local", "mx.example.org[192.0.2.1]:25"; "" unknown)
    # The history event when it is not ``status.value`` ("expired" for a FAILED).
    event: str = ""
    # A delay warning for this recipient was committed with this result.
    warned: bool = False


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    """One line of a message's history (kept after the message is removed)."""

    ts: float
    queue_id: str
    event: str  # "queued", "delivered", "deferred", "failed", "bounced", "held", ...
    rcpt: str = ""
    relay: str = ""  # "local", "mx.example.org[192.0.2.1]:25", ...
    dsn: str = ""
    reply: str = ""
    # The trace (on the "queued" events): envelope sender, Message-ID, and
    # how it came (client, TLS, authentication, checks).
    sender: str = ""
    message_id: str = ""
    detail: str = ""


class QueueStore(Protocol):
    def new_body(self) -> BodyWriter:
        """A writer for a new message body (no storage is committed yet)."""

    async def commit(self, body: BodyWriter, envelope: Envelope, prepend: bytes,
                     meta: CommitMeta) -> str:
        """Make the message durable and return its queue id.

        ``prepend`` (header lines added by cleanup, such as Received) is stored
        ahead of the body.  On return the body, ``prepend`` and envelope are
        fsync'ed/committed.  Raises :class:`StorageError` (nothing committed).
        """

    async def due(self, now: float, limit: int,
                  skip: Collection[str] = ()) -> list[QueuedMessage]:
        """Up to ``limit`` messages with at least one recipient due for an
        attempt at ``now``, leaving out those whose queue id is in ``skip``
        (the runner's deliveries in flight: still due until their results
        are stored, and not worth reading again)."""

    async def get(self, queue_id: str) -> QueuedMessage | None: ...

    async def list(self, limit: int = 1000) -> list[QueuedMessage]: ...

    def read_message(self, queue_id: str) -> AsyncIterator[bytes]:
        """The full message (prepend + body) in chunks."""

    async def record_results(self, queue_id: str, results: builtins.list[RecipientResult],
                             events: Sequence[DeliveryEvent] = ()) -> None:
        """Store attempt outcomes, and one history event per result plus
        ``events`` (DSNs sent), in one transaction; a message with no pending
        recipient left is removed.  Nothing is written if the message is gone
        (deleted while it was being delivered)."""

    async def flush(self, queue_id: str | None = None) -> int:
        """Make deferred recipients (of one message, or all) due now; the count."""

    async def requeue(self, queue_id: str) -> bool:
        """Reset attempts of pending recipients and make them due now."""

    async def set_held(self, queue_id: str, held: bool) -> bool:
        """Hold (no delivery) or release a message; False if there is none."""

    async def delete(self, queue_id: str) -> bool:
        """Remove a message whatever its state (no bounce); False if there is none."""

    async def history(self, queue_id: str) -> builtins.list[DeliveryEvent]:
        """The message's events, oldest first (also after its removal)."""

    async def add_events(self, events: Sequence[DeliveryEvent]) -> None:
        """Add lines to messages' histories, whether or not they are still
        queued (a complaint about a message delivered long ago)."""

    async def find_message_id(self, message_id: str,
                              limit: int = 10) -> builtins.list[str]:
        """The queue ids of the messages queued with this Message-ID, newest first."""

    async def close(self) -> None: ...


@runtime_checkable
class LeasingStore(Protocol):
    """A queue shared by several nodes (PostgreSQL): due work is claimed
    with a lease instead of read, so that no two nodes deliver it at once."""

    async def claim(self, now: float, limit: int) -> builtins.list[QueuedMessage]:
        """Up to ``limit`` due messages (their due recipients), leased to
        this node until their results are recorded or :meth:`release`."""

    async def release(self, queue_id: str) -> None:
        """Give the message back without results (another node may take it)."""


@dataclass(frozen=True, slots=True)
class Account:
    address: str  # the login name: a full address, lower case
    password_hash: str
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Alias:
    source: str  # "local@domain" or "@domain" (catch-all)
    targets: tuple[str, ...] = field(default_factory=tuple)


class Directory(Protocol):
    async def is_local_domain(self, domain: str) -> bool: ...

    async def resolve(self, address: Address) -> list[str] | None:
        """Local mailboxes (``local@domain``, lower case) that mail for
        ``address`` goes to after alias expansion; ``None`` if unknown."""

    async def get_account(self, username: str) -> Account | None: ...

    async def may_send_as(self, username: str, sender: Address) -> bool:
        """``sender`` is the account's own address or an alias pointing to it."""
