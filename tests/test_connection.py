"""The session's socket layer (smtp/connection.py) on real loopback sockets:
flow control, half-close, the end of the stream, a lost connection."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from postwarden.limits import SESSION_BUFFER_MAX
from postwarden.smtp.connection import SessionIO


async def _serve(handler: Callable[[SessionIO], Awaitable[None]],
                 client: Callable[[int], Awaitable[None]]) -> None:
    """A server whose connections run ``handler``; ``client(port)`` talks to it."""
    tasks: list[asyncio.Task[None]] = []

    def connected(io: SessionIO) -> None:
        tasks.append(asyncio.get_running_loop().create_task(handler(io)))

    server = await asyncio.get_running_loop().create_server(
        lambda: SessionIO(connected), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await client(port)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        server.close()


def test_a_client_that_floods_is_held_by_tcp_not_by_memory() -> None:
    """Reading pauses once SESSION_BUFFER_MAX bytes wait; they are all
    delivered, in order, once the session reads again."""
    sent = bytes(range(256)) * (4 * SESSION_BUFFER_MAX // 256)
    seen: dict[str, object] = {}

    async def handler(io: SessionIO) -> None:
        while io.buffered <= SESSION_BUFFER_MAX:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the client keeps sending; we do not read
        assert io.transport is not None
        seen["paused"] = not io.transport.is_reading()
        seen["held"] = io.buffered
        got = bytearray()
        while len(got) < len(sent):
            chunk = await io.read()
            assert chunk
            got += chunk
        seen["data"] = bytes(got)
        io.write(b"done\r\n")
        io.close()

    async def client(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(sent)
        await writer.drain()
        assert await reader.readline() == b"done\r\n"
        writer.close()

    asyncio.run(_serve(handler, client))
    assert seen["paused"] is True
    assert isinstance(seen["held"], int) and seen["held"] <= SESSION_BUFFER_MAX + 256 * 1024
    assert seen["data"] == sent


def test_half_close_ends_the_stream_but_the_reply_still_goes_out() -> None:
    async def handler(io: SessionIO) -> None:
        assert await io.readexactly(6) == b"QUIT\r\n"
        assert await io.read() == b""  # the client's EOF
        io.write(b"221 2.0.0 Bye\r\n")
        io.close()
        await io.wait_closed()

    async def client(port: int) -> None:
        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"QUIT\r\n")
                s.shutdown(socket.SHUT_WR)
                return s.recv(100)

        assert await asyncio.to_thread(talk) == b"221 2.0.0 Bye\r\n"

    asyncio.run(_serve(handler, client))


def test_readexactly_leaves_the_rest_and_reports_a_short_stream() -> None:
    async def handler(io: SessionIO) -> None:
        assert await io.readexactly(4) == b"PROX"
        assert await io.read() == b"Y rest"
        with pytest.raises(asyncio.IncompleteReadError) as info:
            await io.readexactly(10)
        assert info.value.partial == b"tail"
        io.close()

    async def client(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PROXY rest")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"tail")
        writer.write_eof()
        await reader.read()
        writer.close()

    asyncio.run(_serve(handler, client))


def test_a_reset_connection_fails_the_pending_read() -> None:
    async def handler(io: SessionIO) -> None:
        with pytest.raises(ConnectionError):
            while await io.read():
                pass
            raise ConnectionResetError("EOF instead of a reset")  # pragma: no cover
        with pytest.raises(ConnectionError):
            io.write(b"x")
            await io.drain()

    async def client(port: int) -> None:
        def reset() -> None:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"EHLO x\r\n")
            # SO_LINGER 0: close sends RST, not FIN.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()

        await asyncio.to_thread(reset)

    asyncio.run(_serve(handler, client))


def test_writes_wait_for_a_slow_reader() -> None:
    """More than the socket buffers hold: the transport asks us to stop
    (must_drain), drain() waits until the client reads, nothing is lost."""
    block = bytes(range(256)) * 4096  # 1 MiB
    total = 32
    seen: dict[str, bool] = {}

    async def handler(io: SessionIO) -> None:
        waited = False
        for _ in range(total):
            io.write(block)
            if io.must_drain:
                waited = True
                await io.drain()
        seen["waited"] = waited
        io.close()

    async def client(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.3)  # not reading yet
        got = await reader.read()
        assert got == block * total
        writer.close()

    asyncio.run(_serve(handler, client))
    assert seen["waited"]
