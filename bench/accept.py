"""Accept-rate benchmark of postwarden alone: messages/s committed to its queue.

A quick check while working on the receiving path; ``make bench``
(bench/compare.py) is the side-by-side comparison with Postfix.  Starts
``postwarden serve`` (default configuration, delivery paused with ``[queue]
workers = 0``, DNS answered by the loopback stub) on 127.0.0.1 and sends
``--count`` messages from N concurrent sessions with bench/loadgen.py (one
message per connection; ``--pipelining`` to pipeline MAIL/RCPT/DATA).  Every
250 counted is an fsync'ed commit.  Prints msg/s, the median of ``--runs``
runs (a fresh server each).

    python -m bench.accept [--sessions 1,10,50] [--size 2048] [--count 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.dnsstub import DnsStub
from bench.servers import PostwardenServer, make_postwarden_template, stop_all

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--sessions", default="1,10,50")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pipelining", action="store_true")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="postwarden-accept-"))
    dns = DnsStub().start()
    try:
        template = make_postwarden_template(root / "template")
        print(f"postwarden accept rate, {args.size} B messages, {args.count} per run, "
              f"fsync'ed, median of {args.runs} runs")
        for n in (int(x) for x in args.sessions.split(",")):
            rates = []
            for i in range(args.runs):
                server = PostwardenServer(root / f"s{n}-{i}", "hold", template, dns.port)
                try:
                    server.start()
                    out = subprocess.run(
                        [sys.executable, "-m", "bench.loadgen", "--port", str(server.port),
                         "--rcpt", "sink@sink.test", "--sessions", str(n), "--size",
                         str(args.size), "--count", str(args.count),
                         *(["--pipelining"] if args.pipelining else [])],
                        cwd=REPO, capture_output=True, timeout=args.timeout, check=False)
                    report = json.loads(out.stdout)
                    if out.returncode != 0:
                        raise RuntimeError(report.get("error") or out.stderr.decode())
                    rates.append(report["sent"] / report["elapsed"])
                finally:
                    server.stop()
                    shutil.rmtree(server.workdir, ignore_errors=True)
            print(f"  {n:3d} sessions: median {statistics.median(rates):8.0f} msg/s "
                  f"(min {min(rates):.0f}, max {max(rates):.0f})")
    finally:
        with contextlib.suppress(Exception):
            stop_all()
        dns.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
