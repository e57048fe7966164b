"""The tables of the PostgreSQL backend and their migrations.

Everything lives in one PostgreSQL schema (``[storage] schema``, created by
postwarden).  The version is the one row of ``pw_schema``; :func:`prepare`
creates or migrates the tables inside one transaction holding an advisory
lock, so several nodes starting at once migrate exactly once, and refuses a
schema written by a newer postwarden.

Version history:

1. ``messages`` (with the body, the delivery lease: ``lease_owner``,
   ``lease_until``, and ``due_at``, the earliest next attempt of its pending
   recipients, which claims scan by index), ``recipients``, ``events`` (the history, outliving the
   message) and ``nodes`` (one row per running node, its heartbeat).
2. The shared protection state: ``protect_bans``, ``protect_locks``,
   ``protect_events``, ``protect_rates`` (bans, account locks, failure
   counters, rate counters), and greylisting: ``greylist_triplets``,
   ``greylist_clients``; the same tables as SQLite's, so a ban or a
   greylist pass on one node holds on every node.
3. The directory: ``dir_domains``, ``dir_accounts``, ``dir_aliases``,
   ``dir_app_passwords`` (the columns of SQLite's directory tables) and
   ``dir_version``, bumped by every change (nodes reload on a new version;
   see :mod:`postwarden.storage.pg_directory`).
4. Monitoring: ``monitor_alerts``, ``monitor_suspended``,
   ``monitor_baselines`` and ``audit_log`` (the columns of SQLite's, see
   :mod:`postwarden.storage.sqlite_monitor`), so that an alert is sent
   once by whichever node fires it, a suspension holds on every node, and
   ``postwarden audit`` on any node shows what was done through the
   others; the web admin's ``webadmin_*`` tables (admin accounts,
   sessions, login failures, API keys, delivery webhooks and their outbox;
   see :mod:`postwarden.web.store`), so that any node's web admin and API
   take the same logins and keys; and the indexes ``postwarden trace``
   searches the events by (sender, recipient, Message-ID, the ``queued``
   events by time; feedback reports are matched to the mail they report by
   Message-ID, :mod:`postwarden.web.complaints`).
5. ``quarantine`` (held messages, SQLite's columns), ``dkim_keys`` (the
   signing keys: private key PEM, selector, active flag) with
   ``dkim_version``, bumped by every change (see
   :mod:`postwarden.storage.pg_dkim`), and ``messages.spool_name``: the
   body's file in a shared spool directory (``[storage] shared_spool_dir``),
   empty when the body is in the row.
6. ``access_entries`` and ``access_version`` (the access lists of
   ``postwarden access`` and the web admin's Access page, SQLite's columns;
   the version is bumped by every change, and each node re-reads the
   entries when it sees a new one; see :mod:`postwarden.storage.pg_access`).

Security exposure: none of its own (fixed DDL; the schema name is checked
by :mod:`postwarden.storage.settings` and quoted).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from postwarden.storage.base import StorageError

if TYPE_CHECKING:
    from postwarden.storage.settings import StorageSettings

T = TypeVar("T")

SCHEMA_VERSION = 6
PENDING = "('queued', 'deferred')"
# pg_advisory_xact_lock key: "postwarden" (any constant shared by all nodes).
_MIGRATION_LOCK = 0x706F737477617264

_V1 = f"""
CREATE TABLE messages (
    queue_id     TEXT PRIMARY KEY,
    sender       TEXT NOT NULL,
    params       TEXT NOT NULL,
    received_at  DOUBLE PRECISION NOT NULL,
    size         BIGINT NOT NULL,
    client_ip    TEXT NOT NULL DEFAULT '',
    helo         TEXT NOT NULL DEFAULT '',
    auth_user    TEXT NOT NULL DEFAULT '',
    listener     TEXT NOT NULL DEFAULT '',
    session_id   TEXT NOT NULL DEFAULT '',
    held         BOOLEAN NOT NULL DEFAULT FALSE,
    state        TEXT NOT NULL DEFAULT 'active',
    prepend      BYTEA NOT NULL,
    body         BYTEA NOT NULL,
    body_size    BIGINT NOT NULL,
    checksum     BIGINT NOT NULL,
    lease_owner  TEXT NOT NULL DEFAULT '',
    lease_until  DOUBLE PRECISION NOT NULL DEFAULT 0,
    due_at       DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE INDEX messages_due ON messages(due_at, received_at) WHERE state = 'active' AND NOT held;
CREATE TABLE recipients (
    id           BIGSERIAL PRIMARY KEY,
    queue_id     TEXT NOT NULL REFERENCES messages(queue_id) ON DELETE CASCADE,
    address      TEXT NOT NULL,
    params       TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'queued',
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_reply   TEXT NOT NULL DEFAULT '',
    relay        TEXT NOT NULL DEFAULT '',
    last_attempt DOUBLE PRECISION NOT NULL DEFAULT 0,
    final_ts     DOUBLE PRECISION NOT NULL DEFAULT 0,
    warned       BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX recipients_due ON recipients(next_attempt) WHERE status IN {PENDING};
CREATE INDEX recipients_queue ON recipients(queue_id);
CREATE TABLE events (
    id           BIGSERIAL PRIMARY KEY,
    ts           DOUBLE PRECISION NOT NULL,
    queue_id     TEXT NOT NULL,
    event        TEXT NOT NULL,
    rcpt         TEXT NOT NULL DEFAULT '',
    relay        TEXT NOT NULL DEFAULT '',
    dsn          TEXT NOT NULL DEFAULT '',
    reply        TEXT NOT NULL DEFAULT '',
    sender       TEXT NOT NULL DEFAULT '',
    message_id   TEXT NOT NULL DEFAULT '',
    detail       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_queue ON events(queue_id, id);
CREATE INDEX events_ts ON events(ts);
CREATE TABLE nodes (
    node_id      TEXT PRIMARY KEY,
    hostname     TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started      DOUBLE PRECISION NOT NULL,
    heartbeat    DOUBLE PRECISION NOT NULL,
    in_flight    INTEGER NOT NULL DEFAULT 0,
    takeovers    BIGINT NOT NULL DEFAULT 0
)
"""

_V2 = """
CREATE TABLE protect_bans (
    network TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    level INTEGER NOT NULL DEFAULT 0,
    until DOUBLE PRECISION,
    created DOUBLE PRECISION NOT NULL
);
CREATE TABLE protect_locks (
    account TEXT NOT NULL,
    ip TEXT NOT NULL,
    reason TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (account, ip)
);
CREATE TABLE protect_events (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE INDEX protect_events_key ON protect_events (kind, key, at);
CREATE TABLE protect_rates (
    key TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (key, window_start)
);
CREATE TABLE greylist_triplets (
    network TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    first_seen DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (network, sender, recipient)
);
CREATE INDEX greylist_triplets_first ON greylist_triplets (first_seen);
CREATE TABLE greylist_clients (
    network TEXT PRIMARY KEY,
    allowed_until DOUBLE PRECISION NOT NULL
)
"""

_V3 = """
CREATE TABLE dir_domains (
    name TEXT PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE dir_accounts (
    address TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    password_changed DOUBLE PRECISION
);
CREATE TABLE dir_aliases (
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    domain TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (source, target)
);
CREATE TABLE dir_app_passwords (
    id BIGINT PRIMARY KEY,
    address TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    password_hash TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE dir_version (version BIGINT NOT NULL);
INSERT INTO dir_version (version) VALUES (0)
"""

_V4 = """
CREATE TABLE monitor_alerts (
    key TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    severity TEXT NOT NULL,
    summary TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    since DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL
);
CREATE TABLE monitor_suspended (
    account TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    since DOUBLE PRECISION NOT NULL,
    by TEXT NOT NULL DEFAULT '',
    lifted DOUBLE PRECISION
);
CREATE TABLE monitor_baselines (
    account TEXT PRIMARY KEY,
    per_window DOUBLE PRECISION NOT NULL,
    last_window BIGINT NOT NULL,
    windows INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE audit_log (
    id BIGSERIAL PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT 'ok'
);
CREATE INDEX audit_log_ts ON audit_log (ts);
CREATE INDEX events_sender ON events (lower(sender), ts) WHERE sender <> '';
CREATE INDEX events_rcpt ON events (lower(rcpt), ts) WHERE rcpt <> '';
CREATE INDEX events_message_id ON events (message_id) WHERE message_id <> '';
CREATE INDEX events_queued ON events (ts) WHERE event = 'queued';
CREATE TABLE webadmin_users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
CREATE TABLE webadmin_sessions (
    token_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL
);
CREATE TABLE webadmin_failures (
    key TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    first DOUBLE PRECISION NOT NULL
);
CREATE TABLE webadmin_api_keys (
    id BIGSERIAL PRIMARY KEY,
    key_id TEXT NOT NULL UNIQUE,
    secret_hash TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    scope TEXT NOT NULL,
    account TEXT NOT NULL DEFAULT '',
    created DOUBLE PRECISION NOT NULL,
    created_by TEXT NOT NULL DEFAULT '',
    last_used DOUBLE PRECISION
);
CREATE TABLE webadmin_webhooks (
    account TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
CREATE TABLE webadmin_webhook_outbox (
    id BIGSERIAL PRIMARY KEY,
    account TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try DOUBLE PRECISION NOT NULL
);
CREATE INDEX webadmin_webhook_outbox_due ON webadmin_webhook_outbox (next_try)
"""

_V5 = """
CREATE TABLE quarantine (
    id TEXT PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    direction TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    filters TEXT NOT NULL,
    reasons TEXT NOT NULL,
    rules TEXT NOT NULL,
    size BIGINT NOT NULL,
    client_ip TEXT NOT NULL DEFAULT '',
    helo TEXT NOT NULL DEFAULT '',
    auth_user TEXT NOT NULL DEFAULT '',
    listener TEXT NOT NULL DEFAULT '',
    envelope TEXT NOT NULL DEFAULT '{}',
    message BYTEA NOT NULL
);
CREATE INDEX quarantine_ts ON quarantine (ts);
CREATE TABLE dkim_keys (
    domain TEXT NOT NULL,
    selector TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    pem BYTEA NOT NULL,
    active BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (domain, selector)
);
CREATE TABLE dkim_version (version BIGINT NOT NULL);
INSERT INTO dkim_version (version) VALUES (0);
ALTER TABLE messages ADD COLUMN spool_name TEXT NOT NULL DEFAULT ''
"""

_V6 = """
CREATE TABLE access_entries (
    listener TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (listener, kind, value)
);
CREATE TABLE access_version (version BIGINT NOT NULL);
INSERT INTO access_version (version) VALUES (0)
"""

# MIGRATIONS[n] takes a schema from version n to n + 1.
MIGRATIONS: dict[int, str] = {0: _V1, 1: _V2, 2: _V3, 3: _V4, 4: _V5, 5: _V6}


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def prepare(conn: Any, schema: str) -> int:
    """Create the schema and its tables, or migrate them, to
    :data:`SCHEMA_VERSION`; the version found before.  ``conn``: an
    asyncpg connection (search_path is set here)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
        await conn.execute(f"SET LOCAL search_path TO {quote_ident(schema)}")
        await conn.execute("CREATE TABLE IF NOT EXISTS pw_schema (version INTEGER NOT NULL)")
        found = await conn.fetchval("SELECT version FROM pw_schema")
        if found is None:
            await conn.execute("INSERT INTO pw_schema (version) VALUES (0)")
            found = 0
        if found > SCHEMA_VERSION:
            raise StorageError(f"PostgreSQL schema {schema!r} is at version {found}, newer "
                               f"than {SCHEMA_VERSION}: upgrade postwarden")
        version = int(found)
        while version < SCHEMA_VERSION:
            for stmt in _statements(MIGRATIONS[version]):
                await conn.execute(stmt)
            version += 1
        await conn.execute("UPDATE pw_schema SET version = $1", SCHEMA_VERSION)
    return int(found)


async def connect(settings: StorageSettings, timeout: float = 60.0) -> Any:
    """One connection for a short task (a CLI command): the schema prepared
    (created or migrated), ``search_path`` set to it.  ``timeout``: for
    establishing the connection (asyncpg's default is 60 seconds)."""
    import asyncpg

    conn = await asyncpg.connect(settings.dsn, timeout=timeout)
    try:
        await prepare(conn, settings.schema)
        await conn.execute(f"SET search_path TO {quote_ident(settings.schema)}")
    except BaseException:
        await conn.close()
        raise
    return conn


def run_blocking(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``work()`` to the end from synchronous code: on a new event loop,
    or, when this thread already runs one (a synchronous store called from
    a coroutine), on a new loop in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(work())).result()


def in_transaction(settings: StorageSettings, action: Callable[[Any], Coroutine[Any, Any, T]],
                   error: Callable[[str], Exception]) -> T:
    """``action(conn)`` in one transaction on a connection of its own
    (synchronous: the commands' stores).  A database that cannot be
    reached or refuses becomes ``error(detail)``, a one-line message
    naming the setting to check."""
    import asyncpg

    async def main() -> T:
        conn = await connect(settings)
        try:
            async with conn.transaction():
                return await action(conn)
        finally:
            await conn.close()
    try:
        return run_blocking(main)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise error(f"PostgreSQL at [storage] dsn: {type(exc).__name__}: {exc}") from None
