"""Messages a worker process hands to the main process over a real pipe
(queue/handover.py): what arrives, and what happens when it cannot."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Awaitable, Callable

from postwarden.envelope import MailParams, RcptParams
from postwarden.queue import handover
from postwarden.storage.base import QueuedMessage, QueuedRecipient


def message(queue_id: str = "4Qm2Zb7sXrTq", rcpts: int = 2) -> QueuedMessage:
    return QueuedMessage(
        queue_id, "alice@example.test",
        MailParams(size=1234, body="8BITMIME", smtputf8=True, ret="HDRS", envid="e-1",
                   auth="<>"),
        [QueuedRecipient(100 + i, f"r{i}@dest.example",
                         RcptParams(("SUCCESS", "FAILURE") if i % 2 else None,
                                    f"rfc822;orig{i}@dest.example" if i % 2 else None))
         for i in range(rcpts)],
        1_790_000_000.25, 4321, "192.0.2.7", "client.example", "alice@example.test", "submission")


class Collect:
    def __init__(self) -> None:
        self.messages: list[QueuedMessage] = []
        self.wakes = 0
        self.receiver = handover.Receiver(self.messages.append, self.wake)

    def wake(self) -> None:
        self.wakes += 1


def test_a_message_arrives_as_it_was_committed() -> None:
    msg = message()
    line = handover.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert handover.decode(line[:-1]) == msg


def test_any_envelope_text_arrives_unchanged() -> None:
    # UTF-8 addresses (SMTPUTF8) go as they are; a lone surrogate, which the
    # fast encoder refuses, goes escaped by the standard one; both read back.
    for sender in ("j\u00f6rg@b\u00fccher.example", "x\udc80y@example.test"):
        msg = dataclasses.replace(message(), sender=sender)
        line = handover.encode(msg)
        assert line.count(b"\n") == 1
        assert handover.decode(line[:-1]) == msg


def test_lines_split_across_reads_and_bad_lines() -> None:
    got = Collect()
    data = handover.encode(message("A")) + handover.encode(message("B")) + b"W\n"
    for i in range(0, len(data), 7):  # the pipe may cut anywhere
        got.receiver.feed(data[i:i + 7])
    assert [m.queue_id for m in got.messages] == ["A", "B"]
    assert got.wakes == 1
    got.receiver.feed(b'M["not", "a message"]\n' + b"Mnot json\n")
    assert got.wakes == 2  # one scan for both, no message
    assert len(got.messages) == 2
    got.receiver.feed(b"M[1,")  # the worker died mid-line
    got.receiver.close()
    assert got.wakes == 3


def read_pipe(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def with_pipe(main: Callable[[int, int], Awaitable[None]]) -> None:
    """Run ``main(read_fd, write_fd)`` on a new pipe (non-blocking reads)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        asyncio.run(main(r, w))
    finally:
        os.close(r)
        os.close(w)


def test_sender_batches_a_turn_and_too_long_lines_become_a_scan() -> None:
    got = Collect()

    async def main(r: int, w: int) -> None:
        sender = handover.Sender(w)
        sender.message(message("A"))
        sender.message(message("B"))
        sender.message(message("C", rcpts=400))  # longer than PIPE_BUF
        assert read_pipe(r) == b""  # nothing before the loop turns
        await asyncio.sleep(0)
        got.receiver.feed(read_pipe(r))

    with_pipe(main)
    assert len(handover.encode(message("C", rcpts=400))) > handover.PIPE_BUF
    assert [m.queue_id for m in got.messages] == ["A", "B"]
    assert got.wakes == 1


def test_a_full_pipe_turns_into_a_scan_once_it_drains() -> None:
    got = Collect()

    async def main(r: int, w: int) -> None:
        sender = handover.Sender(w)  # makes w non-blocking
        while True:  # the main process is behind: fill the pipe
            try:
                os.write(w, b"W\n")
            except BlockingIOError:
                break
        sender.message(message("A"))
        await asyncio.sleep(0)
        await asyncio.sleep(handover.RETRY_DELAY * 2)  # still full: it retries
        backlog = read_pipe(r)
        assert set(backlog.split(b"\n")) == {b"W", b""}  # only the filler
        await asyncio.sleep(handover.RETRY_DELAY * 3)
        got.receiver.feed(read_pipe(r))

    with_pipe(main)
    assert got.messages == []  # A stays in the queue, for the scan:
    assert got.wakes == 1
