"""One mail transaction on an open SMTP/LMTP connection: MAIL, RCPT, DATA.

:class:`TransactionRunner` first decides whether the message can go to this
server at all (SIZE, SMTPUTF8, 8BITMIME; "check, then proceed": nothing is
sent for a message the server cannot take), then sends the envelope, with
PIPELINING when offered (RFC 2920: MAIL, every RCPT and DATA in one write,
replies read in order), streams the message, and maps every reply to a
:class:`~postwarden.delivery.result.DeliveryResult` per recipient.

When the server offers CHUNKING and PIPELINING (RFC 3030), a message of up
to :data:`CHUNKING_MAX` octets goes as ``BDAT n LAST`` in the same write as
the envelope: one round trip per message instead of two (the 354 to DATA is
not waited for), as Exim does by default.  A larger one, or with
``[delivery] chunking = false``, goes with DATA.  A server that offers
CHUNKING but answers BDAT as an unknown command (500, 502, 504) has the
message deferred, not failed, the connection dropped, and gets DATA from
then on (:data:`BDAT_REFUSED`).

* MAIL refused: every recipient gets that reply;
* RCPT 4xx/5xx: that recipient is deferred/failed;
* DATA, end-of-data or BDAT 4xx/5xx: every recipient accepted at RCPT;
* LMTP (RFC 2033 4.2): one reply per accepted recipient after the dot;
* a broken connection: everyone not yet answered is deferred (4.4.2).

Security exposure: reply text from the server ends up in logs and bounces
(cleaned by :mod:`postwarden.delivery.smtp_stream`).  Envelope strings were
validated when the message was received; parameters are encoded (xtext,
RFC 3461 4) so nothing in them can add a parameter or a command.  A message
that cannot be read from the queue halfway through DATA is never ended with
a dot: the connection is aborted, so no truncated message is delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from postwarden.delivery.result import DeliveryResult
from postwarden.delivery.smtp_stream import (
    DataEncoder,
    PeerClosed,
    PeerError,
    Reply,
    bdat_payload,
    read_reply,
    send,
    size_limit,
)
from postwarden.envelope import MailParams, RcptParams
from postwarden.observe.log import get_logger
from postwarden.smtp.address import xtext_encode

if TYPE_CHECKING:
    from postwarden.delivery.smtp_client import SmtpClient
    from postwarden.delivery.transport import DeliveryJob

log = get_logger("smtp_client")

# Commands per pipelined write: replies to one batch must fit the socket
# buffers while we are still writing (RFC 2920 3.1 deadlock).
PIPELINE_BATCH = 100
# Message data is written in pieces of about this size.
WRITE_CHUNK = 64 * 1024
# The largest message sent with BDAT after the envelope (RFC 3030): it is
# read into memory first, to send its size.  Bodies up to 128 KiB are held
# in memory anyway (stored inline in the queue).
CHUNKING_MAX = 256 * 1024
# How far to look for the end of the header section (SMTPUTF8 detection).
HEADER_SCAN_MAX = 1024 * 1024

# RFC 5321 4.2.4: command unrecognized, not implemented, parameter not
# implemented: a server that offered CHUNKING without knowing BDAT.
BDAT_UNKNOWN = frozenset({500, 502, 504})
# Servers (address, port) that did so: DATA from then on.  Bounded: the set
# is emptied when full, and a server still broken then costs one deferral.
BDAT_REFUSED: set[tuple[str, int]] = set()
BDAT_REFUSED_MAX = 10_000
# Linux only (see TransactionRunner._ack_at_once).
TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)

MessageSource = Callable[[], AsyncIterator[bytes]]
# The reply to the RSET that checks a connection taken from the cache.
RESET_TIMEOUT = 10.0


class StaleConnection(Exception):
    """A connection taken from the cache did not answer the RSET that led
    the first envelope sent on it, or refused it: no reply after it was
    read and no message data sent, so the transaction goes on another
    connection."""


@dataclass(frozen=True, slots=True)
class Transaction:
    """What to send: the envelope, its parameters and the message."""

    sender: str  # "" is the null reverse-path
    params: MailParams
    recipients: Sequence[tuple[str, RcptParams]]
    size: int
    open_message: MessageSource  # a fresh iterator over the message per call

    @classmethod
    def from_job(cls, job: DeliveryJob, indices: Sequence[int] | None = None) -> Transaction:
        """The transaction for ``job`` (or the recipients at ``indices``)."""
        rcpts = job.recipients if indices is None else [job.recipients[i] for i in indices]
        return cls(job.message.sender, job.message.params,
                   tuple((r.address, r.params) for r in rcpts), job.message.size,
                   job.open_message)


class SourceError(Exception):
    """The message could not be read from the queue."""


def _escape_utf8_addr(addr: str, allow_utf8: bool) -> str:
    """RFC 6533 3: utf-8-addr-xtext (or -unitext when the server does
    SMTPUTF8): ``\\x{HEX}`` for what may not appear literally."""
    out = []
    for c in addr:
        o = ord(c)
        if o <= 0x20 or o == 0x7F or c in "+=" or (o > 0x7F and not allow_utf8):
            out.append(f"\\x{{{o:X}}}")
        else:
            out.append(c)
    return "".join(out)


def orcpt_param(orcpt: str, allow_utf8: bool) -> str:
    """The ORCPT value to send for the stored ``type;decoded-address``."""
    addr_type, _, addr = orcpt.partition(";")
    if addr_type.lower() == "utf-8":
        # Stored as the client sent it (already encoded); only non-ASCII
        # needs escaping for a server without SMTPUTF8.
        if not allow_utf8 and not addr.isascii():
            addr = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in addr)
        return f"utf-8;{addr}"
    if addr.isascii():
        return f"{addr_type};{xtext_encode(addr)}"
    return f"utf-8;{_escape_utf8_addr(addr, allow_utf8)}"


async def _read_all(source: MessageSource) -> bytes:
    try:
        return b"".join([chunk async for chunk in source()])
    except Exception as exc:
        raise SourceError(str(exc)) from exc


async def headers_are_ascii(source: MessageSource) -> bool:
    """Whether the header section (up to the first empty line) is ASCII."""
    it = source()
    seen = b""
    try:
        async for chunk in it:
            seen += chunk
            end = seen.find(b"\r\n\r\n")
            if end < 0:
                end = seen.find(b"\n\n")
            if end >= 0:
                return seen[:end].isascii()
            if len(seen) > HEADER_SCAN_MAX:
                break
        return seen.isascii()
    except Exception as exc:
        raise SourceError(str(exc)) from exc
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def _memory_source(data: bytes) -> MessageSource:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), WRITE_CHUNK):
            yield data[i:i + WRITE_CHUNK]

    return chunks


class TransactionRunner:
    """Runs one :class:`Transaction` on ``client``'s open connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 client: SmtpClient, tx: Transaction) -> None:
        self.reader = reader
        self.writer = writer
        self.client = client
        self.tx = tx
        self.ext = client.extensions
        self.display = client.peer.display
        self.relay = client.peer.relay
        self.options = client.options
        self.broken = False  # the connection cannot be used any more
        self.open_after = False  # the server is mid-transaction: RSET first
        self.results: list[DeliveryResult | None] = [None] * len(tx.recipients)

    # -- results -------------------------------------------------------

    def _from_reply(self, reply: Reply, command: str) -> DeliveryResult:
        if reply.positive:
            return DeliveryResult.delivered(str(reply), reply.enhanced or "2.0.0",
                                            relay=self.relay, peer_dsn="DSN" in self.ext)
        text = f"host {self.display} said: {reply} (in reply to {command} command)"
        if reply.transient:
            return DeliveryResult.deferred(reply.dsn(), text, relay=self.relay)
        return DeliveryResult.failed(reply.dsn(), text, relay=self.relay)

    def _all(self, result: DeliveryResult, indices: Sequence[int] | None = None) -> None:
        for i in range(len(self.results)) if indices is None else indices:
            if self.results[i] is None:
                self.results[i] = result

    def _broken_by(self, exc: PeerError) -> DeliveryResult:
        self.broken = True
        return self.client.peer_error(exc).result(self.relay)

    def _final(self) -> list[DeliveryResult]:
        fallback = DeliveryResult.deferred("4.4.2", f"no reply from {self.display}",
                                           relay=self.relay)
        return [r or fallback for r in self.results]

    # -- the transaction -------------------------------------------------

    async def run(self) -> list[DeliveryResult]:
        try:
            prepared = await self._prepare()
        except SourceError as exc:
            log.error("message_unreadable", relay=self.relay, error=str(exc))
            self._all(DeliveryResult.deferred("4.3.0", "error reading the queued message"))
            return self._final()
        if isinstance(prepared, DeliveryResult):
            self._all(prepared)
            return self._final()
        mail_params, source, size = prepared
        payload = None
        if self._chunking(size):
            try:
                payload = bdat_payload(await _read_all(source))
            except SourceError as exc:  # nothing was sent yet
                log.error("message_unreadable", relay=self.relay, error=str(exc))
                self._all(DeliveryResult.deferred("4.3.0", "error reading the queued message"))
                return self._final()
        try:
            accepted = await self._envelope(mail_params, payload)
            if accepted:
                await self._data(accepted, source)
        except PeerError as exc:
            self._all(self._broken_by(exc))
        return self._final()

    def _chunking(self, size: int) -> bool:
        """Whether the message goes as one BDAT with the envelope."""
        ext = self.ext
        peer = self.client.peer
        return (self.options.chunking and not self.options.lmtp and size <= CHUNKING_MAX
                and "CHUNKING" in ext and "PIPELINING" in ext
                and (peer.address, peer.port) not in BDAT_REFUSED)

    async def _prepare(self) -> tuple[str, MessageSource, int] | DeliveryResult:
        """MAIL parameters, the message source and its size, or why it cannot
        go here."""
        tx, ext, params = self.tx, self.ext, self.tx.params
        source, size = tx.open_message, tx.size
        words: list[str] = []
        envelope_ascii = tx.sender.isascii() and all(a.isascii() for a, _ in tx.recipients)
        utf8 = False
        if params.smtputf8 or not envelope_ascii:
            if "SMTPUTF8" in ext:
                utf8 = True
            elif not envelope_ascii or not await headers_are_ascii(source):
                # RFC 6531 3.4: no downgrade; an ASCII-only message may go
                # without SMTPUTF8 (as Postfix does).
                return DeliveryResult.failed(
                    "5.6.7", f"host {self.display} does not support SMTPUTF8, "
                             "which this message needs", relay=self.relay)
        if params.body == "8BITMIME" and "8BITMIME" not in ext:
            # RFC 6152 3: 8-bit data must be converted to 7 bits or bounced.
            data = await _read_all(source)
            if not data.isascii():
                converted = await self._downgrade(data)
                if converted is None:
                    return DeliveryResult.failed(
                        "5.6.3", f"host {self.display} does not support 8BITMIME and the "
                                 "message could not be converted to 7 bits", relay=self.relay)
                data = converted
            source, size = _memory_source(data), len(data)
        elif params.body in ("8BITMIME", "7BIT") and "8BITMIME" in ext:
            words.append(f"BODY={params.body}")
        limit = size_limit(ext)
        if limit and size > limit:
            return DeliveryResult.failed(
                "5.3.4", f"message size {size} exceeds size limit {limit} of server "
                         f"{self.display}", relay=self.relay)
        if "SIZE" in ext:
            words.append(f"SIZE={size}")
        if utf8:
            words.append("SMTPUTF8")
        if "DSN" in ext:
            if params.ret:
                words.append(f"RET={params.ret}")
            if params.envid:
                words.append(f"ENVID={xtext_encode(params.envid)}")
        return "".join(" " + w for w in words), source, size

    async def _downgrade(self, data: bytes) -> bytes | None:
        convert = self.client.downgrade
        if convert is None:
            return None
        try:
            # A CPU-bound rewrite of the whole message: off the event loop.
            out = await asyncio.to_thread(convert, data)
        except Exception as exc:
            log.warning("downgrade_failed", relay=self.relay, error=repr(exc))
            return None
        return out if out.isascii() else None

    def _rcpt_line(self, address: str, params: RcptParams) -> str:
        words = []
        if "DSN" in self.ext:
            if params.notify:
                words.append("NOTIFY=" + ",".join(params.notify))
            if params.orcpt:
                words.append("ORCPT=" + orcpt_param(params.orcpt, "SMTPUTF8" in self.ext))
        return f"RCPT TO:<{address}>" + "".join(" " + w for w in words)

    async def _envelope(self, mail_params: str, payload: bytes | None = None) -> list[int]:
        """MAIL, RCPTs and DATA; the indices of recipients now awaiting data.
        Led by RSET on a connection taken from the cache (see
        :meth:`SmtpClient.reuse`).  With ``payload`` (:meth:`_chunking`),
        ``BDAT n LAST`` and the message take the place of DATA, in the same
        write: every result is then known, and nothing awaits data."""
        timeout = self.options.command_timeout
        last = "DATA" if payload is None else f"BDAT {len(payload)} LAST"
        lines = [f"MAIL FROM:<{self.tx.sender}>{mail_params}",
                 *(self._rcpt_line(a, p) for a, p in self.tx.recipients), last]
        names = ["MAIL FROM", *(["RCPT TO"] * len(self.tx.recipients)), last.split()[0]]
        lead = self.client.reset_due and "PIPELINING" in self.ext
        self.client.reset_due = False
        if lead:
            lines.insert(0, "RSET")
            names.insert(0, "RSET")
        self.open_after = True
        replies: list[Reply] = []
        error: PeerError | None = None
        try:
            await self._exchange(lines, names, replies, lead, payload or b"")
        except PeerError as exc:
            error = exc  # the replies read so far still count (a 421, say)
        if lead:
            if not replies or replies[0].code != 250:
                # Dead or closing (a 421): no reply to anything after RSET
                # was read, and no data after the 354 to DATA was sent.
                # (BDAT's message went with the RSET; a server that refused
                # the RSET, closed or stayed silent has not taken it.)
                raise StaleConnection(str(error) if error else f"RSET: {replies[0]}")
            del lines[0], replies[0]
        mail = replies[0] if replies else None
        data = replies[-1] if len(replies) == len(lines) else None
        if mail is not None and not mail.positive:
            self._all(self._from_reply(mail, "MAIL FROM"))
        for i, reply in enumerate(replies[1:len(lines) - 1]):
            if not reply.positive and self.results[i] is None:
                self.results[i] = self._from_reply(reply, "RCPT TO")
        if error is not None:
            self._all(self._broken_by(error))
            return []
        accepted = [i for i, r in enumerate(self.results) if r is None]
        if payload is not None:
            assert data is not None  # every reply was read
            if data.code in BDAT_UNKNOWN:
                self._bdat_unknown(data, accepted)
                return []
            self._all(self._from_reply(data, "BDAT"), accepted)
            # RFC 3030 2: a failed BDAT fails the transaction; RSET first.
            self.open_after = not data.positive
            return []
        if data is not None and data.code == 354 and not accepted:
            # RFC 2920 3.1: DATA accepted though nothing else was: send an
            # empty message (a lone dot) and ignore the reply.
            await send(self.writer, b".\r\n", timeout, "sending end of data")
            await read_reply(self.reader, self.options.data_timeout,
                             "receiving the reply to end of data")
        if not accepted:
            return []
        assert data is not None
        if data.code != 354:
            self._all(self._from_reply(data, "DATA"), accepted)
            return []
        return accepted

    def _ack_at_once(self) -> None:
        """Acknowledge the server's next segments without delay (Linux
        TCP_QUICKACK).  Postfix's smtpd writes its replies to MAIL and RCPT
        when it needs more of the BDAT data, and its reply to BDAT after;
        smtpd leaves Nagle's algorithm on, so that last reply waits until
        the first is acknowledged, and Linux delays the ACK of a segment
        that brings no reason to answer by up to 40 ms: every message of
        16 KB or more waited 44 ms.  Setting the option also sends an ACK
        already held back."""
        sock = self.writer.get_extra_info("socket")
        if TCP_QUICKACK is None or sock is None:
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)

    def _bdat_unknown(self, reply: Reply, accepted: list[int]) -> None:
        """The server offered CHUNKING but does not know BDAT: it may have
        read the message as commands, so the connection is dropped; the
        message is deferred and goes with DATA next time."""
        peer = self.client.peer
        if len(BDAT_REFUSED) >= BDAT_REFUSED_MAX:
            BDAT_REFUSED.clear()
        BDAT_REFUSED.add((peer.address, peer.port))
        log.warning("bdat_refused", relay=self.relay, reply=str(reply))
        self.broken = True
        self._all(DeliveryResult.deferred(
            "4.5.0", f"host {self.display} offers CHUNKING but refused BDAT: {reply}; "
                     "the next attempt uses DATA", relay=self.relay), accepted)

    async def _exchange(self, lines: list[str], names: list[str], replies: list[Reply],
                        lead: bool = False, tail: bytes = b"") -> None:
        """Send the commands and append their replies (PIPELINING: in
        batches; otherwise one by one, stopping when MAIL or every RCPT
        was refused).  ``lead``: the first command is the RSET checking a
        cached connection, whose reply is awaited for RESET_TIMEOUT only.
        ``tail``: BDAT's message, written right after the last command."""
        timeout = self.options.command_timeout
        if "PIPELINING" in self.ext:
            for start in range(0, len(lines), PIPELINE_BATCH):
                batch = lines[start:start + PIPELINE_BATCH]
                out = "".join(f"{x}\r\n" for x in batch).encode("utf-8")
                with_tail = bool(tail) and start + PIPELINE_BATCH >= len(lines)
                if with_tail:
                    out += tail
                await send(self.writer, out, timeout, "sending the envelope")
                if with_tail:
                    self._ack_at_once()
                for name in names[start:start + PIPELINE_BATCH]:
                    # BDAT LAST is answered once the message is taken: the
                    # end-of-data timeout (RFC 5321 4.5.3.2.6).
                    wait = (RESET_TIMEOUT if lead and not replies
                            else self.options.data_timeout if name == "BDAT" else timeout)
                    replies.append(await read_reply(self.reader, wait,
                                                    f"receiving the reply to {name}"))
            return
        for line, name in zip(lines, names, strict=True):
            if name == "DATA" and not any(r.positive for r in replies[1:]):
                return
            await send(self.writer, line.encode("utf-8") + b"\r\n", timeout, f"sending {name}")
            replies.append(await read_reply(self.reader, timeout,
                                            f"receiving the reply to {name}"))
            if name == "MAIL FROM" and not replies[0].positive:
                return

    async def _data(self, accepted: list[int], source: MessageSource) -> None:
        timeout = self.options.command_timeout
        try:
            await self._stream(source)
        except SourceError as exc:
            # Never end with a dot: that would deliver half a message.
            log.error("message_unreadable", relay=self.relay, error=str(exc))
            self.broken = True
            self.writer.transport.abort()
            self._all(DeliveryResult.deferred("4.3.0", "error reading the queued message"))
            return
        except PeerClosed as exc:
            # The server may have said why before closing (552, 554).
            with contextlib.suppress(PeerError):
                reply = await read_reply(self.reader, min(timeout, 5.0), exc.what)
                if not reply.positive:
                    self.broken = True
                    self._all(self._from_reply(reply, "DATA"), accepted)
            raise
        what = "receiving the reply to end of data -- message may be sent more than once"
        if not self.options.lmtp:
            reply = await read_reply(self.reader, self.options.data_timeout, what)
            self._all(self._from_reply(reply, "end of DATA"), accepted)
        else:
            for i in accepted:  # RFC 2033 4.2: one reply per accepted RCPT
                reply = await read_reply(self.reader, self.options.data_timeout, what)
                self.results[i] = self._from_reply(reply, "end of DATA")
        self.open_after = False

    async def _stream(self, source: MessageSource) -> None:
        """The message, dot-stuffed, then ``.``; memory stays about one chunk."""
        encoder = DataEncoder()
        buffer = bytearray()
        timeout = self.options.command_timeout  # RFC 5321 4.5.3.2.5: data block
        it = source()
        try:
            while True:
                try:
                    chunk = await anext(it)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    raise SourceError(str(exc) or type(exc).__name__) from exc
                buffer += encoder.feed(chunk)
                if len(buffer) >= WRITE_CHUNK:
                    await send(self.writer, bytes(buffer), timeout, "sending message body")
                    buffer.clear()
            buffer += encoder.finish()
            await send(self.writer, bytes(buffer), timeout, "sending end of data")
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
