"""Access lists: allow/deny client networks, deny HELO names, senders and
recipients.

Entries come from the config (``[access]`` for every listener and
``[access.listeners.NAME]`` for one) and from the database (``postwarden
access add``, :mod:`postwarden.storage.sqlite_access`; on PostgreSQL the
shared tables, :mod:`postwarden.storage.pg_access`, so an entry added
through any node applies on every node); all of them apply.

- CONNECT: a client in an ``allow`` network is accepted at once and marked
  ``conn.trusted`` (allow overrides deny, and exempts it from the later
  protection checks: connection limits, bans, rate limits, DNSBL); else a
  client in a ``deny`` network gets 554 5.7.1 and the connection is closed.
- HELO / MAIL / RCPT: ``deny_helo`` / ``deny_sender`` / ``deny_recipient``
  patterns answer 550 5.7.1, for every client (allow-listed ones too: a
  pattern names what is refused, whoever sends it).

Patterns are shell globs (:mod:`fnmatch`, case-insensitive) or, when
written ``/.../``, regular expressions searched case-insensitively.  The
null sender ``<>`` is matched as the empty string.

Changes made with the CLI take effect without a restart: the database's
change counter is looked at, at most once a second, before a connection is
admitted (on PostgreSQL over one connection the server keeps; when the
database is away, the entries last read stay in force); SIGHUP re-reads
the ``[access]`` tables of the config file and the database entries (:meth:`Access.reload`).

Security exposure: decides who may connect; the lists are trusted input
(administrator), the addresses and names matched against them are not.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from postwarden import reply as R
from postwarden.config import ACCESS_KINDS, AccessConfig, AccessLists, Config
from postwarden.netaddr import client_address
from postwarden.observe.log import get_logger
from postwarden.policy import CheckContext, Policy, Stage
from postwarden.storage.base import StorageError
from postwarden.storage.settings import StorageSettings
from postwarden.storage.sqlite_access import AccessEntry, AccessStore, AccessTables

log = get_logger("access")

CLIENT_DENIED = R.Reply(554, "5.7.1", "Access denied")
HELO_DENIED = R.Reply(550, "5.7.1", "HELO name refused by policy")
SENDER_DENIED = R.Reply(550, "5.7.1", "Sender address refused by policy")
RECIPIENT_DENIED = R.Reply(550, "5.7.1", "Recipient address refused by policy")
# The database's change counter is read at most this often.
DB_CHECK_INTERVAL = 1.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network




class Pattern:
    """A glob or ``/regex/``, matched case-insensitively."""

    def __init__(self, text: str) -> None:
        self.text = text
        # A /regex/ is searched; a glob must match the whole value, so that
        # "bad.example" does not also refuse "notbad.example".
        self.glob = not (len(text) >= 2 and text.startswith("/") and text.endswith("/"))
        if self.glob:
            self.regex = re.compile(fnmatch.translate(text.lower()), re.IGNORECASE)
        else:
            self.regex = re.compile(text[1:-1], re.IGNORECASE)

    def matches(self, value: str) -> bool:
        if self.glob:
            return self.regex.fullmatch(value) is not None
        return self.regex.search(value) is not None


@dataclass(slots=True)
class Compiled:
    """The effective lists of one listener."""

    allow: list[Network] = field(default_factory=list)
    deny: list[Network] = field(default_factory=list)
    helo: list[Pattern] = field(default_factory=list)
    sender: list[Pattern] = field(default_factory=list)
    recipient: list[Pattern] = field(default_factory=list)

    def add(self, kind: str, value: str) -> None:
        if kind in ("allow", "deny"):
            net = ipaddress.ip_network(value, strict=False)
            (self.allow if kind == "allow" else self.deny).append(net)
        else:
            {"deny_helo": self.helo, "deny_sender": self.sender,
             "deny_recipient": self.recipient}[kind].append(Pattern(value))


def _in(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: Iterable[Network]) -> bool:
    return any(addr.version == n.version and addr in n for n in nets)


def _first(patterns: Iterable[Pattern], value: str) -> Pattern | None:
    for p in patterns:
        if p.matches(value):
            return p
    return None


class Access:
    """The checks, with the lists of the config and of the database."""

    def __init__(self, config: AccessConfig, db_path: Path | None,
                 shared: StorageSettings | None = None) -> None:
        self.config = config
        self.db_path = db_path
        # PostgreSQL (``[storage] backend = "postgres"``): the shared tables,
        # over one connection opened at the first read and kept.
        self.shared = shared if shared is not None and shared.postgres else None
        self._pg: AccessTables | None = None
        self.db_entries: list[AccessEntry] = []
        self.db_version = -1
        self._checked = 0.0
        self._cache: dict[str, Compiled] = {}
        self._lock = asyncio.Lock()

    # ---- lists -------------------------------------------------------------

    def lists(self, listener: str) -> Compiled:
        compiled = self._cache.get(listener)
        if compiled is None:
            compiled = Compiled()
            sources: list[AccessLists] = [self.config.lists]
            if listener in self.config.listeners:
                sources.append(self.config.listeners[listener])
            for src in sources:
                for kind in ACCESS_KINDS:
                    for value in getattr(src, kind):
                        compiled.add(kind, value)
            for e in self.db_entries:
                if e.listener in ("", listener) and e.kind in ACCESS_KINDS:
                    try:
                        compiled.add(e.kind, e.value)
                    except (ValueError, re.error) as exc:  # written by hand into the db
                        log.warning("access_entry_invalid", kind=e.kind, value=e.value,
                                    error=str(exc))
            self._cache[listener] = compiled
        return compiled

    @contextmanager
    def _store(self) -> Iterator[AccessTables | None]:
        """The database's access tables, or None when there is no database
        yet (a SQLite file not created)."""
        if self.shared is not None:
            if self._pg is None:
                from postwarden.storage.pg_access import PgAccessStore

                self._pg = PgAccessStore(self.shared)
            yield self._pg
            return
        if self.db_path is None or not self.db_path.exists():
            yield None
            return
        store = AccessStore(self.db_path)
        try:
            yield store
        finally:
            store.close()

    def close(self) -> None:
        """Close the connection to the shared tables (PostgreSQL)."""
        if self._pg is not None:
            self._pg.close()
            self._pg = None

    def _read_db(self) -> tuple[int, list[AccessEntry]] | None:
        with self._store() as store:
            return None if store is None else (store.version(), store.entries())

    def _apply_db(self, result: tuple[int, list[AccessEntry]] | None) -> None:
        if result is None:
            return
        version, entries = result
        if version != self.db_version:
            self.db_version, self.db_entries = version, entries
            self._cache.clear()
            log.info("access_reloaded", entries=len(entries), version=version)

    def _db_version(self) -> int | None:
        with self._store() as store:
            return None if store is None else store.version()

    def reload(self, config: AccessConfig | None = None) -> None:
        """SIGHUP: new config lists (when given) and the database entries."""
        if config is not None:
            self.config = config
        self._cache.clear()
        self.db_version = -1
        try:
            self._apply_db(self._read_db())
        except StorageError as exc:  # the shared database away: the config's lists
            log.error("access_reload_failed", error=str(exc))
        self._checked = time.monotonic()

    async def refresh(self) -> None:
        """Re-read the database entries when the CLI changed them (at most
        one look per :data:`DB_CHECK_INTERVAL`)."""
        if time.monotonic() - self._checked < DB_CHECK_INTERVAL:
            return
        async with self._lock:
            if time.monotonic() - self._checked < DB_CHECK_INTERVAL:
                return
            try:
                version = await asyncio.to_thread(self._db_version)
                if version is not None and version != self.db_version:
                    self._apply_db(await asyncio.to_thread(self._read_db))
            except StorageError as exc:  # the shared database away: the entries held
                log.warning("access_refresh_failed", error=str(exc))
            finally:
                self._checked = time.monotonic()

    # ---- checks ------------------------------------------------------------

    async def check_connect(self, ctx: CheckContext) -> R.Verdict:
        await self.refresh()
        addr = client_address(ctx.conn.peer_ip)
        if addr is None:
            return R.NO_OPINION
        lists = self.lists(ctx.listener.name)
        if _in(addr, lists.allow):
            ctx.conn.trusted = True
            return R.accept("client on the allow list")
        if _in(addr, lists.deny):
            return R.reject(CLIENT_DENIED, "client on the deny list")
        return R.NO_OPINION

    async def check_helo(self, ctx: CheckContext) -> R.Verdict:
        p = _first(self.lists(ctx.listener.name).helo, ctx.conn.helo)
        if p is not None:
            return R.reject(HELO_DENIED, f"HELO matches deny_helo {p.text}")
        return R.NO_OPINION

    async def check_sender(self, ctx: CheckContext) -> R.Verdict:
        address = ctx.path.address if ctx.path is not None else None
        p = _first(self.lists(ctx.listener.name).sender, str(address) if address else "")
        if p is not None:
            return R.reject(SENDER_DENIED, f"sender matches deny_sender {p.text}")
        return R.NO_OPINION

    async def check_recipient(self, ctx: CheckContext) -> R.Verdict:
        address = ctx.path.address if ctx.path is not None else None
        if address is None:
            return R.NO_OPINION
        p = _first(self.lists(ctx.listener.name).recipient, str(address))
        if p is not None:
            return R.reject(RECIPIENT_DENIED, f"recipient matches deny_recipient {p.text}")
        return R.NO_OPINION


def install(policy: Policy, config: Config) -> Access:
    """Register the checks; the connect check goes first, so that an allowed
    client skips the other connect-stage checks."""
    access = Access(config.access, config.db_path, config.storage)
    access.reload()
    policy.checks[Stage.CONNECT].insert(0, access.check_connect)
    policy.checks[Stage.HELO].insert(0, access.check_helo)
    policy.checks[Stage.MAIL].insert(0, access.check_sender)
    policy.checks[Stage.RCPT].insert(0, access.check_recipient)
    return access
