"""Where one session's time goes: the latency of each SMTP step, postwarden
and Postfix side by side.

The "one session" case of ``make bench`` is a chain of round trips: one
message per connection, each command waiting for the previous reply, so
its rate is the inverse of the sum of the steps' latencies.  This measures
each step separately, against both servers in the accept-only setup of the
bench (``bench.servers``, mode ``hold``: Postfix's hold queue, postwarden's
delivery paused), with the same client: a blocking socket that sends
exactly what smtp-source sends (HELO, MAIL, RCPT, DATA, the headers
From/To/Date/Message-Id and a body of 80-byte lines, QUIT) and times each
reply.

    python -m bench.steps [--count 1500] [--size 2048] [--rounds 2]

Steps: ``connect`` (TCP handshake), ``greeting`` (from the connection to
the 220), one per command, ``end of data`` (from the body and its final
dot to the 250: the checks and the fsync'ed commit), ``close`` (the 221 to
the server's FIN).  It prints the median of each step in milliseconds for
both servers and their sum, which is the time per message of smtp-source
at one session.  The servers run one after the other, ``--rounds`` times
(Postfix, postwarden, Postfix, ...); each step's median is taken over all
messages of all rounds.  Loopback only, as the bench: 127.0.0.1, ports the
kernel picks, DNS to the bench's stub.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

from bench import disk, dnsstub, loadgen, servers
from bench.compare import HELO, SENDER

RCPT = servers.RCPT["hold"]
STEPS = ("connect", "greeting", "HELO", "MAIL", "RCPT", "DATA", "end of data", "QUIT",
         "close")


def one_session(port: int, data: bytes, into: dict[str, list[float]]) -> None:
    """One message, as smtp-source sends it, each step timed into ``into``."""
    clock = time.perf_counter
    start = clock()
    with socket.create_connection((servers.HOST, port), timeout=30) as sock, \
            sock.makefile("rb") as replies:
        now = clock()
        into["connect"].append(now - start)
        loadgen.read_reply_blocking(replies, 220)
        into["greeting"].append(clock() - now)
        for step, line, expect in (("HELO", f"HELO {HELO}\r\n".encode(), 250),
                                   ("MAIL", f"MAIL FROM:<{SENDER}>\r\n".encode(), 250),
                                   ("RCPT", f"RCPT TO:<{RCPT}>\r\n".encode(), 250),
                                   ("DATA", b"DATA\r\n", 354),
                                   ("end of data", data, 250),
                                   ("QUIT", b"QUIT\r\n", 221)):
            before = clock()
            sock.sendall(line)
            loadgen.read_reply_blocking(replies, expect)
            into[step].append(clock() - before)
        before = clock()
        while replies.read(4096):  # until the server closes
            pass
        into["close"].append(clock() - before)


def run(server: servers.PostfixServer | servers.PostwardenServer, count: int, size: int,
        into: dict[str, list[float]]) -> None:
    server.start()
    try:
        body = loadgen.payload(size)
        for n in range(count):
            one_session(server.port, loadgen.message(SENDER, RCPT, body, n, HELO), into)
    finally:
        server.stop()


def main() -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--count", type=int, default=1500, help="messages per server and round")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--disk", choices=("image", "tmp"), default="image",
                    help="where the servers write (as bench.compare --disk)")
    args = ap.parse_args()
    with disk.workspace(args.disk, "steps") as root:
        return measure(args, root)


def measure(args: argparse.Namespace, root: Path) -> int:
    tools = servers.ensure_postfix(install=False)
    dns = dnsstub.DnsStub().start()
    root.chmod(0o711)
    timings: dict[str, dict[str, list[float]]] = {
        name: {step: [] for step in STEPS} for name in ("postfix", "postwarden")}
    try:
        template = servers.make_postwarden_template(root / "template")
        for r in range(args.rounds):
            run(servers.PostfixServer(root / f"postfix-{r}", "hold", tools), args.count,
                args.size, timings["postfix"])
            run(servers.PostwardenServer(root / f"postwarden-{r}", "hold", template, dns.port),
                args.count, args.size, timings["postwarden"])
    except (servers.BenchError, loadgen.SmtpError, OSError) as exc:
        print(f"bench.steps: {exc}", file=sys.stderr)
        return 1
    finally:
        servers.stop_all()
        dns.stop()
    print(f"one session, {args.size}-byte messages, {args.count} x {args.rounds} per server: "
          "median ms per step")
    print(f"  {'step':14s} {'postfix':>9s} {'postwarden':>11s}")
    totals = {"postfix": 0.0, "postwarden": 0.0}
    for step in STEPS:
        cells = []
        for name in ("postfix", "postwarden"):
            median = 1000 * statistics.median(timings[name][step])
            totals[name] += median
            cells.append(median)
        print(f"  {step:14s} {cells[0]:9.3f} {cells[1]:11.3f}")
    pf, pw = totals["postfix"], totals["postwarden"]
    print(f"  {'sum':14s} {pf:9.3f} {pw:11.3f}   (about {1000 / pf:.0f} and {1000 / pw:.0f} "
          f"msg/s; ratio {pf / pw:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
