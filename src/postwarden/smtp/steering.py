"""Which process takes a new connection, with ``processes`` > 1.

Every process accepts on the same listening sockets (see
:mod:`postwarden.workers`).  Left to the kernel, a new connection goes to
whichever process calls accept first; at low load that is a coin toss, so
consecutive sessions of one client alternate between processes, and each
process finds its SQLite page cache emptied by the other's last commit and
its own caches cold.  Measured at one session, one message per connection:
one process accepted 18-28% more messages than two, with a quarter to a
third less CPU per message (docs/performance.md, "Which process accepts").

So each process decides, for each new connection, whether it is the one
to take it:

* Every process publishes its load (sessions in progress, plus
  :data:`DELIVERY_WEIGHT` for each delivery in flight) in a few bytes of
  shared memory, with a count of the connections accepted by all and the
  slot of the process that accepted the last one (:class:`ProcessLoad`).
* Every process, the main one included, waits for new connections on its
  own epoll descriptor, edge-triggered (:class:`Acceptor`): the kernel
  wakes each once per new connection.  The least loaded process takes it;
  the one that took the last connection counts :data:`STAY_BONUS` less, so
  that one client's sessions one after another stay in one process.
* The others look again :data:`RECHECK` later (the loads may have changed
  between their looks), and if no process has accepted anything for
  :data:`STALL_AFTER` while a connection waits, the chosen one is stuck (a
  long pause, a SIGSTOP): they accept until the count moves again.  No
  connection waits on a process that does not accept.

The main process is the one that delivers, so while it delivers, new
sessions go to the workers.  Relaying at 10 sessions this took 26% more
messages a second than the main process accepting whenever it was idle
for a moment, with 24% less CPU each (docs/performance.md, "Every process
chooses").  The price: the main process accepts through this loop too,
not through asyncio's server, which costs a task and a few system calls
per connection, about 50 us (one session, delivery paused: 6% fewer
messages on one machine, no difference measured on another).

Security exposure: none beyond the listeners'.  The shared memory is a
memfd passed only to the server's own workers; a wrong value in it can
only change which process accepts, never whether a connection is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import mmap
import os
import select
import socket
from collections.abc import Callable

from postwarden.observe.log import get_logger

log = get_logger("steering")

# The process that took the last connection counts this much less (as if
# it had fewer sessions): one session alone is served best where the last
# one was.  Two, because a session that has sent its 221 may still be
# closing when the same client's next connection arrives.
STAY_BONUS = 2
# A delivery in flight weighs this many sessions.  Relaying 2 KB messages
# at 10 / 50 sessions: 2 gave 1,403 / 1,720 msg/s, 4 gave 1,544 / 1,720,
# 8 gave 1,625 / 1,672 (medians of three, alternated).
DELIVERY_WEIGHT = 4
# Seconds between looks at a connection left to another process.
RECHECK = 0.002
# Seconds a process leaves a waiting connection to another that accepts
# nothing meanwhile before it takes the connection itself.
STALL_AFTER = 0.05
# Connections a process accepts in one go before it lets other work run.
ACCEPT_BATCH = 64
# Seconds a process stops accepting after running out of descriptors or
# memory (as asyncio's own accept loop does).
ACCEPT_PAUSE = 1.0
_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# The shared block: uint32 words.  The connections accepted by all the
# processes (wrapping), the slot of the process that accepted the last one,
# then each process's load by slot (the main process is slot 0).
_ACCEPTED, _LAST, _FIRST_LOAD = 0, 1, 2
_WORD = 4
# The load of a slot whose process does not accept (not started yet,
# stopping, dead): never the least.
UNAVAILABLE = 0x7FFFFFFF


def create_block(processes: int) -> int:
    """The shared block for ``processes`` processes, in a memfd (passed to
    the workers): the main process available, the workers not yet."""
    fd = os.memfd_create("postwarden-steering", 0)  # not inherited unless passed
    size = _WORD * (_FIRST_LOAD + processes)
    os.ftruncate(fd, size)
    mem = memoryview(mmap.mmap(fd, size)).cast("I")
    for slot in range(1, processes):
        mem[_FIRST_LOAD + slot] = UNAVAILABLE
    mem.release()
    return fd


class ProcessLoad:
    """One process's load in the shared block (sessions in progress, plus
    DELIVERY_WEIGHT for each delivery in flight), and the choice of the process
    that takes the next connection."""

    def __init__(self, fd: int, slot: int) -> None:
        size = os.fstat(fd).st_size
        self._mem = memoryview(mmap.mmap(fd, size)).cast("I")
        self.slots = size // _WORD - _FIRST_LOAD
        if not 0 <= slot < self.slots:
            raise ValueError(f"steering: slot {slot} of {self.slots}")
        self.slot = slot
        self.load = 0
        self.joined = False

    def join(self) -> None:
        """This process accepts from now on."""
        self.joined = True
        self._mem[_FIRST_LOAD + self.slot] = self.load

    def leave(self) -> None:
        """This process takes no more connections (it is stopping)."""
        self.joined = False
        self.vacate(self.slot)

    def vacate(self, slot: int) -> None:
        """The process in ``slot`` takes no more connections (the main
        process marks a worker that ended)."""
        self._mem[_FIRST_LOAD + slot] = UNAVAILABLE

    def change(self, n: int) -> None:
        self.load = max(0, self.load + n)
        if self.joined:
            self._mem[_FIRST_LOAD + self.slot] = self.load

    def accepted(self) -> None:
        """A connection was accepted here (a session begins)."""
        mem = self._mem
        mem[_ACCEPTED] = (mem[_ACCEPTED] + 1) & 0xFFFFFFFF
        mem[_LAST] = self.slot
        self.change(1)

    def session_ended(self) -> None:
        self.change(-1)

    def delivering(self, n: int) -> None:
        """A delivery began (+1) or ended (-1).  A delivery counts as
        DELIVERY_WEIGHT sessions: the sessions a process would take share its core
        with its deliveries, while another core may be free (relaying, a
        worker taking the sessions while the main process delivers was
        the fastest split; docs/performance.md)."""
        self.change(n * DELIVERY_WEIGHT)

    @property
    def accepted_count(self) -> int:
        return int(self._mem[_ACCEPTED])

    def taker(self) -> int:
        """The slot that takes the next connection: the least loaded, where
        the one that took the last connection counts STAY_BONUS less (a client's
        next session is served best where its last one was, which may
        still be closing); on a tie the lower slot."""
        mem = self._mem
        last = mem[_LAST]
        best_slot, best = 0, UNAVAILABLE
        for slot in range(self.slots):
            load = mem[_FIRST_LOAD + slot]
            if load >= UNAVAILABLE:
                continue
            if slot == last:
                load -= STAY_BONUS
            if load < best:
                best_slot, best = slot, load
        return best_slot


class Acceptor:
    """A process's accept loop over the listening sockets (see the module
    docstring).  ``attach`` a socket with what to do with each connection
    accepted on it; ``close`` before the loop ends."""

    def __init__(self, load: ProcessLoad) -> None:
        self.load = load
        self._ep = select.epoll()
        self._listening: dict[int, tuple[socket.socket, Callable[[socket.socket], None]]] = {}
        self._check: asyncio.TimerHandle | None = None
        self._seen = 0  # the accept count when a connection was left to another
        self._left_at = 0.0  # and when
        self._stuck_at: int | None = None  # the count when nobody was found accepting
        self._paused = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, sock: socket.socket, on_connection: Callable[[socket.socket], None]
               ) -> None:
        loop = self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        if not self._listening:
            loop.add_reader(self._ep.fileno(), self._ready)
            self.load.join()
        self._listening[sock.fileno()] = (sock, on_connection)
        self._ep.register(sock.fileno(), select.EPOLLIN | select.EPOLLET)
        # Connections that arrived before the registration raised no edge.
        self._arrived([sock.fileno()])

    def detach(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._listening.pop(fd, None) is None:
            return
        with contextlib.suppress(OSError):
            self._ep.unregister(fd)
        if not self._listening:
            self.close()

    def close(self) -> None:
        self.load.leave()
        if self._loop is not None and not self._ep.closed:
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                self._loop.remove_reader(self._ep.fileno())
        if self._check is not None:
            self._check.cancel()
            self._check = None
        self._listening.clear()
        self._ep.close()

    def _ready(self) -> None:
        self._arrived([fd for fd, _ in self._ep.poll(0)])

    def _takes(self) -> bool:
        load = self.load
        return (load.taker() == load.slot
                or (self._stuck_at is not None and self._stuck_at == load.accepted_count))

    def _arrived(self, fds: list[int]) -> None:
        if not fds or self._paused:
            return
        if self._takes():
            for fd in fds:
                self._accept(fd)
        elif self._check is None and self._loop is not None:
            self._stuck_at = None
            self._seen = self.load.accepted_count
            self._left_at = self._loop.time()
            self._check = self._loop.call_later(RECHECK, self._look_again)

    def _look_again(self) -> None:
        """RECHECK after a connection was left to another process: taken now
        if the loads changed meanwhile (each process reads them when the
        kernel wakes it, so two can both leave a connection to the other),
        or if no process has accepted anything for STALL_AFTER while it
        waits; else looked at again."""
        self._check = None
        if self._loop is None:
            return
        socks = [sock for sock, _ in self._listening.values()]
        try:
            waiting = [s.fileno() for s in select.select(socks, [], [], 0)[0]]
        except (OSError, ValueError):  # closing
            return
        if not waiting or self._paused:
            return
        accepted = self.load.accepted_count
        now = self._loop.time()
        if accepted != self._seen:  # others accept: a new wait begins
            self._seen, self._left_at = accepted, now
        elif now - self._left_at >= STALL_AFTER and self._stuck_at != accepted:
            log.debug("process_not_accepting", slot=self.load.taker(), after=STALL_AFTER)
            self._stuck_at = accepted
        if self._takes():
            for fd in waiting:
                self._accept(fd)
        else:
            self._check = self._loop.call_later(RECHECK, self._look_again)

    def _accept(self, fd: int) -> None:
        """Accept what waits on ``fd``; edge-triggered, so up to EAGAIN."""
        entry = self._listening.get(fd)
        if entry is None:
            return
        sock, on_connection = entry
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _PAUSE_ERRNOS:
                    log.error("accept_failed", error=exc.strerror, pause=ACCEPT_PAUSE)
                    self._pause()
                    return
                continue  # ECONNABORTED and the like: that connection is gone
            on_connection(conn)
        if self._loop is not None:  # more may wait: go on after other work
            self._loop.call_soon(self._accept, fd)

    def _pause(self) -> None:
        self._paused = True

        def resume() -> None:
            self._paused = False
            if self._listening:
                self._arrived(list(self._listening))

        if self._loop is not None:
            self._loop.call_later(ACCEPT_PAUSE, resume)
