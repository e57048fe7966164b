"""Which process takes a new connection (smtp/steering.py): acceptors of
two "processes" (slots 0 and 1 of one shared block) on one real listening
socket; the kernel wakes both for every connection, and the least loaded
takes it, the last taker counting STAY_BONUS less."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
from collections.abc import Callable

import pytest

from postwarden.smtp import steering
from postwarden.smtp.steering import (
    DELIVERY_WEIGHT,
    RECHECK,
    STALL_AFTER,
    STAY_BONUS,
    Acceptor,
    ProcessLoad,
    create_block,
)


class Bench:
    """A listening socket, the shared block of two processes, and their
    acceptors (``running``: which of them accept; the other is stuck)."""

    def __init__(self, running: tuple[int, ...] = (0, 1)) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.fd = create_block(2)
        self.loads = [ProcessLoad(self.fd, 0), ProcessLoad(self.fd, 1)]
        self.running = running
        self.acceptors = {slot: Acceptor(self.loads[slot]) for slot in running}
        self.taken: dict[int, list[socket.socket]] = {0: [], 1: []}
        self.clients: list[socket.socket] = []

    async def __aenter__(self) -> Bench:
        for slot, acceptor in self.acceptors.items():
            acceptor.attach(self.listener, self._taker(slot))
        for slot in (0, 1):
            if slot not in self.running:  # it joined, then stopped accepting
                self.loads[slot].join()
        return self

    def _taker(self, slot: int) -> Callable[[socket.socket], None]:
        def take(conn: socket.socket) -> None:
            self.taken[slot].append(conn)
            self.loads[slot].accepted()
        return take

    async def __aexit__(self, *exc: object) -> None:
        for acceptor in self.acceptors.values():
            acceptor.detach(self.listener)
            acceptor.close()
        for s in [*self.taken[0], *self.taken[1], *self.clients]:
            s.close()
        self.listener.close()
        os.close(self.fd)

    def connect(self) -> None:
        self.clients.append(socket.create_connection(("127.0.0.1", self.port), timeout=5))

    async def taken_by(self, count: int, timeout: float = 5.0) -> list[int]:
        """The slots of the first ``count`` connections taken, in order."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while len(self.taken[0]) + len(self.taken[1]) < count and loop.time() < end:
            await asyncio.sleep(0.001)
        return [0] * len(self.taken[0]) + [1] * len(self.taken[1])

    def end_sessions(self) -> None:
        for slot in (0, 1):
            for _ in self.taken[slot]:
                self.loads[slot].session_ended()


def test_one_client_after_another_stays_with_the_process_that_took_it() -> None:
    asyncio.run(_one_after_another())


async def _one_after_another() -> None:
    async with Bench() as b:
        for n in range(1, 6):
            b.connect()
            assert await b.taken_by(n) == [0] * n  # the main process first
            if n > 1:  # each session still closing when the next one comes
                b.loads[0].session_ended()
        b.loads[0].session_ended()
        b.clients += b.taken[0]  # closed at the end
        b.taken[0] = []
        # A delivery in flight in the main process: the worker takes the next
        # one, and keeps the client while it stays less loaded.
        b.loads[0].delivering(1)
        for n in range(1, 4):
            b.connect()
            assert await b.taken_by(n) == [1] * n
            b.loads[1].session_ended()
        b.loads[0].delivering(-1)
        b.connect()
        assert await b.taken_by(4) == [1] * 4  # idle main process: it stays


def test_sessions_are_shared_by_load() -> None:
    asyncio.run(_shared())


async def _shared() -> None:
    async with Bench() as b:
        for _ in range(12):
            b.connect()
            await b.taken_by(len(b.clients))
        # Sessions held open: neither process has more than STAY_BONUS + 1
        # sessions above the other.
        assert abs(len(b.taken[0]) - len(b.taken[1])) <= STAY_BONUS + 1
        assert b.loads[0].load + b.loads[1].load == 12


def test_deliveries_weigh_on_the_main_process() -> None:
    asyncio.run(_deliveries())


async def _deliveries() -> None:
    async with Bench() as b:
        b.loads[0].delivering(2)  # as heavy as 2 * DELIVERY_WEIGHT sessions
        for _ in range(2 * DELIVERY_WEIGHT - STAY_BONUS):
            b.connect()
            await b.taken_by(len(b.clients))
        assert b.taken[0] == []


def test_a_process_that_does_not_accept_leaves_waiting_connections_to_the_other() -> None:
    asyncio.run(_stuck())


async def _stuck() -> None:
    async with Bench(running=(1,)) as b:  # slot 0, the least loaded, is stuck
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        b.connect()
        assert await b.taken_by(1) == [1]
        assert loop.time() - t0 >= STALL_AFTER
        # Nobody else accepts meanwhile: the next is taken at once.
        b.end_sessions()
        t1 = loop.time()
        b.connect()
        assert await b.taken_by(2) == [1, 1]
        assert loop.time() - t1 < STALL_AFTER


def test_a_connection_left_to_another_is_taken_when_the_loads_change() -> None:
    # Each process reads the loads when the kernel wakes it: the main process
    # may have become busy since the worker left it the connection.
    asyncio.run(_changed())


async def _changed() -> None:
    async with Bench(running=(1,)) as b:
        loop = asyncio.get_running_loop()
        b.connect()
        await asyncio.sleep(RECHECK * 3)
        assert b.taken[1] == []  # left to slot 0
        t0 = loop.time()
        b.loads[0].delivering(1)  # slot 0 is busy now
        assert await b.taken_by(1) == [1]
        assert loop.time() - t0 < STALL_AFTER / 2


def test_a_process_that_left_is_never_chosen() -> None:
    asyncio.run(_left())


async def _left() -> None:
    async with Bench() as b:
        b.loads[1].leave()
        b.loads[0].delivering(5)
        b.connect()
        assert await b.taken_by(1) == [0]


def test_out_of_descriptors_pauses_accepting_instead_of_spinning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Real EMFILE: the descriptor limit lowered, and the table filled.
    monkeypatch.setattr(steering, "ACCEPT_PAUSE", 0.3)
    asyncio.run(_out_of_descriptors())


async def _out_of_descriptors() -> None:
    async with Bench(running=(1,)) as b:
        b.loads[0].leave()  # slot 1 takes everything
        client = socket.socket()
        client.settimeout(5)
        b.clients.append(client)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(open_fds()) + 16, hard))
        try:
            with contextlib.suppress(OSError):
                while True:
                    fillers.append(os.open(os.devnull, os.O_RDONLY))
            client.connect(("127.0.0.1", b.port))
            await asyncio.sleep(0.05)  # accept failed: EMFILE
            assert b.taken[1] == []
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await asyncio.sleep(0.1)
        assert b.taken[1] == []  # descriptors are free, but accepting pauses
        await asyncio.sleep(0.4)
        assert len(b.taken[1]) == 1  # taken after the pause


def open_fds() -> list[int]:
    return [int(n) for n in os.listdir("/proc/self/fd")]
