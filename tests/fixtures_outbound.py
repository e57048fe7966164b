"""Peers and helpers for outbound-delivery tests (all on loopback).

* :class:`ScriptedServer`: an SMTP or LMTP server (asyncio, 127.0.0.1 or a
  unix socket, port 0) whose replies are set per test; it records every
  command with the number of the socket read it arrived in (to see
  PIPELINING), and every message as received on the wire.
* :func:`aiosmtpd_server`: a real aiosmtpd server on the running loop, with
  a :class:`Sink` handler that keeps the envelopes.
* :func:`make_job`, :func:`delivery_config`, :func:`server_tls`: inputs.
* :func:`smtp_transport` (its resolver answers nothing: next hops are given
  as ``smtp:[127.0.0.1]:PORT``) and :func:`run` (``asyncio.run`` with a
  bound).

Servers run on the test's own event loop: tests are ``asyncio.run(...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from postwarden.config import DeliveryConfig, DnsConfig
from postwarden.delivery.dns import Resolver
from postwarden.delivery.remote import SmtpTransport
from postwarden.delivery.transport import DeliveryJob, Nexthop
from postwarden.envelope import MailParams, RcptParams
from postwarden.storage.base import QueuedMessage, QueuedRecipient

PEER_NAME = "mx.peer.test"
OUR_NAME = "client.example.test"
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
    """``asyncio.run`` of ``coro``, failing after ``timeout`` seconds."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def smtp_transport(**kw: Any) -> SmtpTransport:
    """An SmtpTransport with :func:`delivery_config` (``kw`` overrides)."""
    resolver = Resolver(DnsConfig(nameservers=(("127.0.0.1", 9),), timeout=0.5))
    return SmtpTransport(OUR_NAME, delivery_config(**kw), resolver)


def body_source(body: bytes, chunk: int = 64 * 1024) -> Callable[[], AsyncIterator[bytes]]:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), chunk):
            yield body[i:i + chunk]

    return chunks


def make_job(recipients: Iterable[str | tuple[str, RcptParams]], body: bytes = b"",
             nexthop: Nexthop | None = None, sender: str = "alice@example.test",
             params: MailParams | None = None, source: Callable[[], AsyncIterator[bytes]]
             | None = None, queue_id: str = "TESTQ1") -> DeliveryJob:
    if not body:
        body = b"Subject: test\r\nFrom: alice@example.test\r\n\r\nHello.\r\n"
    rcpts = []
    for n, r in enumerate(recipients, 1):
        addr, rp = (r, RcptParams()) if isinstance(r, str) else r
        rcpts.append(QueuedRecipient(n, addr, rp))
    msg = QueuedMessage(queue_id, sender, params or MailParams(), rcpts, 0.0, len(body))
    hop = nexthop or Nexthop("mx", "example.org")
    return DeliveryJob(msg, rcpts, hop, source or body_source(body))


def delivery_config(**kw: Any) -> DeliveryConfig:
    values: dict[str, Any] = {"connect_timeout": 5.0, "greeting_timeout": 5.0,
                              "command_timeout": 5.0, "data_timeout": 10.0,
                              "helo_name": OUR_NAME}
    values.update(kw)
    return DeliveryConfig(**values)


def server_tls(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*(names or (PEER_NAME,))).configure_cert(ctx)
    return ctx


