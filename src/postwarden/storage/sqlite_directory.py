"""The directory in SQLite: local domains, accounts and aliases.

:class:`SqliteDirectory` implements :class:`postwarden.storage.base.Directory`
for the running server (async methods) and the administration commands of
the CLI (sync methods).  It shares ``postwarden.db`` with the queue store but
owns only the tables ``domains``, ``accounts``, ``aliases``,
``app_passwords`` and its own version table ``directory_schema``.

Schema version 2 added ``accounts.password_changed`` (Unix time of the last
password change, for ``[passwords] max_age_days``; existing rows take their
``updated_at``) and ``app_passwords``: per-account application passwords,
argon2id-hashed like account passwords, at most
:data:`MAX_APP_PASSWORDS` per account, deleted when revoked or when the
account is deleted.

Local domains are the union of the config file's ``domains`` and the
``domains`` table.  Lookups fold addresses to lower case.  The answers of
``is_local`` and ``resolve`` are cached per process, and every write stamps
a change after its commit (:mod:`postwarden.storage.change_stamp`), so a
running server still sees ``postwarden user add`` at once: the cache spares
the re-reading of pages that SQLite drops whenever the queue commits.

Resolution (``resolve``), after Postfix's virtual alias maps:

1. an account ``local@domain`` receives its own mail;
2. an exact alias ``local@domain`` expands to its targets; local targets
   are resolved again (up to :data:`MAX_ALIAS_DEPTH` levels, loops cut),
   remote targets are final;
3. a catch-all ``@domain`` applies only when there is neither;
4. anything else is unknown (``None``), and so is a non-local domain.

Security exposure: ``resolve``/``may_send_as`` answer for addresses given by
unauthenticated clients; every query is parameterised and the result
decides whether mail is accepted for delivery.  The write methods validate
addresses themselves (:func:`check_address`, :func:`check_domain`) so that
nothing malformed reaches the table that the relay policy trusts.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

from postwarden.envelope import Address
from postwarden.observe.log import get_logger
from postwarden.storage.base import Account, Alias, StorageError
from postwarden.storage.change_stamp import ChangeStamp, StampedCache
from postwarden.storage.sqlite_shared import SharedTables

SCHEMA_VERSION = 2
# Every AUTH attempt for an account verifies the account password and each
# of its application passwords (one argon2id each, ~50 ms): bound the work.
MAX_APP_PASSWORDS = 10
# Alias chains longer than this are cut (Postfix stops at 1000 results and
# 100 levels; a mail system with ten levels of aliases has other problems).
MAX_ALIAS_DEPTH = 10
# The CLI and the server write the same file; wait this long for a lock.
# RFC 5321 4.5.3.1.1-3: local part 64 octets, domain 255, path 256 (with <>).
LOCAL_PART_MAX = 64
DOMAIN_MAX = 255
ADDRESS_MAX = 254

# RFC 5322 3.2.3 atext, minus "%" and "!" (percent hack and bang paths are
# routing syntax that must never appear in a name we own).  Non-ASCII
# (RFC 6532 UTF-8) is allowed separately.
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789#$&'*+-/=?^_`{|}~")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS directory_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS accounts (
    address TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS accounts_domain ON accounts (domain);
CREATE TABLE IF NOT EXISTS aliases (
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    domain TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (source, target)
);
CREATE INDEX IF NOT EXISTS aliases_domain ON aliases (domain);
CREATE TABLE IF NOT EXISTS app_passwords (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    address TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS app_passwords_address ON app_passwords (address);
"""

log = get_logger("directory")

_P = ParamSpec("_P")
_T = TypeVar("_T")


class DirectoryError(Exception):
    """An administration request that cannot be done (bad or conflicting input).

    The message is one line meant for the administrator.
    """


# --- validation -----------------------------------------------------------


