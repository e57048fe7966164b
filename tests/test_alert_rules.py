"""The alert rules one by one, on real databases, certificates, sockets and
the loopback DNS server; and the engine's deduplication and resolved
notices (by mail to the postmaster)."""

from __future__ import annotations

import asyncio
import datetime
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.conftest import DOMAIN, write_cert, write_config

from postwarden import config as config_mod
from postwarden.delivery.dns import Resolver
from postwarden.envelope import Address, Envelope, Recipient
from postwarden.observe import alerts
from postwarden.storage.base import CommitMeta
from postwarden.storage.sqlite_monitor import SqliteMonitorStore
from postwarden.storage.sqlite_queue import SqliteQueueStore


def load(tmp_path: Path, cert_files: tuple[Path, Path], dns: Any, extra: str = ""
         ) -> config_mod.Config:
    cfg = config_mod.load(write_config(tmp_path, cert_files, extra, dns_port=dns.port))
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    return cfg


async def queue(cfg: config_mod.Config, count: int) -> SqliteQueueStore:
    store = SqliteQueueStore(cfg.db_path, cfg.spool_dir)
    await store.start()
    for _ in range(count):
        body = store.new_body()
        body.write(b"Subject: x\r\n\r\nx\r\n")
        await store.commit(body, Envelope(Address("a", "x.test"), recipients=[
            Recipient(Address("b", "y.test"))]), b"", CommitMeta())
    return store


def test_bounce_rate_and_queue_rules(tmp_path: Path, cert_files: tuple[Path, Path],
                                     loopback_dns: Any) -> None:
    cfg = load(tmp_path, cert_files, loopback_dns,
               "[alerts]\nbounce_rate = 0.25\nbounce_min = 4\nqueue_max = 2\n"
               "deferred_age = 60\n")

    async def main() -> None:
        store = await queue(cfg, 3)
        await store.close()
    asyncio.run(main())
    db = sqlite3.connect(cfg.db_path)
    now = datetime.datetime.now(datetime.UTC).timestamp()
    events = [("delivered",)] * 3 + [("failed",), ("expired",)]
    db.executemany("INSERT INTO events (ts, queue_id, event) VALUES (?, 'Q', ?)",
                   [(now - 60, e) for (e,) in events])
    db.execute("UPDATE recipients SET status = 'deferred'")
    db.execute("UPDATE messages SET received_at = ?", (now - 120,))
    db.commit()
    (bounce,) = alerts.bounce_findings(cfg, db, now)
    assert bounce.key == "bounce_rate" and "2 of 5" in bounce.summary
    keys = {f.key for f in alerts.queue_findings(cfg, db, now)}
    assert keys == {"queue_size", "deferred_age"}
    # Old results do not count; an emptied queue is quiet.
    assert alerts.bounce_findings(cfg, db, now + 7200) == []
    db.execute("DELETE FROM recipients")
    db.execute("DELETE FROM messages")
    db.commit()
    assert alerts.queue_findings(cfg, db, now) == []
    db.close()


def test_certificate_rule(tmp_path: Path, ca: trustme.CA, loopback_dns: Any) -> None:
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=5)
    issued = ca.issue_cert("mail.example.test", not_after=soon)
    (tmp_path / "soon").mkdir()
    cert, key = tmp_path / "soon" / "cert.pem", tmp_path / "soon" / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    cfg = load(tmp_path, (cert, key), loopback_dns)
    (found,) = alerts.certificate_findings(cfg, soon.timestamp() - 5 * 86400)
    assert found.severity == "warning" and "expires in 5.0 days" in found.summary
    assert alerts.certificate_findings(cfg, soon.timestamp() - 30 * 86400) == []
    (late,) = alerts.certificate_findings(cfg, soon.timestamp() + 1)
    assert late.severity == "critical" and "expired" in late.summary
    fresh = write_cert(ca, tmp_path, "mail.example.test")
    cfg = load(tmp_path, fresh, loopback_dns)
    assert alerts.certificate_findings(cfg, datetime.datetime.now(datetime.UTC).timestamp()
                                       ) == []


