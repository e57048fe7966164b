"""CPU time and memory of a server's processes, read from /proc (no psutil).

A server is a process group: ``postfix start`` runs master(8) as a session and
group leader and every daemon it forks (smtpd, cleanup, qmgr, smtp, virtual,
...) stays in that group; postwarden is started with ``start_new_session`` so
it leads its own group too.

CPU: the sum over the group's processes of utime + stime + cutime + cstime.
A daemon that exits is reaped by its parent (master) and its time moves into
the parent's cutime/cstime, so the sum stays monotonic while daemons come and
go; a zombie still shows its own times until it is reaped.  A measurement is
the difference of two snapshots.

Memory: the sum of VmRSS over the group (what ``ps`` shows; counts shared
pages, such as libc and Postfix's shared libraries, once per process) and the
sum of Pss from smaps_rollup (shared pages divided among their users, so the
sum is the group's real footprint).  Both are sampled by a thread; the peak
of each sum is kept.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after "pid (comm)", or None if gone.

    Index 0 is the state, 2 the process group, 11..14 utime, stime, cutime,
    cstime (in clock ticks).
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def group_members(pgid: int) -> list[int]:
    """Every process (zombies included) in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def live_members(pgid: int) -> list[int]:
    members = []
    for pid in group_members(pgid):
        fields = _stat(pid)
        if fields is not None and fields[0] != "Z":
            members.append(pid)
    return members


def group_cpu(pgid: int) -> float:
    """CPU seconds used so far by the group (live and reaped processes)."""
    return sum(group_cpu_split(pgid))


def group_cpu_split(pgid: int) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by the group: time in the
    processes' own code, and in the kernel on their behalf (system calls:
    sockets, files, fsync, locks; page faults)."""
    user = system = 0
    for pid in group_members(pgid):
        fields = _stat(pid)
        if fields is not None:  # utime, stime, cutime, cstime (proc(5))
            user += int(fields[11]) + int(fields[13])
            system += int(fields[12]) + int(fields[14])
    return user / CLK_TCK, system / CLK_TCK


def own_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` itself (its threads, not
    its reaped children); 0 once it is gone."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


@dataclass
class Memory:
    rss: int = 0  # bytes, sum of VmRSS
    pss: int = 0  # bytes, sum of Pss
    processes: int = 0


def group_memory(pgid: int) -> Memory:
    pids = live_members(pgid)
    return Memory(rss=sum(_rss(p) for p in pids), pss=sum(_pss(p) for p in pids),
                  processes=len(pids))


class Sampler:
    """Samples a group's memory every ``interval`` seconds in a thread and
    measures its CPU time between ``start()`` and ``stop()``."""

    def __init__(self, pgid: int, interval: float = 0.25) -> None:
        self.pgid = pgid
        self.interval = interval
        self.peak = Memory()
        self.cpu = 0.0
        self.cpu_system = 0.0  # the kernel's part of ``cpu``
        self._cpu0 = (0.0, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _sample(self) -> None:
        m = group_memory(self.pgid)
        self.peak.rss = max(self.peak.rss, m.rss)
        self.peak.pss = max(self.peak.pss, m.pss)
        self.peak.processes = max(self.peak.processes, m.processes)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> Sampler:
        self._cpu0 = group_cpu_split(self.pgid)
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        user, system = group_cpu_split(self.pgid)
        self.cpu = user + system - sum(self._cpu0)
        self.cpu_system = system - self._cpu0[1]
        self._sample()
        self._stop.set()
        with contextlib.suppress(RuntimeError):
            self._thread.join(5)
