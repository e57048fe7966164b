"""The socket side of one SMTP session: an asyncio protocol that hands the
session what the transport received and writes its replies.

Written by hand instead of asyncio's StreamReader/StreamWriter, which cost a
session about a hundred Python calls per message: every read creates a
future and copies the data through a buffer, every write goes through a
drain coroutine.  Here a read returns the chunk the transport delivered as
it is (or the chunks that arrived meanwhile, joined), and a write needs no
await unless the transport asked us to stop writing (flow control).

Flow control both ways: reading is paused while more than
:data:`~postwarden.limits.SESSION_BUFFER_MAX` bytes wait for the session (a
client that pipelines faster than we process is held by TCP, not by our
memory); the session's
writes wait in :meth:`SessionIO.drain` while the transport's buffer is over
its high-water mark.

Security exposure: carries untrusted bytes; it keeps no more than
``SESSION_BUFFER_MAX`` of them plus one chunk, and never interprets them.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, cast

from postwarden.limits import SESSION_BUFFER_MAX


class SessionIO(asyncio.Protocol):
    """One connection.  ``on_connect(io)`` is called once the connection is
    made (the listener starts the session's task there)."""

    def __init__(self, on_connect: Callable[[SessionIO], None]) -> None:
        self.on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._lost = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drainer: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's classes.
        self.transport = cast(asyncio.Transport, transport)
        self._closed = asyncio.get_running_loop().create_future()
        self.on_connect(self)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if (self._size > SESSION_BUFFER_MAX and not self._reading_paused
                and self.transport is not None):
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # A client that half-closes after QUIT still gets its 221: keep the
        # transport open for writing (TLS has no half-close).
        return self.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        if exc is not None:
            self._error = exc
        self._wake()
        drainer, self._drainer = self._drainer, None
        if drainer is not None and not drainer.done():
            drainer.set_exception(exc or ConnectionResetError("connection lost"))
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        drainer, self._drainer = self._drainer, None
        if drainer is not None and not drainer.done():
            drainer.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- reading --------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read."""
        return self._size

    def discard(self) -> int:
        """Drop what was received and not read (plaintext pipelined after
        STARTTLS, RFC 3207 6); how many bytes that was."""
        n = self._size
        self._chunks.clear()
        self._size = 0
        self._resume_reading()
        return n

    async def read(self) -> bytes:
        """What arrived since the last read, waiting for something if
        nothing did; b"" at the end of the stream."""
        if not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            await self._wait()
            if not self._chunks:
                if self._error is not None:
                    raise self._error
                return b""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        self._resume_reading()
        return data

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; what is beyond them stays for the next read
        (the PROXY header, before the first SMTP command).  Raises
        :class:`asyncio.IncompleteReadError` at the end of the stream."""
        while self._size < n:
            if self._eof or self._error is not None:
                partial = b"".join(self._chunks)
                self._chunks.clear()
                self._size = 0
                raise asyncio.IncompleteReadError(partial, n)
            await self._wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if len(data) > n:
            self._chunks.append(data[n:])
            self._size = len(data) - n
        self._resume_reading()
        return data[:n]

    async def _wait(self) -> None:
        assert self._waiter is None, "one reader at a time"
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _resume_reading(self) -> None:
        if (self._reading_paused and self._size <= SESSION_BUFFER_MAX
                and self.transport is not None):
            self._reading_paused = False
            self.transport.resume_reading()

    # -- writing --------------------------------------------------------------

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    @property
    def must_drain(self) -> bool:
        """The transport's buffer is full, or the connection is closing:
        await :meth:`drain` before writing more."""
        return self._writing_paused or self.transport is None or self.transport.is_closing()

    async def drain(self) -> None:
        """Wait while the transport's buffer is full; raises
        :class:`ConnectionResetError` once the connection is lost."""
        if self.transport is None or self.transport.is_closing():
            # As StreamWriter: let connection_lost run, then report it.
            await asyncio.sleep(0)
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._writing_paused:
            return
        assert self._drainer is None, "one writer at a time"
        self._drainer = asyncio.get_running_loop().create_future()
        await self._drainer

    # -- the connection -------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default) if self.transport else default

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await asyncio.shield(self._closed)

    async def start_tls(self, context: ssl.SSLContext, handshake_timeout: float) -> None:
        """Upgrade to TLS as the server (STARTTLS); this protocol receives
        the decrypted data from then on."""
        assert self.transport is not None
        await self.drain()
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(self.transport, self, context, server_side=True,
                                         ssl_handshake_timeout=handshake_timeout)
        if transport is None:
            raise ConnectionResetError("connection closed during the TLS handshake")
        self.transport = transport
