"""Outbound delivery to a real Postfix smtpd (or postwarden): DATA against BDAT.

postwarden's SMTP client sends a message with ``BDAT n LAST`` in the
envelope's write when the server offers CHUNKING (RFC 3030), and with DATA
otherwise (``[delivery] chunking = false``).  This starts a private Postfix
(bench/servers.py, hold queue: it takes and keeps every message) and runs
``SmtpTransport.deliver`` in a loop against it, one message at a time over
one reused connection, alternating DATA and BDAT runs; it prints the median
latency per message and the client's CPU per message, by size.  The
servers write where ``make bench`` does (bench/disk.py).

    python -m bench.outbound [--sizes 2048,16384,102400] [--count 300] [--runs 3]
                             [--peer postfix|postwarden]

``--peer postwarden`` sends to ``postwarden serve`` instead (delivery
paused, the bench's loopback DNS stub), which offers CHUNKING too.

Messages go to 127.0.0.1 only.  Run as root (a Postfix master starts as
root).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import statistics
import time
from collections.abc import AsyncIterator

from bench import disk
from bench.dnsstub import DnsStub
from bench.servers import (
    PostfixServer,
    PostwardenServer,
    ensure_postfix,
    make_postwarden_template,
    stop_all,
)
from postwarden.config import DeliveryConfig, DnsConfig
from postwarden.delivery.dns import Resolver
from postwarden.delivery.remote import SmtpTransport
from postwarden.delivery.result import DeliveryStatus
from postwarden.delivery.transport import DeliveryJob, parse_nexthop
from postwarden.envelope import MailParams, RcptParams
from postwarden.storage.base import QueuedMessage, QueuedRecipient

WARMUP = 20


def message(size: int) -> bytes:
    head = b"From: <bench@client.test>\r\nTo: <sink@sink.test>\r\nSubject: outbound\r\n\r\n"
    line = b"y" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def run(port: int, size: int, count: int, chunking: bool) -> tuple[float, float]:
    """Median seconds per delivery, and client CPU seconds per delivery."""
    body = message(size)
    config = DeliveryConfig(chunking=chunking, tls="none", helo_name="bench.test")
    resolver = Resolver(DnsConfig(nameservers=(("127.0.0.1", 9),), timeout=0.5))
    transport = SmtpTransport("bench.test", config, resolver)
    rcpt = QueuedRecipient(1, "sink@sink.test", RcptParams())
    msg = QueuedMessage("BENCH", "bench@client.test", MailParams(), [rcpt], 0.0, len(body))

    async def source() -> AsyncIterator[bytes]:
        yield body

    job = DeliveryJob(msg, [rcpt], parse_nexthop(f"smtp:[127.0.0.1]:{port}"), source)
    took: list[float] = []
    cpu = 0.0
    try:
        for i in range(WARMUP + count):
            if i == WARMUP:
                r0 = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            (result,) = await transport.deliver(job)
            if i >= WARMUP:
                took.append(time.perf_counter() - start)
            if result.status is not DeliveryStatus.DELIVERED:
                raise RuntimeError(f"not delivered: {result.text}")
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / count
    finally:
        await transport.close()
    return statistics.median(took), cpu


def main() -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--sizes", default="2048,16384,102400")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peer", choices=("postfix", "postwarden"), default="postfix")
    ap.add_argument("--no-install", action="store_true")
    args = ap.parse_args()
    with disk.workspace("image", "outbound") as root:
        if args.peer == "postfix":
            tools = ensure_postfix(install=not args.no_install)
            return measure(PostfixServer(root / "postfix", "hold", tools), args)
        dns = DnsStub().start()
        try:
            template = make_postwarden_template(root / "template")
            return measure(PostwardenServer(root / "postwarden", "hold", template, dns.port),
                           args)
        finally:
            dns.stop()


def measure(server: PostfixServer | PostwardenServer, args: argparse.Namespace) -> int:
    try:
        server.start()
        print(f"SmtpTransport.deliver to {server.name} (hold queue), {args.count} messages "
              f"per run, one connection; median of {args.runs} alternated runs")
        for size in (int(x) for x in args.sizes.split(",")):
            figures: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            for _ in range(args.runs):
                for chunking in (False, True):
                    figures[chunking].append(
                        asyncio.run(run(server.port, size, args.count, chunking)))
            for chunking, runs in figures.items():
                latency = statistics.median(t for t, _ in runs)
                cpu = statistics.median(c for _, c in runs)
                print(f"  {size:7d} B  {'BDAT' if chunking else 'DATA'}: "
                      f"{latency * 1e3:6.2f} ms per message, client CPU {cpu * 1e6:5.0f} us")
    finally:
        with contextlib.suppress(Exception):
            server.stop()
        with contextlib.suppress(Exception):
            stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
