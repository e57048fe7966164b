"""Maildir delivery into real directories (cr.yp.to/proto/maildir.html)."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden.delivery.maildir import (
    MaildirDelivery,
    UnsafeMailbox,
    mailbox_parts,
    temporary_result,
    unique_name,
)
from postwarden.delivery.result import DeliveryResult, DeliveryStatus
from postwarden.storage.base import StorageError

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


async def chunks(*parts: bytes, fail: bool = False) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if fail:
        raise StorageError("queue file went bad")


def deliver(mail: Path, mailbox: str, sender: str = "alice@example.test",
            parts: tuple[bytes, ...] = (MESSAGE,)) -> DeliveryResult:
    return asyncio.run(MaildirDelivery(mail).deliver(mailbox, sender, chunks(*parts)))


def files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_delivery_lands_in_new_with_trace_headers(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    # A CRLF split across chunks is still converted to the Maildir LF form.
    result = deliver(mail, "Bob@Example.TEST", parts=(b"Subject: hi\r", b"\n\r\nhello\r\n"))
    assert result.status is DeliveryStatus.DELIVERED
    assert result.reply == "2.0.0 delivered to maildir"
    maildir = mail / "example.test" / "bob" / "Maildir"
    [msg] = list((maildir / "new").iterdir())
    assert msg.read_bytes() == (b"Return-Path: <alice@example.test>\n"
                                b"Delivered-To: bob@example.test\n"
                                + MESSAGE.replace(b"\r\n", b"\n"))
    assert list((maildir / "tmp").iterdir()) == []
    assert (maildir / "cur").is_dir()
    assert stat.S_IMODE(msg.stat().st_mode) == 0o600
    for d in (maildir, maildir / "new", maildir / "tmp", maildir / "cur"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_a_message_bigger_than_the_write_buffer_is_streamed_intact(tmp_path: Path) -> None:
    body = b"".join(b"line %06d " % i + b"x" * 60 + b"\r\n" for i in range(15_000))  # ~1.1 MB
    message = b"Subject: big\r\n\r\n" + body
    # Chunks of an odd size: CRLFs fall across chunk boundaries.
    parts = tuple(message[i:i + 65_537] for i in range(0, len(message), 65_537))
    result = deliver(tmp_path, "bob@example.test", parts=parts)
    assert result.status is DeliveryStatus.DELIVERED
    maildir = tmp_path / "example.test" / "bob" / "Maildir"
    [msg] = list((maildir / "new").iterdir())
    assert msg.read_bytes() == (b"Return-Path: <alice@example.test>\n"
                                b"Delivered-To: bob@example.test\n"
                                + message.replace(b"\r\n", b"\n"))
    assert list((maildir / "tmp").iterdir()) == []


def test_two_deliveries_get_unique_names(tmp_path: Path) -> None:
    for _ in range(2):
        assert deliver(tmp_path, "bob@example.test").status is DeliveryStatus.DELIVERED
    assert len(list((tmp_path / "example.test/bob/Maildir/new").iterdir())) == 2
    name = unique_name()
    assert "/" not in name and ":" not in name and not name.startswith(".")


def test_null_sender_and_header_injection(tmp_path: Path) -> None:
    deliver(tmp_path / "a", "bob@example.test", sender="")
    [msg] = files(tmp_path / "a")
    assert msg.read_bytes().startswith(b"Return-Path: <>\nDelivered-To: bob@example.test\n")
    deliver(tmp_path / "b", "bob@example.test", sender="x@y\r\nX-Evil: 1")
    [msg] = files(tmp_path / "b")
    assert b"\nX-Evil" not in msg.read_bytes()


@pytest.mark.parametrize("mailbox", [
    "../etc@example.test",
    ".hidden@example.test",
    "..@example.test",
    "a/b@example.test",
    "a\\b@example.test",
    "a\x00b@example.test",
    "a b@example.test",
    "a\nb@example.test",
    "bob@../../etc",
    "bob@exa/mple.test",
    "bob@.example.test",
    "bob@example..test",
    "bob@",
    "@example.test",
    "nodomain",
    "x" * 300 + "@example.test",
])
def test_unsafe_mailboxes_are_refused_permanently(tmp_path: Path, mailbox: str) -> None:
    result = deliver(tmp_path / "mail", mailbox)
    assert result.status is DeliveryStatus.FAILED
    assert result.dsn == "5.1.3"
    assert files(tmp_path) == []


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(max_size=40),
    st.builds(lambda local, domain: f"{local}@{domain}",
              st.text(alphabet="aZ0./\\-~ \x00\n:%é", max_size=12),
              st.text(alphabet="aZ0.-/é", max_size=12))))
def test_accepted_mailboxes_stay_inside_mail_dir(text: str) -> None:
    mail = Path("/srv/mail")
    try:
        path = MaildirDelivery(mail).path_for(text)
    except UnsafeMailbox:
        return
    domain, local = mailbox_parts(text)
    assert path == mail / domain / local / "Maildir"
    assert os.path.normpath(path) == str(path)
    assert path.parent.parent.parent == mail


def test_unwritable_mailbox_is_temporary(tmp_path: Path) -> None:
    # Works as root too: a file where the directory should be.
    mail = tmp_path / "mail"
    (mail / "example.test").mkdir(parents=True)
    (mail / "example.test" / "bob").write_text("not a directory")
    result = deliver(mail, "bob@example.test")
    assert result.status is DeliveryStatus.DEFERRED
    assert result.dsn.startswith("4.")


def test_broken_new_dir_is_temporary_and_leaves_no_tmp_file(tmp_path: Path) -> None:
    maildir = tmp_path / "example.test" / "bob" / "Maildir"
    (maildir / "tmp").mkdir(parents=True)
    (maildir / "new").write_text("a file, not a directory")
    result = deliver(tmp_path, "bob@example.test")
    assert result.status is DeliveryStatus.DEFERRED
    assert list((maildir / "tmp").iterdir()) == []


def test_source_failure_removes_tmp_file_and_propagates(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(StorageError):
            await MaildirDelivery(tmp_path).deliver(
                "bob@example.test", "", chunks(b"partial " * 100_000, fail=True))

    asyncio.run(main())
    maildir = tmp_path / "example.test" / "bob" / "Maildir"
    assert list((maildir / "tmp").iterdir()) == []
    assert list((maildir / "new").iterdir()) == []


@pytest.mark.parametrize(("err", "dsn"), [
    (errno.ENOSPC, "4.3.1"),
    (errno.EFBIG, "4.3.1"),
    (errno.EDQUOT, "4.2.2"),
    (errno.EACCES, "4.3.0"),
    (errno.EIO, "4.3.0"),
])
def test_os_errors_map_to_temporary_codes(err: int, dsn: str) -> None:
    result = temporary_result(OSError(err, os.strerror(err)))
    assert result.status is DeliveryStatus.DEFERRED
    assert result.dsn == dsn


def test_concurrent_deliveries_to_one_mailbox_all_land(tmp_path: Path) -> None:
    """Deliveries in parallel share the new/ directory's fsync; each still
    returns only once its message is in new/, and none is lost."""
    mail = tmp_path / "mail"
    delivery = MaildirDelivery(mail, threads=8)

    async def many() -> list[DeliveryResult]:
        return await asyncio.gather(*(
            delivery.deliver("bob@example.test", "alice@example.test",
                             chunks(b"Subject: %d\r\n\r\nbody\r\n" % i))
            for i in range(100)))

    results = asyncio.run(many())
    assert {r.status for r in results} == {DeliveryStatus.DELIVERED}
    new = mail / "example.test" / "bob" / "Maildir" / "new"
    subjects = sorted(int(p.read_bytes().split(b"Subject: ")[1].split(b"\n")[0])
                      for p in new.iterdir())
    assert subjects == list(range(100))


def test_a_broken_mailbox_in_a_batch_fails_alone(tmp_path: Path) -> None:
    """Deliveries stored in one batch: the one whose new/ is unusable is
    deferred and leaves no file behind; the others land."""
    broken = tmp_path / "example.test" / "eve" / "Maildir"
    (broken / "tmp").mkdir(parents=True)
    (broken / "cur").mkdir()
    (broken / "new").write_text("a file, not a directory")
    delivery = MaildirDelivery(tmp_path)

    async def many() -> list[DeliveryResult]:
        return await asyncio.gather(*(
            delivery.deliver("eve@example.test" if i == 20 else f"user{i % 3}@example.test",
                             "alice@example.test", chunks(b"Subject: %d\r\n\r\nbody\r\n" % i))
            for i in range(40)))

    results = asyncio.run(many())
    assert results[20].status is DeliveryStatus.DEFERRED
    assert results[20].dsn.startswith("4.")
    assert list((broken / "tmp").iterdir()) == []
    others = [r for i, r in enumerate(results) if i != 20]
    assert {r.status for r in others} == {DeliveryStatus.DELIVERED}
    landed = [p for n in range(3)
              for p in (tmp_path / "example.test" / f"user{n}" / "Maildir" / "new").iterdir()]
    assert len(landed) == 39
    for n in range(3):
        assert list((tmp_path / "example.test" / f"user{n}" / "Maildir" / "tmp").iterdir()) == []


def test_a_mailbox_removed_while_running_is_created_again(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    delivery = MaildirDelivery(mail)

    async def once() -> DeliveryResult:
        return await delivery.deliver("bob@example.test", "", chunks(MESSAGE))

    assert asyncio.run(once()).status is DeliveryStatus.DELIVERED
    maildir = mail / "example.test" / "bob" / "Maildir"
    for p in files(maildir):
        p.unlink()
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).rmdir()
    assert asyncio.run(once()).status is DeliveryStatus.DELIVERED
    assert len(list((maildir / "new").iterdir())) == 1


def test_shared_directory_sync_reports_errors_to_every_caller(tmp_path: Path) -> None:
    """A failing directory fsync raises in each thread that needed it,
    instead of leaving any of them waiting."""
    import threading

    from postwarden.storage.spool import DirSyncer

    syncer = DirSyncer()
    errors: list[BaseException] = []

    def call(path: Path) -> None:
        try:
            syncer.sync(path)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(tmp_path / "gone",)) for _ in range(20)]
    threads += [threading.Thread(target=call, args=(tmp_path,)) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 20
    assert all(isinstance(e, FileNotFoundError) for e in errors)