def unstuff(wire: bytes) -> bytes:
    """The message from the DATA stream (without the final ``.CRLF``)."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n", wire[-20:]
    content = wire[:-3]
    if content.startswith(b".."):
        content = content[1:]
    return content.replace(b"\r\n..", b"\r\n.")


def stuff(content: bytes) -> bytes:
    """The DATA stream of ``content`` (ending in CRLF): what :func:`unstuff`
    reads back."""
    wire = content.replace(b"\r\n.", b"\r\n..")
    return (b"." + wire if wire.startswith(b".") else wire) + b".\r\n"


@dataclass
class SessionRecord:
    commands: list[tuple[int, str]] = field(default_factory=list)  # (read number, line)
    messages: list[bytes] = field(default_factory=list)  # DATA as on the wire
    chunks: list[bytes] = field(default_factory=list)  # BDAT data as on the wire
    tls: bool = False

    def verbs(self) -> list[str]:
        return [c.split(" ", 1)[0].split(":", 1)[0].upper() for _, c in self.commands]

    def read_of(self, prefix: str) -> list[int]:
        return [n for n, c in self.commands if c.upper().startswith(prefix)]


class ScriptedServer:
    """An SMTP/LMTP server that answers from its attributes (change them
    between tests or sessions).  ``rcpt`` maps an address to its reply,
    ``final`` is the reply after the dot (SMTP), ``lmtp_final`` maps an
    address to its reply after the dot (LMTP).  ``greeting=None`` never
    greets; ``tls`` enables STARTTLS; ``break_tls`` answers 220 to STARTTLS
    and then closes instead of a handshake.  With CHUNKING among the
    extensions it takes BDAT (RFC 3030); a message sent so is recorded in
    ``messages`` as DATA would have carried it, its chunks in ``chunks``."""

    def __init__(self, *, extensions: Iterable[str] = ("PIPELINING", "8BITMIME",
                                                         "ENHANCEDSTATUSCODES"),
                 lmtp: bool = False, tls: ssl.SSLContext | None = None,
                 greeting: str | None = f"220 {PEER_NAME} ESMTP scripted",
                 unix_path: str = "", host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.ehlo_reply = ""  # set: the reply to EHLO/LHLO instead of the list
        self.extensions = list(extensions)
        self.lmtp = lmtp
        self.tls = tls
        self.break_tls = False
        self.inject_after_starttls = False
        self.greeting = greeting
        self.ehlo_name = PEER_NAME
        self.unix_path = unix_path
        self.mail_reply = "250 2.1.0 ok"
        self.rcpt: dict[str, str] = {}
        self.max_rcpts = 0  # > 0: "452 4.5.3" after that many per transaction
        self.data_reply = "354 go ahead"
        self.final = "250 2.0.0 queued as SCRIPTED"
        self.lmtp_final: dict[str, str] = {}
        self.final_delay = 0.0
        self.rset_reply: str | None = "250 2.0.0 ok"  # None: falls silent (hung)
        self.bdat_known = True  # False: CHUNKING offered, BDAT an unknown command
        self.sessions: list[SessionRecord] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.active = 0
        self.max_active = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> ScriptedServer:
        if self.unix_path:
            self._server = await asyncio.start_unix_server(self._handle, self.unix_path)
        else:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            # End the sessions still open, so that none is left suspended
            # when the test's event loop closes (it would be collected
            # later, in another test, with "coroutine ignored GeneratorExit").
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def drop_sessions(self) -> None:
        """Close every open connection without a word (a server that
        restarted, or timed out idle clients)."""
        for writer in list(self._writers):
            writer.transport.abort()

    async def __aenter__(self) -> ScriptedServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def messages(self) -> list[bytes]:
        return [unstuff(m) for s in self.sessions for m in s.messages]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rec = SessionRecord()
        self.sessions.append(rec)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self._converse(reader, writer, rec)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self.active -= 1
            if task is not None:
                self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        rec: SessionRecord) -> None:
        if self.greeting is None:
            await asyncio.sleep(3600)
            return
        buf = b""
        reads = 0

        closing = False

        def say(*lines: str) -> None:
            nonlocal closing
            closing = closing or any(x.startswith("421") for x in lines)
            writer.write("".join(f"{x}\r\n" for x in lines).encode())

        async def line() -> str | None:
            nonlocal buf, reads
            while b"\r\n" not in buf:
                data = await reader.read(65536)
                if not data:
                    return None
                reads += 1
                buf += data
            raw, buf = buf.split(b"\r\n", 1)
            text = raw.decode("utf-8", "replace")
            rec.commands.append((reads, text))
            return text

        say(self.greeting)
        await writer.drain()
        if not self.greeting.startswith("2"):
            return
        accepted: list[str] = []
        chunked = b""
        while (cmd := await line()) is not None:
            verb = cmd.split(" ", 1)[0].upper()
            if verb in ("EHLO", "LHLO") and self.ehlo_reply:
                say(self.ehlo_reply)
            elif verb in ("EHLO", "LHLO"):
                ext = [e for e in self.extensions if e != "STARTTLS" or not rec.tls]
                if self.tls is not None and not rec.tls and "STARTTLS" not in ext:
                    ext.append("STARTTLS")
                lines = [self.ehlo_name, *ext]
                say(*(f"250-{x}" for x in lines[:-1]), f"250 {lines[-1]}")
            elif verb == "HELO":
                say(f"250 {self.ehlo_name}")
            elif verb == "STARTTLS":
                if self.tls is None and not (self.break_tls or self.inject_after_starttls):
                    say("502 5.5.1 no TLS here")
                else:
                    if self.inject_after_starttls:
                        # STARTTLS response injection (CVE-2011-0411 style).
                        say("220 2.0.0 go ahead", "250 injected")
                        await writer.drain()
                        await asyncio.sleep(0.5)
                        return
                    say("220 2.0.0 go ahead")
                    await writer.drain()
                    if self.break_tls:
                        await reader.read(1)  # the ClientHello arrives
                        writer.write(b"this is not TLS\r\n")
                        await writer.drain()
                        return
                    assert self.tls is not None
                    await writer.start_tls(self.tls)
                    rec.tls = True
                    buf = b""
            elif verb == "MAIL":
                accepted = []
                say(self.mail_reply)
            elif verb == "RCPT":
                addr = cmd[cmd.index("<") + 1:cmd.index(">")]
                reply = self.rcpt.get(addr, "250 2.1.5 ok")
                if self.max_rcpts and len(accepted) >= self.max_rcpts:
                    reply = "452 4.5.3 too many recipients"
                if reply.startswith("2"):
                    accepted.append(addr)
                say(reply)
            elif verb == "DATA":
                if not accepted:
                    say("554 5.5.1 no valid recipients")
                    continue
                say(self.data_reply)
                if not self.data_reply.startswith("354"):
                    continue
                await writer.drain()
                while b"\r\n.\r\n" not in b"\r\n" + buf:
                    data = await reader.read(65536)
                    if not data:
                        return
                    buf += data
                end = (b"\r\n" + buf).index(b"\r\n.\r\n") + 3
                rec.messages.append(buf[:end])
                buf = buf[end:]
                if self.final_delay:
                    await asyncio.sleep(self.final_delay)
                if self.lmtp:
                    say(*(self.lmtp_final.get(a, "250 2.0.0 delivered") for a in accepted))
                else:
                    say(self.final)
                accepted = []
            elif verb == "BDAT" and "CHUNKING" in self.extensions and self.bdat_known:
                words = cmd.split()
                size, last = int(words[1]), words[-1].upper() == "LAST"
                while len(buf) < size:
                    data = await reader.read(65536)
                    if not data:
                        return
                    buf += data
                rec.chunks.append(buf[:size])
                chunked, buf = chunked + buf[:size], buf[size:]
                if not last:
                    say("250 2.0.0 chunk received")
                    continue
                content, chunked = chunked, b""
                if not accepted:  # RFC 3030 2: read, then refused
                    say("554 5.5.1 no valid recipients")
                    continue
                rec.messages.append(stuff(content))
                if self.final_delay:
                    await asyncio.sleep(self.final_delay)
                say(self.final)
                accepted = []
            elif verb == "RSET":
                accepted = []
                chunked = b""
                if self.rset_reply is None:
                    await asyncio.sleep(3600)  # cancelled by stop()
                say(self.rset_reply or "")
            elif verb == "NOOP":
                say("250 2.0.0 ok")
            elif verb == "QUIT":
                say("221 2.0.0 bye")
                await writer.drain()
                return
            else:
                say("502 5.5.2 unknown command")
            await writer.drain()
            if closing:  # RFC 5321 3.8: 421 and close
                return


class Sink:
    """aiosmtpd handler that keeps what it receives; ``ehlo_drop`` removes
    keywords from the EHLO reply (e.g. ``8BITMIME``)."""

    def __init__(self, ehlo_drop: Iterable[str] = ()) -> None:
        self.envelopes: list[Envelope] = []
        self.ehlo_drop = {x.upper() for x in ehlo_drop}

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        kept = [r for r in responses if r[4:].split(" ", 1)[0].upper() not in self.ehlo_drop]
        kept[-1] = "250 " + kept[-1][4:]
        return kept

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 OK sunk"


class PasswordCheck:
    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user.encode(), password.encode()
        self.attempts: list[tuple[str, bytes]] = []

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                 auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        self.attempts.append((mechanism, auth_data.login))
        ok = (auth_data.login, auth_data.password) == (self.user, self.password)
        return AuthResult(success=ok, handled=False)


async def aiosmtpd_server(handler: Any, **smtp_kwargs: Any) -> tuple[asyncio.AbstractServer,
                                                                    int]:
    """aiosmtpd's SMTP protocol on 127.0.0.1:0 in the running loop."""
    loop = asyncio.get_running_loop()
    smtp_kwargs.setdefault("hostname", PEER_NAME)  # never socket.getfqdn()
    server = await loop.create_server(lambda: SMTP(handler, loop=loop, **smtp_kwargs),
                                      "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def free_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port
