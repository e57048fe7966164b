"""One SMTP connection: timeouts, STARTTLS, AUTH, policy, and DATA/BDAT
streamed to the queue.

The session drives :class:`~postwarden.smtp.protocol.ServerProtocol`: it reads
from the socket, hands bytes to the engine, answers each event (asking the
policy, the directory, the queue), and writes replies once per pipelined
batch (RFC 2920 3.1: the server flushes before it waits for input).

Check, then proceed: the engine has checked syntax and sequence before an
event reaches this module; policy decides before any state changes here.

Security exposure: talks to untrusted clients.  AUTH is offered and accepted
only over TLS (RFC 4954 4 / RFC 8314); failed AUTH is answered after a
delay; plaintext read before the TLS handshake is discarded (RFC 3207 6);
every read has a timeout; message bodies go straight to the body writer
(bounded memory) and the 250 is sent only after the queue's commit returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from postwarden import reply as R
from postwarden.config import Config, ListenerConfig
from postwarden.delivery.dns import Resolver
from postwarden.dkim_keys import KeyStore
from postwarden.envelope import Address, ConnectionInfo, Envelope, RcptParams, Recipient
from postwarden.filter.service import FilterService
from postwarden.ids import new_session_id
from postwarden.limits import HEADER_SCAN_MAX
from postwarden.message import authresults, cleanup
from postwarden.observe.log import get_logger
from postwarden.observe.metrics import NULL_METRICS
from postwarden.policy import CheckContext, Event, Policy, Stage, authentication
from postwarden.policy import spf as spf_mod
from postwarden.smtp import commit, proxy, sasl
from postwarden.smtp import protocol as P
from postwarden.smtp.connection import SessionIO
from postwarden.smtp.tls import TlsContexts
from postwarden.storage.base import (
    BodyWriter,
    Directory,
    QueueStore,
    StorageError,
    StorageFull,
)

log = get_logger("smtp")

AUTH_NOT_ENABLED = R.Reply(503, "5.5.1", "Authentication not enabled")
PREGREET_REFUSED = R.Reply(554, "5.5.1", "Protocol error: talking before the greeting")
# An unexpected error in the session (RFC 5321 4.2.5: 451 aborts the
# transaction, 421 closes the channel).
CRASHED = R.Reply(421, "4.3.0", "Local error, closing connection")
CRASHED_MID_TRANSACTION = R.Reply(451, "4.3.0", "Local error in processing, closing connection")
_IN_TRANSACTION = frozenset({P.State.MAIL, P.State.RCPT, P.State.DATA, P.State.BDAT,
                             P.State.CHUNK})


@dataclass(slots=True)
class ServerContext:
    """What every session shares; built by :mod:`postwarden.app`."""

    config: Config
    tls: TlsContexts
    directory: Directory
    queue: QueueStore
    policy: Policy
    verify_password: object  # async (hash, password) -> bool
    resolver: Resolver | None = None  # SPF, DKIM, DMARC lookups
    dkim_keys: KeyStore | None = None  # signing keys (None: no signing)
    filters: FilterService | None = None  # content filters (postwarden.filter)
    dummy_hash: str = ""
    shutting_down: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    metrics: Any = NULL_METRICS  # postwarden.observe.metrics.Metrics
    complaints: Any = None  # postwarden.web.complaints.Complaints (feedback reports)


class _Transaction:
    """The mail transaction in progress (RFC 5321 3.3)."""

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.original: list[Recipient] = []
        self.expanded: dict[str, Recipient] = {}
        self.body: BodyWriter | None = None
        self.scanner = cleanup.HeaderScanner()
        self.size = 0
        self.too_big = False
        self.eight_bit = False  # any octet > 127 seen (RFC 6152)
        self.failure: R.Reply | None = None
        self.failure_detail = ""
        # The header block is held back until it is complete, so that forged
        # Authentication-Results fields can be dropped before it is written.
        self.head = bytearray()
        self.head_done = False
        self.original_head = b""  # as received (what DKIM verifies)
        self.cleaned_len = 0  # length of the header block as written
        self.spf: asyncio.Future[spf_mod.SpfResult] | None = None
        self.spf_helo: asyncio.Future[spf_mod.SpfResult] | None = None
        # The sender authentication results, for the message's log line.
        self.auth_log: dict[str, object] = {}

    def cancel(self) -> None:
        for task in (self.spf, self.spf_helo):
            if task is not None and not task.done():
                task.cancel()


def _started(at_once: Callable[[], spf_mod.SpfResult | None],
             waiting: Callable[[], Coroutine[Any, Any, spf_mod.SpfResult]]
             ) -> asyncio.Future[spf_mod.SpfResult]:
    """An SPF check's result to await later.  The check starts in the
    event loop's next turn, after the reply to MAIL has been written (the
    session writes it before it waits for the client): answered at once
    when every DNS answer is cached (no task), else by a task that queries
    while the client sends RCPT and DATA."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[spf_mod.SpfResult] = loop.create_future()

    def start() -> None:
        if done.done():  # the transaction ended meanwhile (cancelled)
            return
        try:
            result = at_once()
        except Exception as exc:  # reported where the result is awaited
            done.set_exception(exc)
            return
        if result is not None:
            done.set_result(result)
            return
        task = loop.create_task(waiting())
        task.add_done_callback(lambda t: _settle(done, t))
        done.add_done_callback(lambda d: task.cancel() if d.cancelled() else None)

    loop.call_soon(start)
    return done