def test_blocklist_rule(tmp_path: Path, cert_files: tuple[Path, Path],
                        loopback_dns: Any) -> None:
    cfg = load(tmp_path, cert_files, loopback_dns,
               '[alerts]\nown_ips = ["192.0.2.25", "192.0.2.26"]\nblocklists = ["bl.test"]\n')
    loopback_dns.set("25.2.0.192.bl.test", {"A": ["127.0.0.2"]})
    try:
        found = asyncio.run(alerts.blocklist_findings(cfg, Resolver(cfg.dns)))
    finally:
        loopback_dns.remove("25.2.0.192.bl.test")
    assert [f.key for f in found] == ["blocklisted:192.0.2.25:bl.test"]
    assert "127.0.0.2" in found[0].summary


def test_filter_daemon_rule(tmp_path: Path, cert_files: tuple[Path, Path],
                            loopback_dns: Any) -> None:
    path = tmp_path / "clamd.sock"
    cfg = load(tmp_path, cert_files, loopback_dns,
               f'[filters]\ninbound = ["rules", "clamav"]\n'
               f'[filters.clamav]\naddress = "unix:{path}"\n')
    (down,) = asyncio.run(alerts.filter_findings(cfg))
    assert down.key == "filter_down:clamav"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        listening.listen()
        assert asyncio.run(alerts.filter_findings(cfg)) == []


def test_engine_fires_once_and_resolves_by_mail(tmp_path: Path, cert_files: tuple[Path, Path],
                                                loopback_dns: Any) -> None:
    cfg = load(tmp_path, cert_files, loopback_dns, "[alerts]\nqueue_max = 1\nfilters = false\n")

    async def main() -> list[str]:
        store = await queue(cfg, 2)
        monitor = SqliteMonitorStore(cfg.db_path)
        engine = alerts.AlertEngine(cfg, monitor, store)
        try:
            assert [f.key for f in await engine.evaluate()] == ["queue_size"]
            # The alert mail itself is queued: 3 messages; still the same alert.
            assert [f.key for f in await engine.evaluate()] == ["queue_size"]
            assert list(monitor.firing()) == ["queue_size"]
            for msg in await store.list():
                if msg.listener != "alerts":
                    await store.delete(msg.queue_id)
            cfg2 = config_mod.load(write_config(tmp_path, cert_files,
                                                "[alerts]\nqueue_max = 5\nfilters = false\n",
                                                dns_port=loopback_dns.port))
            engine.cfg = cfg2
            assert await engine.evaluate() == []
            assert monitor.firing() == {}
            mails = [m for m in await store.list() if m.listener == "alerts"]
            subjects = []
            for m in mails:
                assert [r.address for r in m.recipients] == [f"postmaster@{DOMAIN}"]
                assert m.sender == ""
                data = b"".join([c async for c in store.read_message(m.queue_id)])
                subjects.append(next(line for line in data.decode().splitlines()
                                     if line.startswith("Subject:")))
            return sorted(subjects)
        finally:
            monitor.close()
            await store.close()

    subjects = asyncio.run(main())
    assert len(subjects) == 2
    assert subjects[0].startswith("Subject: [postwarden firing]")
    assert subjects[1].startswith("Subject: [postwarden resolved]")


@pytest.mark.parametrize("table, problem", [
    ({"webhook": "ftp://x"}, "alerts.webhook: must be an http:// or https:// URL"),
    ({"bounce_rate": 2}, "alerts.bounce_rate: must be a share between 0 and 1"),
    ({"own_ips": ["nope"]}, "alerts.own_ips: 'nope' is not an IP address"),
    ({"interval": "soon"}, "alerts.interval: 'soon' is not a duration"),
    ({"spike_factor": 0.5}, "alerts.spike_factor: must be at least 1"),
])
def test_config_errors_name_the_key(table: dict[str, object], problem: str) -> None:
    with pytest.raises(config_mod.ConfigError) as exc:
        config_mod.parse({"hostname": "mail.example.test", "alerts": table},
                         Path("/nonexistent/postwarden.toml"))
    assert str(exc.value).startswith(problem)
