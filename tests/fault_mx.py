"""A remote MX on loopback that misbehaves on demand.

``FaultMx(mode)`` listens on a free port in a thread of its own.  Modes:

* ``"good"``: a correct ESMTP server (STARTTLS with the given context,
  PIPELINING), keeping each message it accepts in ``received``;
* ``"hang"``: accepts the connection and never says a word;
* ``"greet421"``: answers ``421`` at the greeting and closes;
* ``"invalid"``: greets, then answers EHLO with a line that is no reply;
* ``"close_in_data"``: closes the connection in the middle of DATA;
* ``"tls_fail"``: offers STARTTLS, says 220, then answers the ClientHello
  with garbage and closes;
* ``"slow"``: sends its greeting one byte per second.

``mode`` may be changed while running: the next connection gets the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from typing import Any

GOOD_EHLO = (b"250-mx.fault.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
             b"250-STARTTLS\r\n250 SIZE 104857600\r\n")


class FaultMx:
    def __init__(self, mode: str = "good", tls: ssl.SSLContext | None = None) -> None:
        self.mode = mode
        self.tls = tls
        self.received: list[bytes] = []
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None
        self.port = 0

    def __enter__(self) -> FaultMx:
        self.thread.start()

        async def start() -> None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self.server is not None
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        mode = self.mode
        try:
            await self._session(mode, reader, writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _session(self, mode: str, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "greet421":
            writer.write(b"421 4.3.2 mx.fault.example busy, try later\r\n")
            await writer.drain()
            return
        if mode == "slow":
            for b in b"220 mx.fault.example ESMTP slowly\r\n":
                writer.write(bytes([b]))
                await writer.drain()
                await asyncio.sleep(1)
        else:
            writer.write(b"220 mx.fault.example ESMTP\r\n")
        data: list[bytes] = []
        in_data = False
        while True:
            line = await reader.readline()
            if not line:
                return
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    self.received.append(b"".join(data))
                    data = []
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                else:
                    if mode == "close_in_data" and len(data) > 3:
                        return
                    data.append(line[1:] if line.startswith(b"..") else line)
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"this is not an SMTP reply\r\n" if mode == "invalid"
                             else GOOD_EHLO)
            elif verb == b"STAR":
                writer.write(b"220 2.0.0 go ahead\r\n")
                await writer.drain()
                if mode == "tls_fail" or self.tls is None:
                    await reader.read(1)
                    writer.write(b"\x15\x03\x01\x00\x02garbage")
                    await writer.drain()
                    return
                await writer.start_tls(self.tls)
            elif verb == b"DATA":
                in_data = True
                writer.write(b"354 go on\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP", b"HELO"):
                writer.write(b"250 2.0.0 ok\r\n")
            else:
                writer.write(b"502 5.5.1 what\r\n")
            await writer.drain()


def server_tls(cert_files: tuple[Any, Any]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert_files[0]), str(cert_files[1]))
    return ctx
