"""Shared fixtures: real certificates (trustme), real config files, and a
real postwarden server running in a background thread on port 0."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from postwarden import config as config_mod
from postwarden.observe import log as logmod

REQUIRE_ALL = os.environ.get("POSTWARDEN_REQUIRE_ALL") == "1"
DOMAIN = "example.test"
HOSTNAME = "mail.example.test"
PASSWORD = "correct horse battery staple"


def require_tool(name: str) -> str:
    """The path of an external tool; skip (fail in CI) when it is missing."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (Debian package providing it is required)"
        if REQUIRE_ALL:
            pytest.fail(msg + " and POSTWARDEN_REQUIRE_ALL=1")
        pytest.skip(msg)
    return path


def require_peer(name: str) -> str:
    """A daemon run as a private test peer (Postfix, Dovecot): also found in
    /usr/sbin when that is not on PATH; the peers must start as root."""
    from tests.peers import find_tool

    path = find_tool(name) or require_tool(name)
    if os.geteuid() != 0:
        msg = f"{name} test peers must run as root"
        if REQUIRE_ALL:
            pytest.fail(msg + " and POSTWARDEN_REQUIRE_ALL=1")
        pytest.skip(msg)
    return path


# The PostgreSQL the tests use (trust auth on loopback); each test gets a
# schema of its own (the pg_schema fixture), dropped afterwards.
PG_DSN = os.environ.get("POSTWARDEN_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def require_postgres() -> str:
    """The DSN of the test PostgreSQL; skip (fail in CI) when it does not answer."""
    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
        await conn.close()

    try:
        asyncio.run(probe())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        msg = f"PostgreSQL at {PG_DSN} does not answer ({exc})"
        if REQUIRE_ALL:
            pytest.fail(msg + " and POSTWARDEN_REQUIRE_ALL=1")
        pytest.skip(msg)
    return PG_DSN


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema name for one test (postwarden creates it;
    it is dropped with everything in it afterwards)."""
    import secrets

    import asyncpg

    require_postgres()
    name = "t_" + secrets.token_hex(6)
    yield name

    async def drop() -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


async def pg_pool(schema: str) -> Any:
    """An asyncpg pool on ``schema`` (created and migrated by postwarden),
    for the stores that share a node's pool (protection, greylisting)."""
    import asyncpg

    from postwarden.storage.pg_schema import prepare

    conn = await asyncpg.connect(PG_DSN)
    try:
        await prepare(conn, schema)
    finally:
        await conn.close()
    return await asyncpg.create_pool(PG_DSN, min_size=1, max_size=4,
                                     server_settings={"search_path": schema})


def write_cert(ca: trustme.CA, directory: Path, *names: str) -> tuple[Path, Path]:
    """A certificate from ``ca`` for ``names``: (chain file, key file 0600)."""
    issued = ca.issue_cert(*names)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    for i, pem in enumerate(issued.cert_chain_pems):
        pem.write_to_path(str(cert_path), append=i > 0)
    issued.private_key_pem.write_to_path(str(key_path))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def cert_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_cert(ca, tmp_path_factory.mktemp("tls"), HOSTNAME, "localhost", "127.0.0.1",
                      "::1")


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(p))
    return p


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture(scope="session")
def loopback_dns() -> Iterator[Any]:
    """A DNS server on loopback that every test server uses: no test ever
    asks the real DNS.  It knows no names unless a test adds them."""
    from tests.dns_server import LoopbackDns

    dns = LoopbackDns({})
    dns.start()
    yield dns
    dns.stop()


def write_config(directory: Path, cert_files: tuple[Path, Path], extra: str = "",
                 ports: tuple[int, int, int] = (0, 0, 0), *, dns_port: int) -> Path:
    """A config for a test server.  ``dns_port`` is a loopback DNS server's:
    tests never use the system resolver."""
    cert, key = cert_files
    path = directory / "postwarden.toml"
    path.write_text(f"""
hostname = "{HOSTNAME}"
data_dir = "data"
domains = ["{DOMAIN}"]

[listeners.mx]
address = "127.0.0.1:{ports[0]}"
[listeners.submission]
address = "127.0.0.1:{ports[1]}"
[listeners.submissions]
address = "127.0.0.1:{ports[2]}"

[tls]
cert = "{cert}"
key = "{key}"

[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = 1.0

[limits]
auth_fail_delay = 0.05
{extra}
""")
    return path


class ServerThread:
    """A postwarden server on its own event loop in a background thread."""

    def __init__(self, cfg: config_mod.Config) -> None:
        self.cfg = cfg
        from postwarden.app import new_event_loop

        self.loop = new_event_loop()
        from postwarden.app import Server

        self.server = Server(cfg)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        return self

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def port(self, name: str) -> int:
        return self.server.port(name)

    def stop(self) -> None:
        try:
            self.call(self.server.stop(grace=2))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def add_user(cfg: config_mod.Config, address: str, password: str = PASSWORD) -> None:
    from postwarden.auth.passwords import hash_password
    from postwarden.storage.sqlite_directory import SqliteDirectory

    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    d = SqliteDirectory(cfg.db_path, cfg.domains)
    try:
        d.add_user(address, hash_password(password))
    finally:
        d.close()


def add_alias(cfg: config_mod.Config, source: str, *targets: str) -> None:
    from postwarden.storage.sqlite_directory import SqliteDirectory

    d = SqliteDirectory(cfg.db_path, cfg.domains)
    try:
        d.add_alias(source, targets)
    finally:
        d.close()


@pytest.fixture
def make_server(tmp_path: Path, cert_files: tuple[Path, Path], loopback_dns: Any
                ) -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def factory(extra: str = "", users: tuple[str, ...] = (f"alice@{DOMAIN}",),
                directory: Path | None = None, ports: tuple[int, int, int] = (0, 0, 0)
                ) -> ServerThread:
        d = directory or tmp_path
        cfg = config_mod.load(write_config(d, cert_files, extra, ports=ports,
                                           dns_port=loopback_dns.port))
        for u in users:
            add_user(cfg, u)
        st = ServerThread(cfg).start()
        servers.append(st)
        return st

    yield factory
    for st in servers:
        st.stop()


@pytest.fixture
def server(make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server()


def maildir_messages(cfg: config_mod.Config, address: str) -> list[bytes]:
    local, domain = address.split("@")
    new = cfg.mail_dir / domain / local / "Maildir" / "new"
    if not new.is_dir():
        return []
    return [p.read_bytes() for p in sorted(new.iterdir())]


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``predicate`` until it is truthy (for asynchronous delivery)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The log, as JSON lines in memory, for the length of a test."""
    buf = io.StringIO()
    logmod.configure("json", "info", buf)
    try:
        yield buf
    finally:
        logmod.configure("json", "info", sys.stderr)


def json_log_events(buf: io.StringIO) -> list[dict[str, Any]]:
    """The records written to a :func:`log_lines` buffer."""
    return [json.loads(line) for line in buf.getvalue().splitlines()]