def _settle(done: asyncio.Future[spf_mod.SpfResult],
            task: asyncio.Future[spf_mod.SpfResult]) -> None:
    """``done`` takes the outcome of ``task``."""
    if done.done():
        return
    if task.cancelled():
        done.cancel()
    elif (exc := task.exception()) is not None:
        done.set_exception(exc)
    else:
        done.set_result(task.result())


class Session:
    def __init__(self, ctx: ServerContext, listener: ListenerConfig, io: SessionIO) -> None:
        self.ctx = ctx
        self.cfg = ctx.config
        self.listener = listener
        self.limits = ctx.config.limits
        self.io = io
        peer = io.get_extra_info("peername") or ("", 0)
        sock = io.get_extra_info("sockname") or ("", 0)
        self.conn = ConnectionInfo(
            session_id=new_session_id(), listener=listener.name,
            peer_ip=str(peer[0]), peer_port=int(peer[1]),
            local_ip=str(sock[0]), local_port=int(sock[1]))
        self.proto = P.ServerProtocol(self.limits)
        self.tx: _Transaction | None = None
        self.sasl: sasl.Mechanism | None = None
        self.accepted = 0
        self.started = time.monotonic()
        self.m = ctx.metrics.listener(listener.name)  # bound once per listener

    # ---- lifecycle -------------------------------------------------------

    async def run(self) -> None:
        c = self.conn
        log.info("connect", session=c.session_id, pid=os.getpid(), listener=c.listener,
                 client=c.peer_ip, port=c.peer_port)
        try:
            if self.listener.proxy_protocol and not await proxy.accept_header(
                    self.conn, self.listener.trusted_proxies, self.io):
                return  # not from a trusted proxy, or a bad header: no greeting
            if self.listener.implicit_tls:
                self._tls_established()
            if self.ctx.shutting_down:
                self.proto.send(R.SHUTTING_DOWN)
            elif await self._admit():
                self.proto.send(R.Reply(220, "", f"{self.cfg.hostname} ESMTP ready"))
            await self._loop()
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            log.info("connection_lost", session=c.session_id, error=type(exc).__name__)
        except asyncio.CancelledError:
            # Shutdown after the grace period: tell the client to come back.
            if not self.io.is_closing():
                self.io.write(R.SHUTTING_DOWN.to_bytes())
        except Exception:
            # A bug: the client is told to try again later (never left
            # waiting for a reply), the listener logs it.
            if not self.io.is_closing():
                mid = self.tx is not None or self.proto.state in _IN_TRANSACTION
                self.io.write((CRASHED_MID_TRANSACTION if mid else CRASHED).to_bytes())
            raise
        finally:
            self._abort_transaction()
            with contextlib.suppress(Exception):
                await self.ctx.policy.emit(Event.DISCONNECT, self._check_context())
            self.io.close()
            with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
                # asyncio.timeout, not wait_for: no task per connection.
                async with asyncio.timeout(5):
                    await self.io.wait_closed()
            log.info("disconnect", session=c.session_id, client=c.peer_ip,
                     accepted=self.accepted, errors=self.proto.errors,
                     commands=self.proto.commands,
                     seconds=round(time.monotonic() - self.started, 3))

    async def _admit(self) -> bool:
        """Before the greeting: connect-stage checks (access lists, limits,
        bans, DNSBL) and the pregreet test.  False: refused, reply queued."""
        verdict = await self.ctx.policy.run(Stage.CONNECT, self._check_context())
        if verdict.outcome in (R.Outcome.REJECT, R.Outcome.TEMPFAIL):
            reply = verdict.reply or R.ACCESS_DENIED
            log.info("rejected", session=self.conn.session_id, client=self.conn.peer_ip,
                     stage="connect", code=reply.code, dsn=reply.enhanced,
                     reason=verdict.reason)
            self.m.refused.inc()
            self.proto.send(reply)
            self.proto.state = P.State.CLOSED
            return False
        if self.listener.pregreet_wait > 0:
            await asyncio.sleep(self.listener.pregreet_wait)
        else:
            await asyncio.sleep(0)  # let what already arrived be read
        if self.io.buffered:
            # RFC 5321 4.3.1: the client must wait for the greeting.
            log.info("pregreet", session=self.conn.session_id, client=self.conn.peer_ip)
            banned = await self.ctx.policy.emit(Event.PREGREET, self._check_context())
            self.m.refused.inc()
            self.proto.send(banned or PREGREET_REFUSED)
            self.proto.state = P.State.CLOSED
            return False
        self.m.connected.inc()
        return True

    async def _event(self, event: Event, **data: object) -> None:
        """Tell the event handlers; a reply from one ends the session."""
        reply = await self.ctx.policy.emit(event, self._check_context(), **data)
        if reply is not None:
            log.info("session_ended_by_policy", session=self.conn.session_id,
                     client=self.conn.peer_ip, on=event.value, code=reply.code)
            self.proto.send(reply)
            self.proto.state = P.State.CLOSED

    async def _flush(self) -> None:
        out = self.proto.data_to_send()
        if out:
            io = self.io
            io.write(out)
            if io.must_drain:
                await io.drain()

    def _watchdog(self) -> None:
        """One timer per session instead of one per read (RFC 5321 4.5.3.2):
        re-armed for the current deadline; when it has passed, 421 and close."""
        now = self._loop_time()
        if now < self._deadline:
            self._timer = self._event_loop.call_at(self._deadline, self._watchdog)
            return
        self._timed_out = True
        log.info("timeout", session=self.conn.session_id, state=self.proto.state.value)
        self.proto.send(R.TIMEOUT)
        io = self.io
        if not io.is_closing():
            io.write(self.proto.data_to_send())
            io.close()  # the pending read sees EOF

    async def _loop(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self._loop_time = self._event_loop.time
        self._deadline = self._loop_time() + self.limits.command_timeout
        self._timed_out = False
        self._timer = self._event_loop.call_at(self._deadline, self._watchdog)
        try:
            await self._loop_events()
        finally:
            self._timer.cancel()

    async def _loop_events(self) -> None:
        proto = self.proto
        # RFC 5321 4.5.3.2.7: the command timeout is for a whole command, so
        # a client dribbling one byte at a time (slowloris) does not extend
        # it; DATA content re-arms it at every read (4.5.3.2.5).
        progress = True
        while True:
            ev = proto.next_event()
            if isinstance(ev, P.NeedData):
                if proto.http_seen:
                    proto.http_seen = False
                    log.info("http_on_smtp", session=self.conn.session_id,
                             client=self.conn.peer_ip)
                    await self.ctx.policy.emit(Event.HTTP, self._check_context())
                await self._flush()
                if proto.closed:
                    return
                if proto.state is P.State.TLS:
                    if not await self._handshake():
                        return
                    proto.tls_started()
                    continue
                in_data = proto.state in (P.State.DATA, P.State.CHUNK)
                if in_data or progress:
                    self._deadline = self._loop_time() + (
                        self.limits.data_timeout if in_data else self.limits.command_timeout)
                progress = False
                data = await self.io.read()
                if self._timed_out:
                    return
                if not data:
                    if proto.state is not P.State.GREETED or proto.buffered:
                        log.info("client_eof", session=self.conn.session_id,
                                 state=proto.state.value)
                    return
                proto.receive(data)
                continue
            progress = True
            await self._handle(ev)

    async def _handshake(self) -> bool:
        ctx = self.ctx.tls.server
        if ctx is None:
            return False
        try:
            await self.io.start_tls(ctx, self.limits.tls_handshake_timeout)
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as exc:
            log.info("tls_failed", session=self.conn.session_id, error=str(exc)[:200])
            return False
        # RFC 3207 6: anything the client sent before the handshake completed
        # was plaintext pipelined after STARTTLS: discard it.
        leftover = self.io.discard()
        if leftover:
            log.warning("tls_injection_discarded", session=self.conn.session_id,
                        bytes=leftover)
        self._tls_established()
        return True

    def _tls_established(self) -> None:
        self.proto.tls_active = True
        obj = self.io.get_extra_info("ssl_object")
        if obj is not None:
            self.conn.tls_version = obj.version() or ""
            cipher = obj.cipher()
            self.conn.tls_cipher = cipher[0] if cipher else ""
        log.info("tls", session=self.conn.session_id, version=self.conn.tls_version,
                 cipher=self.conn.tls_cipher)
        self.m.tls.inc()

    # ---- events ----------------------------------------------------------

    async def _handle(self, ev: P.Event) -> None:
        if isinstance(ev, P.DataChunk):
            self._body_chunk(ev.data)
        elif isinstance(ev, P.Ehlo):
            await self._ehlo(ev)
        elif isinstance(ev, P.Mail):
            await self._mail(ev)
        elif isinstance(ev, P.Rcpt):
            await self._rcpt(ev)
        elif isinstance(ev, P.Data):
            self._open_body()
            self.proto.respond(R.START_DATA)
        elif isinstance(ev, P.DataEnd):
            self.proto.respond(await self._finish(ev.long_lines))
        elif isinstance(ev, P.BdatEnd):
            await self._bdat_end(ev)
        elif isinstance(ev, P.Rset):
            self._abort_transaction()
            self.proto.respond(R.RESET_OK)
        elif isinstance(ev, P.Vrfy):
            self.proto.respond(R.VRFY_CANNOT)  # RFC 5321 3.5.3
        elif isinstance(ev, P.StartTls):
            self._starttls()
        elif isinstance(ev, P.Auth):
            await self._auth_start(ev)
        elif isinstance(ev, P.AuthResponse):
            await self._auth_step(ev.line)
        elif isinstance(ev, P.Quit):
            pass

    def _check_context(self) -> CheckContext:
        return CheckContext(config=self.cfg, listener=self.listener, conn=self.conn,
                            directory=self.ctx.directory,
                            envelope=self.tx.envelope if self.tx else None)

    def _verdict_reply(self, stage: Stage, verdict: R.Verdict, ok: R.Reply, **fields: object
                       ) -> R.Reply:
        if verdict.outcome in (R.Outcome.ACCEPT, R.Outcome.NO_OPINION):
            return ok
        reply = verdict.reply or R.TEMP_FAILURE
        log.info("rejected", session=self.conn.session_id, client=self.conn.peer_ip,
                 stage=stage.value, code=reply.code, dsn=reply.enhanced,
                 reason=verdict.reason, **fields)
        self.m.rejected(stage.value, reply.code)
        return reply

    def _extensions(self) -> list[str]:
        ext = ["PIPELINING", f"SIZE {self.limits.message_size_max}", "8BITMIME", "SMTPUTF8",
               "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"]
        if not self.conn.tls and self.ctx.tls.server is not None:
            ext.append("STARTTLS")
        if self.listener.mode != "mx" and self.conn.tls and not self.conn.auth_user:
            ext.append("AUTH " + " ".join(sasl.MECHANISMS))
        return ext

    async def _ehlo(self, ev: P.Ehlo) -> None:
        self._abort_transaction()
        self.conn.helo = ev.domain
        self.conn.esmtp = ev.extended
        ctx = self._check_context()
        verdict = await self.ctx.policy.run(Stage.HELO, ctx)
        if ev.extended:
            ok = P.ehlo_reply(self.cfg.hostname, self.conn.peer_ip, self._extensions())
        else:
            ok = R.Reply(250, "", self.cfg.hostname)
        self.proto.respond(self._verdict_reply(Stage.HELO, verdict, ok, helo=ev.domain))

    async def _mail(self, ev: P.Mail) -> None:
        ctx = self._check_context()
        ctx.path = ev.path
        ctx.mail_params = ev.params
        sender = str(ev.path.address) if ev.path.address else ""
        verdict = await self.ctx.policy.run(Stage.MAIL, ctx)
        reply = self._verdict_reply(Stage.MAIL, verdict, R.SENDER_OK, sender=sender)
        if reply.positive:
            self.tx = _Transaction(Envelope(ev.path.address, ev.params))
            if self._verifies:
                # RFC 7208 2.4: SPF for MAIL FROM (the HELO identity for <>),
                # running while the client sends RCPT and DATA.
                resolver = self.ctx.resolver
                assert resolver is not None
                ip, helo, me = self.conn.peer_ip, self.conn.helo, self.cfg.hostname
                self.tx.spf = _started(
                    lambda: spf_mod.check_mail_from_cached(ip, sender, helo, resolver,
                                                           receiver=me),
                    lambda: spf_mod.check_mail_from(ip, sender, helo, resolver, receiver=me,
                                                    cached_first=False))
                if sender:  # RFC 7208 2.3: the HELO identity too
                    self.tx.spf_helo = _started(
                        lambda: spf_mod.check_helo_cached(ip, helo, resolver, receiver=me),
                        lambda: spf_mod.check_helo(ip, helo, resolver, receiver=me,
                                                   cached_first=False))
        self.proto.respond(reply)

    @property
    def _verifies(self) -> bool:
        """Inbound sender authentication applies: mx, unauthenticated."""
        return (self.cfg.checks.verify and self.listener.mode == "mx"
                and not self.conn.auth_user and self.ctx.resolver is not None)

    async def _rcpt(self, ev: P.Rcpt) -> None:
        tx = self.tx
        assert tx is not None  # the engine allows RCPT only after MAIL
        ctx = self._check_context()
        ctx.path = ev.path
        ctx.rcpt_params = ev.params
        rcpt = str(ev.path.address)
        verdict = await self.ctx.policy.run(Stage.RCPT, ctx)
        reply = self._verdict_reply(Stage.RCPT, verdict, R.RCPT_OK, rcpt=rcpt,
                                    sender=str(tx.envelope.sender or ""))
        if not reply.positive:
            await self._event(Event.RCPT_REJECTED, address=rcpt, reply=reply)
        if reply.positive and ev.path.address is not None:
            original = Recipient(ev.path.address, ev.params)
            tx.original.append(original)
            for target in ctx.targets:
                addr = Address.parse_simple(target)
                if addr.key in tx.expanded:
                    continue
                params = ev.params
                if params.orcpt is None and addr.key != ev.path.address.key:
                    # RFC 3461 4.2: keep the original recipient across expansion.
                    params = RcptParams(params.notify, f"rfc822;{ev.path.address}")
                tx.expanded[addr.key] = Recipient(addr, params)
        self.proto.respond(reply)

    # ---- message content -------------------------------------------------

    def _open_body(self) -> None:
        tx = self.tx
        assert tx is not None
        if tx.body is None and tx.failure is None:
            try:
                tx.body = self.ctx.queue.new_body()
            except StorageError as exc:
                self._fail(tx, exc)

    def _fail(self, tx: _Transaction, exc: Exception) -> None:
        tx.failure = R.STORAGE_FULL if isinstance(exc, StorageFull) else R.TEMP_FAILURE
        tx.failure_detail = f"{type(exc).__name__}: {exc}"
        if tx.body is not None:
            tx.body.abort()
            tx.body = None

    def _body_chunk(self, data: bytes) -> None:
        tx = self.tx
        if tx is None:
            return
        if tx.body is None and tx.failure is None and not tx.too_big:
            self._open_body()
        tx.size += len(data)
        if tx.too_big or tx.failure is not None:
            return
        if tx.size > self.limits.message_size_max:
            tx.too_big = True
            if tx.body is not None:
                tx.body.abort()
                tx.body = None
            return
        if not tx.head_done:
            if not tx.head and (end := _header_end(data)) >= 0:
                # The usual case: the whole header block in the first chunk.
                self._release_head(tx, data, end)
                return
            tx.head += data
            end = _header_end(tx.head)
            if end < 0 and len(tx.head) < HEADER_SCAN_MAX:
                return
            head, tx.head = bytes(tx.head), bytearray()
            self._release_head(tx, head, len(head) if end < 0 else end)
            return
        self._write_body(tx, data)

    def _release_head(self, tx: _Transaction, data: bytes, end: int) -> None:
        """The header block, ``data[:end]``, is complete: drop forged
        Authentication-Results claiming our name (RFC 8601 5) and write it,
        then the rest of ``data``."""
        head, rest = data[:end], data[end:]
        tx.head_done = True
        tx.original_head = head
        cleaned, removed = authresults.remove_forged(head, self.cfg.hostname)
        if removed:
            log.info("forged_authresults_removed", session=self.conn.session_id,
                     count=removed)
        tx.cleaned_len = len(cleaned)
        self._write_body(tx, cleaned)
        self._write_body(tx, rest)

    def _write_body(self, tx: _Transaction, data: bytes) -> None:
        if not data:
            return
        tx.scanner.feed(data)
        if not tx.eight_bit and not data.isascii():
            tx.eight_bit = True
        if tx.body is not None:
            try:
                tx.body.write(data)
            except StorageError as exc:
                self._fail(tx, exc)

    async def _bdat_end(self, ev: P.BdatEnd) -> None:
        tx = self.tx
        if tx is None:  # the engine only allows BDAT in a transaction
            self.proto.respond(R.BAD_SEQUENCE)
            return
        if ev.last:
            self.proto.respond(await self._finish(ev.long_lines))
            return
        error = self._content_error(tx, ev.long_lines)
        if error is not None:
            self._abort_transaction()
            self.proto.respond(error)
        else:
            self.proto.respond(R.Reply(250, "2.0.0", f"{ev.size} octets received"))

    def _content_error(self, tx: _Transaction, long_lines: bool) -> R.Reply | None:
        if tx.too_big:
            return R.MESSAGE_TOO_BIG
        if tx.failure is not None:
            return tx.failure
        if long_lines:
            return R.LINE_LIMIT_EXCEEDED
        return None

    async def _finish(self, long_lines: bool) -> R.Reply:
        """End of content: the commit point.  250 only once it is durable."""
        tx = self.tx
        self.tx = None
        if tx is None:
            return R.BAD_SEQUENCE
        sid = self.conn.session_id
        sender = str(tx.envelope.sender or "")
        error = self._content_error(tx, long_lines)
        if tx.body is None and error is None:
            self._open_body()
            error = self._content_error(tx, long_lines)
        if error is not None or tx.body is None:
            return self._reject_content(tx, error or R.TEMP_FAILURE, long_lines)
        if not tx.head_done:  # the message ended inside its header block
            head, tx.head = bytes(tx.head), bytearray()
            self._release_head(tx, head, len(head))
            error = self._content_error(tx, long_lines)
            if error is not None or tx.body is None:
                return self._reject_content(tx, error or R.TEMP_FAILURE, long_lines)
        tx.scanner.close()
        extra = b""
        if self._verifies:
            decision = await self._authenticate(tx)
            if decision.reply is not None:
                tx.body.abort()
                log.info("rejected", session=sid, client=self.conn.peer_ip, stage="data",
                         code=decision.reply.code, dsn=decision.reply.enhanced,
                         sender=sender, reason=decision.reason, **tx.auth_log)
                self.m.rejected("data", decision.reply.code)
                return decision.reply
            extra = decision.headers
        # Filters, headers, DKIM, the commit point (shared with the HTTP send API).
        queued = await commit.queue_message(self.ctx, self.conn, self.listener, commit.Pending(
            tx.envelope, list(tx.expanded.values()), tx.body, tx.scanner, tx.original_head,
            tx.eight_bit, tx.size, tx.auth_log), extra, self.m)
        if queued.queue_id is None:
            return queued.reply
        self.accepted += 1
        await self._event(Event.ACCEPTED, queue_id=queued.queue_id,
                          recipients=len(tx.expanded), size=tx.size)
        return queued.reply

    def _reject_content(self, tx: _Transaction, reply: R.Reply, long_lines: bool) -> R.Reply:
        tx.cancel()
        if tx.body is not None:
            tx.body.abort()
        log.info("rejected", session=self.conn.session_id, client=self.conn.peer_ip,
                 stage="data", code=reply.code, dsn=reply.enhanced,
                 sender=str(tx.envelope.sender or ""), size=tx.size,
                 reason=tx.failure_detail or ("message too big" if tx.too_big else
                                              "line too long" if long_lines else ""))
        self.m.rejected("data", reply.code)
        return reply

    async def _authenticate(self, tx: _Transaction) -> authentication.Decision:
        """SPF (started at MAIL), DKIM, ARC and DMARC on the message exactly
        as received; Authentication-Results goes into the prepended lines."""
        assert self.ctx.resolver is not None and tx.spf is not None
        sender = str(tx.envelope.sender or "")
        try:
            spf = await tx.spf
        except Exception as exc:  # never an accept by accident: temperror
            spf = spf_mod.SpfResult("temperror", comment=f"SPF check failed: {exc!r}"[:200])
        helo: authresults.SpfOutcome | None = None
        if tx.spf_helo is not None:
            try:
                h = await tx.spf_helo
                helo = authresults.SpfOutcome(h.result, "", self.conn.helo, h.comment)
            except Exception:
                helo = None
        assert tx.body is not None
        written = await commit.written(tx.body)
        # The message as received: as written, unless forged fields were
        # dropped from its header block (that only ever shortens it).
        raw = (written if tx.cleaned_len == len(tx.original_head)
               else tx.original_head + written[tx.cleaned_len:])
        try:
            outcome = await authresults.authenticate(
                raw, self.ctx.resolver, authserv_id=self.cfg.hostname,
                client_ip=self.conn.peer_ip, helo=self.conn.helo, mail_from=sender,
                spf_result=spf.result, spf_domain=spf.domain or None,
                spf_comment=spf.comment, spf_helo=helo)
        except Exception as exc:
            log.error("authentication_failed", session=self.conn.session_id,
                      error=f"{type(exc).__name__}: {exc}")
            return authentication.Decision(R.TEMP_FAILURE, "sender authentication failed")
        decision = authentication.decide(spf, outcome, self.cfg.checks)
        # Logged with the message's "accepted" or "rejected" line.
        tx.auth_log = {"spf": spf.result,
                       "dkim": [f"{r.domain}:{r.result}" for r in outcome.dkim.results] or None,
                       "arc": outcome.arc.cv, "dmarc": outcome.dmarc.result,
                       "dmarc_policy": outcome.dmarc.policy, "auth_decision": decision.reason}
        return authentication.Decision(decision.reply, decision.reason,
                                       outcome.header + decision.headers)

    def _abort_transaction(self) -> None:
        tx = self.tx
        self.tx = None
        if tx is not None:
            tx.cancel()
            if tx.body is not None:
                tx.body.abort()

    # ---- STARTTLS and AUTH ----------------------------------------------

    def _starttls(self) -> None:
        if self.ctx.tls.server is None:
            self.proto.respond(R.TLS_UNAVAILABLE)
            return
        self._abort_transaction()
        self.proto.respond(R.READY_TLS)

    async def _auth_start(self, ev: P.Auth) -> None:
        if self.listener.mode == "mx":
            self.proto.respond(AUTH_NOT_ENABLED)
            return
        if not self.conn.tls:
            # RFC 4954 4: never accept a password in the clear.
            self.proto.respond(R.AUTH_NEEDS_TLS)
            return
        mech = sasl.mechanism(ev.mechanism)
        if mech is None:
            self.proto.respond(R.MECH_UNSUPPORTED)
            return
        self.sasl = mech
        self.conn.auth_mechanism = mech.name
        await self._auth_result(mech.start(ev.initial))

    async def _auth_step(self, line: str) -> None:
        if self.sasl is None:
            self.proto.respond(R.BAD_SEQUENCE)
            return
        await self._auth_result(self.sasl.step(line))

    async def _auth_result(self, step: sasl.Step) -> None:
        sid = self.conn.session_id
        if isinstance(step, sasl.Challenge):
            self.proto.respond(step.reply())
            return
        self.sasl = None
        if isinstance(step, sasl.Failure):
            log.info("auth_failed", session=sid, client=self.conn.peer_ip, reason=step.reason,
                     mechanism=self.conn.auth_mechanism)
            self.m.auth_failed.inc()
            if step.reply.code == 535:
                await asyncio.sleep(self.limits.auth_fail_delay)
            self.proto.respond(step.reply)
            return
        username = step.username.strip().lower()
        try:
            account = await self.ctx.directory.get_account(username)
            hashed = account.password_hash if account and account.enabled else self.ctx.dummy_hash
            verify = self.ctx.verify_password
            ok = await verify(hashed, step.password)  # type: ignore[operator]
            ok = bool(ok) and account is not None and account.enabled
        except Exception as exc:  # storage down: temporary, never an accept
            log.error("auth_error", session=sid, user=username, error=type(exc).__name__)
            self.proto.respond(R.AUTH_TEMPFAIL)
            return
        if not ok:
            log.info("auth_failed", session=sid, client=self.conn.peer_ip, user=username,
                     mechanism=self.conn.auth_mechanism, reason="bad credentials")
            self.m.auth_failed.inc()
            await asyncio.sleep(self.limits.auth_fail_delay)
            self.proto.respond(R.AUTH_FAILED)
            await self._event(Event.AUTH_FAILED, username=username)
            return
        assert account is not None
        ctx = self._check_context()
        ctx.username = account.address
        verdict = await self.ctx.policy.run(Stage.AUTH, ctx)
        if verdict.outcome in (R.Outcome.REJECT, R.Outcome.TEMPFAIL):
            reply = verdict.reply or R.AUTH_FAILED
            log.info("auth_refused", session=sid, client=self.conn.peer_ip,
                     user=account.address, code=reply.code, reason=verdict.reason)
            self.proto.respond(reply)
            return
        self.conn.auth_user = account.address
        self.m.auth_ok.inc()
        log.info("auth", session=sid, client=self.conn.peer_ip, user=account.address,
                 mechanism=self.conn.auth_mechanism)
        self.proto.respond(R.AUTH_OK)
        await self._event(Event.AUTH_OK, username=account.address)


def _header_end(buf: bytes | bytearray) -> int:
    """Offset just past the blank line ending the header block, or -1."""
    if buf.startswith(b"\r\n"):
        return 2
    end = buf.find(b"\r\n\r\n")
    return end + 4 if end >= 0 else -1
