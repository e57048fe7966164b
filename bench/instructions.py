"""Instructions per message: postwarden's own work, counted by callgrind
instead of timed, to compare two versions of the code.

Rates and CPU seconds on these machines move by 10-30% between two runs of
the same code (see docs/performance.md), so a change worth 2-3% cannot be
seen in them.  An instruction count can: it does not depend on the load
of the machine, the CPU's clock or the other process.  This runs ``postwarden
serve`` (one process, ``processes = 1``, its threads included) under
``valgrind --tool=callgrind``, sends a warm-up (the first delivery
builds TLS contexts, and so on), zeroes the counters, sends ``--count``
messages with smtp-source, waits until they are queued or delivered, and
prints the instructions per message:

    python -m bench.instructions                       # the working tree
    python -m bench.instructions --rev HEAD~1 --rev .   # two versions, side by side
    python -m bench.instructions --mode relay --set checks.verify=false

What it does not count: the kernel's work (system calls, the network
stack, fsync), cache misses and waiting; those are in the rates of
``make bench``.  Work on a timer (the access list's once-a-second look at
the database, for one) counts for more than it costs, as a run under
valgrind takes 20 to 50 times as long.  Large copies count for far more
than they cost: glibc's memcpy moves big blocks with ``rep movsb``, which
callgrind counts once per byte (a 100 KB message copied fifteen times was
1.5 million of its 4.9 million instructions, a few percent of its CPU
time).  Two runs of the same code agree
within about 1% (counts of 200 messages at one session).  The callgrind
file of each run is kept (its path is printed) for ``callgrind_annotate``.

Needs valgrind (Debian's ``valgrind``) and smtp-source (``postfix``).
Loopback only, as the bench.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import disk, dnsstub, servers
from bench.compare import HELO, SENDER

REPO = Path(__file__).resolve().parent.parent
WARMUP = 20
# Under valgrind, start-up takes a minute or more.
START_TIMEOUT = 600.0
WORKTREE = "."


def source_tree(rev: str, into: Path) -> Path:
    """The ``src`` directory of ``rev`` (``.`` is the working tree)."""
    if rev == WORKTREE:
        return REPO / "src"
    target = into / re.sub(r"[^A-Za-z0-9_.-]", "_", rev)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, "src"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise servers.BenchError(f"git archive {rev}: {archive.stderr.decode().strip()}")
    target.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target / "src"


def smtp_source(tools: dict[str, str], port: int, rcpt: str, count: int, sessions: int,
                size: int) -> None:
    subprocess.run([tools["smtp-source"], "-M", HELO, "-f", SENDER, "-t", rcpt,
                    "-s", str(sessions), "-l", str(size), "-m", str(count),
                    f"{servers.HOST}:{port}"], check=True, timeout=3600,
                   capture_output=True)


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def instructions(out: Path) -> int:
    """The instruction total of a callgrind dump."""
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise servers.BenchError(f"no summary in {out}")


def one_run(args: argparse.Namespace, tools: dict[str, str], template: Path,
            dns_port: int, src: Path, workdir: Path, out_prefix: Path) -> int:
    """Instructions per message of one run of the code in ``src``."""
    sink = servers.Sink(workdir / "sink", tools["smtp-sink"]).start() \
        if args.mode == "relay" else None
    env = {**os.environ, "PYTHONPATH": str(src)}
    settings = [("", "processes", "1"), *args.settings]
    server = servers.PostwardenServer(
        workdir / "postwarden", args.mode, template, dns_port,
        sink_port=sink.port if sink else None, env=env, settings=settings,
        wrapper=["valgrind", "--tool=callgrind", "--log-file=/dev/null",
                 f"--callgrind-out-file={out_prefix}.%p"])
    rcpt = servers.RCPT[args.mode]
    try:
        server.start(timeout=START_TIMEOUT)
        assert server.proc is not None
        pid = str(server.proc.pid)

        def arrived(n: int) -> None:
            if sink is None and args.mode == "hold":
                return  # the 250 came after the commit
            count = sink.count if sink is not None else server.delivered
            if not servers.wait_until(lambda: count() >= n, START_TIMEOUT, 0.1):
                raise servers.BenchError(f"only {count()} of {n} messages arrived")

        smtp_source(tools, server.port, rcpt, WARMUP, 1, args.size)
        arrived(WARMUP)
        time.sleep(1)
        callgrind_control("--zero", pid)
        smtp_source(tools, server.port, rcpt, args.count, args.sessions, args.size)
        arrived(WARMUP + args.count)
        dump = Path(f"{out_prefix}.{pid}.1")
        callgrind_control("--dump", pid)
        if not servers.wait_until(dump.exists, 60, 0.1):
            raise servers.BenchError(f"callgrind wrote no {dump}")
        time.sleep(0.5)  # the dump is written at once, but not in one write
        return instructions(dump) // int(args.count)
    finally:
        server.stop()
        if sink is not None:
            sink.stop()


def main() -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rev", action="append", default=[],
                    help="a git revision to measure ('.': the working tree, the default); "
                         "repeat to compare, runs alternate")
    ap.add_argument("--mode", choices=("hold", "relay", "maildir"), default="hold")
    ap.add_argument("--count", type=int, default=200, help="messages per run")
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=1, help="runs of each revision")
    ap.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                    help="a config setting (TOML value), e.g. checks.verify=false")
    ap.add_argument("--keep", type=Path, default=Path(tempfile.gettempdir()),
                    help="where the callgrind files are written")
    args = ap.parse_args()
    try:
        args.settings = [servers.parse_setting(item) for item in args.set]
    except ValueError as exc:
        print(f"bench.instructions: --set: {exc}", file=sys.stderr)
        return 2
    revs = args.rev or [WORKTREE]
    for tool in ("valgrind", "callgrind_control"):
        if servers.find_tool(tool) is None:
            print(f"bench.instructions: {tool} not found (apt-get install valgrind)",
                  file=sys.stderr)
            return 1
    tools = servers.ensure_postfix(install=False)
    dns = dnsstub.DnsStub().start()
    counts: dict[str, list[int]] = {rev: [] for rev in revs}
    try:
        with disk.workspace("tmp", "instructions") as root:
            root.chmod(0o711)
            template = servers.make_postwarden_template(root / "template")
            trees = {rev: source_tree(rev, root / "trees") for rev in revs}
            for n in range(args.runs):
                for i, rev in enumerate(revs):
                    prefix = args.keep / f"callgrind.postwarden.{i}.{n}"
                    per_message = one_run(args, tools, template, dns.port, trees[rev],
                                          root / f"run-{i}-{n}", prefix)
                    counts[rev].append(per_message)
                    print(f"{rev}: {per_message:,} instructions per message "
                          f"(run {n + 1}; {prefix}.*)", flush=True)
    except (servers.BenchError, disk.DiskError, OSError,
            subprocess.SubprocessError) as exc:
        print(f"bench.instructions: {exc}", file=sys.stderr)
        return 1
    finally:
        servers.stop_all()
        dns.stop()
    first = statistics.median(counts[revs[0]])
    print(f"mode {args.mode}, {args.count} messages of {args.size} bytes, "
          f"{args.sessions} session(s); median of {args.runs} run(s):")
    for rev in revs:
        median = statistics.median(counts[rev])
        print(f"  {rev:20s} {median:12,.0f}  {median / first:6.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
