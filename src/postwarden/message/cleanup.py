"""Cleanup: the header lines postwarden adds before a message is queued.

Owns the ``Received:`` trace header (RFC 5321 4.4, with-protocol names from
RFC 3848 and RFC 6531 3.7.3) and, for mail from our own users (submission,
RFC 6409 8.2/8.3), the ``Message-ID:`` and ``Date:`` a client left out.

The body is never rewritten: added lines are stored as a prefix beside the
streamed body.  :class:`HeaderScanner` looks only at the header block (up to
``HEADER_SCAN_MAX`` bytes), with buffer scans, as chunks pass by.

Security exposure: HELO names and addresses in the Received header come from
the client; they are stripped of control characters so that no client can
inject header lines.
"""

from __future__ import annotations

import functools
import re
import secrets
import time
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate

from postwarden.envelope import ConnectionInfo
from postwarden.limits import HEADER_SCAN_MAX

_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)
_UNSAFE = re.compile(r"[\x00-\x1f\x7f()\\]")


def _header_block_end(buf: bytes | bytearray, start: int) -> int:
    """Where the header block of ``buf`` ends (the blank line, CRLF or bare
    LF), searching from ``start``; 0 for a message without header, -1 when
    it has not ended yet."""
    if buf.startswith(b"\r\n") or buf.startswith(b"\n"):
        return 0
    crlf = buf.find(b"\r\n\r\n", start)
    # A bare-LF blank line counts only before the CRLF one (no second scan
    # of the whole chunk when the header ends early).
    lf = buf.find(b"\n\n", start, crlf if crlf >= 0 else len(buf))
    return lf if lf >= 0 else crlf


class HeaderScanner:
    """Collect the header field names of a message as its chunks stream by."""

    def __init__(self, limit: int = HEADER_SCAN_MAX) -> None:
        self.limit = limit
        self._buf = bytearray()
        self.done = False
        self.names: set[str] = set()

    def feed(self, chunk: bytes) -> None:
        if self.done:
            return
        if not self._buf:
            # The header usually ends in the first chunk: look there without
            # copying the chunk.
            end = _header_block_end(chunk, 0)
            if end >= 0:
                self._finish_block(chunk[:end])
                return
        start = max(0, len(self._buf) - 3)
        self._buf += chunk
        end = _header_block_end(self._buf, start)
        if end >= 0:
            self._finish(end)
        elif len(self._buf) >= self.limit:
            self._finish(len(self._buf))

    def close(self) -> None:
        if not self.done:
            self._finish(len(self._buf))

    def _finish(self, end: int) -> None:
        self._finish_block(bytes(self._buf[:end]))

    def _finish_block(self, block: bytes) -> None:
        self.names = {m.group(1).decode("ascii").lower() for m in _HEADER_NAME.finditer(block)}
        self._buf = bytearray()
        self.done = True

    def has(self, name: str) -> bool:
        return name.lower() in self.names


def _clean(text: str) -> str:
    return _UNSAFE.sub("?", text)[:255]


def with_protocol(conn: ConnectionInfo, utf8: bool) -> str:
    """RFC 3848 / RFC 6531 3.7.3 with-protocol keyword."""
    base = "UTF8SMTP" if utf8 else "ESMTP" if conn.esmtp else "SMTP"
    if conn.tls:
        base += "S"
    if conn.auth_user:
        base += "A"
    return base


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """RFC 5322 3.3 date-time of ``second`` (UTC): formatted once per second,
    as every message of that second carries the same one."""
    return formatdate(second, localtime=False)


def received_header(hostname: str, conn: ConnectionInfo, queue_id: str, recipient: str | None,
                    utf8: bool = False, now: float | None = None) -> bytes:
    """The Received line for this hop (RFC 5321 4.4), folded, CRLF-ended."""
    peer = f"[{conn.peer_ip}]" if ":" not in conn.peer_ip else f"[IPv6:{conn.peer_ip}]"
    parts = [f"Received: from {_clean(conn.helo) or 'unknown'} ({peer})"]
    by = f"\tby {hostname} (postwarden) with {with_protocol(conn, utf8)} id {queue_id}"
    parts.append(by)
    if conn.tls:
        parts.append(f"\t(using {_clean(conn.tls_version)} with cipher {_clean(conn.tls_cipher)})")
    if recipient:
        parts.append(f"\tfor <{_clean(recipient)}>")
    date = _date(int(now if now is not None else time.time()))
    parts[-1] += f"; {date}"
    return ("\r\n".join(parts) + "\r\n").encode("utf-8")


def message_id(hostname: str) -> str:
    return f"<{time.strftime('%Y%m%d%H%M%S', time.gmtime())}.{secrets.token_hex(8)}@{hostname}>"


def submission_headers(scanner: HeaderScanner, hostname: str) -> bytes:
    """Message-ID and Date a submitted message lacks (RFC 6409 8.2, 8.3)."""
    out = b""
    if not scanner.has("message-id"):
        out += f"Message-ID: {message_id(hostname)}\r\n".encode()
    if not scanner.has("date"):
        out += f"Date: {format_datetime(datetime.now(UTC))}\r\n".encode()
    return out
