"""Admin accounts, web sessions, login failures and API keys in SQLite.

:class:`SqliteAdminStore` shares ``postwarden.db`` with the other stores
and owns the tables prefixed ``webadmin_``:

- ``webadmin_users``: admin accounts (not mail accounts), an argon2id hash
  and a role, ``admin`` (may change things) or ``read-only`` (may look);
- ``webadmin_sessions``: logged-in browsers; the cookie holds a random
  token, the table only its SHA-256 (a copy of the database lets nobody
  in), with the session's CSRF token and its expiry;
- ``webadmin_failures``: failed logins per name and per client address,
  counted over a window like failed SMTP AUTH: too many and the login is
  refused until the window has passed;
- ``webadmin_webhooks``, ``webadmin_webhook_outbox``: each account's
  delivery webhook (URL and signing secret) and the events waiting to be
  posted (:mod:`postwarden.web.webhooks`);
- ``webadmin_api_keys``: API keys (only the SHA-256 of the secret part is
  kept) with their scope (``read``, ``send``, ``admin``) and, for
  ``send``, the mail account they send as.

Security exposure: holds password hashes and token digests, never a
password or a token (webhook signing secrets are kept as they are: they
are needed to sign).  All SQL is parameterised.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from postwarden.storage.sqlite_shared import SharedTables

SCHEMA_VERSION = 1
ROLES = ("admin", "read-only")
SCOPES = ("read", "send", "admin")
TOKEN_BYTES = 32
API_KEY_PREFIX = "pwk_"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS webadmin_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS webadmin_users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS webadmin_sessions (
    token_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS webadmin_failures (
    key TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    first REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS webadmin_api_keys (
    id INTEGER PRIMARY KEY,
    key_id TEXT NOT NULL UNIQUE,
    secret_hash TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    scope TEXT NOT NULL,
    account TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    created_by TEXT NOT NULL DEFAULT '',
    last_used REAL
);
CREATE TABLE IF NOT EXISTS webadmin_webhooks (
    account TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS webadmin_webhook_outbox (
    id INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS webadmin_webhook_outbox_due ON webadmin_webhook_outbox (next_try);
"""


class AdminError(Exception):
    """A request about admin accounts or keys that cannot be done (one line)."""


class SchemaError(Exception):
    """The tables were written by a newer postwarden."""


@dataclass(frozen=True, slots=True)
class AdminUser:
    name: str
    role: str
    created: float
    password_hash: str = ""

    @property
    def can_change(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True, slots=True)
