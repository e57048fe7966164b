"""Which process takes a new connection, with ``processes`` > 1.

Every process accepts on the same listening sockets (see
:mod:`postwarden.workers`).  Left to the kernel, a new connection goes to
whichever process calls accept first; at low load that is a coin toss, so
consecutive sessions of one client alternate between processes, and each
process finds its SQLite page cache emptied by the other's last commit and
its own caches cold.  Measured at one session, one message per connection:
one process accepted 18-28% more messages than two, with a quarter to a
third less CPU per message (docs/performance.md, "Which process accepts").

So the main process takes new connections alone while it is not busy:

* The main process publishes its load (sessions in progress plus
  deliveries in flight) and a count of the connections it accepted, in a
  few bytes of shared memory (:class:`MainLoad`).
* A worker waits for new connections on its own epoll descriptor,
  edge-triggered (:class:`WorkerAcceptor`): the kernel wakes it once per
  new connection, and it accepts only while the main process's load is at
  least :data:`BUSY_AT`.  Otherwise it leaves the connection to the main
  process, and looks again :data:`STALL_AFTER` seconds later: if the main
  process has accepted nothing meanwhile and a connection still waits, the
  main process is stuck (a long pause, a SIGSTOP) and the worker accepts
  until the main process's count moves again.  No connection waits on a
  main process that does not accept.
* Under load every process accepts, as before.  The main process is the
  one that delivers: while a delivery is in flight it counts as busy.

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

# The main process counts as busy from this load on (sessions + deliveries):
# one session alone is served best where the last one was.  Two, because a
# session that has sent its 221 may still be closing when the same client's
# next connection arrives.
BUSY_AT = 2
# Seconds a worker leaves a waiting connection to a main process that is
# not busy before it takes the connection itself.
STALL_AFTER = 0.05
# Connections a worker accepts in one go before it lets other work run.
ACCEPT_BATCH = 64
# Seconds a worker stops accepting after running out of descriptors or
# memory (as asyncio's own accept loop does).
ACCEPT_PAUSE = 1.0
_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_LOAD, _ACCEPTED = 0, 1  # uint32 words of the shared block
_SIZE = 8


class MainLoad:
    """The main process's side: its load and accept count, in a memfd
    (``fd``, passed to the workers)."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("postwarden-steering", 0)  # not inherited unless passed
        os.ftruncate(self.fd, _SIZE)
        self._mem = memoryview(mmap.mmap(self.fd, _SIZE)).cast("I")
        self.load = 0

    def change(self, n: int) -> None:
        self.load = max(0, self.load + n)
        self._mem[_LOAD] = self.load

    def accepted(self) -> None:
        """A connection was accepted here (a session begins)."""
        self._mem[_ACCEPTED] = (self._mem[_ACCEPTED] + 1) & 0xFFFFFFFF
        self.change(1)

    def session_ended(self) -> None:
        self.change(-1)

    def delivering(self, n: int) -> None:
        """A delivery began (+1) or ended (-1).  One delivery in flight makes
        the main process busy by itself: the sessions it would take share
        its core with the deliveries, while a worker's core is free (at one
        session relaying, the worker taking the sessions is the fastest
        split; docs/performance.md)."""
        self.change(n * BUSY_AT)


class WorkerAcceptor:
    """A worker's accept loop over the inherited listening sockets (see the
    module docstring).  ``attach`` a socket with what to do with each
    connection accepted on it; ``close`` before the loop ends."""

    def __init__(self, fd: int) -> None:
        self._mem = memoryview(mmap.mmap(fd, _SIZE, prot=mmap.PROT_READ)).cast("I")
        self._ep = select.epoll()
        self._listening: dict[int, tuple[socket.socket, Callable[[socket.socket], None]]] = {}
        self._check: asyncio.TimerHandle | None = None
        self._seen = 0  # the main process's accept count when a connection was left to it
        self._stuck_at: int | None = None  # its count when it was found not accepting
        self._paused = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, sock: socket.socket, on_connection: Callable[[socket.socket], None]
               ) -> None:
        loop = self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        if not self._listening:
            loop.add_reader(self._ep.fileno(), self._ready)
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
        return (self._mem[_LOAD] >= BUSY_AT
                or (self._stuck_at is not None and self._stuck_at == self._mem[_ACCEPTED]))

    def _arrived(self, fds: list[int]) -> None:
        if not fds or self._paused:
            return
        if self._takes():
            for fd in fds:
                self._accept(fd)
        elif self._check is None and self._loop is not None:
            self._stuck_at = None
            self._seen = self._mem[_ACCEPTED]
            self._check = self._loop.call_later(STALL_AFTER, self._look_again)

    def _look_again(self) -> None:
        """STALL_AFTER after a connection was left to the main process."""
        self._check = None
        socks = [sock for sock, _ in self._listening.values()]
        try:
            waiting = [s.fileno() for s in select.select(socks, [], [], 0)[0]]
        except (OSError, ValueError):  # closing
            return
        if not waiting:
            return
        accepted = self._mem[_ACCEPTED]
        if accepted == self._seen:
            log.debug("main_process_not_accepting", after=STALL_AFTER)
            self._stuck_at = accepted
        # Taken now if the main process is stuck or busy; else looked at
        # again after another STALL_AFTER.
        self._arrived(waiting)

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
