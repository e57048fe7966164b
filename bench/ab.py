"""Rates of two or more variants of postwarden, alternated: A B A B ...

``make bench`` compares postwarden with Postfix; this compares postwarden
with itself, to decide whether a change is worth keeping.  A variant is a
git revision (``.``: the working tree) and settings, e.g. ``HEAD~1
processes=2`` against ``. processes=2``.  Each run starts a fresh server
(bench/servers.py, the loopback DNS stub, delivery paused in ``hold`` mode)
from a copy of its revision's own ``postwarden init`` directory (so that a
revision that changes the schema or the page size creates its database
files itself), sends ``--count`` messages with smtp-source from
``--sessions`` sessions, waits until they are queued (``hold``) or
delivered (``relay`` to smtp-sink, ``maildir``), and records messages/s and
the CPU seconds of the server's processes, and of its main process alone
(with ``processes = 2`` at one session it delivers while the worker runs
the sessions).  Runs alternate so that the machine's drift hits every
variant alike; on these machines runs of the same code differ by 10-30%, so
read the medians and the ranges, and use ``python -m bench.instructions``
for changes of a few percent.  The servers write in ``$TMPDIR`` unless
``--disk image`` puts them on the loop-mounted ext4 image that ``make
bench`` uses, where an fsync costs more (for changes to what is synced
and when).  ``--profile DIR`` records each run with
py-spy (``python -m bench.stacks`` sums the samples by function).

    python -m bench.ab --variant "HEAD~1 processes=2" --variant ". processes=2" \\
        --mode relay --sessions 1 --count 2000 --runs 4

Loopback only, as the bench.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import disk, dnsstub, procs, servers
from bench.instructions import smtp_source, source_tree


@dataclass
class Variant:
    label: str
    rev: str
    settings: list[tuple[str, str, str]]
    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    main_ms: list[float] = field(default_factory=list)  # the main process's share

    @staticmethod
    def parse(text: str) -> Variant:
        """``REV [TABLE.KEY=VALUE ...]`` (a top-level key has no table)."""
        words = text.split()
        if not words:
            raise ValueError("empty: give a revision ('.' for the working tree)")
        rev, *items = words
        return Variant(text, rev, [servers.parse_setting(item) for item in items])


def start_profile(output: Path, pid: int, native: bool) -> subprocess.Popen[bytes]:
    """py-spy sampling every process of the server (``--subprocesses``), only
    while a thread holds the GIL (``--gil``), in its raw (collapsed stacks)
    format: one line per stack, its sample count last.  A sample is wall
    time: a process preempted while it holds the GIL (on the way out of a
    system call, typically the first after a write woke the client) is
    sampled there, so a cheap call such as ``getpid`` can collect samples
    that were the client's CPU time (``native``: C frames too)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    output.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--subprocesses", "--gil",
                             "--rate", "250", *(["--native"] if native else []),
                             "--format", "raw", "--output", str(output)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the load starts
    return proc


def code_env(src: Path) -> dict[str, str]:
    """The environment that runs ``postwarden`` from the source tree ``src``."""
    return {**os.environ, "PYTHONPATH": str(src)}


