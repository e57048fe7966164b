"""The floor: what the bench's load costs a minimal Python SMTP responder.

``make bench`` compares postwarden with Postfix.  This module answers a
different question: how much of a server's CPU per message is the load
itself (the loopback sockets of one session per message, the event loop,
one fsync'ed write per message) and how much is the server's own work
(checks, filters, headers, the queue database, logs).  It runs the same
``smtp-source`` load against a responder of about sixty lines:

* uvloop and ``asyncio.Protocol``, one buffer per connection, the replies
  of a read written at once, ``find`` for the end of the data;
* with ``--journal`` (the default), durability as a real queue needs it:
  each message is appended to a journal file, and one ``fdatasync`` in a
  thread covers every message that arrived meanwhile (group commit); the
  250 is sent only after that sync.  ``--no-journal`` answers 250 at once.

It accepts any sender and recipient and keeps nothing: it is a yardstick,
not a mail server.  One process, so its figures are for one core, unless
``--processes N`` starts N of them on the same port (``SO_REUSEPORT``), each
with a journal of its own.

    python -m bench.floor --sessions 10 --count 6000 --size 2048
    python -m bench.floor --sessions 1 --count 2000 --no-journal

The journal is written where ``make bench`` has its servers write (``--disk
image``, the loop-mounted ext4 image of bench/disk.py), so that its rate
can be set beside Postfix's in a bench report; ``--disk tmp`` writes in
``$TMPDIR``, as earlier runs did.  It prints messages/s and the
responder's CPU per 1,000 messages, split into user and system time, as
the bench's report does.  Loopback only: the responder binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import cast

from bench import disk, procs, servers

HOST = "127.0.0.1"
END = b"\r\n.\r\n"


class Journal:
    """Appends messages to one file; a thread writes and fdatasyncs every
    message waiting, then calls ``done`` on the loop with the batch."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.loop = loop
        self.pending: list[tuple[bytes, asyncio.Transport]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._run, name="journal", daemon=True).start()

    def add(self, message: bytes, transport: asyncio.Transport) -> None:
        with self.cond:
            self.pending.append((message, transport))
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending:
                    self.cond.wait()
                batch, self.pending = self.pending, []
            os.write(self.fd, b"".join(m for m, _ in batch))
            os.fdatasync(self.fd)
            self.loop.call_soon_threadsafe(_queued, batch)


def _queued(batch: list[tuple[bytes, asyncio.Transport]]) -> None:
    for _, transport in batch:
        if not transport.is_closing():
            transport.write(b"250 2.0.0 Ok: queued\r\n")


class Responder(asyncio.Protocol):
    """Canned replies: 220, 250 to every command, 354 to DATA, 221 to QUIT."""

    journal: Journal | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.buf = b""
        self.in_data = False
        self.transport.write(b"220 floor ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        while True:
            if self.in_data:
                end = self.buf.find(END)
                if end < 0:
                    break
                message, self.buf = self.buf[:end], self.buf[end + len(END):]
                self.in_data = False
                if self.journal is not None:
                    self.journal.add(message, self.transport)
                else:
                    out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            nl = self.buf.find(b"\n")
            if nl < 0:
                break
            verb, self.buf = self.buf[:4].upper(), self.buf[nl + 1:]
            if verb == b"DATA":
                self.in_data = True
                self.buf = b"\r\n" + self.buf  # the content starts at a line start
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:
                out.append(b"250 2.0.0 OK\r\n")
        if out:
            self.transport.write(b"".join(out))


async def serve(port: int, journal: Path | None, ready: Path | None) -> None:
    loop = asyncio.get_running_loop()
    if journal is not None:
        Responder.journal = Journal(journal, loop)
    # reuse_port: with --processes, each process listens on the same port
    # and the kernel spreads the connections.
    server = await loop.create_server(Responder, HOST, port, backlog=1024, reuse_port=True)
    if ready is not None:
        ready.touch()
    await server.serve_forever()


def measure(args: argparse.Namespace) -> int:
    tools = servers.ensure_postfix(install=False)
    port = servers.free_port()
    with disk.workspace(args.disk, "floor") as workdir:
        return run(args, tools, port, workdir)


def run(args: argparse.Namespace, tools: dict[str, str], port: int, workdir: Path) -> int:
    children = []
    ready = [workdir / f"ready-{n}" for n in range(args.processes)]
    for n in range(args.processes):
        cmd = [sys.executable, "-m", "bench.floor", "--serve", str(port),
               "--ready-file", str(ready[n])]
        if args.journal:
            cmd += ["--journal-file", str(workdir / f"journal-{n}")]
        children.append(subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL,
                                         cwd=Path(__file__).resolve().parent.parent))

    def cpu() -> tuple[float, float]:
        split = [procs.group_cpu_split(c.pid) for c in children]
        return sum(u for u, _ in split), sum(s for _, s in split)

    try:
        # Every process listens before the load starts.
        if not servers.wait_until(lambda: all(r.exists() for r in ready), 10):
            raise servers.BenchError("the responder does not listen")
        user0, sys0 = cpu()
        start = time.monotonic()
        load = subprocess.run([tools["smtp-source"], "-M", "bench.test", "-f",
                               "bench@client.test", "-t", "sink@sink.test", "-s",
                               str(args.sessions), "-l", str(args.size), "-m", str(args.count),
                               f"{HOST}:{port}"], env=servers.tool_env(), timeout=300,
                              check=False)
        if load.returncode != 0:
            raise servers.BenchError(f"smtp-source exited with {load.returncode}")
        elapsed = time.monotonic() - start
        user1, sys1 = cpu()
    finally:
        for child in children:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait(10)
    per_k = 1000 / args.count
    print(f"floor responder ({'journal, fdatasync per batch' if args.journal else 'no journal'}"
          f"{f', {args.processes} processes' if args.processes > 1 else ''}), "
          f"{args.size} B x {args.count}, {args.sessions} sessions: "
          f"{args.count / elapsed:.0f} msg/s; CPU per 1,000 messages "
          f"{(user1 - user0) * per_k:.2f} s user + {(sys1 - sys0) * per_k:.2f} s system")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--count", type=int, default=6000)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--no-journal", dest="journal", action="store_false",
                   help="answer 250 at once (no file, no fsync)")
    p.add_argument("--processes", type=int, default=1,
                   help="responders on the same port (SO_REUSEPORT), each with its own journal")
    p.add_argument("--disk", choices=("image", "tmp"), default="image",
                   help="where the journal is written (as bench.compare --disk)")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--journal-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        import uvloop

        uvloop.run(serve(args.serve, args.journal_file, args.ready_file))
        return 0
    try:
        return measure(args)
    except servers.BenchError as exc:
        print(f"bench.floor: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