def check_domain(text: str) -> str:
    """Validate a domain name (ASCII LDH labels, RFC 1035 2.3.1 / RFC 5890
    A-labels) and return it lower-cased without a trailing dot."""
    name = text.strip().lower().removesuffix(".")
    if not name:
        raise DirectoryError("empty domain name")
    if not name.isascii():
        raise DirectoryError(f"domain {text!r}: write internationalised domains "
                             "in their xn-- (A-label) form")
    if len(name) > DOMAIN_MAX:
        raise DirectoryError(f"domain {text!r} is longer than {DOMAIN_MAX} characters")
    labels = name.split(".")
    for label in labels:
        if (not label or len(label) > 63 or label[0] == "-" or label[-1] == "-"
                or not all(c.isalnum() or c == "-" for c in label)):
            raise DirectoryError(f"{text!r} is not a valid domain name")
    if labels[-1].isdigit():
        raise DirectoryError(f"{text!r} is not a domain name (looks like an IP address)")
    return name


def check_local_part(local: str, shown: str) -> None:
    """A dot-atom local part (RFC 5322 3.2.3, UTF-8 allowed per RFC 6532)."""
    if not local:
        raise DirectoryError(f"invalid address {shown!r}: empty local part")
    if len(local.encode("utf-8", "surrogatepass")) > LOCAL_PART_MAX:
        raise DirectoryError(
            f"invalid address {shown!r}: local part longer than {LOCAL_PART_MAX} octets")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise DirectoryError(f"invalid address {shown!r}: misplaced dot in local part")
    for c in local:
        if c == "." or c in _ATEXT:
            continue
        if ord(c) > 127 and c.isprintable() and not c.isspace():
            continue
        raise DirectoryError(f"invalid address {shown!r}: character {c!r} not allowed "
                             "in the local part")


def check_address(text: str) -> str:
    """Validate ``local@domain`` and return it with the domain lower-cased
    (the local part is kept as given; see :func:`normalize`)."""
    shown = text
    text = text.strip()
    if text.count("@") != 1:
        raise DirectoryError(f"invalid address {shown!r}: must contain exactly one @")
    local, _, domain = text.partition("@")
    check_local_part(local, shown)
    if not domain:
        raise DirectoryError(f"invalid address {shown!r}: empty domain")
    try:
        domain = check_domain(domain)
    except DirectoryError as exc:
        raise DirectoryError(f"invalid address {shown!r}: {exc}") from None
    address = f"{local}@{domain}"
    if len(address.encode("utf-8", "surrogatepass")) > ADDRESS_MAX:
        raise DirectoryError(f"invalid address {shown!r}: longer than {ADDRESS_MAX} octets")
    return address


def normalize(address: str) -> str:
    """The lookup key of a valid address: all lower case."""
    return address.lower()


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2]


# --- the directory --------------------------------------------------------


