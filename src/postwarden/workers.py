"""Worker processes: every core accepts mail.

One Python process runs on one core at a time.  With ``processes = N``
(default ``"auto"``: one per CPU), ``postwarden serve`` runs the main
process and N - 1 workers:

* The main process binds the listening sockets and runs the whole server:
  sessions, the queue runner, the control socket.  It starts the workers,
  restarts one that dies, forwards SIGHUP (certificate and access list
  reload) and stops them on shutdown.
* A worker inherits the listening sockets and runs sessions only.  All
  processes accept on the same sockets, each new connection in the least
  loaded process (:mod:`postwarden.smtp.steering`): at low load one
  process serves a client's consecutive sessions, and while the main
  process delivers, the workers take the sessions.
* Workers commit to the same queue database (SQLite in WAL mode: writers
  take its lock in turn, each process group-commits what arrived meanwhile).
  After a commit a worker writes the message on its pipe to the main
  process, whose queue runner starts its delivery at once
  (:mod:`postwarden.queue.handover`).
* State shared in the database (bans, rate limits, greylisting, access
  entries) is the same for every process.  Concurrent connections, in
  total and per client network (``[connections]``), are counted in shared
  memory that every process reads and writes
  (:class:`~postwarden.policy.connlimit.ConnectionTable`), so their limits
  hold for the whole server.  The rate of new connections per client is
  counted by each process, with the limit divided among them (rounded up).

Security exposure: workers run with the same privileges and configuration
as the main process; the pipes carry the envelopes of committed messages
(a line that does not decode only starts a scan of the queue); a worker's
crash loses no committed mail (every 250 is in the database) and only its
open sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import mmap
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from postwarden.observe.log import get_logger
from postwarden.policy.connlimit import ConnectionTable
from postwarden.queue import handover
from postwarden.storage.base import QueuedMessage

log = get_logger("workers")

MAX_PROCESSES = 64
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
RESTART_DELAY = 1.0
# A worker that dies within STABLE seconds of its start is restarted after a
# delay that doubles each time, up to RESTART_DELAY_MAX (a crash loop, e.g.
# a config file broken since the main process started, must not spin).
STABLE = 10.0
RESTART_DELAY_MAX = 60.0
STOP_TIMEOUT_EXTRA = 5.0  # beyond the sessions' grace period


def process_count(setting: int) -> int:
    """``processes`` from the config: 0 means one per CPU."""
    if setting > 0:
        return min(setting, MAX_PROCESSES)
    return max(1, min(len(os.sched_getaffinity(0)), MAX_PROCESSES))


def connection_table(processes: int) -> tuple[ConnectionTable, int]:
    """In the main process: the connection counts shared with the workers,
    in a memfd (passed to them like the sockets), and its descriptor."""
    fd = os.memfd_create("postwarden-connections", 0)  # not inherited unless passed
    os.ftruncate(fd, ConnectionTable.size(processes))
    return ConnectionTable(mmap.mmap(fd, ConnectionTable.size(processes)), processes, 0), fd


@dataclass(frozen=True, slots=True)
class WorkerArgs:
    """What a worker process gets on its command line."""

    sockets: dict[str, list[int]]  # listener name -> inherited socket fds
    notify_fd: int
    slot: int
    table_fd: int  # the shared connection counts (connection_table)
    main_pid: int
    steering_fd: int  # the main process's load (postwarden.smtp.steering)

    def encode(self) -> list[str]:
        fds = ";".join(f"{name}={','.join(map(str, fds))}"
                       for name, fds in self.sockets.items())
        return ["--worker", fds, "--notify-fd", str(self.notify_fd),
                "--worker-slot", str(self.slot), "--table-fd", str(self.table_fd),
                "--main-pid", str(self.main_pid), "--steering-fd", str(self.steering_fd)]

    @staticmethod
    def decode(fds: str, notify_fd: int, slot: int, table_fd: int, main_pid: int,
               steering_fd: int) -> WorkerArgs:
        sockets: dict[str, list[int]] = {}
        for part in filter(None, fds.split(";")):
            name, _, numbers = part.partition("=")
            sockets[name] = [int(n) for n in numbers.split(",") if n]
        return WorkerArgs(sockets, notify_fd, slot, table_fd, main_pid, steering_fd)

    def adopt(self) -> dict[str, list[socket.socket]]:
        return {name: [socket.socket(fileno=fd) for fd in fds]
                for name, fds in self.sockets.items()}

    def table(self) -> ConnectionTable:
        size = os.fstat(self.table_fd).st_size
        return ConnectionTable(mmap.mmap(self.table_fd, size), size // ConnectionTable.ROW,
                               self.slot)


def die_with_parent(parent: int) -> None:
    """Linux: have the kernel send SIGTERM to this process when its parent
    exits (prctl PR_SET_PDEATHSIG); elsewhere nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)


