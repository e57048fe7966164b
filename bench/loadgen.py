"""A small SMTP load generator, for what smtp-source(1) cannot do.

smtp-source has no TLS and no pipelining.  This generator (one thread with a
blocking socket per session) sends the same kind of load: ``--sessions``
concurrent sessions, one message per connection (connect, greeting, EHLO,
[STARTTLS, EHLO,] MAIL, RCPT, DATA, message, QUIT),
``--count`` messages in all, each with smtp-source's headers (From, To, Date,
Message-Id) and a ``--size`` byte payload of 80-byte lines, as ``smtp-source
-l SIZE`` sends it.  ``--starttls`` upgrades every session with STARTTLS (no
certificate check, no session resumption: a full handshake per message);
``--pipelining`` sends MAIL, RCPT and DATA in one write (RFC 2920);
``--bdat`` sends MAIL, RCPT, ``BDAT n LAST`` and the message in one write
(RFC 3030, as Exim and large providers send to servers offering CHUNKING),
then acknowledges the replies without delay (``TCP_QUICKACK``).
Like smtp-source it stops at the first unexpected reply.

It prints one JSON object: sent, elapsed (seconds from the first connect to
the last reply), the generator's own CPU seconds, and the first error.

    python -m bench.loadgen --port 2525 --rcpt sink@example.test \\
        --sessions 10 --count 1000 --size 2048 [--starttls] [--pipelining | --bdat]

The module also holds the idle-sessions test used by bench.compare (asyncio:
thousands of connections).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import json
import os
import resource
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO

HOST = "127.0.0.1"
STEP_TIMEOUT = 60.0


class SmtpError(Exception):
    pass


def payload(size: int) -> bytes:
    """``size`` bytes of 80-byte CRLF lines, like ``smtp-source -l SIZE``."""
    lines = []
    left = size
    n = 1
    while left > 0:
        chunk = min(80, left)
        text = (str(n % 10) + "X" * 77)[: max(0, chunk - 2)]
        lines.append(text.encode() + b"\r\n")
        left -= chunk
        n += 1
    return b"".join(lines)


def message(sender: str, rcpt: str, body: bytes, seq: int, helo: str) -> bytes:
    headers = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\n"
               f"Date: {email.utils.formatdate(localtime=True)}\r\n"
               f"Message-Id: <{os.getpid():x}.{seq:06d}@{helo}>\r\n\r\n")
    return headers.encode() + body + b".\r\n"


async def read_reply(reader: asyncio.StreamReader, expect: int) -> list[bytes]:
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)
        if not line:
            raise SmtpError(f"connection closed, expected {expect}")
        lines.append(line)
        if line[3:4] != b"-":
            break
    if not lines[-1].startswith(str(expect).encode()):
        raise SmtpError(f"expected {expect}, got {lines[-1].decode(errors='replace').strip()}")
    return lines


def read_reply_blocking(f: BinaryIO, expect: int) -> None:
    while True:
        line = f.readline(4096)
        if not line:
            raise SmtpError(f"connection closed, expected {expect}")
        if line[3:4] != b"-":
            break
    if not line.startswith(str(expect).encode()):
        raise SmtpError(f"expected {expect}, got {line.decode(errors='replace').strip()}")


@dataclass
class Load:
    """``sessions`` threads with blocking sockets (the TLS handshake and
    the socket I/O run in C without the GIL; asyncio's pure-Python TLS layer
    costs the client about twice the CPU)."""

    host: str
    port: int
    sender: str
    rcpt: str
    size: int
    count: int
    sessions: int
    starttls: bool = False
    pipelining: bool = False
    bdat: bool = False
    helo: str = "bench.test"
    sent: int = 0
    errors: list[str] = field(default_factory=list)
    _next: int = 0

    def __post_init__(self) -> None:
        self.body = payload(self.size)
        self.lock = threading.Lock()
        self.tls: ssl.SSLContext | None = None
        if self.starttls:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.tls = ctx

    def one(self, seq: int) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=STEP_TIMEOUT)
        f = sock.makefile("rb")
        try:
            read_reply_blocking(f, 220)
            ehlo = f"EHLO {self.helo}\r\n".encode()
            sock.sendall(ehlo)
            read_reply_blocking(f, 250)
            if self.tls is not None:
                sock.sendall(b"STARTTLS\r\n")
                read_reply_blocking(f, 220)
                f.close()
                sock = self.tls.wrap_socket(sock)
                f = sock.makefile("rb")
                sock.sendall(ehlo)
                read_reply_blocking(f, 250)
            mail = f"MAIL FROM:<{self.sender}>\r\n".encode()
            rcpt = f"RCPT TO:<{self.rcpt}>\r\n".encode()
            if self.bdat:
                # The message without DATA's end mark; nothing is dot-stuffed
                # (the payload's lines begin with digits).
                content = message(self.sender, self.rcpt, self.body, seq, self.helo)[:-3]
                sock.sendall(mail + rcpt + f"BDAT {len(content)} LAST\r\n".encode() + content)
                # As postwarden's own client does: acknowledge the replies at
                # once.  Postfix's smtpd answers MAIL and RCPT before it has
                # read all the data and BDAT after, with Nagle on, so a
                # client that delays its ACK makes that last reply wait up
                # to 40 ms (delivery/smtp_transaction.py, _ack_at_once).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                for code in (250, 250, 250):
                    read_reply_blocking(f, code)
            elif self.pipelining:
                sock.sendall(mail + rcpt + b"DATA\r\n")
                for code in (250, 250, 354):
                    read_reply_blocking(f, code)
            else:
                for command, code in ((mail, 250), (rcpt, 250), (b"DATA\r\n", 354)):
                    sock.sendall(command)
                    read_reply_blocking(f, code)
            if not self.bdat:
                sock.sendall(message(self.sender, self.rcpt, self.body, seq, self.helo))
                read_reply_blocking(f, 250)
            with self.lock:
                self.sent += 1
            with contextlib.suppress(SmtpError, OSError):
                sock.sendall(b"QUIT\r\n")
                read_reply_blocking(f, 221)
        finally:
            f.close()
            sock.close()

    def worker(self) -> None:
        while True:
            with self.lock:
                if self.errors or self._next >= self.count:
                    return
                self._next += 1
                seq = self._next
            try:
                self.one(seq)
            except (OSError, SmtpError) as e:
                with self.lock:
                    self.errors.append(f"{type(e).__name__}: {e}")

    def run(self) -> float:
        start = time.monotonic()
        threads = [threading.Thread(target=self.worker, daemon=True)
                   for _ in range(self.sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - start


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- idle sessions ---------------------------------------------------------


@dataclass
class IdleSessions:
    """Many concurrent sessions that read the greeting and then say nothing."""

    host: str
    port: int
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    failed: int = 0
    first_error: str = ""

    async def _open_one(self, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), STEP_TIMEOUT)
                await read_reply(reader, 220)
            except (TimeoutError, OSError, SmtpError) as e:
                self.failed += 1
                self.first_error = self.first_error or f"{type(e).__name__}: {e}"
                return
            self.conns.append((reader, writer))

    async def open(self, n: int, parallel: int = 200) -> None:
        gate = asyncio.Semaphore(parallel)
        await asyncio.gather(*(self._open_one(gate) for _ in range(n)))

    async def probe(self) -> float:
        """Seconds until a new session gets its greeting; it then says EHLO
        and QUIT, so the session is known to work."""
        start = time.monotonic()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), STEP_TIMEOUT)
        try:
            await read_reply(reader, 220)
            latency = time.monotonic() - start
            writer.write(b"EHLO probe.test\r\n")
            await read_reply(reader, 250)
            writer.write(b"QUIT\r\n")
            await read_reply(reader, 221)
        finally:
            writer.close()
        return latency

    async def still_alive(self, sample: int = 20) -> int:
        """How many of ``sample`` idle sessions (spread over all) answer NOOP."""
        if not self.conns:
            return 0
        step = max(1, len(self.conns) // sample)
        ok = 0
        for reader, writer in self.conns[::step][:sample]:
            try:
                writer.write(b"NOOP\r\n")
                await read_reply(reader, 250)
                ok += 1
            except (TimeoutError, OSError, SmtpError):
                pass
        return ok

    async def close(self) -> None:
        for _, writer in self.conns:
            writer.close()
        self.conns.clear()
        await asyncio.sleep(0)


def main() -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--host", default=HOST)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sender", default="bench@client.test")
    ap.add_argument("--rcpt", required=True)
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--starttls", action="store_true")
    ap.add_argument("--pipelining", action="store_true")
    ap.add_argument("--bdat", action="store_true")
    ap.add_argument("--helo", default="bench.test")
    args = ap.parse_args()
    load = Load(args.host, args.port, args.sender, args.rcpt, args.size, args.count,
                args.sessions, starttls=args.starttls, pipelining=args.pipelining,
                bdat=args.bdat, helo=args.helo)
    elapsed = load.run()
    print(json.dumps({"sent": load.sent, "elapsed": elapsed, "cpu": cpu_self(),
                      "error": load.errors[0] if load.errors else None}))
    return 0 if not load.errors and load.sent == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
