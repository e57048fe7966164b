"""postwarden side by side with Postfix, on loopback (``make bench``).

Runs the same load against a private Postfix instance and against postwarden
(default configuration), interleaved (Postfix, postwarden, Postfix, ...), for
each case, message size and concurrency, and prints messages/s (median and
min-max over the repetitions), the ratio postwarden / Postfix, server CPU
seconds per 1,000 messages and peak memory.  See docs/performance.md.

    python -m bench.compare                 # full run (make bench), about 10 minutes
    python -m bench.compare --quick         # smoke test (make bench-quick), about 30 s
    python -m bench.compare --docs docs/performance.md   # also write the results there

Every server binds 127.0.0.1 on a kernel-chosen port, nothing does DNS, each
run has a time limit, and everything (Postfix instances, postwarden, sinks,
temporary directories) is cleaned up on exit, errors and Ctrl-C.  Needs root
(Postfix's master must start as root).  The servers write to a loop-mounted
ext4 image with a journal, the same kind of storage on every machine
(``--disk tmp``: ``$TMPDIR`` instead; see bench/disk.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

from bench import disk, loadgen, procs
from bench.dnsstub import DnsStub
from bench.servers import (
    HOST,
    RCPT,
    BenchError,
    PostfixServer,
    PostwardenServer,
    Sink,
    ensure_postfix,
    make_postwarden_template,
    raise_nofile,
    stop_all,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
SENDER = "bench@client.test"
HELO = "bench.test"
KB = 1024
DOCS_BEGIN = "<!-- bench:results:begin (written by `make bench`; do not edit by hand) -->"
DOCS_END = "<!-- bench:results:end -->"


@dataclass(frozen=True)
class Case:
    name: str
    mode: str  # hold, relay, maildir (see bench.servers)
    generator: str  # smtp-source, or loadgen with options
    end_to_end: bool
    title: str
    loadgen_args: tuple[str, ...] = ()
    checks: bool = True  # postwarden's [checks] verify (its default: on)


CASES = {
    "accept": Case("accept", "hold", "smtp-source", False, "accept-only"),
    "nochecks": Case("nochecks", "hold", "smtp-source", False, "accept-only, checks off",
                     checks=False),
    "relay": Case("relay", "relay", "smtp-source", True, "relay to smtp-sink"),
    "maildir": Case("maildir", "maildir", "smtp-source", True, "local Maildir"),
    "starttls": Case("starttls", "hold", "loadgen", False, "accept-only, STARTTLS",
                     ("--starttls",)),
    "pipelined": Case("pipelined", "hold", "loadgen", False, "accept-only, pipelined",
                      ("--pipelining",)),
    "bdat": Case("bdat", "hold", "loadgen", False, "accept-only, BDAT", ("--bdat",)),
}


@dataclass(frozen=True)
class Config:
    case: str
    size: int
    sessions: int
    count: int


def full_plan() -> list[Config]:
    # Counts give runs of a few seconds each at the rates seen on a 2-core VM;
    # the same count goes to both servers.
    counts = {
        (2 * KB, 1): 400, (2 * KB, 10): 1500, (2 * KB, 50): 2000,
        (100 * KB, 1): 200, (100 * KB, 10): 600, (100 * KB, 50): 800,
    }
    plan = [Config(case, size, sess, count)
            for case in ("accept", "relay", "maildir")
            for (size, sess), count in counts.items()]
    plan += [Config("nochecks", 2 * KB, s, n) for s, n in ((1, 400), (10, 1500))]
    plan += [Config("starttls", 2 * KB, s, n) for s, n in ((1, 300), (10, 1000), (50, 1000))]
    plan += [Config("pipelined", 2 * KB, 10, 1500)]
    plan += [Config("bdat", size, 10, n) for size, n in ((2 * KB, 1500), (100 * KB, 600))]
    return plan


def quick_plan() -> list[Config]:
    return [Config("accept", 2 * KB, 10, 300), Config("nochecks", 2 * KB, 10, 300),
            Config("relay", 2 * KB, 10, 300),
            Config("maildir", 2 * KB, 10, 300), Config("starttls", 2 * KB, 10, 150),
            Config("bdat", 2 * KB, 10, 300)]


@dataclass
class Run:
    server: str
    case: str
    size: int
    sessions: int
    count: int
    rep: int
    accept_s: float = 0.0  # load start -> last 250 after DATA
    e2e_s: float | None = None  # load start -> last message at the sink / in the Maildir
    cpu_s: float = 0.0  # server CPU over the load (and delivery)
    cpu_system_s: float = 0.0  # the part of cpu_s spent in the kernel
    rss: int = 0  # peak sum of VmRSS, bytes
    pss: int = 0  # peak sum of Pss, bytes
    processes: int = 0  # peak number of server processes
    client_cpu_s: float | None = None  # the Python generator's own CPU
    dns: dict[str, int] = field(default_factory=dict)  # queries to the stub, by type
    error: str | None = None

    @property
    def accept_rate(self) -> float:
        return self.count / self.accept_s if self.accept_s else 0.0

    @property
    def e2e_rate(self) -> float | None:
        return self.count / self.e2e_s if self.e2e_s else None


@dataclass
class Idle:
    sessions: int
    opened: int = 0
    failed: int = 0
    first_error: str = ""
    rss_before: int = 0
    rss_after: int = 0
    pss_after: int = 0
    cpu_idle_s: float = 0.0
    hold_s: float = 0.0
    probes: list[float] = field(default_factory=list)
    alive: int = 0
    alive_sample: int = 0
    error: str | None = None


class Interrupted(BaseException):
    pass


# Ctrl-C, kill, hang-up and the --max-seconds watchdog all end the bench the
# same way: Interrupted unwinds every run's cleanup.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Once: a second signal must not cut the cleanup short.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.tools = ensure_postfix(install=not args.no_install)
        self.dns = DnsStub().start()
        self.template = make_postwarden_template(root / "postwarden-template")
        tls = self.template / "tls"
        self.tls = (tls / "cert.pem", tls / "key.pem")
        self.runs: list[Run] = []
        self.idle: Idle | None = None
        self.commands: dict[str, str] = {}

    # -- one run -----------------------------------------------------------

    def generator_cmd(self, case: Case, cfg: Config, port: int) -> list[str]:
        rcpt = RCPT[case.mode]
        if case.generator == "smtp-source":
            return [self.tools["smtp-source"], "-M", HELO, "-f", SENDER, "-t", rcpt,
                    "-s", str(cfg.sessions), "-l", str(cfg.size), "-m", str(cfg.count),
                    f"{HOST}:{port}"]
        return [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--sender", SENDER,
                "--rcpt", rcpt, "--helo", HELO, "--sessions", str(cfg.sessions),
                "--size", str(cfg.size), "--count", str(cfg.count), *case.loadgen_args]

    def run_one(self, server_name: str, cfg: Config, rep: int) -> Run:
        case = CASES[cfg.case]
        run = Run(server_name, cfg.case, cfg.size, cfg.sessions, cfg.count, rep)
        workdir = self.root / f"r{rep}-{cfg.case}-{cfg.size}-{cfg.sessions}-{server_name}"
        try:
            with contextlib.ExitStack() as stack:
                stack.callback(shutil.rmtree, workdir, True)
                self._measure(run, case, cfg, workdir, stack)
        except (BenchError, OSError, subprocess.SubprocessError, ValueError) as e:
            run.error = f"{type(e).__name__}: {e}"
        return run

    def _measure(self, run: Run, case: Case, cfg: Config, workdir: Path,
                 stack: contextlib.ExitStack) -> None:
        workdir.mkdir(parents=True)
        workdir.chmod(0o711)
        sink = None
        if case.mode == "relay":
            sink = Sink(workdir / "sink", self.tools["smtp-sink"])
            stack.callback(sink.stop)
            sink.start()
        server: PostfixServer | PostwardenServer
        if run.server == "postfix":
            tls = self.tls if "--starttls" in case.loadgen_args else None
            server = PostfixServer(workdir / "postfix", case.mode, self.tools,
                                   sink_port=sink.port if sink else None, tls=tls)
        else:
            server = PostwardenServer(workdir / "postwarden", case.mode, self.template,
                                      self.dns.port, sink_port=sink.port if sink else None,
                                      log_level=self.args.postwarden_log_level,
                                      checks=case.checks)
        stack.callback(server.stop)
        server.start()
        assert server.pgid is not None
        self.dns.take_counts()
        cmd = self.generator_cmd(case, cfg, server.port)
        self.commands.setdefault(f"{case.name}/{run.server}", shlex.join(
            [Path(cmd[0]).name if cmd[0] == sys.executable else cmd[0], *cmd[1:]]))

        sampler = procs.Sampler(server.pgid)
        stack.callback(sampler.stop)
        sampler.start()
        start = time.monotonic()
        gen = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=self.args.run_timeout,
                             check=False)
        run.accept_s = time.monotonic() - start
        if gen.returncode != 0:
            detail = (gen.stderr or gen.stdout).decode(errors="replace").strip()[-800:]
            raise BenchError(f"load generator exited with {gen.returncode}: {detail}\n"
                             f"server log:\n{server.log_tail()}")
        if case.generator == "loadgen":
            report = json.loads(gen.stdout)
            run.client_cpu_s = report["cpu"]
        if case.end_to_end:
            def arrived() -> int:
                if sink is not None:
                    return sink.count()
                return server.delivered()

            if not wait_until(lambda: arrived() >= cfg.count, self.args.run_timeout, 0.02):
                raise BenchError(f"only {arrived()} of {cfg.count} messages arrived after "
                                 f"{self.args.run_timeout:.0f}s:\n{server.log_tail()}")
            run.e2e_s = time.monotonic() - start
        sampler.stop()
        run.dns = self.dns.take_counts()
        run.cpu_s = sampler.cpu
        run.cpu_system_s = sampler.cpu_system
        run.rss, run.pss, run.processes = (sampler.peak.rss, sampler.peak.pss,
                                           sampler.peak.processes)
        if not case.end_to_end:
            held = server.accepted()
            if held != cfg.count:
                raise BenchError(f"{held} messages queued, expected {cfg.count}")

    # -- idle sessions -----------------------------------------------------------

    def run_idle(self, n: int) -> Idle:
        idle = Idle(n)
        workdir = self.root / "idle-postwarden"
        try:
            with contextlib.ExitStack() as stack:
                stack.callback(shutil.rmtree, workdir, True)
                workdir.mkdir(parents=True)
                server = PostwardenServer(workdir / "postwarden", "hold", self.template,
                                          self.dns.port,
                                          log_level=self.args.postwarden_log_level)
                stack.callback(server.stop)
                server.start()
                assert server.pgid is not None
                time.sleep(0.5)
                idle.rss_before = procs.group_memory(server.pgid).rss
                asyncio.run(asyncio.wait_for(self._idle(idle, server.port, server.pgid),
                                             self.args.run_timeout))
        except (BenchError, OSError, TimeoutError, loadgen.SmtpError) as e:
            idle.error = f"{type(e).__name__}: {e}"
        return idle

    async def _idle(self, idle: Idle, port: int, pgid: int) -> None:
        sessions = loadgen.IdleSessions(HOST, port)
        try:
            await sessions.open(idle.sessions)
            idle.opened, idle.failed = len(sessions.conns), sessions.failed
            idle.first_error = sessions.first_error
            cpu0 = procs.group_cpu(pgid)
            t0 = time.monotonic()
            for _ in range(4):
                await asyncio.sleep(0.5)
                m = procs.group_memory(pgid)
                idle.rss_after = max(idle.rss_after, m.rss)
                idle.pss_after = max(idle.pss_after, m.pss)
            idle.cpu_idle_s = procs.group_cpu(pgid) - cpu0
            idle.hold_s = time.monotonic() - t0
            for _ in range(5):
                idle.probes.append(await sessions.probe())
                await asyncio.sleep(0.05)
            idle.alive_sample = min(20, len(sessions.conns))
            idle.alive = await sessions.still_alive(idle.alive_sample)
            if idle.failed or idle.alive < idle.alive_sample:
                idle.error = (f"{idle.failed} of {idle.sessions} sessions got no greeting "
                              f"({idle.first_error or '-'}); {idle.alive} of "
                              f"{idle.alive_sample} sampled idle sessions answered NOOP")
        finally:
            await sessions.close()

    # -- the whole thing ---------------------------------------------------------

    def execute(self, plan: list[Config], reps: int, idle_n: int) -> None:
        total = len(plan) * reps * 2
        done = 0
        for rep in range(1, reps + 1):
            for cfg in plan:
                for server in ("postfix", "postwarden"):
                    done += 1
                    run = self.run_one(server, cfg, rep)
                    self.runs.append(run)
                    print(f"[{done:3d}/{total}] rep {rep} {CASES[cfg.case].title:24s} "
                          f"{cfg.size // KB:3d} KB {cfg.sessions:3d} sess {server:10s} "
                          + progress(run), flush=True)
        if idle_n:
            print(f"idle sessions: {idle_n} against postwarden ...", flush=True)
            self.idle = self.run_idle(idle_n)
            print(idle_lines(self.idle)[-1], flush=True)


def progress(run: Run) -> str:
    if run.error:
        return "FAILED: " + run.error.splitlines()[0]
    text = f"{run.accept_rate:7.0f} msg/s accepted"
    if run.e2e_rate is not None:
        text += f", {run.e2e_rate:7.0f} msg/s end to end"
    return text + f", cpu {run.cpu_s:5.2f} s, rss {run.rss / 2**20:6.1f} MB"


# -- reporting -----------------------------------------------------------------


def machine_facts(tools: dict[str, str], root: Path) -> dict[str, str]:
    def out(cmd: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            r = subprocess.run(cmd, capture_output=True, timeout=10, check=False)
            return r.stdout.decode(errors="replace").strip()
        return "?"

    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    os_name = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    commit = out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"])
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{os.cpu_count()} x {model}",
        "memory": mem,
        "os": os_name,
        "kernel": platform.release(),
        "python": f"{platform.python_version()} "
                  f"({os.path.realpath(getattr(sys, '_base_executable', sys.executable))})",
        "postfix": out([tools["postconf"], "-d", "-h", "mail_version"]),
        "openssl": out(["openssl", "version"]),
        "filesystem": disk.describe(root),
        "postwarden": f"{commit}{' + uncommitted changes in src/' if dirty else ''}",
        "load average": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def _rate(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.0f}"
    return f"{med:.0f} ({min(values):.0f}-{max(values):.0f})"


def _mb(values: list[int]) -> str:
    return f"{max(values) / 2**20:.0f}" if values else "-"


def _cpu_per_1k(runs: list[Run]) -> str:
    return f"{statistics.median(r.cpu_s * 1000 / r.count for r in runs):.2f}" if runs else "-"


def grouped(runs: list[Run]) -> Iterator[tuple[tuple[str, int, int], list[Run], list[Run]]]:
    keys: list[tuple[str, int, int]] = []
    for r in runs:
        key = (r.case, r.size, r.sessions)
        if key not in keys:
            keys.append(key)
    for key in keys:
        same = [r for r in runs if (r.case, r.size, r.sessions) == key and not r.error]
        yield (key, [r for r in same if r.server == "postfix"],
               [r for r in same if r.server == "postwarden"])


def results_table(runs: list[Run]) -> list[str]:
    head = ("case", "size", "sess", "measured", "postfix msg/s (min-max)",
            "postwarden msg/s (min-max)", "ratio", "cpu s/1k (pf / pw)",
            "peak RSS MB (pf / pw)", "peak PSS MB (pf / pw)")
    rows: list[tuple[str, ...]] = []
    for (case, size, sess), pf, pw in grouped(runs):
        metrics: list[tuple[str, list[float], list[float]]] = [
            ("accepted", [r.accept_rate for r in pf], [r.accept_rate for r in pw])]
        if CASES[case].end_to_end:
            metrics.append(("end to end", [r.e2e_rate or 0.0 for r in pf],
                            [r.e2e_rate or 0.0 for r in pw]))
        for i, (what, a, b) in enumerate(metrics):
            ratio = (f"{statistics.median(b) / statistics.median(a):.2f}x"
                     if a and b and statistics.median(a) else "-")
            last = i == len(metrics) - 1
            rows.append((
                CASES[case].title if i == 0 else "", f"{size // KB} KB", str(sess), what,
                _rate(a), _rate(b), ratio,
                f"{_cpu_per_1k(pf)} / {_cpu_per_1k(pw)}" if last else "",
                f"{_mb([r.rss for r in pf])} / {_mb([r.rss for r in pw])}" if last else "",
                f"{_mb([r.pss for r in pf])} / {_mb([r.pss for r in pw])}" if last else "",
            ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [fmt(head), fmt(tuple("-" * w for w in widths)), *(fmt(r) for r in rows)]


def cpu_split_lines(runs: list[Run]) -> list[str]:
    """Where each server's CPU went, per message: its own code (user) and
    the kernel (system calls, page faults), medians over the repetitions."""
    lines = []
    for (case, size, sess), pf, pw in grouped(runs):
        cells = []
        for server, done in (("postfix", pf), ("postwarden", pw)):
            if not done:
                continue
            user = statistics.median((r.cpu_s - r.cpu_system_s) * 1000 / r.count for r in done)
            system = statistics.median(r.cpu_system_s * 1000 / r.count for r in done)
            cells.append(f"{server} {user:.2f} + {system:.2f}")
        if cells:
            lines.append(f"  {CASES[case].title + ',':26s} {size // KB:3d} KB, {sess:2d} sessions: "
                         + "; ".join(cells))
    return ["", "CPU seconds per 1,000 messages, user + system (the server's own code + "
            "the kernel working for it):", *lines] if lines else []


def dns_lines(runs: list[Run]) -> list[str]:
    """DNS queries per message, per case and server (all to the loopback stub)."""
    lines = []
    for server in ("postfix", "postwarden"):
        for case in CASES:
            done = [r for r in runs if r.server == server and r.case == case and not r.error]
            total = sum(r.count for r in done)
            if not total:
                continue
            by_type: collections.Counter[str] = collections.Counter()
            for r in done:
                by_type.update(r.dns)
            n = sum(by_type.values())
            detail = ", ".join(f"{t} {c}" for t, c in by_type.most_common())
            lines.append(f"  {server:10s} {CASES[case].title + ':':25s} {n} queries for "
                         f"{total} messages" + (f" ({detail})" if detail else ""))
    return ["", "DNS queries (all to the bench's loopback stub, which answers NXDOMAIN):",
            *lines] if lines else []


def idle_lines(idle: Idle) -> list[str]:
    if idle.error:
        return [f"idle sessions ({idle.sessions}): FAILED: {idle.error}"]
    per = (idle.rss_after - idle.rss_before) / max(1, idle.opened)
    probes = sorted(idle.probes)
    latency = (f"greeting for a new session: median {statistics.median(probes) * 1000:.1f} ms, "
               f"max {probes[-1] * 1000:.1f} ms ({'<' if probes[-1] < 0.1 else '>='} 100 ms)"
               if probes else "no probe")
    return [
        f"idle sessions against postwarden: {idle.opened} of {idle.sessions} open"
        + (f", {idle.failed} failed ({idle.first_error})" if idle.failed else ""),
        f"  RSS {idle.rss_before / 2**20:.0f} MB before, {idle.rss_after / 2**20:.0f} MB with "
        f"the sessions (PSS {idle.pss_after / 2**20:.0f} MB), {per / 1024:.1f} KB per session; "
        f"CPU while idle {idle.cpu_idle_s:.2f} s in {idle.hold_s:.1f} s",
        f"  {latency}; {idle.alive} of {idle.alive_sample} idle sessions answer NOOP",
    ]


def report(bench: Bench, facts: dict[str, str], reps: int, quick: bool) -> list[str]:
    lines = [f"postwarden vs Postfix {facts['postfix']}, loopback, "
             f"{'quick smoke run' if quick else 'full run'}, {reps} repetition(s), "
             f"interleaved (Postfix, postwarden, ...); median (min-max) over the repetitions.",
             ""]
    if bench.runs:
        lines += results_table(bench.runs)
    failed = [r for r in bench.runs if r.error]
    if failed:
        lines += ["", f"{len(failed)} run(s) failed:"]
        lines += [f"  rep {r.rep} {r.case} {r.size // KB} KB {r.sessions} sess {r.server}: "
                  + (r.error or "").splitlines()[0] for r in failed]
    tls = [r for r in bench.runs if r.case == "starttls" and r.client_cpu_s is not None]
    if tls:
        cpu = statistics.median(r.client_cpu_s * 1000 / r.count for r in tls
                                if r.client_cpu_s is not None)
        lines += ["", f"STARTTLS load generator (Python) CPU: {cpu:.2f} s per 1,000 messages."]
    lines += cpu_split_lines(bench.runs)
    lines += dns_lines(bench.runs)
    if bench.idle is not None:
        lines += ["", *idle_lines(bench.idle)]
    lines += ["", "machine: " + "; ".join(f"{k}: {v}" for k, v in facts.items())]
    return lines


def write_docs(path: Path, bench: Bench, facts: dict[str, str], lines: list[str],
               argv: list[str]) -> None:
    block = [DOCS_BEGIN, "", f"Run on {facts['date']} with `{shlex.join(argv)}`.", "",
             "| machine | |", "|---|---|"]
    block += [f"| {k} | {v} |" for k, v in facts.items()]
    block += ["", "```", *[ln for ln in lines if not ln.startswith("machine: ")], "```", "",
              "Commands (one run of each case; ports differ per run):", "", "```"]
    block += [f"{k}: {v}" for k, v in sorted(bench.commands.items())]
    block += ["```", "", DOCS_END]
    text = path.read_text() if path.exists() else "# Performance\n\n"
    if DOCS_BEGIN in text and DOCS_END in text:
        head, rest = text.split(DOCS_BEGIN, 1)
        tail = rest.split(DOCS_END, 1)[1]
        text = head + "\n".join(block) + tail
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(block) + "\n"
    path.write_text(text)


# -- main -----------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="one repetition of a few small cases (CI smoke test)")
    ap.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--cases", help="comma-separated subset of: " + ", ".join([*CASES, "idle"]))
    ap.add_argument("--idle", type=int,
                    help="idle sessions to hold (default 10000; 2000 with --quick)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    ap.add_argument("--run-timeout", type=float,
                    help="seconds one load (or delivery) may take (default 300; 60 quick)")
    ap.add_argument("--max-seconds", type=float,
                    help="abort the whole bench after this long (default 3600; 240 quick)")
    ap.add_argument("--postwarden-log-level", choices=("debug", "info", "warning", "error"),
                    help="override postwarden's log level (default: its default, info)")
    ap.add_argument("--docs", type=Path, help="write the results into this Markdown file")
    ap.add_argument("--json", type=Path, help="write every run as JSON to this file")
    ap.add_argument("--disk", choices=("image", "tmp"), default="image",
                    help="where the servers write: a loop-mounted ext4 image with a journal "
                         "(default; see bench/disk.py) or $TMPDIR")
    ap.add_argument("--no-install", action="store_true",
                    help="do not apt-get install postfix when it is missing")
    args = ap.parse_args(argv)
    q = args.quick
    args.reps = args.reps or (1 if q else 3)
    args.idle = args.idle if args.idle is not None else (2000 if q else 10000)
    args.run_timeout = args.run_timeout or (60.0 if q else 300.0)
    args.max_seconds = args.max_seconds or (240.0 if q else 3600.0)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: must run as root (a private Postfix's master starts as root)",
              file=sys.stderr)
        return 2
    plan = quick_plan() if args.quick else full_plan()
    if args.cases:
        wanted = set(args.cases.split(","))
        if unknown := wanted - {*CASES, "idle"}:
            print(f"bench: unknown case(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        plan = [c for c in plan if c.case in wanted]
        if "idle" not in wanted:
            args.idle = 0
    plan = [Config(c.case, c.size, c.sessions, max(10, int(c.count * args.scale)))
            for c in plan]
    raise_nofile(args.idle + 1024)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)
    signal.setitimer(signal.ITIMER_REAL, args.max_seconds)
    began = time.monotonic()
    try:
        with disk.workspace(args.disk, "bench") as root:
            root.chmod(0o711)  # Postfix's unprivileged daemons reach their dirs by path
            return run_bench(args, argv, plan, root, began)
    except Interrupted as e:  # while the image was being made or removed
        print(f"\nbench: interrupted by {e}", file=sys.stderr)
        return 130


def run_bench(args: argparse.Namespace, argv: list[str], plan: list[Config], root: Path,
              began: float) -> int:
    bench: Bench | None = None
    try:
        bench = Bench(args, root)
        facts = machine_facts(bench.tools, root)
        print(f"bench: {len(plan)} configurations x 2 servers x {args.reps} repetition(s) "
              f"in {root}", flush=True)
        bench.execute(plan, args.reps, args.idle)
        facts["load average"] += " (start), " + " ".join(
            Path("/proc/loadavg").read_text().split()[:3]) + " (end)"
        facts["duration"] = f"{time.monotonic() - began:.0f} s"
        facts["filesystem"] += (f"; {disk.creation_cost(root) * 1e6:.0f} us after the "
                                "runs")
        lines = report(bench, facts, args.reps, args.quick)
        print()
        print("\n".join(lines))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"facts": facts, "runs": [asdict(r) for r in
                                             bench.runs], "idle": asdict(bench.idle)
                                             if bench.idle else None}, indent=1))
        if args.docs:
            write_docs(args.docs, bench, facts, lines, ["python", "-m", "bench.compare", *argv])
            print(f"\nwrote {args.docs}")
        failed = [r for r in bench.runs if r.error]
        if failed or (bench.idle is not None and bench.idle.error):
            print("bench: some runs failed (see above)", file=sys.stderr)
            return 1
        return 0
    except Interrupted as e:
        what = "time limit (--max-seconds)" if str(e) == "SIGALRM" else str(e)
        print(f"\nbench: interrupted by {what}; cleaning up", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        stop_all()
        if bench is not None:
            bench.dns.stop()


if __name__ == "__main__":
    sys.exit(main())
