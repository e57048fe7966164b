"""Antivirus: ClamAV's clamd over its INSTREAM protocol.

Owns the ``clamav`` filter.  The message is streamed to clamd in chunks
(``zINSTREAM``, then 4-byte big-endian lengths each followed by that many
bytes, then a zero length; clamd(8) "INSTREAM"), over a unix socket or TCP.
clamd parses the mail itself (MIME, base64, archives).  ``stream: OK``
accepts; ``stream: NAME FOUND`` rejects with 554 5.7.1 "virus found", the
signature name going to the log and the quarantine record only; anything
else (an ERROR line, a closed connection, a timeout) makes the filter
unavailable, which the chain answers with 451 unless told to fail open.

Security exposure: sends untrusted content to a local daemon; reads its
one-line answer with a size bound.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from postwarden.filter.verdict import (
    VIRUS_FOUND,
    Action,
    FilterMessage,
    FilterUnavailable,
    FilterVerdict,
)

CHUNK = 64 * 1024
REPLY_MAX = 4096


@dataclass(frozen=True, slots=True)
class ClamavSettings:
    # "unix:/run/clamav/clamd.ctl", "/run/clamav/clamd.ctl" or "HOST:PORT".
    address: str = "unix:/run/clamav/clamd.ctl"
    chunk_size: int = CHUNK


async def _connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if address.startswith("unix:") or address.startswith("/"):
        return await asyncio.open_unix_connection(address.removeprefix("unix:"))
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host.strip("[]"), int(port))


async def scan(address: str, data: bytes, chunk_size: int = CHUNK) -> str:
    """clamd's answer for ``data`` without the ``stream: `` prefix
    ("OK", "Eicar-Signature FOUND", "... ERROR")."""
    try:
        reader, writer = await _connect(address)
    except (OSError, ValueError) as exc:
        raise FilterUnavailable(f"clamd at {address}: {exc}") from None
    try:
        writer.write(b"zINSTREAM\0")
        view = memoryview(data)
        for i in range(0, len(data), chunk_size):
            chunk = view[i:i + chunk_size]
            writer.write(struct.pack(">I", len(chunk)))
            writer.write(chunk)
            await writer.drain()
        writer.write(struct.pack(">I", 0))
        await writer.drain()
        answer = await reader.readuntil(b"\0")
    except asyncio.LimitOverrunError:
        raise FilterUnavailable("clamd: answer too long") from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise FilterUnavailable(f"clamd at {address}: {exc!r}") from None
    finally:
        writer.close()
    text = answer[:REPLY_MAX].rstrip(b"\0").decode("utf-8", "replace").strip()
    return text.removeprefix("stream:").strip()


class ClamavFilter:
    name = "clamav"

    def __init__(self, settings: ClamavSettings) -> None:
        self.settings = settings

    async def check(self, message: FilterMessage) -> FilterVerdict:
        answer = await scan(self.settings.address, message.data, self.settings.chunk_size)
        if answer == "OK":
            return FilterVerdict(Action.ACCEPT, "clean")
        if answer.endswith(" FOUND"):
            signature = answer[: -len(" FOUND")].strip()
            return FilterVerdict(Action.REJECT, f"virus found: {signature}", VIRUS_FOUND,
                                 rules=(f"VIRUS:{signature}",))
        raise FilterUnavailable(f"clamd: {answer[:200]}")
