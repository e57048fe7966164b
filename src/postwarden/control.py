"""The control socket: how a command-line process tells the running server
to act now (``queue flush``, ``queue release``, ``queue requeue``).

The server listens on ``<data_dir>/control.sock`` (mode 0600, in the 0700
data directory) for one-line requests and answers one line.  Only ``wake``
exists: the queue runner looks for due deliveries at once (and ``ping``,
answered ``ok``, tells ``postwarden status`` that the server runs).  Changes
themselves go through the database; the socket only saves the wait for the
next scan, so a server that is not running loses nothing.

Security exposure: local only, protected by file permissions; requests are
matched against a fixed set, anything else gets ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

SOCKET_NAME = "control.sock"
MAX_REQUEST = 256


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


class ControlServer:
    """Serves the control socket for the lifetime of the server."""

    def __init__(self, data_dir: Path, wake: Callable[[], None]) -> None:
        self.path = socket_path(data_dir)
        self.wake = wake
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by a server that was killed
        old = os.umask(0o077)
        try:
            self.server = await asyncio.start_unix_server(self._client, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            request = line[:MAX_REQUEST].strip().decode("ascii", "replace")
            if request == "wake":
                self.wake()
                writer.write(b"ok\n")
            elif request == "ping":  # postwarden status: is the server running?
                writer.write(b"ok\n")
            else:
                writer.write(b"error unknown request\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(data_dir: Path, what: str = "wake", timeout: float = 5.0) -> bool:
    """Send a request from another process; False if no server is listening."""
    path = socket_path(data_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(what.encode("ascii") + b"\n")
            return sock.recv(64).startswith(b"ok")
    except OSError:
        return False
