"""Storage faults at the commit point: a full disk (a real, small tmpfs
mounted under the data directory), an unwritable spool (the same mount made
read-only) and a session that fails unexpectedly.  None may acknowledge a
message that is not stored, and the server goes on serving."""

from __future__ import annotations

import contextlib
import io
import os
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import REQUIRE_ALL, ServerThread, wait_for
from tests.test_smtp_server import ALICE, raw

from postwarden.observe import log as logmod
from postwarden.storage.base import QueuedMessage


class Mount:
    """A tmpfs of fixed size mounted at ``path`` (root with CAP_SYS_ADMIN)."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                            str(path)], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            msg = f"cannot mount a tmpfs here: {r.stderr.strip()}"
            if REQUIRE_ALL:
                pytest.fail(msg + " and POSTWARDEN_REQUIRE_ALL=1")
            pytest.skip(msg)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], timeout=30, check=False)


@pytest.fixture
def small_data_dir(tmp_path: Path) -> Iterator[Mount]:
    mount = Mount(tmp_path / "data", "8m")
    yield mount
    mount.unmount()


def queued(st: ServerThread) -> list[QueuedMessage]:
    assert st.server.store is not None
    msgs: list[QueuedMessage] = st.call(st.server.store.list())
    return msgs


def body(size: int, tag: str) -> bytes:
    return f"Subject: {tag}\r\n\r\n".encode() + (b"y" * 998 + b"\r\n") * (size // 1000)


def fill(path: Path, leave: int) -> Path:
    """Fill the filesystem of ``path`` until ``leave`` bytes are free."""
    st = os.statvfs(path)
    filler = path / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


ACCEPT_ONLY = "[checks]\nverify = false\n[queue]\nworkers = 0\n"


def test_disk_full_during_data_is_452_and_recovers(
        make_server: Callable[..., ServerThread], small_data_dir: Mount) -> None:
    st = make_server(ACCEPT_ONLY)
    other = smtplib.SMTP("127.0.0.1", st.port("mx"), timeout=10)
    other.ehlo("other.remote.example")
    client = smtplib.SMTP("127.0.0.1", st.port("mx"), timeout=30)
    client.sendmail("s@remote.example", [ALICE], body(2_000_000, "fits"))
    filler = fill(small_data_dir.path, 1_000_000)

    with pytest.raises(smtplib.SMTPDataError) as failed:
        client.sendmail("s@remote.example", [ALICE], body(3_000_000, "too big for the disk"))
    assert (failed.value.smtp_code, failed.value.smtp_error[:5]) == (452, b"4.3.1")
    # The session and the others go on: a small message still fits.
    assert client.noop()[0] == 250
    other.sendmail("s@remote.example", [ALICE], body(10_000, "small"))
    assert sorted(len(m.recipients) and m.size > 0 for m in queued(st)) == [True, True]
    assert len(queued(st)) == 2

    filler.unlink()  # space returns
    client.sendmail("s@remote.example", [ALICE], body(3_000_000, "after"))
    client.quit()
    other.quit()
    assert len(queued(st)) == 3
    # Nothing of the refused message is left behind.
    spool = small_data_dir.path / "spool"
    assert len(list(spool.glob("*.spool"))) == 2


def test_unwritable_spool_is_a_clear_temporary_error(
        make_server: Callable[..., ServerThread], small_data_dir: Mount) -> None:
    st = make_server(ACCEPT_ONLY)
    logged = io.StringIO()
    old_stream = logmod._sink.stream
    logmod.configure(stream=logged)
    # Root writes through permissions, and a filesystem with files open for
    # writing cannot be remounted read-only: a read-only tmpfs is mounted
    # over the spool directory instead.
    spool = Mount.__new__(Mount)
    spool.path = small_data_dir.path / "spool"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(spool.path)],
                   check=True, timeout=30)
    try:
        with smtplib.SMTP("127.0.0.1", st.port("mx"), timeout=30) as client:
            with pytest.raises(smtplib.SMTPDataError) as failed:
                client.sendmail("s@remote.example", [ALICE], body(500_000, "spooled"))
            assert failed.value.smtp_code == 451
            assert failed.value.smtp_error.startswith(b"4.3.0")
            assert client.noop()[0] == 250
    finally:
        spool.unmount()
    assert queued(st) == []
    # The log says why.
    try:
        assert wait_for(lambda: "spool write: Read-only file system" in logged.getvalue())
    finally:
        logmod.configure(stream=old_stream)


class _FailingQueue:
    """The real queue, except that ``new_body`` or ``commit`` fails with an
    error no code path expects (a bug)."""

    def __init__(self, real: Any, fail: str) -> None:
        self.real = real
        self.fail = fail

    def __getattr__(self, name: str) -> Any:
        if name == self.fail:
            raise RuntimeError(f"{name} is broken")
        return getattr(self.real, name)


class _FailingPolicy:
    """The real policy, except that the HELO stage fails with an error no
    code path expects."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def run(self, stage: Any, ctx: Any) -> Any:
        if stage.value == "helo":
            raise RuntimeError("helo check is broken")
        return await self.real.run(stage, ctx)


def _all_replies(sock: Any) -> list[bytes]:
    buf = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            buf += chunk
    sock.close()
    return [ln for ln in buf.split(b"\r\n") if len(ln) >= 4 and ln[3:4] == b" "]


@pytest.mark.parametrize(("attr", "fail", "reply"), [
    ("queue", "new_body", b"451 4.3.0"),  # in the middle of a transaction
    ("queue", "commit", b"451 4.3.0"),  # at the end of data: no 250
    ("policy", "helo", b"421 4.3.0"),  # outside a transaction
])
def test_a_crashing_session_replies_before_closing(
        server: ServerThread, attr: str, fail: str, reply: bytes) -> None:
    ctx = server.server.context
    real = getattr(ctx, attr)
    setattr(ctx, attr, _FailingPolicy(real) if attr == "policy" else _FailingQueue(real, fail))
    try:
        sock = raw(server)
        # RFC 2920: the content may follow DATA at once when the client
        # knows the 354 will come; the server reads it as content.
        sock.sendall(b"EHLO t\r\nMAIL FROM:<s@remote.example>\r\n"
                     b"RCPT TO:<alice@example.test>\r\nDATA\r\n"
                     b"Subject: x\r\n\r\nbody\r\n.\r\n")
        replies = []
        replies += _all_replies(sock)  # until the server closes
        assert replies[-1].startswith(reply), replies
        assert not any(r.startswith(b"250 2.0.0 Ok: queued") for r in replies)
    finally:
        setattr(ctx, attr, real)
    with smtplib.SMTP("127.0.0.1", server.port("mx"), timeout=10) as c:
        c.sendmail("s@remote.example", [ALICE], b"Subject: fine\r\n\r\nx\r\n")