class Session:
    name: str
    role: str
    csrf: str
    expires: float

    @property
    def can_change(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    label: str
    scope: str
    account: str
    created: float
    created_by: str
    last_used: float | None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def check_name(name: str) -> str:
    name = name.strip()
    if not NAME_RE.fullmatch(name):
        raise AdminError(f"{name!r} is not a usable admin name (letters, digits, . _ @ -; "
                         "at most 64)")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise AdminError(f"role must be one of {', '.join(ROLES)}")
    return role


def _not_the_last_admin(db: sqlite3.Connection, name: str, what: str) -> None:
    """Refuse a change that would leave no account of role ``admin``."""
    row = db.execute("SELECT role FROM webadmin_users WHERE name = ?", (name,)).fetchone()
    if row is None or row[0] != "admin":
        return
    others = db.execute("SELECT count(*) FROM webadmin_users WHERE role = 'admin' "
                        "AND name <> ?", (name,)).fetchone()[0]
    if not others:
        raise AdminError(f"{name} is the last admin: cannot {what} it (make another "
                         "admin first)")


class SqliteAdminStore(SharedTables):
    schema = _SCHEMA
    schema_table = "webadmin_schema"
    schema_version = SCHEMA_VERSION
    schema_error = SchemaError

    def __init__(self, db_path: Path, clock: Callable[[], float] = time.time) -> None:
        super().__init__(db_path)
        self.clock = clock

    # --- admin accounts ------------------------------------------------

    def add(self, name: str, password_hash: str, role: str) -> str:
        name, role = check_name(name), check_role(role)
        with self._write() as db:
            if db.execute("SELECT 1 FROM webadmin_users WHERE name = ?", (name,)).fetchone():
                raise AdminError(f"admin {name} already exists")
            db.execute("INSERT INTO webadmin_users VALUES (?, ?, ?, ?)",
                       (name, password_hash, role, self.clock()))
        return name

    def set_password(self, name: str, password_hash: str) -> str:
        with self._write() as db:
            if not db.execute("UPDATE webadmin_users SET password_hash = ? WHERE name = ?",
                              (password_hash, name)).rowcount:
                raise AdminError(f"no admin {name}")
            # A new password ends every session of the account.
            db.execute("DELETE FROM webadmin_sessions WHERE name = ?", (name,))
        return name

    def set_role(self, name: str, role: str, *, keep_an_admin: bool = False) -> str:
        """``keep_an_admin``: refuse to make the last ``admin`` read-only
        (the web admin and the API; the command line can always repair)."""
        role = check_role(role)
        with self._write() as db:
            if keep_an_admin and role != "admin":
                _not_the_last_admin(db, name, "make read-only")
            if not db.execute("UPDATE webadmin_users SET role = ? WHERE name = ?",
                              (role, name)).rowcount:
                raise AdminError(f"no admin {name}")
        return name

    def delete(self, name: str, *, keep_an_admin: bool = False) -> str:
        with self._write() as db:
            if keep_an_admin:
                _not_the_last_admin(db, name, "delete")
            if not db.execute("DELETE FROM webadmin_users WHERE name = ?", (name,)).rowcount:
                raise AdminError(f"no admin {name}")
            db.execute("DELETE FROM webadmin_sessions WHERE name = ?", (name,))
        return name

    def get(self, name: str) -> AdminUser | None:
        rows = self._query("SELECT name, role, created, password_hash FROM webadmin_users "
                           "WHERE name = ?", (name,))
        if not rows:
            return None
        n, role, created, h = rows[0]
        return AdminUser(str(n), str(role), float(created), str(h))  # type: ignore[arg-type]

    def list_admins(self) -> list[AdminUser]:
        return [AdminUser(str(n), str(r), float(c))  # type: ignore[arg-type]
                for n, r, c in self._query("SELECT name, role, created FROM webadmin_users "
                                           "ORDER BY name")]

    # --- sessions --------------------------------------------------------

    def new_session(self, name: str, lifetime: float) -> tuple[str, Session]:
        """A new session of ``name``: (the cookie's token, the session)."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        csrf = secrets.token_urlsafe(TOKEN_BYTES)
        now = self.clock()
        with self._write() as db:
            db.execute("DELETE FROM webadmin_sessions WHERE expires < ?", (now,))
            row = db.execute("SELECT role FROM webadmin_users WHERE name = ?",
                             (name,)).fetchone()
            if row is None:
                raise AdminError(f"no admin {name}")
            db.execute("INSERT INTO webadmin_sessions VALUES (?, ?, ?, ?, ?)",
                       (_digest(token), name, csrf, now, now + lifetime))
        return token, Session(name, str(row[0]), csrf, now + lifetime)

    def session(self, token: str) -> Session | None:
        """The live session of a cookie's token (the account's current role)."""
        if not token:
            return None
        rows = self._query(
            "SELECT s.name, u.role, s.csrf, s.expires FROM webadmin_sessions s "
            "JOIN webadmin_users u ON u.name = s.name WHERE s.token_hash = ? AND s.expires > ?",
            (_digest(token), self.clock()))
        if not rows:
            return None
        n, role, csrf, expires = rows[0]
        return Session(str(n), str(role), str(csrf), float(expires))  # type: ignore[arg-type]

    def end_session(self, token: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM webadmin_sessions WHERE token_hash = ?", (_digest(token),))

    # --- login failures ------------------------------------------------

    def locked(self, keys: list[str], limit: int, window: float) -> bool:
        """True when one of ``keys`` (``name:alice``, ``ip:192.0.2.1``) failed
        ``limit`` times within the last ``window`` seconds."""
        since = self.clock() - window
        for key in keys:
            rows = self._query("SELECT count FROM webadmin_failures WHERE key = ? "
                               "AND first > ?", (key, since))
            if rows and int(rows[0][0]) >= limit:  # type: ignore[call-overload]
                return True
        return False

    def failed(self, keys: list[str], window: float) -> None:
        now = self.clock()
        with self._write() as db:
            for key in keys:
                db.execute("DELETE FROM webadmin_failures WHERE key = ? AND first <= ?",
                           (key, now - window))
                db.execute("INSERT INTO webadmin_failures VALUES (?, 1, ?) ON CONFLICT(key) "
                           "DO UPDATE SET count = webadmin_failures.count + 1", (key, now))

    def succeeded(self, keys: list[str]) -> None:
        with self._write() as db:
            for key in keys:
                db.execute("DELETE FROM webadmin_failures WHERE key = ?", (key,))

    # --- API keys --------------------------------------------------------

    def add_key(self, scope: str, *, label: str = "", account: str = "",
                created_by: str = "") -> tuple[str, ApiKey]:
        """A new key: (the whole key, shown once; its record)."""
        if scope not in SCOPES:
            raise AdminError(f"scope must be one of {', '.join(SCOPES)}")
        if scope == "send" and not account:
            raise AdminError("a send key needs the account it sends as")
        if len(label) > 100 or not label.isprintable():
            raise AdminError("the label must be printable, at most 100 characters")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(TOKEN_BYTES)
        now = self.clock()
        with self._write() as db:
            db.execute("INSERT INTO webadmin_api_keys (key_id, secret_hash, label, scope, "
                       "account, created, created_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (key_id, _digest(secret), label, scope, account, now, created_by))
        return (f"{API_KEY_PREFIX}{key_id}_{secret}",
                ApiKey(key_id, label, scope, account, now, created_by, None))

    def check_key(self, whole: str) -> ApiKey | None:
        """The key a request presents, or None (unknown, revoked, malformed)."""
        if not whole.startswith(API_KEY_PREFIX):
            return None
        key_id, _, secret = whole[len(API_KEY_PREFIX):].partition("_")
        rows = self._query("SELECT secret_hash, label, scope, account, created, created_by, "
                           "last_used FROM webadmin_api_keys WHERE key_id = ?", (key_id,))
        if not rows or not secrets.compare_digest(str(rows[0][0]), _digest(secret)):
            return None
        _, label, scope, account, created, by, used = rows[0]
        now = self.clock()
        if used is None or now - float(used) > 60:  # type: ignore[arg-type]
            with self._write() as db:
                db.execute("UPDATE webadmin_api_keys SET last_used = ? WHERE key_id = ?",
                           (now, key_id))
        return ApiKey(key_id, str(label), str(scope), str(account),
                      float(created), str(by), now)  # type: ignore[arg-type]

    def list_keys(self) -> list[ApiKey]:
        return [ApiKey(str(k), str(lb), str(s), str(a), float(c), str(b),  # type: ignore[arg-type]
                       None if u is None else float(u))  # type: ignore[arg-type]
                for k, lb, s, a, c, b, u in self._query(
                    "SELECT key_id, label, scope, account, created, created_by, last_used "
                    "FROM webadmin_api_keys ORDER BY id")]

    def revoke_key(self, key_id: str) -> str:
        with self._write() as db:
            if not db.execute("DELETE FROM webadmin_api_keys WHERE key_id = ?",
                              (key_id,)).rowcount:
                raise AdminError(f"no API key {key_id}")
        return key_id

    # --- webhooks --------------------------------------------------------

    def set_webhook(self, account: str, url: str, secret: str) -> None:
        with self._write() as db:
            db.execute("INSERT INTO webadmin_webhooks VALUES (?, ?, ?, ?) ON CONFLICT(account) "
                       "DO UPDATE SET url = excluded.url, secret = excluded.secret",
                       (account, url, secret, self.clock()))

    def del_webhook(self, account: str) -> str:
        with self._write() as db:
            if not db.execute("DELETE FROM webadmin_webhooks WHERE account = ?",
                              (account,)).rowcount:
                raise AdminError(f"no webhook for {account}")
            db.execute("DELETE FROM webadmin_webhook_outbox WHERE account = ?", (account,))
        return account

    def webhooks(self) -> dict[str, str]:
        """{account: url}"""
        return {str(a): str(u) for a, u in self._query(
            "SELECT account, url FROM webadmin_webhooks ORDER BY account")}

    def webhook_accounts(self) -> list[str]:
        return [str(r[0]) for r in self._query("SELECT account FROM webadmin_webhooks")]

    def outbox_add(self, events: list[tuple[str, str]]) -> None:
        now = self.clock()
        with self._write() as db:
            db.executemany("INSERT INTO webadmin_webhook_outbox (account, payload, next_try) "
                           "VALUES (?, ?, ?)", [(a, p, now) for a, p in events])

    def outbox_due(self, now: float, limit: int) -> list[tuple[int, str, str, str, int]]:
        """(id, url, secret, payload, attempts) of the events due now."""
        return [(int(i), str(u), str(s), str(p), int(n))  # type: ignore[call-overload]
                for i, u, s, p, n in self._query(
                    "SELECT o.id, w.url, w.secret, o.payload, o.attempts "
                    "FROM webadmin_webhook_outbox o JOIN webadmin_webhooks w "
                    "ON w.account = o.account WHERE o.next_try <= ? ORDER BY o.id LIMIT ?",
                    (now, limit))]

    def outbox_retry(self, row_id: int, attempts: int, next_try: float) -> None:
        with self._write() as db:
            db.execute("UPDATE webadmin_webhook_outbox SET attempts = ?, next_try = ? "
                       "WHERE id = ?", (attempts, next_try, row_id))

    def outbox_done(self, row_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM webadmin_webhook_outbox WHERE id = ?", (row_id,))
