"""``postwarden queue ...`` and ``postwarden send-test`` against a running server."""

from __future__ import annotations

import json
import os
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from tests.conftest import PASSWORD, ServerThread, maildir_messages, wait_for
from tests.test_service import free_ports

ALICE = "alice@example.test"


class Sink:
    """An aiosmtpd handler that keeps every envelope it receives."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 Ok: sunk"


@pytest.fixture
def remote_port() -> int:
    return free_ports(1)[0]


@pytest.fixture
def server_with_remote(make_server: Callable[..., ServerThread], remote_port: int
                       ) -> ServerThread:
    ports = free_ports(3)
    return make_server(f'[transports]\n"remote.example" = "smtp:[127.0.0.1]:{remote_port}"\n'
                       '[queue]\nretry_min = 300\n', ports=(ports[0], ports[1], ports[2]))


def cli(st: ServerThread, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "postwarden", "-c", str(st.cfg.path), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def submit(st: ServerThread, tls: ssl.SSLContext, to: str) -> str:
    client = smtplib.SMTP("127.0.0.1", st.port("submission"), timeout=10)
    client.starttls(context=tls)
    client.login(ALICE, PASSWORD)
    client.mail(ALICE)
    client.rcpt(to)
    code, reply = client.data(b"Subject: queued test\r\n\r\nbody\r\n")
    client.quit()
    assert code == 250
    return reply.decode().rsplit(" ", 1)[-1]


def queue_json(st: ServerThread) -> list[dict[str, Any]]:
    r = cli(st, "queue", "list", "--json")
    assert r.returncode == 0, r.stderr
    data: list[dict[str, Any]] = json.loads(r.stdout)
    return data


@pytest.fixture
def sink(remote_port: int) -> Iterator[Sink]:
    handler = Sink()
    yield handler


def test_queue_list_hold_release_flush_delete(server_with_remote: ServerThread,
                                              client_tls: ssl.SSLContext, remote_port: int,
                                              sink: Sink) -> None:
    st = server_with_remote
    qid = submit(st, client_tls, "friend@remote.example")
    entry = wait_for(lambda: next((m for m in queue_json(st) if m["queue_id"] == qid
                                   and m["recipients"][0]["status"] == "deferred"), None))
    assert entry, "the message was not deferred (nothing listens on the remote port)"
    assert entry["sender"] == ALICE and entry["recipients"][0]["address"] == \
        "friend@remote.example"
    assert entry["recipients"][0]["last_reply"].startswith("4.")

    r = cli(st, "queue", "list")
    assert qid in r.stdout and "friend@remote.example" in r.stdout and "[deferred]" in r.stdout

    assert cli(st, "queue", "hold", qid).returncode == 0
    assert next(m for m in queue_json(st) if m["queue_id"] == qid)["held"] is True
    r = cli(st, "queue", "show", qid)
    assert r.returncode == 0 and "(held)" in r.stdout and "Subject: queued test" in r.stdout
    assert "history:" in r.stdout and "deferred" in r.stdout
    assert cli(st, "queue", "release", qid).returncode == 0

    # The remote end comes up; without flush the retry would wait 5 minutes.
    controller = Controller(sink, hostname="127.0.0.1", port=remote_port)
    controller.start()
    try:
        r = cli(st, "queue", "flush", qid)
        assert r.returncode == 0 and "delivering now" in r.stdout, r.stdout + r.stderr
        assert wait_for(lambda: sink.envelopes, timeout=15)
    finally:
        controller.stop()
    assert sink.envelopes[0].rcpt_tos == ["friend@remote.example"]
    assert wait_for(lambda: not any(m["queue_id"] == qid for m in queue_json(st)))
    r = cli(st, "queue", "show", qid)
    assert r.returncode == 0 and "delivered" in r.stdout and "127.0.0.1" in r.stdout

    qid2 = submit(st, client_tls, "other@remote.example")
    assert cli(st, "queue", "delete", qid2).returncode == 0
    assert not any(m["queue_id"] == qid2 for m in queue_json(st))
    r = cli(st, "queue", "delete", qid2)
    assert r.returncode == 1 and "no message" in r.stderr


def test_send_test_to_local_mailbox(server_with_remote: ServerThread) -> None:
    st = server_with_remote
    r = cli(st, "send-test", "--to", ALICE, "--user", ALICE, "--timeout", "20",
            env={"POSTWARDEN_PASSWORD": PASSWORD})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "delivered: <alice@example.test> to a local mailbox" in r.stdout
    msgs = maildir_messages(st.cfg, ALICE)
    assert any(b"postwarden test message" in m for m in msgs)


def test_send_test_reports_deferral(server_with_remote: ServerThread) -> None:
    st = server_with_remote
    r = cli(st, "send-test", "--to", "friend@remote.example", "--user", ALICE, "--timeout", "3",
            env={"POSTWARDEN_PASSWORD": PASSWORD})
    assert r.returncode == 1
    assert "NOT delivered yet: <friend@remote.example> deferred" in r.stdout


def test_send_test_wrong_password(server_with_remote: ServerThread) -> None:
    r = cli(server_with_remote, "send-test", "--to", ALICE, "--user", ALICE,
            env={"POSTWARDEN_PASSWORD": "wrong"})
    assert r.returncode == 1 and "535" in r.stderr and "Traceback" not in r.stderr


def test_send_test_via_mx(server_with_remote: ServerThread) -> None:
    r = cli(server_with_remote, "send-test", "--via", "mx", "--from", "probe@remote.example",
            "--to", ALICE, "--timeout", "20")
    assert r.returncode == 0, r.stdout + r.stderr
