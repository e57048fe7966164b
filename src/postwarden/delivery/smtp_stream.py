"""The wire layer of the SMTP/LMTP client: replies in, message data out.

* :func:`read_reply` reads one (multi-line) reply with a deadline and bounds
  on line length and line count (RFC 5321 4.2, 4.5.3.1.5);
* :class:`DataEncoder` turns message chunks into the DATA stream with buffer
  operations: line ends normalised to CRLF (RFC 5321 2.3.8), dot-stuffing
  (RFC 5321 4.5.2) with a carry across chunk boundaries, and the final
  ``CRLF . CRLF``;
* :func:`bdat_payload` makes a message ready for one ``BDAT n LAST``
  (RFC 3030 2): line ends normalised, no dot-stuffing;
* :func:`parse_extensions` reads an EHLO/LHLO reply (RFC 5321 4.1.1.1).

Security exposure: parses every byte a remote server sends.  A reply line
longer than :data:`MAX_REPLY_LINE` or a reply of more than
:data:`MAX_REPLY_LINES` lines is a protocol error, never unbounded memory.
Reply text is stripped of control characters before it reaches logs and
bounces.  Outbound data never contains a bare CR or LF, so a message cannot
end the DATA phase early at a receiver that accepts those as line ends
(SMTP smuggling).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from postwarden.message.lineends import to_crlf

# RFC 5321 4.5.3.1.5 allows 512 octets per reply line; real servers send
# longer ones, so be lenient but bounded.
MAX_REPLY_LINE = 8192
MAX_REPLY_LINES = 200
# Reply text kept for results, logs and bounces.
MAX_REPLY_TEXT = 1000

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class PeerError(Exception):
    """The conversation broke down; ``what`` says while doing what."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class PeerTimeout(PeerError):
    """No (complete) answer within the RFC 5321 4.5.3.2 timeout."""


class PeerClosed(PeerError):
    """The server closed the connection or it broke (reset, EPIPE)."""


class PeerProtocolError(PeerError):
    """A malformed or oversized reply."""


def clean_text(text: str) -> str:
    """Reply text safe to log and quote in a bounce: no control characters."""
    return _CONTROL.sub(" ", text).strip()[:MAX_REPLY_TEXT]


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[str, ...]  # text after "ddd-"/"ddd ", one per line

    @property
    def text(self) -> str:
        return clean_text(" ".join(line.strip() for line in self.lines))

    @property
    def enhanced(self) -> str:
        """The RFC 2034 enhanced status code, when the text starts with one
        of the same class as the reply code; otherwise ""."""
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        if m and m.group(1) == str(self.code)[0]:
            return f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}"
        return ""

    def dsn(self, default_detail: str = "0.0") -> str:
        """The enhanced code, or ``<class>.<default_detail>`` (Postfix uses
        X.0.0 when the server gives none)."""
        return self.enhanced or f"{str(self.code)[0]}.{default_detail}"

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


def _line_waiting(reader: asyncio.StreamReader) -> bool:
    """Whether a whole line already waits in ``reader``, so that reading it
    cannot block.  ``_buffer`` is the StreamReader's own buffer (the same
    bytearray in CPython 3.8 to 3.13); without it the answer is False and
    the read takes the timed path."""
    buffer = getattr(reader, "_buffer", None)
    return isinstance(buffer, bytearray) and b"\n" in buffer


