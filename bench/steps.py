"""Where one session's time goes: the latency of each SMTP step, postwarden
and Postfix side by side.

The "one session" case of ``make bench`` is a chain of round trips: one
message per connection, each command waiting for the previous reply, so
its rate is the inverse of the sum of the steps' latencies.  This measures
each step separately, against both servers in one setup of the bench
(``bench.servers``; ``--mode hold``, the default, is accept-only: Postfix's
hold queue, postwarden's delivery paused; ``relay`` delivers to an
smtp-sink of each server's own, ``maildir`` to the local Maildir, so that
the deliveries run while the session does), with the same client: a
blocking socket that sends exactly what smtp-source sends (HELO, MAIL,
RCPT, DATA, the headers From/To/Date/Message-Id and a body of 80-byte
lines, QUIT) and times each reply.

    python -m bench.steps [--count 1500] [--size 2048] [--rounds 2] [--mode hold]

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

STEPS = ("connect", "greeting", "HELO", "MAIL", "RCPT", "DATA", "end of data", "QUIT",
         "close")


def one_session(port: int, rcpt: str, data: bytes, into: dict[str, list[float]]) -> None:
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
                                   ("RCPT", f"RCPT TO:<{rcpt}>\r\n".encode(), 250),
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
        into: dict[str, list[float]], sink: servers.Sink | None = None) -> None:
    try:
        server.start()
        body = loadgen.payload(size)
        rcpt = servers.RCPT[server.mode]
        for n in range(count):
            one_session(server.port, rcpt, loadgen.message(SENDER, rcpt, body, n, HELO), into)
    finally:
        server.stop()
        if sink is not None:
            sink.stop()


def sink_for(args: argparse.Namespace, tools: dict[str, str], workdir: Path
             ) -> servers.Sink | None:
    """A fresh smtp-sink for one server in relay mode (None otherwise)."""
    if args.mode != "relay":
        return None
    return servers.Sink(workdir, tools["smtp-sink"]).start()


def main() -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--count", type=int, default=1500, help="messages per server and round")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--disk", choices=("image", "tmp"), default="image",
                    help="where the servers write (as bench.compare --disk)")
    ap.add_argument("--mode", choices=("hold", "relay", "maildir"), default="hold",
                    help="accept-only (default), or delivering while the session runs")
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
            sink = sink_for(args, tools, root / f"postfix-sink-{r}")
            run(servers.PostfixServer(root / f"postfix-{r}", args.mode, tools,
                                      sink_port=sink.port if sink else None),
                args.count, args.size, timings["postfix"], sink)
            sink = sink_for(args, tools, root / f"postwarden-sink-{r}")
            run(servers.PostwardenServer(root / f"postwarden-{r}", args.mode, template,
                                         dns.port, sink_port=sink.port if sink else None),
                args.count, args.size, timings["postwarden"], sink)
    except (servers.BenchError, loadgen.SmtpError, OSError) as exc:
        print(f"bench.steps: {exc}", file=sys.stderr)
        return 1
    finally:
        servers.stop_all()
        dns.stop()
    print(f"one session, mode {args.mode}, {args.size}-byte messages, {args.count} x "
          f"{args.rounds} per server: median ms per step")
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
