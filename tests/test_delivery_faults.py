"""Network faults on outbound delivery, end to end: a remote MX that hangs,
refuses, talks nonsense, drops the connection in DATA, fails the TLS
handshake or crawls; a DNS server that times out, fails or loops.  Each
ends in a deferral with the reason recorded, within the configured
timeouts (no worker stuck), and then in exactly one delivery once the
fault is gone."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests.conftest import ServerThread, add_alias, wait_for
from tests.fault_mx import FaultMx, server_tls

from postwarden.storage.base import QueuedMessage

FWD = "fwd@example.test"


@pytest.fixture
def fault_mx(cert_files: tuple[Any, Any]) -> Iterator[FaultMx]:
    with FaultMx("good", server_tls(cert_files)) as mx:
        yield mx


def start(make_server: Callable[..., ServerThread], mx: FaultMx, dns: Any, domain: str,
          extra: str = "") -> ServerThread:
    dns.set(domain, {"MX": [(10, f"mx.{domain}")]})
    dns.set(f"mx.{domain}", {"A": ["127.0.0.1"]})
    st = make_server(
        "[checks]\nverify = false\n"
        "[queue]\nscan_interval = 0.5\nretry_min = 1\nretry_max = 1\n"
        f"[delivery]\nmx_port = {mx.port}\nconnect_timeout = 2\ngreeting_timeout = 2\n"
        "command_timeout = 2\ndata_timeout = 3\n" + extra)
    add_alias(st.cfg, FWD, f"someone@{domain}")
    return st


def submit(st: ServerThread, tag: str) -> None:
    with smtplib.SMTP("127.0.0.1", st.port("mx"), timeout=10) as c:
        c.sendmail("s@remote.example", [FWD], f"Subject: {tag}\r\n\r\nbody\r\n".encode())


def queued(st: ServerThread) -> list[QueuedMessage]:
    assert st.server.store is not None
    msgs: list[QueuedMessage] = st.call(st.server.store.list())
    return msgs


def deferred_reply(st: ServerThread, timeout: float) -> str:
    def reply() -> str:
        for m in queued(st):
            for r in m.recipients:
                if r.attempts >= 1 and r.last_reply:
                    return r.last_reply
        return ""
    return str(wait_for(reply, timeout=timeout))


def retried_once(st: ServerThread, mx: FaultMx) -> None:
    assert st.server.store is not None
    st.call(st.server.store.flush())
    assert wait_for(lambda: queued(st) == [], timeout=20), queued(st)
    time.sleep(0.6)  # a scan: nothing more goes out
    assert len(mx.received) == 1 and b"Subject: " in mx.received[0]


MX_FAULTS = [
    # (mode, seconds the deferral may take, what the recorded reason says)
    ("hang", 10, "timed out while receiving the initial server greeting"),
    ("greet421", 6, "refused to talk to me: 421 4.3.2"),
    ("invalid", 6, "reply to ehlo: malformed reply"),
    ("close_in_data", 6, "lost connection with mx.close-in-data"),
    ("tls_fail", 6, "tls handshake with host"),
    # 1 byte per second: the greeting timeout is for the whole reply.
    ("slow", 12, "timed out while receiving the initial server greeting"),
]


@pytest.mark.parametrize(("mode", "within", "reason"), MX_FAULTS, ids=[m[0] for m in MX_FAULTS])
def test_remote_mx_fault_defers_then_delivers_once(
        make_server: Callable[..., ServerThread], fault_mx: FaultMx, loopback_dns: Any,
        mode: str, within: float, reason: str) -> None:
    domain = f"{mode.replace('_', '-')}.mxfault.example"
    extra = f'[tls_policy]\n"{domain}" = "encrypt"\n' if mode == "tls_fail" else ""
    fault_mx.mode = mode
    st = start(make_server, fault_mx, loopback_dns, domain, extra)
    started = time.monotonic()
    submit(st, mode)
    why = deferred_reply(st, within + 5)
    assert why, f"no deferral within {within + 5} s"
    assert time.monotonic() - started < within + 5
    assert reason in why.lower(), why
    assert fault_mx.received == []
    fault_mx.mode = "good"
    retried_once(st, fault_mx)


DNS_FAULTS = [
    ("timeout", "DROP", "4.4.3 dns timeout looking up mx"),
    ("servfail", "SERVFAIL", "4.4.3 dns server failure looking up mx"),
    # The chain never ends in an answer: a (temporary) server failure.
    ("cname-loop", None, "4.4.3 dns server failure looking up mx"),
]


@pytest.mark.parametrize(("name", "data", "reason"), DNS_FAULTS, ids=[d[0] for d in DNS_FAULTS])
def test_dns_fault_defers_then_delivers_once(
        make_server: Callable[..., ServerThread], fault_mx: FaultMx, loopback_dns: Any,
        name: str, data: str | None, reason: str) -> None:
    domain = f"{name}.dnsfault.example"
    st = start(make_server, fault_mx, loopback_dns, domain)
    if data is None:
        loopback_dns.set(domain, {"CNAME": f"loop.{domain}"})
        loopback_dns.set(f"loop.{domain}", {"CNAME": domain})
    else:
        loopback_dns.set(domain, data)
    try:
        submit(st, name)
        why = deferred_reply(st, 15)
        assert why and reason in why.lower(), why
        assert fault_mx.received == []
        assert all(r.status.value == "deferred" for m in queued(st) for r in m.recipients)
    finally:
        loopback_dns.set(domain, {"MX": [(10, f"mx.{domain}")]})
        loopback_dns.remove(f"loop.{domain}")
    retried_once(st, fault_mx)