async def read_reply(reader: asyncio.StreamReader, timeout: float, what: str) -> Reply:
    """Read one reply; raise :class:`PeerError` naming ``what`` we waited for.

    The whole reply must arrive within ``timeout`` of the first wait for it.
    A line already received is read without a timer: with PIPELINING most
    replies arrive in one segment with the one before (RFC 2920 3.2), and a
    timer armed and cancelled per reply was a tenth of the delivery's own
    time in the event loop."""
    lines: list[str] = []
    code = 0
    deadline = -1.0
    try:
        while True:
            try:
                if _line_waiting(reader):
                    raw = await reader.readuntil(b"\n")
                else:
                    if deadline < 0:
                        deadline = asyncio.get_running_loop().time() + timeout
                    async with asyncio.timeout_at(deadline):
                        raw = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                raise PeerProtocolError(f"{what}: reply line too long") from None
            except asyncio.IncompleteReadError:
                raise PeerClosed(what) from None
            if len(raw) > MAX_REPLY_LINE:
                raise PeerProtocolError(f"{what}: reply line too long")
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            # RFC 5321 4.2: "ddd" SP text, or "ddd-" text for all but the last.
            if len(line) < 3 or not line[:3].isdigit() or line[0] not in "2345" or (
                    len(line) > 3 and line[3] not in " -"):
                raise PeerProtocolError(f"{what}: malformed reply {clean_text(line)[:80]!r}")
            this = int(line[:3])
            if lines and this != code:
                raise PeerProtocolError(f"{what}: inconsistent multi-line reply")
            code = this
            lines.append(line[4:])
            if len(line) == 3 or line[3] == " ":
                return Reply(code, tuple(lines))
            if len(lines) >= MAX_REPLY_LINES:
                raise PeerProtocolError(f"{what}: reply has too many lines")
    except TimeoutError:
        raise PeerTimeout(what) from None
    except OSError as exc:  # ECONNRESET and friends; ssl.SSLError is an OSError
        raise PeerClosed(what) from exc


async def send(writer: asyncio.StreamWriter, data: bytes, timeout: float, what: str) -> None:
    """Write ``data`` and wait (bounded) until the kernel took it."""
    try:
        writer.write(data)
        transport = writer.transport
        if transport.get_write_buffer_size() == 0 and not transport.is_closing():
            # The kernel took it all.  Flow control pauses a writer only while
            # its buffer is above the high-water mark and resumes it once the
            # buffer drains, so drain() cannot wait here: no timer.  It still
            # raises if the connection broke.
            await writer.drain()
            return
        async with asyncio.timeout(timeout):
            await writer.drain()
    except TimeoutError:
        raise PeerTimeout(what) from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: transport closing
        raise PeerClosed(what) from exc


def bdat_payload(message: bytes) -> bytes:
    """``message`` as it goes after ``BDAT n LAST`` (RFC 3030 2): the octet
    count delimits it, so nothing is dot-stuffed; CRLF is the only line end
    (RFC 5321 2.3.8), and a message that does not end with one gets one, as
    it does in DATA (:meth:`DataEncoder.finish`)."""
    data = to_crlf(message)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def parse_extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters, from lines 2 on."""
    ext: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if not keyword:
            continue
        # The pre-RFC 4954 form "AUTH=LOGIN PLAIN" is still seen in the wild.
        if keyword.upper().startswith("AUTH="):
            keyword, params = "AUTH", f"{keyword[5:]} {params}".strip()
        ext.setdefault(keyword.upper(), params.strip())
    return ext


def size_limit(ext: dict[str, str]) -> int:
    """RFC 1870: the advertised SIZE; 0 means no fixed limit (or not given)."""
    value = ext.get("SIZE", "")
    return int(value) if value.isdigit() else 0


class DataEncoder:
    """Message chunks -> the DATA stream (RFC 5321 4.5.2 transparency).

    Each chunk costs a few ``bytes.replace`` calls; state carried between
    chunks is a held-back trailing CR (it may be the first half of a CRLF)
    and whether the output is at the start of a line (a leading dot there
    is doubled).
    """

    def __init__(self) -> None:
        self._held_cr = False
        self._bol = True  # the message starts at the beginning of a line

    def feed(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return b""
        if b"\r" in chunk or b"\n" in chunk:
            # RFC 5321 2.3.8: CRLF is the only line end on the wire; a bare
            # CR or LF becomes one.
            chunk = to_crlf(chunk).replace(b"\r\n.", b"\r\n..")
        if self._bol and chunk.startswith(b"."):
            chunk = b"." + chunk
        self._bol = chunk.endswith(b"\r\n")
        return chunk

    def finish(self) -> bytes:
        """What ends the stream: a missing final CRLF, then ``.`` CRLF."""
        out = b""
        if self._held_cr:
            out, self._held_cr, self._bol = b"\r\n", False, True
        if not self._bol:
            out += b"\r\n"
        self._bol = True
        return out + b".\r\n"
