"""Accept-rate benchmark: messages/s that postwarden commits to its queue.

Starts ``postwarden serve`` in a temporary directory with delivery paused
(``[queue] workers = 0``, like Postfix's hold queue), then drives the mx
listener from N concurrent pipelining sessions for a fixed time, and prints
messages/s (median of the repetitions).  Every 250 counted is an fsync'ed
commit.  Loopback only.

    python bench/accept.py [--sessions 1,10,50] [--size 2048] [--seconds 5] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def session(port: int, body: bytes, deadline: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"EHLO bench.example\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    txn = b"MAIL FROM:<bench@remote.example>\r\nRCPT TO:<sink@example.test>\r\nDATA\r\n"
    while time.monotonic() < deadline:
        writer.write(txn)
        for _ in range(3):
            await reader.readline()
        writer.write(body + b".\r\n")
        line = await reader.readline()
        if not line.startswith(b"250"):
            raise RuntimeError(f"unexpected reply {line!r}")
        counts[0] += 1
    writer.write(b"QUIT\r\n")
    await reader.readline()
    writer.close()


async def load(port: int, sessions: int, size: int, seconds: float) -> float:
    line = b"x" * 76 + b"\r\n"
    body = b"Subject: bench\r\n\r\n" + line * max(1, size // len(line))
    counts = [0]
    start = time.monotonic()
    deadline = start + seconds
    await asyncio.gather(*(session(port, body, deadline, counts) for _ in range(sessions)))
    return counts[0] / (time.monotonic() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", default="1,10,50")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        port = free_port()
        subprocess.run([sys.executable, "-m", "postwarden", "init", "--non-interactive",
                        "--dir", str(d), "--domain", "example.test", "--mx-port", str(port),
                        "--submission-port", str(free_port()), "--submissions-port",
                        str(free_port())], check=True, capture_output=True)
        cfg = d / "postwarden.toml"
        cfg.write_text(cfg.read_text().replace("[queue]", "[queue]\nworkers = 0").replace(
            "level = \"info\"", "level = \"warning\"")
                       )
        subprocess.run([sys.executable, "-m", "postwarden", "-c", str(cfg), "user", "add",
                        "sink@example.test"], check=True, capture_output=True)
        proc = subprocess.Popen([sys.executable, "-m", "postwarden", "-c", str(cfg), "serve"])
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            print(f"postwarden accept rate, {args.size} B messages, fsync'ed, "
                  f"{args.seconds:.0f} s x {args.runs} runs")
            for n in (int(x) for x in args.sessions.split(",")):
                rates = [asyncio.run(load(port, n, args.size, args.seconds))
                         for _ in range(args.runs)]
                print(f"  {n:3d} sessions: median {statistics.median(rates):8.0f} msg/s "
                      f"(min {min(rates):.0f}, max {max(rates):.0f})")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