class WorkerPool:
    """In the main process: the workers (see module docstring)."""

    def __init__(self, config_path: Path, count: int,
                 sockets: dict[str, list[int]], on_commit: Callable[[], None],
                 grace: float, table: ConnectionTable, table_fd: int, steering_fd: int,
                 on_exit: Callable[[int], None] | None = None,
                 on_message: Callable[[QueuedMessage], None] | None = None,
                 on_vacated: Callable[[int], None] | None = None) -> None:
        """``on_message``: a message a worker committed (see
        :mod:`postwarden.queue.handover`); ``on_commit``: scan the queue;
        ``on_vacated``: the slot of a worker that ended (it takes no more
        connections, :mod:`postwarden.smtp.steering`)."""
        self.config_path = config_path
        self.table = table
        self.table_fd = table_fd
        self.steering_fd = steering_fd
        self.count = count
        self.sockets = sockets
        self.on_commit = on_commit
        self.on_message = on_message or (lambda _msg: on_commit())
        self._receivers: dict[int, handover.Receiver] = {}  # pipe fd -> its reader
        self.grace = grace
        self.on_exit = on_exit  # told the pid of a worker that ended
        self.on_vacated = on_vacated
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.started = 0  # processes started, restarts included
        self._delay: dict[int, float] = {}  # slot -> next restart delay
        self._born: dict[int, float] = {}  # slot -> when its process started
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._stop_event = asyncio.Event()  # wakes watchers waiting to restart

    async def start(self) -> None:
        for slot in range(1, self.count + 1):
            await self._spawn(slot)

    async def _spawn(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        fds = self.sockets
        args = WorkerArgs(fds, write_fd, slot, self.table_fd, os.getpid(), self.steering_fd)
        inherited = [fd for group in fds.values() for fd in group] + [
            write_fd, self.table_fd, self.steering_fd]
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "postwarden", "-c", str(self.config_path), "serve",
                *args.encode(), stdin=asyncio.subprocess.DEVNULL, pass_fds=inherited)
        finally:
            os.close(write_fd)
        self.procs[slot] = proc
        self._born[slot] = time.monotonic()
        self.started += 1
        os.set_blocking(read_fd, False)
        self._receivers[read_fd] = handover.Receiver(self.on_message, self.on_commit)
        loop.add_reader(read_fd, self._notified, read_fd)
        log.info("worker_started", slot=slot, pid=proc.pid)
        task = asyncio.create_task(self._watch(slot, proc, read_fd))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notified(self, fd: int) -> None:
        """Hand what the worker wrote on its pipe to its receiver."""
        receiver = self._receivers.get(fd)
        if receiver is None:
            return
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # BlockingIOError: all read for now
                return
            if not data:
                return
            receiver.feed(data)

    async def _watch(self, slot: int, proc: asyncio.subprocess.Process, read_fd: int) -> None:
        status = await proc.wait()
        loop = asyncio.get_running_loop()
        loop.remove_reader(read_fd)
        self._notified(read_fd)  # what it said before it went
        self._receivers.pop(read_fd).close()
        os.close(read_fd)
        if self.procs.get(slot) is proc:
            del self.procs[slot]
        if self.on_exit is not None:
            self.on_exit(proc.pid)
        if self.on_vacated is not None:
            self.on_vacated(slot)
        if self._stopping:
            return
        # Its sessions are gone: so are their places in the counts.
        self.table.clear(slot)
        delay = RESTART_DELAY
        if time.monotonic() - self._born.get(slot, 0.0) < STABLE:
            delay = self._delay.get(slot, RESTART_DELAY / 2) * 2
        self._delay[slot] = min(delay, RESTART_DELAY_MAX)
        log.error("worker_died", slot=slot, pid=proc.pid, status=status,
                  restart_in=self._delay[slot])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), self._delay[slot])
        if not self._stopping:
            await self._spawn(slot)

    def signal(self, signum: int) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    def reload(self) -> None:
        self.signal(signal.SIGHUP)

    async def stop(self) -> None:
        """SIGTERM: the workers stop accepting and let their sessions finish
        (within their grace period); SIGKILL for any still running after."""
        self._stopping = True
        self._stop_event.set()
        procs = list(self.procs.values())
        self.signal(signal.SIGTERM)
        if procs:
            _, pending = await asyncio.wait([asyncio.create_task(p.wait()) for p in procs],
                                            timeout=self.grace + STOP_TIMEOUT_EXTRA)
            if pending:
                self.signal(signal.SIGKILL)
                await asyncio.wait(pending, timeout=5)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        self.procs.clear()
