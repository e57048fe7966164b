"""The monitoring store (alerts, suspensions, baselines, audit log), the
message trace and ``postwarden status`` / ``audit`` / ``suspend``: one
conformance suite run against both backends from the same test code.

``backend`` is SQLite (``postwarden.db``) or PostgreSQL (a schema of its
own per test).  Two stores opened on the same configuration stand for two
processes or two nodes: what one writes, the other sees.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import PG_DSN, write_config
from tests.test_queue_store import envelope

from postwarden import cli
from postwarden import config as config_mod
from postwarden.observe import trace
from postwarden.storage.base import CommitMeta, RcptStatus, RecipientResult
from postwarden.storage.factory import monitor_store, queue_store
from postwarden.storage.sqlite_monitor import Alert


@pytest.fixture(params=["sqlite", "postgres"])
def cfg(request: pytest.FixtureRequest, tmp_path: Path, cert_files: tuple[Path, Path],
        loopback_dns: Any) -> config_mod.Config:
    extra = ""
    if request.param == "postgres":
        schema = request.getfixturevalue("pg_schema")
        extra = f'[storage]\nbackend = "postgres"\ndsn = "{PG_DSN}"\nschema = "{schema}"\n'
    loaded = config_mod.load(write_config(tmp_path, cert_files, extra,
                                          dns_port=loopback_dns.port))
    loaded.data_dir.mkdir(parents=True, exist_ok=True)
    return loaded


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_an_alert_fired_by_two_processes_is_new_to_one_only(cfg: config_mod.Config) -> None:
    with monitor_store(cfg) as a, monitor_store(cfg) as b:
        alert = Alert("queue_size", "queue_size", "warning", "1001 messages in the queue")
        assert a.fire(alert) is True  # the one that tells the postmaster
        assert b.fire(Alert("queue_size", "queue_size", "warning", "1002 messages")) is False
        assert b.firing()["queue_size"].summary == "1002 messages"  # refreshed
        assert list(a.firing()) == ["queue_size"]
        assert b.resolve("queue_size") is True  # the resolved notice: once
        assert a.resolve("queue_size") is False
        assert a.firing() == {} == b.firing()


def test_a_suspension_through_one_store_holds_in_the_other(cfg: config_mod.Config) -> None:
    with monitor_store(cfg) as admin, monitor_store(cfg) as server:
        assert not server.suspended("alice@example.test")
        assert admin.suspend("Alice@Example.test", "spam burst", "administrator") is True
        assert admin.suspend("alice@example.test", "again") is False  # already
        assert admin.suspended("ALICE@example.test")  # its own change: at once
        # The other process sees it within the cache's second.
        assert wait_for(lambda: server.suspended("alice@example.test"))
        ((account, reason, since, by),) = server.suspensions()
        assert (account, reason, by) == ("alice@example.test", "spam burst", "administrator")
        assert 0 < time.time() - since < 60
        assert server.unsuspend("alice@example.test") is True
        assert server.unsuspend("alice@example.test") is False
        assert wait_for(lambda: not admin.suspended("alice@example.test"))
        # Lifted a moment ago: the detector does not suspend it again...
        assert not admin.suspend("alice@example.test", "spike", unless_lifted_within=600)
        # ...the administrator can.
        assert admin.suspend("alice@example.test", "by hand") is True


def test_baselines_fold_each_window_once(cfg: config_mod.Config) -> None:
    with monitor_store(cfg) as a, monitor_store(cfg) as b:
        a.fold("alice@example.test", 600, 10.0)
        b.fold("alice@example.test", 1200, 20.0)
        b.fold("alice@example.test", 1200, 20.0)  # the same window: not twice
        assert a.baselines() == {"alice@example.test": (12.0, 1200, 2)}
        a.set_baseline("Bob@example.test", 3.0)
        a.set_baseline("bob@example.test", 4.0, 600)
        assert b.baselines()["bob@example.test"] == (4.0, 600, 1)


def test_audit_entries_from_every_process(cfg: config_mod.Config) -> None:
    with monitor_store(cfg) as a, monitor_store(cfg) as b:
        a.audit("root", "cli", "user add", "bob@example.test", {"quota": 5})
        b.audit("admin", "web", "queue delete", "Q1", result="failed")
        entries = a.audit_entries()
        assert [(e.actor, e.source, e.action, e.target, e.result) for e in entries] == [
            ("root", "cli", "user add", "bob@example.test", "ok"),
            ("admin", "web", "queue delete", "Q1", "failed")]
        assert json.loads(entries[0].detail) == {"quota": 5}
        assert [e.action for e in b.audit_entries(limit=1)] == ["queue delete"]
        assert b.audit_entries(since=time.time() + 60) == []
        last = b.last_audit("user add")
        assert last is not None and last.actor == "root"
        assert b.last_audit("config changed") is None
        # Two nodes' config files in one log: each node compares with its own.
        a.audit("root", "server", "config changed", "mx1:/etc/pw.toml", {"sha256": "one"})
        b.audit("root", "server", "config changed", "mx2:/etc/pw.toml", {"sha256": "two"})
        mine = a.last_audit("config changed", "mx1:/etc/pw.toml")
        assert mine is not None and '"one"' in mine.detail
        newest = a.last_audit("config changed")
        assert newest is not None and newest.target == "mx2:/etc/pw.toml"


def test_suspend_and_audit_commands(cfg: config_mod.Config, capsys: Any) -> None:
    path = str(cfg.path)
    monitor_store(cfg).close()  # (SQLite: the server created the file)
    assert cli.main(["-c", path, "suspend", "add", "carol@example.test",
                     "--reason", "phished"]) == 0
    assert cli.main(["-c", path, "suspend", "list"]) == 0
    assert "carol@example.test  since" in capsys.readouterr().out
    assert cli.main(["-c", path, "suspend", "lift", "nobody@example.test"]) == 1
    assert "nobody@example.test is not suspended" in capsys.readouterr().err
    assert cli.main(["-c", path, "audit", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(e["action"], e["target"], e["result"]) for e in entries] == [
        ("suspend add", "carol@example.test", "ok"),
        ("suspend lift", "nobody@example.test", "failed (exit 1)")]


async def _fill(cfg: config_mod.Config) -> list[str]:
    """Three messages in the queue with their events: one delivered, one
    deferred, one waiting."""
    store = queue_store(cfg, node=False)
    await store.start()
    ids = []
    try:
        for n, (sender, rcpt) in enumerate([("Alice@Example.test", "bob@remote.test"),
                                            ("carol@example.test", "Dave@Remote.test"),
                                            ("alice@example.test", "erin@remote.test")]):
            body = store.new_body()
            body.write(f"Message-ID: <m{n}@example.test>\r\n\r\nhello\r\n".encode())
            ids.append(await store.commit(body, envelope(rcpt, sender=sender), b"", CommitMeta(
                client_ip="192.0.2.1", listener="submission", message_id=f"<m{n}@example.test>",
                detail="listener=submission")))
        for queue_id, status, reply in [(ids[0], RcptStatus.DELIVERED, "250 2.0.0 ok"),
                                        (ids[1], RcptStatus.DEFERRED, "451 4.3.0 later")]:
            msg = await store.get(queue_id)
            assert msg is not None
            await store.record_results(queue_id, [RecipientResult(
                msg.recipients[0].id, status, reply, next_attempt=time.time() + 600,
                relay="mx.remote.test")])
    finally:
        await store.close()
    return ids


def test_trace_and_status_read_the_configured_backend(cfg: config_mod.Config,
                                                      capsys: Any) -> None:
    ids = asyncio.run(_fill(cfg))

    def found(**kw: Any) -> list[str]:
        return [t.queue_id for t in trace.search(cfg, trace.Query(**kw))]

    # Case-insensitive addresses, newest event first; Message-ID with or
    # without <>.
    assert found(sender="alice@EXAMPLE.test") == [ids[0], ids[2]]
    assert found(rcpt="<dave@remote.test>") == [ids[1]]
    assert found(message_id="m0@example.test") == [ids[0]]
    assert found(sender="alice@example.test", rcpt="erin@remote.test") == [ids[2]]
    assert found(queue_id=ids[1].lower()) == [ids[1]]
    # (Newest first: by each message's latest event.)
    assert found(since=time.time() - 60) == [ids[1], ids[0], ids[2]]
    assert found(until=time.time() - 3600) == []
    (delivered,) = trace.search(cfg, trace.Query(queue_id=ids[0]))
    assert [e.event for e in delivered.events] == ["queued", "delivered", "removed"]
    assert delivered.events[1].relay == "mx.remote.test"
    assert delivered.summary()["sender"] == "Alice@example.test"

    assert cli.main(["-c", str(cfg.path), "trace", "--to", "dave@remote.test"]) == 0
    out = capsys.readouterr().out
    assert ids[1] in out and "deferred" in out and "451 4.3.0 later" in out

    assert cli.main(["-c", str(cfg.path), "status", "--json"]) == 1  # no server runs
    status = json.loads(capsys.readouterr().out)
    assert status["queue"]["messages"]["active"] == 2
    assert status["queue"]["recipients"] == {"queued": 1, "deferred": 1}
    assert status["last_hour"] == {"received": 3, "delivered": 1, "deferred": 1, "bounced": 0}


def test_the_spike_rule_reads_the_rate_counters_of_the_backend(cfg: config_mod.Config) -> None:
    from postwarden.observe import alerts
    from postwarden.storage.factory import open_reader
    from postwarden.storage.sqlite_protect import SqliteProtectStore

    if not cfg.storage.postgres:
        SqliteProtectStore(cfg.db_path).close()  # (the server creates the counters)
    window = cfg.ratelimit.window
    now = time.time()
    start = int(now // window) * window
    with monitor_store(cfg) as monitor:
        monitor.set_baseline("alice@example.test", 1.0)
        with monitor._write() as db:  # what the rate limiter counted
            db.execute("INSERT INTO protect_rates (key, window_start, count) VALUES (?, ?, ?)",
                       ("msg:acct:alice@example.test", start, 500))
        reader = open_reader(cfg)
        try:
            found = {f.key: f for f in alerts.spike_findings(cfg, reader, monitor, now)}
        finally:
            reader.close()
    spike = found["account_spike:alice@example.test"]
    assert spike.severity == "critical" and "usually 1.0" in spike.summary


# ---- the web admin's store ------------------------------------------------------


def test_admin_accounts_sessions_keys_and_lockouts_are_shared(cfg: config_mod.Config) -> None:
    from postwarden.auth.passwords import hash_password
    from postwarden.storage.factory import admin_store
    from postwarden.web.store import AdminError

    with admin_store(cfg) as a, admin_store(cfg) as b:
        a.add("root", hash_password("correct horse battery staple 42"), "admin")
        with pytest.raises(AdminError, match="admin root already exists"):
            b.add("root", "x", "read-only")
        found = b.get("root")
        assert found is not None and found.role == "admin" and found.can_change
        token, opened = a.new_session("root", 3600)
        seen = b.session(token)  # a browser's cookie from node A, on node B
        assert seen is not None and (seen.name, seen.csrf) == ("root", opened.csrf)
        b.set_role("root", "read-only")
        seen = a.session(token)
        assert seen is not None and not seen.can_change
        b.set_password("root", hash_password("another long passphrase 43"))
        assert a.session(token) is None  # a new password ends every session
        whole, key = a.add_key("read", label="monitoring")
        checked = b.check_key(whole)
        assert checked is not None and checked.scope == "read" and checked.last_used
        assert [k.key_id for k in a.list_keys()] == [key.key_id]
        assert b.check_key(whole[:-2] + "xx") is None
        a.revoke_key(key.key_id)
        assert b.check_key(whole) is None
        for _ in range(3):
            a.failed(["name:root", "ip:192.0.2.1"], 600)
        assert b.locked(["ip:192.0.2.1"], 3, 600) and not b.locked(["ip:192.0.2.1"], 4, 600)
        b.succeeded(["name:root", "ip:192.0.2.1"])
        assert not a.locked(["name:root"], 1, 600)
        assert [u.name for u in b.list_admins()] == ["root"]
        a.delete("root")
        assert b.get("root") is None


def test_webhook_events_are_posted_by_one_process(cfg: config_mod.Config) -> None:
    from postwarden.storage.factory import admin_store

    with admin_store(cfg) as a, admin_store(cfg) as b:
        a.set_webhook("alice@example.test", "https://hooks.example/a", "s3cret")
        assert b.webhooks() == {"alice@example.test": "https://hooks.example/a"}
        a.outbox_add([("alice@example.test", '{"n": 1}'), ("alice@example.test", '{"n": 2}')])
        now = time.time()
        due = a.outbox_due(now, 10)
        assert [(u, s, p, n) for _, u, s, p, n in due] == [
            ("https://hooks.example/a", "s3cret", '{"n": 1}', 0),
            ("https://hooks.example/a", "s3cret", '{"n": 2}', 0)]
        if cfg.storage.postgres:  # claimed by A: B's sender does not post them too
            assert b.outbox_due(now, 10) == []
        first, second = (row[0] for row in due)
        a.outbox_done(first)
        a.outbox_retry(second, 1, now - 1)  # failed once; due again
        assert [(i, n) for i, _, _, _, n in b.outbox_due(now, 10)] == [(second, 1)]
        b.del_webhook("alice@example.test")  # its waiting events go with it
        assert a.outbox_due(now + 3600, 10) == []
