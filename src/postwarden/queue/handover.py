"""Messages handed from a worker process to the main one's queue runner.

A worker process (see :mod:`postwarden.workers`) accepts mail but does not
deliver it: the main process does.  After each commit the worker writes the
message, as the store committed it, on its pipe to the main process, whose
runner starts the delivery at once instead of scanning the queue for it
(:meth:`~postwarden.queue.runner.QueueRunner.hand_over`).

The pipe carries lines.  ``M`` followed by a JSON object is one message;
``W`` asks for a scan of the queue (a message that could not be written,
or a store that cannot hand messages over).  A write of at most PIPE_BUF
bytes is atomic (POSIX), so lines from one worker never interleave with
half lines; a longer line is replaced by ``W``.  When the pipe is full the
messages stay in the queue and the worker writes ``W`` once it can.

Security exposure: the pipe connects processes of one server, started by
it with the same privileges; a line that does not decode is treated as
``W`` (a scan), never as a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
from collections.abc import Callable

from postwarden import compactjson
from postwarden.envelope import MailParams, RcptParams
from postwarden.observe.log import get_logger
from postwarden.storage.base import QueuedMessage, QueuedRecipient

log = get_logger("workers")

WAKE = b"W\n"
PIPE_BUF = select.PIPE_BUF
RETRY_DELAY = 0.05  # seconds between attempts to write a wake-up on a full pipe


def encode(msg: QueuedMessage) -> bytes:
    """One ``M`` line for a message just committed (recipients pending)."""
    p = msg.params
    doc = [msg.queue_id, msg.sender, [p.size, p.body, p.smtputf8, p.ret, p.envid, p.auth],
           [[r.id, r.address, list(r.params.notify) if r.params.notify is not None else None,
             r.params.orcpt] for r in msg.recipients],
           msg.received_at, msg.size, msg.client_ip, msg.helo, msg.auth_user, msg.listener]
    return b"M" + compactjson.dumps(doc).encode() + b"\n"


def decode(line: bytes) -> QueuedMessage:
    """The message of an ``M`` line (without its newline); ValueError if it
    is not one."""
    if not line.startswith(b"M"):
        raise ValueError("not a message line")
    try:
        (queue_id, sender, params, rcpts, received_at, size, client_ip, helo, auth_user,
         listener) = compactjson.loads(line[1:])
        size_p, body, smtputf8, ret, envid, auth = params
        recipients = [QueuedRecipient(int(rid), str(address),
                                      RcptParams(tuple(notify) if notify is not None else None,
                                                 orcpt))
                      for rid, address, notify, orcpt in rcpts]
        return QueuedMessage(str(queue_id), str(sender),
                             MailParams(size_p, body, bool(smtputf8), ret, envid, auth),
                             recipients, float(received_at), int(size), str(client_ip),
                             str(helo), str(auth_user), str(listener))
    except (TypeError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"bad message line: {exc}") from None


class Sender:
    """In a worker: the messages it committed, written on the pipe to the
    main process once per turn of the event loop."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._lines: list[bytes] = []
        self._wake_owed = False
        self._scheduled = False

    def message(self, msg: QueuedMessage) -> None:
        """For ``store.on_queued``."""
        self._lines.append(encode(msg))
        self._schedule()

    def wake(self, _queue_id: str = "") -> None:
        """For ``store.on_commit`` (a store that cannot hand messages over)."""
        self._wake_owed = True
        self._schedule()

    def _schedule(self, delay: float = 0.0) -> None:
        if not self._scheduled:
            self._scheduled = True
            loop = asyncio.get_running_loop()
            if delay:
                loop.call_later(delay, self._send)
            else:
                loop.call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        lines, self._lines = self._lines, []
        batch = b""
        for line in lines:
            if len(line) > PIPE_BUF:  # not atomic: the main process scans instead
                self._wake_owed = True
                continue
            if len(batch) + len(line) > PIPE_BUF:
                if not self._write(batch):
                    return
                batch = b""
            batch += line
        if batch and not self._write(batch):
            return
        if self._wake_owed and self._write(WAKE):
            self._wake_owed = False

    def _write(self, data: bytes) -> bool:
        try:
            os.write(self.fd, data)
            return True
        except BlockingIOError:
            # The main process is behind: what was not written is in the
            # queue; it scans for it when it reads the wake-up.
            self._wake_owed = True
            self._schedule(RETRY_DELAY)
            return False
        except OSError:
            # The main process is gone; its successor scans at start.
            return False


class Receiver:
    """In the main process: reads one worker's pipe and hands each message
    to ``on_message``, or calls ``on_wake``."""

    def __init__(self, on_message: Callable[[QueuedMessage], None],
                 on_wake: Callable[[], None]) -> None:
        self.on_message = on_message
        self.on_wake = on_wake
        self._partial = b""

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        wake = False
        for line in lines:
            if line.startswith(b"M"):
                try:
                    msg = decode(line)
                except ValueError as exc:
                    log.error("handover_bad_line", error=str(exc))
                    wake = True
                    continue
                self._deliver(msg)
            elif line:
                wake = True
        if wake:
            self.on_wake()

    def _deliver(self, msg: QueuedMessage) -> None:
        try:
            self.on_message(msg)
        except Exception as exc:  # the message stays queued: scan for it
            log.error("handover_failed", queue_id=msg.queue_id, error=repr(exc))
            with contextlib.suppress(Exception):
                self.on_wake()

    def close(self) -> None:
        """The worker is gone: a partial line is dropped, and a scan finds
        what it was about."""
        if self._partial:
            self._partial = b""
            self.on_wake()

