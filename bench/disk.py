"""The filesystem the bench's servers write to: an ext4 image with a journal,
loop-mounted, so that every machine measures the same kind of storage.

Both servers create, fsync, rename and delete files for every message
(Postfix a queue file per message and a file per Maildir delivery,
postwarden a spool file per large message and a file per Maildir
delivery), so what the filesystem charges for that is part of every
figure.  The machines the bench has run on have their root filesystem as
ext4 *without* a journal.  There, creating a file costs from 15 us to
over 800 us of kernel time: without a journal, ext4 will not reuse an
inode freed less than 60 seconds ago (360 while its inode table block is
unwritten), and ``find_inode_bit`` looks at every such inode of the
directory's block group in turn (``recently_deleted`` in fs/ext4/ialloc.c).
A server that creates and deletes a file per message, and a bench that
deletes each run's directory before the next run starts, fill the block
group with such inodes.  The cost then depends on what ran before, and it
has nothing to do with the storage a mail server has in practice (ext4
and XFS with a journal, where the check does not apply).

So by default (``--disk image``) the bench makes a sparse file in
``/var/tmp``, formats it with ``mkfs.ext4`` defaults (journal, ordered
data), attaches it to a loop device with direct I/O (no second page cache;
an fsync on the image reaches the disk below) and runs every server in it.
``--disk tmp`` runs in ``$TMPDIR`` instead, as earlier runs did.  Either
way the report names the filesystem, whether it has a journal, and what
creating a file there costs (:func:`creation_cost`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

IMAGE_SIZE = "8G"  # sparse; a full run writes well under 1 GB at a time
IMAGE_DIR = Path("/var/tmp")
CREATE_SAMPLES = 300


class DiskError(RuntimeError):
    """The image could not be made or mounted (the message says why)."""


def _run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    if r.returncode != 0:
        raise DiskError(f"{' '.join(cmd)}: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout.decode().strip()


@contextlib.contextmanager
def ext4_image(image_dir: Path = IMAGE_DIR) -> Iterator[Path]:
    """A freshly formatted, loop-mounted ext4 image; yields its mount point.
    Unmounted, detached and deleted on exit, errors included."""
    for tool in ("mkfs.ext4", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            raise DiskError(f"{tool} not found")
    image = Path(tempfile.mkstemp(prefix="postwarden-bench-", suffix=".ext4",
                                  dir=image_dir)[1])
    # Short: the servers' Unix sockets live below it (AF_UNIX paths have
    # room for 107 bytes).
    mount_point = Path(tempfile.mkdtemp(prefix="pwb-"))
    device = ""
    mounted = False
    try:
        _run("truncate", "-s", IMAGE_SIZE, str(image))
        _run("mkfs.ext4", "-q", "-F", "-L", "pw-bench", str(image))
        device = _run("losetup", "--find", "--show", "--direct-io=on", str(image))
        _run("mount", device, str(mount_point))
        mounted = True
        mount_point.chmod(0o755)
        yield mount_point
    finally:
        if mounted:
            with contextlib.suppress(DiskError):
                _run("umount", str(mount_point))
        if device:
            with contextlib.suppress(DiskError):
                _run("losetup", "--detach", device)
        with contextlib.suppress(OSError):
            mount_point.rmdir()
        with contextlib.suppress(OSError):
            image.unlink()


@contextlib.contextmanager
def workspace(choice: str, name: str) -> Iterator[Path]:
    """A new directory for a bench's servers, removed on exit: in an ext4
    image (``choice`` "image"), or in ``$TMPDIR`` ("tmp", or when the image
    cannot be made, which is said on stderr; ``name`` prefixes the note)."""
    with contextlib.ExitStack() as stack:
        base = None
        if choice == "image":
            try:
                base = stack.enter_context(ext4_image())
            except DiskError as e:
                print(f"{name}: no ext4 image ({e}); running in {tempfile.gettempdir()}",
                      file=sys.stderr)
        if base is not None:  # a new filesystem: nothing else in it
            root = base / name
            root.mkdir()
        else:
            root = Path(tempfile.mkdtemp(prefix=f"postwarden-{name}-"))
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _source(path: Path) -> tuple[str, str]:
    """(filesystem type, device) of the mount holding ``path``."""
    best = ("", "?", "?")
    real = str(path.resolve())
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        point = left.split()[4]
        fstype, source = right.split()[:2]
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fstype, source)
    return best[1], best[2]


def _journal(fstype: str, source: str) -> str:
    """Whether the filesystem on ``source`` has a journal: "yes", "no", or
    "" when that cannot be told (not ext4)."""
    if fstype != "ext4":
        return ""
    task = Path("/sys/fs/ext4") / Path(source).name / "journal_task"
    with contextlib.suppress(OSError):
        return "no" if task.read_text().strip() == "<none>" else "yes"
    return ""


def creation_cost(directory: Path, samples: int = CREATE_SAMPLES) -> float:
    """Median seconds to create an empty file in a new directory below
    ``directory`` (the directory and its files are removed again)."""
    probe = Path(tempfile.mkdtemp(prefix="create-probe-", dir=directory))
    times = []
    try:
        for n in range(samples):
            start = time.perf_counter()
            fd = os.open(probe / str(n), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            times.append(time.perf_counter() - start)
            os.close(fd)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return statistics.median(times)


def describe(directory: Path) -> str:
    """The filesystem of ``directory`` for the report: type, device,
    journal, and the cost of creating a file there."""
    fstype, source = _source(directory)
    has_journal = _journal(fstype, source)
    parts = [f"{fstype} on {source}"]
    if has_journal:
        parts.append("with a journal" if has_journal == "yes" else "without a journal")
    parts.append(f"creating a file {creation_cost(directory) * 1e6:.0f} us (median)")
    return ", ".join(parts)
