"""The SMTP and LMTP client: one connection to one server, one or more
transactions on it.

Written by hand rather than on aiosmtplib because delivery needs what that
library lacks: PIPELINING (RFC 2920: MAIL, every RCPT and DATA in one write),
streaming DATA from the queue in chunks (aiosmtplib wants the whole message
in memory), and LMTP's one reply per recipient after the final dot
(RFC 2033 4.2).

:class:`SmtpClient` does the session: greeting, EHLO (HELO when EHLO is
refused) or LHLO, STARTTLS per the TLS policy (RFC 3207; EHLO again after
it), AUTH PLAIN/LOGIN over TLS only (RFC 4954), then
:meth:`SmtpClient.send` per transaction with SIZE (RFC 1870), BODY=8BITMIME
(RFC 6152), SMTPUTF8 (RFC 6531) and DSN (RFC 3461) parameters when the
server supports them.  Session failures raise :class:`SessionError`;
:meth:`SmtpClient.send` turns every reply and failure into one
:class:`~postwarden.delivery.result.DeliveryResult` per recipient and never
raises.  Which host to try and in what order is
:mod:`postwarden.delivery.remote`'s job.

Security exposure: talks to servers chosen by DNS (untrusted) and parses
their replies (see :mod:`postwarden.delivery.smtp_stream` for the bounds).
Credentials are sent only inside TLS and never logged.  Plaintext buffered
before the TLS handshake is refused (STARTTLS response injection).  A server
that greets with our own name is a mail loop (5.4.6), as in Postfix.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from postwarden.delivery.dns import is_ip
from postwarden.delivery.result import DeliveryResult
from postwarden.delivery.smtp_stream import (
    MAX_REPLY_LINE,
    PeerClosed,
    PeerError,
    PeerTimeout,
    Reply,
    parse_extensions,
    read_reply,
    send,
)
from postwarden.delivery.smtp_transaction import (
    RESET_TIMEOUT,
    StaleConnection,
    Transaction,
    TransactionRunner,
)
from postwarden.observe.log import get_logger

log = get_logger("smtp_client")

# Waiting for the reply to QUIT is a courtesy; never long.
QUIT_TIMEOUT = 10.0

__all__ = ["Peer", "SessionError", "SessionOptions", "SmtpClient", "StaleConnection",
           "Transaction", "client_tls_context"]


@dataclass(frozen=True, slots=True)
class Peer:
    """One server: ``name`` (the MX host name, for TLS and logs), the
    ``address`` and ``port`` to connect to, or a unix socket path (LMTP)."""

    name: str
    address: str = ""
    port: int = 25
    unix_path: str = ""

    @property
    def display(self) -> str:
        """``mx.example[192.0.2.1]`` (Postfix style), or the socket."""
        if self.unix_path:
            return f"unix:{self.unix_path}"
        return f"{self.name}[{self.address or self.name}]"

    @property
    def relay(self) -> str:
        """For :attr:`DeliveryResult.relay`: ``mx.example[192.0.2.1]:25``."""
        if self.unix_path:
            return f"lmtp:unix:{self.unix_path}"
        return f"{self.display}:{self.port}"


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """How to talk to a server (from ``[delivery]`` and the next hop)."""

    helo_name: str
    tls: str = "may"  # none | may | encrypt | verify (config.TLS_POLICIES)
    tls_context: ssl.SSLContext | None = None  # required unless tls == "none"
    credentials: tuple[str, str] | None = None  # (username, password): AUTH
    lmtp: bool = False
    # RFC 3030 BDAT instead of DATA when the server offers CHUNKING and
    # PIPELINING (smtp_transaction.py): the message goes with the envelope.
    chunking: bool = True
    # RFC 5321 4.5.3.2 timeouts (seconds).
    connect_timeout: float = 30.0
    greeting_timeout: float = 300.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    # Authenticates the server after the handshake, beyond ``tls_context``
    # (DANE, :mod:`postwarden.delivery.dane`): called with the SSLObject,
    # returns None when satisfied or why not (the session then fails 4.7.5).
    peer_check: Callable[[ssl.SSLObject], str | None] | None = None

    def __repr__(self) -> str:  # never show the password
        return (f"SessionOptions(helo_name={self.helo_name!r}, tls={self.tls!r}, "
                f"auth={self.credentials is not None}, lmtp={self.lmtp})")


class SessionError(Exception):
    """The session failed before or between transactions.

    ``tls_failed``: the TLS handshake failed (under ``may`` the caller retries
    the host in plaintext).  ``permanent``: no other host will do better
    (a mail loop).  Otherwise the caller tries the next host.
    """

    def __init__(self, dsn: str, text: str, *, tls_failed: bool = False,
                 permanent: bool = False) -> None:
        super().__init__(text)
        self.dsn = dsn
        self.text = text
        self.tls_failed = tls_failed
        self.permanent = permanent

    def result(self, relay: str = "") -> DeliveryResult:
        if self.permanent:
            return DeliveryResult.failed(self.dsn, self.text, relay=relay)
        return DeliveryResult.deferred(self.dsn, self.text, relay=relay)


def client_tls_context(policy: str, ca_file: Path | None = None) -> ssl.SSLContext | None:
    """The client context for a TLS policy (``None`` for ``none``).

    ``verify`` checks the chain (against ``ca_file`` or the system store) and
    the host name; ``may`` and ``encrypt`` encrypt without authenticating, as
    opportunistic TLS must (RFC 7435).  TLS 1.2 at least (RFC 8996).
    """
    if policy == "none":
        return None
    if policy == "verify":
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    else:
        # create_default_context() with verification turned off, without
        # loading the system's CA certificates that nothing would check
        # (50 ms of CPU on the event loop at the first delivery, 1.3 MB).
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _unrefused(dsn: str) -> str:
    """A session-level refusal is retried later: class 4 whatever the server said."""
    return "4" + dsn[1:] if dsn.startswith("5") else dsn


class SmtpClient:
    """One connection.  Use: ``await open()``, ``await send(tx)`` one or more
    times, ``await close()`` (always, also after errors)."""

    def __init__(self, peer: Peer, options: SessionOptions,
                 downgrade: Callable[[bytes], bytes] | None = None) -> None:
        self.peer = peer
        self.options = options
        self.downgrade = downgrade
        self.extensions: dict[str, str] = {}
        self.esmtp = True
        self.tls_active = False
        self.tls_version = ""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._broken = False
        self._in_transaction = False
        # Taken from the connection cache: RSET leads the next envelope.
        self.reset_due = False
        self.transactions = 0  # sent on this connection (connection_cache.py)
        self.opened_at = time.monotonic()

    # -- session -------------------------------------------------------

    @property
    def usable(self) -> bool:
        """The connection can carry another transaction."""
        return self._writer is not None and not self._broken

    def peer_error(self, exc: PeerError) -> SessionError:
        self._broken = True
        if isinstance(exc, PeerTimeout):
            return SessionError("4.4.2", f"conversation with {self.peer.display} timed out "
                                         f"while {exc.what}")
        if isinstance(exc, PeerClosed):
            return SessionError("4.4.2", f"lost connection with {self.peer.display} "
                                         f"while {exc.what}")
        return SessionError("4.5.0", f"protocol error with {self.peer.display}: {exc.what}")

    async def _connect(self) -> None:
        opts = self.options
        what = f"connect to {self.peer.relay}"
        try:
            async with asyncio.timeout(opts.connect_timeout):
                if self.peer.unix_path:
                    self._reader, self._writer = await asyncio.open_unix_connection(
                        self.peer.unix_path, limit=MAX_REPLY_LINE)
                else:
                    self._reader, self._writer = await asyncio.open_connection(
                        self.peer.address or self.peer.name, self.peer.port,
                        limit=MAX_REPLY_LINE)
        except TimeoutError:
            raise SessionError("4.4.1", f"{what}: connection timed out") from None
        except OSError as exc:
            # asyncio's message names the address again; the errno's is enough.
            reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
            raise SessionError("4.4.1", f"{what}: {reason}") from None
        log.debug("connected", relay=self.peer.relay)

    async def _command(self, line: str, what: str, timeout: float | None = None) -> Reply:
        assert self._reader is not None and self._writer is not None
        wait = self.options.command_timeout if timeout is None else timeout
        await send(self._writer, line.encode("utf-8") + b"\r\n", wait, f"sending {what}")
        return await read_reply(self._reader, wait, f"receiving the reply to {what}")

    async def open(self) -> None:
        """Connect and get ready for :meth:`send`; raise :class:`SessionError`."""
        await self._connect()
        assert self._reader is not None
        try:
            greeting = await read_reply(self._reader, self.options.greeting_timeout,
                                        "receiving the initial server greeting")
            if greeting.code != 220:
                raise SessionError(_unrefused(greeting.dsn()),
                                   f"host {self.peer.display} refused to talk to me: "
                                   f"{greeting}")
            await self._hello()
            await self._starttls()
            await self._authenticate()
        except PeerError as exc:
            raise self.peer_error(exc) from None

    async def _hello(self) -> None:
        opts = self.options
        verb = "LHLO" if opts.lmtp else "EHLO"
        reply = await self._command(f"{verb} {opts.helo_name}", verb)
        if reply.permanent and not opts.lmtp:
            # RFC 5321 3.2: an old server may know only HELO.
            reply = await self._command(f"HELO {opts.helo_name}", "HELO")
            self.esmtp = False
        if reply.code != 250:
            raise SessionError(_unrefused(reply.dsn()),
                               f"host {self.peer.display} refused to talk to me: {reply}")
        self.extensions = parse_extensions(reply) if self.esmtp else {}
        greeted_as = reply.lines[0].split(" ", 1)[0].lower().rstrip(".") if reply.lines else ""
        if not opts.lmtp and greeted_as == opts.helo_name.lower():
            # The server is this host: relaying would loop (Postfix bounces
            # "mail for X loops back to myself" with 5.4.6).
            raise SessionError("5.4.6", f"mail loops back to myself (host {self.peer.display} "
                                        f"greeted me as {greeted_as})", permanent=True)

    async def _starttls(self) -> None:
        policy = self.options.tls
        if policy == "none":
            return
        assert self._reader is not None and self._writer is not None
        if "STARTTLS" not in self.extensions:
            if policy == "may":
                return
            raise SessionError("4.7.5", f"TLS is required, but was not offered by host "
                                        f"{self.peer.display}")
        reply = await self._command("STARTTLS", "STARTTLS")
        if reply.code != 220:
            if policy == "may":  # carry on in plaintext on this connection
                log.info("starttls_refused", relay=self.peer.relay, reply=str(reply))
                return
            raise SessionError("4.7.5", f"host {self.peer.display} refused STARTTLS: {reply}")
        # RFC 3207 6: nothing the server sent before the handshake may be
        # used afterwards; a server that sends more is broken or attacked.
        if getattr(self._reader, "_buffer", b""):
            self._broken = True
            raise SessionError("4.7.5", f"host {self.peer.display} sent data after its "
                                        "STARTTLS reply", tls_failed=True)
        ctx = self.options.tls_context or client_tls_context(policy)
        assert ctx is not None
        verify = policy == "verify"
        sni = self.peer.name if verify or not is_ip(self.peer.name) else None
        try:
            await self._writer.start_tls(ctx, server_hostname=sni,
                                         ssl_handshake_timeout=self.options.command_timeout)
        except ssl.SSLCertVerificationError as exc:
            self._broken = True
            raise SessionError("4.7.5", f"server certificate not verified for host "
                                        f"{self.peer.display}: {exc.verify_message}",
                               tls_failed=True) from None
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            self._broken = True
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise SessionError("4.7.5", f"TLS handshake with host {self.peer.display} "
                                        f"failed: {reason}", tls_failed=True) from None
        sslobj = self._writer.get_extra_info("ssl_object")
        if self.options.peer_check is not None:
            problem = self.options.peer_check(sslobj)
            if problem is not None:
                self._broken = True  # no QUIT: nothing more over this channel
                raise SessionError("4.7.5", f"server certificate not verified for host "
                                            f"{self.peer.display}: {problem}", tls_failed=True)
            verify = True
        self.tls_active = True
        self.tls_version = sslobj.version() if sslobj is not None else ""
        cipher = sslobj.cipher() if sslobj is not None else None
        log.info("tls", relay=self.peer.relay, version=self.tls_version,
                 cipher=cipher[0] if cipher else None, verified=verify)
        # RFC 3207 4.2: forget everything learnt before TLS, greet again.
        self.extensions = {}
        await self._hello()

    async def _authenticate(self) -> None:
        creds = self.options.credentials
        if creds is None:
            return
        if not self.tls_active:
            raise SessionError("4.7.0", f"not sending credentials to host "
                                        f"{self.peer.display} without TLS")
        user, password = creds
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:  # RFC 4616, with the initial response
            token = _b64("\0" + user + "\0" + password)
            reply = await self._command(f"AUTH PLAIN {token}", "AUTH")
        elif "LOGIN" in mechanisms:
            reply = await self._command("AUTH LOGIN", "AUTH")
            if reply.code == 334:
                reply = await self._command(_b64(user), "AUTH")
            if reply.code == 334:
                reply = await self._command(_b64(password), "AUTH")
        else:
            raise SessionError("4.7.0", f"host {self.peer.display} offers no SASL mechanism "
                                        "we support (PLAIN, LOGIN)")
        if reply.code != 235:
            # Soft, like Postfix's smtp_sasl_auth_soft_bounce: the password
            # may be fixed before the message expires.
            raise SessionError(_unrefused(reply.dsn("7.8")),
                               f"SASL authentication failed; server {self.peer.display} "
                               f"said: {reply}")
        log.info("auth", relay=self.peer.relay, user=user)

    async def send(self, tx: Transaction) -> list[DeliveryResult]:
        """One transaction: a result per ``tx.recipients`` entry, in order."""
        assert self._reader is not None and self._writer is not None
        if self._broken:
            error = SessionError("4.4.2", f"connection with {self.peer.display} is broken")
            return [error.result(self.peer.relay)] * len(tx.recipients)
        if self._in_transaction:
            try:  # the previous transaction did not end: RFC 5321 4.1.1.5
                await self._command("RSET", "RSET")
            except PeerError as exc:
                return [self.peer_error(exc).result(self.peer.relay)] * len(tx.recipients)
            self.reset_due = False
        self._in_transaction = True
        self.transactions += 1
        runner = TransactionRunner(self._reader, self._writer, self, tx)
        try:
            results = await runner.run()
        except StaleConnection:
            self._broken = True
            raise
        self._in_transaction = runner.open_after
        if runner.broken:
            self._broken = True
        return results

    async def reuse(self) -> bool:
        """A connection taken from the cache: whether it may carry the next
        transaction.  RFC 2920 3.1 lets RSET lead a pipelined group, so with
        PIPELINING the RSET that checks the connection goes in the same write
        as the next envelope (:class:`StaleConnection` when it fails), instead
        of a round trip of its own."""
        if not self.usable:
            return False
        if "PIPELINING" in self.extensions:
            self.reset_due = True
            return True
        return await self.reset()

    async def reset(self) -> bool:
        """RSET (RFC 5321 4.1.1.5) on a connection taken from the cache:
        whether it still works."""
        if not self.usable:
            return False
        try:
            reply = await self._command("RSET", "RSET", timeout=RESET_TIMEOUT)
        except PeerError:
            self._broken = True
            return False
        self._in_transaction = False
        if reply.code != 250:
            self._broken = True
        return reply.code == 250

    async def close(self) -> None:
        """QUIT politely when possible, then close; never raises."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        if not self._broken and self._reader is not None:
            with contextlib.suppress(PeerError):
                await send(writer, b"QUIT\r\n", QUIT_TIMEOUT, "sending QUIT")
                await read_reply(self._reader, QUIT_TIMEOUT, "receiving the reply to QUIT")
        if self._broken:
            writer.transport.abort()
        else:
            writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(QUIT_TIMEOUT):
                await writer.wait_closed()
