"""Which process takes a new connection (smtp/steering.py): a worker's
acceptor, on a real listening socket, takes connections only while the main
process is busy, or when the main process has not accepted a waiting one
for STALL_AFTER seconds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket

import pytest

from postwarden.smtp import steering
from postwarden.smtp.steering import BUSY_AT, STALL_AFTER, MainLoad, WorkerAcceptor


class Bench:
    """A listening socket that the "main process" (this test) accepts on
    by hand, and a worker's acceptor on the same socket."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.main = MainLoad()
        self.worker = WorkerAcceptor(self.main.fd)
        self.taken: list[socket.socket] = []
        self.clients: list[socket.socket] = []

    async def __aenter__(self) -> Bench:
        self.worker.attach(self.listener, self.taken.append)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.worker.detach(self.listener)
        for s in [*self.taken, *self.clients]:
            s.close()
        self.listener.close()
        self.worker.close()

    def connect(self) -> None:
        self.clients.append(socket.create_connection(("127.0.0.1", self.port), timeout=5))

    def main_accepts(self) -> socket.socket:
        self.listener.setblocking(True)
        self.listener.settimeout(5)
        conn, _ = self.listener.accept()
        self.listener.setblocking(False)
        self.main.accepted()
        return conn


def test_an_idle_main_process_is_left_the_connection() -> None:
    asyncio.run(_idle_main())


async def _idle_main() -> None:
    async with Bench() as b:
        b.connect()
        await asyncio.sleep(STALL_AFTER / 5)
        assert b.taken == []
        conn = b.main_accepts()  # within STALL_AFTER: the worker never takes it
        await asyncio.sleep(STALL_AFTER * 3)
        assert b.taken == []
        conn.close()


def test_a_busy_main_process_shares_new_connections_at_once() -> None:
    asyncio.run(_busy_main())


async def _busy_main() -> None:
    async with Bench() as b:
        for _ in range(BUSY_AT):
            b.main.change(1)
        b.connect()
        b.connect()
        for _ in range(50):
            if len(b.taken) == 2:
                break
            await asyncio.sleep(STALL_AFTER / 10)
        assert len(b.taken) == 2  # well before STALL_AFTER
        # Idle again: the next one is the main process's.
        for _ in range(BUSY_AT):
            b.main.change(-1)
        b.connect()
        await asyncio.sleep(STALL_AFTER / 5)
        assert len(b.taken) == 2
        b.main_accepts().close()


def test_a_stuck_main_process_leaves_waiting_connections_to_the_worker() -> None:
    asyncio.run(_stuck_main())


async def _stuck_main() -> None:
    async with Bench() as b:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        b.connect()
        while not b.taken and loop.time() - t0 < 5:
            await asyncio.sleep(0.005)
        assert len(b.taken) == 1
        assert loop.time() - t0 >= STALL_AFTER
        # While the main process's count stays put, the next is taken at once.
        t1 = loop.time()
        b.connect()
        while len(b.taken) < 2 and loop.time() - t1 < 5:
            await asyncio.sleep(0.002)
        assert len(b.taken) == 2
        assert loop.time() - t1 < STALL_AFTER
        # Once the main process accepts again, it is left the next one.
        b.connect()
        b.main_accepts().close()
        b.connect()
        await asyncio.sleep(STALL_AFTER / 5)
        assert len(b.taken) == 2
        b.main_accepts().close()


def test_a_worker_out_of_descriptors_pauses_instead_of_spinning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Real EMFILE: the descriptor limit lowered, and the table filled.
    monkeypatch.setattr(steering, "ACCEPT_PAUSE", 0.3)
    asyncio.run(_out_of_descriptors())


async def _out_of_descriptors() -> None:
    async with Bench() as b:
        b.main.change(BUSY_AT)
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
            assert b.taken == []
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await asyncio.sleep(0.1)
        assert b.taken == []  # descriptors are free, but the worker pauses
        await asyncio.sleep(0.4)
        assert len(b.taken) == 1  # taken after the pause


def open_fds() -> list[int]:
    return [int(n) for n in os.listdir("/proc/self/fd")]
