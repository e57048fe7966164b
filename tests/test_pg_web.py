"""The web admin's figures and the HTTP API's read paths on PostgreSQL:
mail accepted by one node is in the queue page, the trace, the status and
the dashboard figures of another node's web admin; an API key made through
one node works on the other.

Two servers (each on its own event loop) share one PostgreSQL schema and
stand for two nodes; node B serves ``[admin]`` with the web admin.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import DOMAIN, PG_DSN, ServerThread, wait_for
from tests.test_service import free_ports
from tests.test_web_api import call, new_key

from postwarden.auth.passwords import hash_password
from postwarden.storage.pg_directory import DirectoryEdit
from postwarden.web import dashboard

BOB = f"bob@{DOMAIN}"


def pg_nodes(make_server: Callable[..., ServerThread], tmp_path: Path, schema: str
             ) -> tuple[ServerThread, ServerThread]:
    storage = (f'[storage]\nbackend = "postgres"\ndsn = "{PG_DSN}"\nschema = "{schema}"\n'
               "pool_min = 1\npool_max = 4\n")
    quiet = "[alerts]\nenabled = false\n[queue]\nworkers = 0\n"  # the mail stays queued
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_server(storage + quiet, users=(), directory=tmp_path / "a")
    with DirectoryEdit(a.cfg.storage, a.cfg.domains) as directory:
        directory.add_user(BOB, hash_password("a long enough password 42"))
    ports = free_ports(4)
    admin = f'[admin]\nenabled = true\naddress = "127.0.0.1:{ports[3]}"\n'
    b = make_server(storage + quiet + admin, users=(), directory=tmp_path / "b",
                    ports=(ports[0], ports[1], ports[2]))
    assert a.server.directory is not None
    assert wait_for(lambda: a.server.directory.resolve_sync(BOB) == [BOB])  # reloaded
    return a, b


def send(st: ServerThread, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", st.port("mx"), timeout=10) as client:
        for i in range(count):
            client.sendmail(f"sender{i}@remote.example", [BOB],
                            f"Subject: {i}\r\nMessage-ID: <pgweb.{i}@remote.example>\r\n\r\n"
                            f"hello\r\n".encode())


def test_node_b_web_api_reads_the_shared_queue_and_trace(
        make_server: Callable[..., ServerThread], tmp_path: Path, pg_schema: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    a, b = pg_nodes(make_server, tmp_path, pg_schema)
    send(a, 3)
    # A key made through node A's command line works on node B (shared keys).
    key = new_key(a, capsys, "read")
    assert call(b, "GET", "/api/v1/status", key[:-2] + "xx")[0] == 401
    status, body = call(b, "GET", "/api/v1/status", key)
    assert status == 200 and body["queue"]["messages"]["active"] == 3
    assert body["queue"]["recipients"]["queued"] == 3
    status, page = call(b, "GET", "/api/v1/queue?sort=sender&limit=2", key)
    assert status == 200 and page["total"] == 3
    assert [m["sender"] for m in page["messages"]] == ["sender0@remote.example",
                                                       "sender1@remote.example"]
    _, found = call(b, "GET", "/api/v1/queue?q=SENDER2", key)
    assert [m["sender"] for m in found["messages"]] == ["sender2@remote.example"]
    assert call(b, "GET", "/api/v1/queue?state=held", key)[1]["total"] == 0
    status, traced = call(b, "GET", "/api/v1/trace?message_id=pgweb.1@remote.example", key)
    assert status == 200
    (message,) = traced["messages"]
    assert message["sender"] == "sender1@remote.example" and message["recipients"] == [BOB]

    # The dashboard's figures (what the page draws) on node B.
    figures: Any = dashboard.figures(b.cfg, time.time(), b.server.monitor)
    assert sum(figures.incoming) == 3 and figures.queue["messages"]["active"] == 3
    assert sorted(s for s, _ in figures.senders) == [f"sender{i}@remote.example"
                                                     for i in range(3)]