class SqliteDirectory(SharedTables):
    """Domains, accounts and aliases in ``db_path`` (see module docstring).

    One connection, guarded by a lock: async lookups run inline on the event
    loop (they are index reads taking microseconds); admin methods are sync.
    """

    schema = _SCHEMA
    schema_table = "directory_schema"
    schema_version = SCHEMA_VERSION
    schema_error = DirectoryError

    def __init__(self, db_path: Path, config_domains: Iterable[str] = ()) -> None:
        self.config_domains: tuple[str, ...] = tuple(
            d.lower().removesuffix(".") for d in config_domains)
        # Not stamped: the schema migration at open (it changes no answer).
        self._stamp: ChangeStamp | None = None
        super().__init__(db_path)
        self._stamp = ChangeStamp(db_path)
        self._domains: StampedCache[bool] = StampedCache(self._stamp)
        self._resolved: StampedCache[tuple[str, ...] | None] = StampedCache(self._stamp)

    def close(self) -> None:
        super().close()
        if self._stamp is not None:
            self._stamp.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, stamped as a change once committed."""
        with super()._write() as db:
            yield db
        if self._stamp is not None:
            # This process sees its own change even if the stamp fails.
            self._domains.clear()
            self._resolved.clear()
            self._stamp.bump()

    def _upgrade(self, db: sqlite3.Connection) -> None:
        columns = {str(r[1]) for r in db.execute("PRAGMA table_info(accounts)")}
        if "password_changed" not in columns:  # schema 1 -> 2
            db.execute("ALTER TABLE accounts ADD COLUMN password_changed REAL")
            db.execute("UPDATE accounts SET password_changed = updated_at")

    # -- lookups (sync)

    def is_local(self, domain: str) -> bool:
        domain = domain.lower().removesuffix(".")
        if domain in self.config_domains:
            return True
        return self._domains.get(domain, lambda: bool(
            self._query("SELECT 1 FROM domains WHERE name = ?", (domain,))))

    def find_account(self, address: str) -> Account | None:
        rows = self._query(
            "SELECT address, password_hash, enabled FROM accounts WHERE address = ?",
            (normalize(address),))
        if not rows:
            return None
        addr, pw_hash, enabled = rows[0]
        return Account(str(addr), str(pw_hash), bool(enabled))

    def _targets(self, source: str) -> list[str] | None:
        rows = self._query(
            "SELECT target FROM aliases WHERE source = ? ORDER BY position", (source,))
        return [str(r[0]) for r in rows] if rows else None

    def _is_account(self, key: str) -> bool:
        return bool(self._query("SELECT 1 FROM accounts WHERE address = ?", (key,)))

    def resolve_sync(self, address: str) -> list[str] | None:
        """Final addresses for ``address`` (see module docstring), or ``None``."""
        key = normalize(address)
        found = self._resolved.get(key, lambda: self._resolve(key))
        return None if found is None else list(found)

    def _resolve(self, key: str) -> tuple[str, ...] | None:
        if not self.is_local(_domain_of(key)):
            return None
        out: list[str] = []
        self._expand(key, 0, set(), out)
        return tuple(_dedupe(out)) or None

    def _expand(self, key: str, depth: int, seen: set[str], out: list[str]) -> None:
        """Append the final addresses of local ``key`` to ``out``."""
        if key in seen:
            return  # alias loop: this branch adds nothing
        if depth > MAX_ALIAS_DEPTH:
            log.warning("alias_too_deep", address=key, max_depth=MAX_ALIAS_DEPTH)
            return
        seen = seen | {key}
        if self._is_account(key):
            out.append(key)
            return
        targets = self._targets(key)
        if targets is None:
            targets = self._targets("@" + _domain_of(key))
        if targets is None:
            return
        for target in targets:
            if self.is_local(_domain_of(target)):
                self._expand(normalize(target), depth + 1, seen, out)
            else:
                out.append(target)

    def may_send_as_sync(self, username: str, sender: str) -> bool:
        user = normalize(username)
        key = normalize(sender)
        if key == user:
            return True
        if not self.is_local(_domain_of(key)):
            return False
        targets = self._targets(key)  # exact aliases only, never the catch-all
        if targets is None:
            return False
        out: list[str] = []
        seen = {key}
        for target in targets:
            if self.is_local(_domain_of(target)):
                self._expand(normalize(target), 1, seen, out)
        return user in out

    # -- the Directory protocol (async, for the server)

    async def is_local_domain(self, domain: str) -> bool:
        return _guard(self.is_local, domain)

    async def resolve(self, address: Address) -> list[str] | None:
        return _guard(self.resolve_sync, address.key)

    async def get_account(self, username: str) -> Account | None:
        return _guard(self.find_account, username)

    async def may_send_as(self, username: str, sender: Address) -> bool:
        return _guard(self.may_send_as_sync, username, sender.key)

    # -- administration (sync, for the CLI)

    def list_domains(self) -> list[str]:
        rows = self._query("SELECT name FROM domains")
        return sorted(set(self.config_domains) | {str(r[0]) for r in rows})

    def add_domain(self, domain: str) -> str:
        name = check_domain(domain)
        if name in self.config_domains:
            raise DirectoryError(f"domain {name} is already local (listed in the config file)")
        with self._write() as db:
            if db.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone():
                raise DirectoryError(f"domain {name} already exists")
            db.execute("INSERT INTO domains (name, created_at) VALUES (?, ?)",
                       (name, time.time()))
        return name

    def del_domain(self, domain: str) -> str:
        name = check_domain(domain)
        with self._write() as db:
            in_db = db.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone()
            if not in_db:
                if name in self.config_domains:
                    raise DirectoryError(f"domain {name} is listed in the config file; "
                                         "remove it there")
                raise DirectoryError(f"no such domain: {name}")
            if name not in self.config_domains:
                (n_acc,) = db.execute(
                    "SELECT count(*) FROM accounts WHERE domain = ?", (name,)).fetchone()
                (n_ali,) = db.execute(
                    "SELECT count(DISTINCT source) FROM aliases WHERE domain = ?",
                    (name,)).fetchone()
                if n_acc or n_ali:
                    raise DirectoryError(
                        f"domain {name} still has {n_acc} account(s) and {n_ali} alias(es); "
                        "delete them first")
            db.execute("DELETE FROM domains WHERE name = ?", (name,))
        return name

    def add_user(self, address: str, password_hash: str) -> str:
        key = normalize(check_address(address))
        _check_hash(password_hash)
        domain = _domain_of(key)
        with self._write() as db:
            self._require_local(db, domain, key)
            if db.execute("SELECT 1 FROM accounts WHERE address = ?", (key,)).fetchone():
                raise DirectoryError(f"account {key} already exists")
            if db.execute("SELECT 1 FROM aliases WHERE source = ?", (key,)).fetchone():
                raise DirectoryError(f"{key} is an alias; delete the alias first")
            now = time.time()
            db.execute(
                "INSERT INTO accounts (address, domain, password_hash, enabled, created_at,"
                " updated_at, password_changed) VALUES (?, ?, ?, 1, ?, ?, ?)",
                (key, domain, password_hash, now, now, now))
        return key

    def set_password(self, address: str, password_hash: str) -> str:
        key = normalize(check_address(address))
        _check_hash(password_hash)
        now = time.time()
        with self._write() as db:
            cur = db.execute(
                "UPDATE accounts SET password_hash = ?, updated_at = ?, password_changed = ?"
                " WHERE address = ?", (password_hash, now, now, key))
            if cur.rowcount == 0:
                raise DirectoryError(f"no such account: {key}")
        return key

    def password_changed(self, address: str) -> float | None:
        """When the account's password was last set (Unix time), or ``None``."""
        rows = self._query("SELECT password_changed FROM accounts WHERE address = ?",
                           (normalize(address),))
        if not rows or rows[0][0] is None:
            return None
        return float(rows[0][0])  # type: ignore[arg-type]

    # -- application passwords

    def add_app_password(self, address: str, password_hash: str, label: str = "") -> int:
        """Store an application password for an account; returns its id."""
        key = normalize(check_address(address))
        _check_hash(password_hash)
        if len(label) > 100 or any(ord(c) < 32 or ord(c) == 127 for c in label):
            raise DirectoryError("label: at most 100 printable characters")
        with self._write() as db:
            if not db.execute("SELECT 1 FROM accounts WHERE address = ?", (key,)).fetchone():
                raise DirectoryError(f"no such account: {key}")
            (count,) = db.execute("SELECT count(*) FROM app_passwords WHERE address = ?",
                                  (key,)).fetchone()
            if count >= MAX_APP_PASSWORDS:
                raise DirectoryError(
                    f"account {key} already has {MAX_APP_PASSWORDS} application passwords "
                    "(the maximum); revoke one first")
            cur = db.execute(
                "INSERT INTO app_passwords (address, label, password_hash, created_at)"
                " VALUES (?, ?, ?, ?)", (key, label, password_hash, time.time()))
            assert cur.lastrowid is not None
            return int(cur.lastrowid)

    def list_app_passwords(self, address: str) -> list[tuple[int, str, float]]:
        """``(id, label, created_at)`` of an account's application passwords."""
        key = normalize(check_address(address))
        if not self._is_account(key):
            raise DirectoryError(f"no such account: {key}")
        rows = self._query("SELECT id, label, created_at FROM app_passwords "
                           "WHERE address = ? ORDER BY id", (key,))
        return [(int(i), str(lbl), float(c)) for i, lbl, c in rows]  # type: ignore[call-overload, arg-type]

    def revoke_app_password(self, address: str, app_id: int) -> str:
        key = normalize(check_address(address))
        with self._write() as db:
            cur = db.execute("DELETE FROM app_passwords WHERE address = ? AND id = ?",
                             (key, app_id))
            if cur.rowcount == 0:
                raise DirectoryError(f"no application password {app_id} for {key}")
        return key

    def app_password_hashes(self, account_hash: str) -> list[tuple[int, str]]:
        """``(id, hash)`` of the application passwords of the enabled account
        whose password hash is ``account_hash`` (hashes are salted, hence
        unique: this is how the AUTH verifier finds them)."""
        rows = self._query(
            "SELECT p.id, p.password_hash FROM app_passwords p JOIN accounts a"
            " ON a.address = p.address WHERE a.password_hash = ? AND a.enabled = 1"
            " ORDER BY p.id LIMIT ?", (account_hash, MAX_APP_PASSWORDS))
        return [(int(i), str(h)) for i, h in rows]  # type: ignore[call-overload]

    def del_user(self, address: str) -> str:
        key = normalize(check_address(address))
        with self._write() as db:
            cur = db.execute("DELETE FROM accounts WHERE address = ?", (key,))
            if cur.rowcount == 0:
                raise DirectoryError(f"no such account: {key}")
            db.execute("DELETE FROM app_passwords WHERE address = ?", (key,))
        return key

    def list_users(self, domain: str | None = None) -> list[Account]:
        sql = "SELECT address, password_hash, enabled FROM accounts"
        args: tuple[object, ...] = ()
        if domain is not None:
            sql += " WHERE domain = ?"
            args = (check_domain(domain),)
        rows = self._query(sql + " ORDER BY domain, address", args)
        return [Account(str(a), str(h), bool(e)) for a, h, e in rows]

    def add_alias(self, source: str, targets: Iterable[str]) -> Alias:
        """Create ``source`` (``local@domain`` or ``@domain`` for a catch-all)
        or add ``targets`` to it.  Returns the alias with all its targets."""
        src = _check_source(source)
        domain = _domain_of(src)
        checked: list[str] = []
        for t in targets:
            if t.strip().startswith("@"):
                raise DirectoryError(f"alias target {t!r} must be a full address")
            checked.append(check_address(t))
        if not checked:
            raise DirectoryError("an alias needs at least one target")
        with self._write() as db:
            self._require_local(db, domain, src)
            finals = [normalize(t) if self._is_local_in(db, _domain_of(t)) else t
                      for t in checked]
            if src in finals:
                raise DirectoryError(f"alias {src} cannot point to itself")
            if db.execute("SELECT 1 FROM accounts WHERE address = ?", (src,)).fetchone():
                raise DirectoryError(f"{src} is an account; an alias of the same name "
                                     "would never be used")
            (pos,) = db.execute("SELECT coalesce(max(position), 0) FROM aliases "
                                "WHERE source = ?", (src,)).fetchone()
            for target in _dedupe(finals):
                pos += 1
                db.execute("INSERT OR IGNORE INTO aliases (source, target, domain, position)"
                           " VALUES (?, ?, ?, ?)", (src, target, domain, pos))
            rows = db.execute("SELECT target FROM aliases WHERE source = ? ORDER BY position",
                              (src,)).fetchall()
        return Alias(src, tuple(str(r[0]) for r in rows))

    def del_alias(self, source: str) -> str:
        src = _check_source(source)
        with self._write() as db:
            cur = db.execute("DELETE FROM aliases WHERE source = ?", (src,))
            if cur.rowcount == 0:
                raise DirectoryError(f"no such alias: {src}")
        return src

    def list_aliases(self) -> list[Alias]:
        rows = self._query(
            "SELECT source, target FROM aliases ORDER BY domain, source, position")
        result: dict[str, list[str]] = {}
        for source, target in rows:
            result.setdefault(str(source), []).append(str(target))
        return [Alias(s, tuple(t)) for s, t in result.items()]

    # -- helpers

    def _is_local_in(self, db: sqlite3.Connection, domain: str) -> bool:
        return domain in self.config_domains or bool(
            db.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone())

    def _require_local(self, db: sqlite3.Connection, domain: str, what: str) -> None:
        if not self._is_local_in(db, domain):
            raise DirectoryError(
                f"{what}: domain {domain} is not a local domain "
                f"(add it with 'postwarden domain add {domain}')")


def _check_source(source: str) -> str:
    text = source.strip()
    if text.startswith("@"):
        return "@" + check_domain(text[1:])
    return normalize(check_address(text))


def _check_hash(password_hash: str) -> None:
    # Defence in depth: the CLI hashes first; never store a clear password.
    if not password_hash.startswith("$argon2"):
        raise DirectoryError("refusing to store a password that is not an argon2 hash")


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _guard(func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run a lookup for the server: a database failure is temporary (4xx)."""
    try:
        return func(*args, **kwargs)
    except sqlite3.Error as exc:
        log.error("directory_error", error=str(exc))
        raise StorageError(f"directory lookup failed: {exc}") from exc