def one_run(args: argparse.Namespace, tools: dict[str, str], template: Path, dns_port: int,
            variant: Variant, src: Path, workdir: Path, tag: str
            ) -> tuple[float, float, float]:
    """messages/s, and CPU milliseconds per message of one run: all the
    server's processes, and the main process alone (it delivers, and with
    ``processes = 2`` the worker runs most sessions while it does)."""
    spy: subprocess.Popen[bytes] | None = None
    sink = servers.Sink(workdir / "sink", tools["smtp-sink"]).start() \
        if args.mode == "relay" else None
    server = servers.PostwardenServer(
        workdir / "postwarden", args.mode, template, dns_port,
        sink_port=sink.port if sink else None, env=code_env(src),
        settings=variant.settings)
    try:
        server.start()
        assert server.pgid is not None
        if args.profile:
            spy = start_profile(args.profile / f"{tag}.txt", server.pgid, args.native)
        cpu, main_cpu = procs.group_cpu(server.pgid), procs.own_cpu(server.pgid)
        start = time.monotonic()
        smtp_source(tools, server.port, servers.RCPT[args.mode], args.count, args.sessions,
                    args.size)
        if args.mode != "hold":
            count = sink.count if sink is not None else server.delivered
            if not servers.wait_until(lambda: count() >= args.count, args.timeout, 0.02):
                raise servers.BenchError(f"only {count()} of {args.count} messages arrived")
        seconds = time.monotonic() - start
        cpu = procs.group_cpu(server.pgid) - cpu
        main_cpu = procs.own_cpu(server.pgid) - main_cpu
        return (args.count / seconds, cpu / args.count * 1000,
                main_cpu / args.count * 1000)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
            spy.wait(60)
        server.stop()
        if sink is not None:
            sink.stop()


def main() -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--variant", action="append", default=[], metavar='"REV [T.K=V ...]"',
                    help="a revision and settings; repeat (two at least)")
    ap.add_argument("--mode", choices=("hold", "relay", "maildir"), default="hold")
    ap.add_argument("--count", type=int, default=2000, help="messages per run")
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3, help="runs of each variant")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for delivery")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="record each run with py-spy into DIR/variant-run.txt (collapsed "
                         "stacks; its own sampling slows the server)")
    ap.add_argument("--native", action="store_true", help="--profile with C frames too")
    ap.add_argument("--disk", choices=("tmp", "image"), default="tmp",
                    help="where the servers write: $TMPDIR (default), or the ext4 image "
                         "of make bench (bench/disk.py), whose fsyncs cost more")
    args = ap.parse_args()
    try:
        variants = [Variant.parse(v) for v in args.variant]
    except ValueError as exc:
        print(f"bench.ab: --variant: {exc}", file=sys.stderr)
        return 2
    if len(variants) < 2:
        print("bench.ab: give two --variant at least", file=sys.stderr)
        return 2
    tools = servers.ensure_postfix(install=False)
    dns = dnsstub.DnsStub().start()
    try:
        with disk.workspace(args.disk, "ab") as root:
            root.chmod(0o711)
            trees = {rev: source_tree(rev, root / "trees")
                     for rev in dict.fromkeys(v.rev for v in variants)}
            # Each version makes its own template, so that the database files
            # are created by the code measured (a page size, a schema).
            templates = {rev: servers.make_postwarden_template(
                root / f"template-{i}", env=code_env(src))
                for i, (rev, src) in enumerate(trees.items())}
            for n in range(args.runs):
                for i, v in enumerate(variants):
                    rate, cpu_ms, main_ms = one_run(
                        args, tools, templates[v.rev], dns.port, v, trees[v.rev],
                        root / f"run-{i}-{n}", f"{i + 1}-{n + 1}")
                    v.rates.append(rate)
                    v.cpu_ms.append(cpu_ms)
                    v.main_ms.append(main_ms)
                    print(f"run {n + 1} {v.label}: {rate:,.0f} msg/s, "
                          f"{cpu_ms:.3f} ms CPU per message "
                          f"(main process {main_ms:.3f})", flush=True)
    except (servers.BenchError, disk.DiskError, OSError,
            subprocess.SubprocessError) as exc:
        print(f"bench.ab: {exc}", file=sys.stderr)
        return 1
    finally:
        servers.stop_all()
        dns.stop()
    print(f"mode {args.mode}, {args.count} messages of {args.size} bytes, "
          f"{args.sessions} session(s); median (min-max) of {args.runs} run(s):")
    for v in variants:
        print(f"  {v.label:32s} {statistics.median(v.rates):8,.0f} msg/s "
              f"({min(v.rates):,.0f}-{max(v.rates):,.0f})  "
              f"{statistics.median(v.cpu_ms):.3f} ms CPU per message "
              f"(main process {statistics.median(v.main_ms):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
