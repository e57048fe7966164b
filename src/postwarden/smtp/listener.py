"""Listeners: bind the configured addresses, accept connections, own sessions.

One :class:`Listener` per ``[listeners.NAME]``.  Each accepted connection
runs a :class:`~postwarden.smtp.session.Session` in a task the listener
owns, so that shutdown can wait for them (structured concurrency).  asyncio's
accept loop already survives EMFILE/ENFILE/ENOBUFS by pausing accepts for a
second instead of crashing.

Security exposure: the network edge.  Binds only the configured address;
implicit TLS (port 465, RFC 8314 3.3) is negotiated by the transport before
the session starts, with the handshake timeout from :mod:`postwarden.limits`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import ssl
from collections.abc import Callable

from postwarden.config import ListenerConfig
from postwarden.observe.log import get_logger
from postwarden.smtp.connection import SessionIO
from postwarden.smtp.session import ServerContext, Session
from postwarden.smtp.steering import Acceptor, ProcessLoad

log = get_logger("listener")

LISTEN_BACKLOG = 1024


class Listener:
    """``sockets``: listening sockets bound by another process (a worker's,
    see :mod:`postwarden.workers`) to accept on instead of binding.
    ``acceptor`` and ``load``: with several processes, this process's
    accept loop and load (see :mod:`postwarden.smtp.steering`); without,
    asyncio's server accepts."""

    def __init__(self, config: ListenerConfig, ctx: ServerContext,
                 sockets: list[socket.socket] | None = None, *,
                 acceptor: Acceptor | None = None,
                 load: ProcessLoad | None = None) -> None:
        self.config = config
        self.ctx = ctx
        self.inherited = sockets
        self.acceptor = acceptor
        self.load = load
        self.servers: list[asyncio.Server] = []
        self.attached: list[socket.socket] = []  # accepted on through ``acceptor``
        self.sessions: set[asyncio.Task[None]] = set()
        self._connecting: set[asyncio.Task[object]] = set()

    @property
    def sockets(self) -> list[socket.socket]:
        return [*(s for srv in self.servers for s in srv.sockets), *self.attached]

    @property
    def fds(self) -> list[int]:
        """The listening sockets' descriptors (to hand to worker processes)."""
        return [s.fileno() for s in self.sockets]

    @property
    def bound(self) -> list[tuple[str, int]]:
        return [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in self.sockets]

    @property
    def port(self) -> int:
        return self.bound[0][1] if self.bound else 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host: str | None = None if self.config.host == "*" else self.config.host
        tls_context: ssl.SSLContext | None = None
        handshake_timeout: float | None = None
        if self.config.implicit_tls:
            # RFC 8314 3.3: the TLS layer is in place before the first byte is
            # read, so the ClientHello can never land in the plaintext buffer.
            tls_context = self.ctx.tls.server
            handshake_timeout = self.ctx.config.limits.tls_handshake_timeout

        def factory() -> SessionIO:
            return SessionIO(self._connected)

        if self.acceptor is not None:
            socks = self.inherited
            if socks is None:  # the main process binds them for all
                socks = await self._bind(loop, host)
            for sock in socks:
                self.acceptor.attach(sock, functools.partial(
                    self._accepted, factory, tls_context, handshake_timeout))
                self.attached.append(sock)
        elif self.inherited is not None:
            for sock in self.inherited:
                self.servers.append(await loop.create_server(
                    factory, sock=sock, backlog=LISTEN_BACKLOG, ssl=tls_context,
                    ssl_handshake_timeout=handshake_timeout))
        else:
            self.servers.append(await loop.create_server(
                factory, host, self.config.port, reuse_address=True, backlog=LISTEN_BACKLOG,
                ssl=tls_context, ssl_handshake_timeout=handshake_timeout))
        log.info("listening", listener=self.config.name, mode=self.config.mode,
                 addresses=[f"{h}:{p}" for h, p in self.bound])

    async def _bind(self, loop: asyncio.AbstractEventLoop, host: str | None
                    ) -> list[socket.socket]:
        """Listening sockets bound as asyncio's server binds them (every
        address of ``host``, SO_REUSEADDR, IPV6_V6ONLY), without its accept
        loop: copies of its sockets, listening, and the server closed."""
        server = await loop.create_server(asyncio.Protocol, host, self.config.port,
                                          reuse_address=True, start_serving=False)
        socks: list[socket.socket] = []
        try:
            for s in server.sockets:
                sock = socket.socket(fileno=os.dup(s.fileno()))
                socks.append(sock)
                sock.listen(LISTEN_BACKLOG)
        except OSError:
            for sock in socks:
                sock.close()
            raise
        finally:
            server.close()
        return socks

    def _accepted(self, factory: Callable[[], SessionIO], tls_context: ssl.SSLContext | None,
                  handshake_timeout: float | None, conn: socket.socket) -> None:
        """A connection the acceptor took: make its transport (and
        TLS, for implicit TLS) as asyncio's server would."""
        loop = asyncio.get_running_loop()
        task: asyncio.Task[object] = loop.create_task(loop.connect_accepted_socket(
            factory, conn, ssl=tls_context, ssl_handshake_timeout=handshake_timeout))
        self._connecting.add(task)
        task.add_done_callback(self._transport_made)

    def _transport_made(self, task: asyncio.Task[object]) -> None:
        self._connecting.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # A failed TLS handshake, or a client gone at once: the
            # transport closed the connection.
            log.debug("connection_failed", listener=self.config.name,
                      error=f"{type(exc).__name__}: {exc}")

    def _connected(self, io: SessionIO) -> None:
        task = asyncio.get_running_loop().create_task(self._session(io))
        self.sessions.add(task)
        if self.load is not None:
            self.load.accepted()
            task.add_done_callback(self._session_ended)
        task.add_done_callback(self.sessions.discard)

    def _session_ended(self, _task: asyncio.Task[None]) -> None:
        assert self.load is not None
        self.load.session_ended()

    async def _session(self, io: SessionIO) -> None:
        # No TCP_NODELAY here: asyncio's and uvloop's TCP transports set it
        # on every connection (a reply is one write, sent at once).
        try:
            await Session(self.ctx, self.config, io).run()
        except Exception as exc:  # a session bug must not take the listener down
            log.error("session_crashed", listener=self.config.name,
                      error=f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        """Stop accepting new connections."""
        for srv in self.servers:
            srv.close()
        if self.acceptor is not None:
            attached, self.attached = self.attached, []
            for sock in attached:
                self.acceptor.detach(sock)
                sock.close()
        for task in self._connecting:
            task.cancel()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let sessions finish for ``grace`` seconds, then cancel."""
        await self.close()
        if self.sessions:
            _, pending = await asyncio.wait(set(self.sessions), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
