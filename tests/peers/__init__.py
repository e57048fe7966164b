"""Real third-party mail servers run as private, loopback-only test peers.

The peers live in their own modules:

- ``tests.peers.postfix.PostfixPeer``: a private Postfix instance (remote MX or
  upstream relay) delivering to Maildirs under its work directory.
- ``tests.peers.dovecot.DovecotLmtpPeer``: a private Dovecot serving LMTP on
  TCP and a unix socket, delivering to Maildirs under its work directory.

Each peer owns one work directory (config, queue, state, mail, log), listens on
127.0.0.1 only, never looks anything up in DNS and never delivers off the
machine. Both need root (Postfix's master and Dovecot's LMTP switch uids);
mail is written by an unprivileged user (``nobody`` unless told otherwise).

This module holds what both peers share: finding the programs (which live in
/usr/sbin, often missing from PATH), picking a free port, waiting for a
listener, reading a Maildir and stopping a daemon's whole process group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
# How long a polite stop may take before the whole group gets SIGTERM.
POLITE_GRACE = 1.0
POLL_INTERVAL = 0.02
# AF_UNIX sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107


class PeerError(RuntimeError):
    """A peer failed to start, stop or deliver; the message quotes its log."""


class LoopbackPeer:
    """What both peers share: a loopback address, the master's process
    group, and use as a context manager (``with Peer(...) as peer``)."""

    def __init__(self) -> None:
        self.host = HOST
        self._port: int | None = None
        self._pgid: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise PeerError(f"{type(self).__name__} is not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def master_pid(self) -> int | None:
        """The master's pid (it leads the process group of the instance)."""
        return self._pgid

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def find_tool(name: str) -> str | None:
    """The path of ``name`` on PATH or in the sbin directories, or None."""
    path = shutil.which(name)
    if path is not None:
        return path
    for directory in SBIN_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def tool_env() -> dict[str, str]:
    """The environment for running a peer's programs: sbin on PATH, no stray
    MAIL_CONFIG/DOVECOT settings from the caller."""
    env = {k: v for k, v in os.environ.items()
           if k != "MAIL_CONFIG" and not k.startswith("DOVECOT")}
    parts = env.get("PATH", "").split(os.pathsep) if env.get("PATH") else []
    for d in (*SBIN_DIRS, "/usr/bin", "/bin"):
        if d not in parts:
            parts.append(d)
    env["PATH"] = os.pathsep.join(parts)
    return env


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (peers need a number in their
    config file; they cannot be handed a bound socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout: float) -> bool:
    """Poll ``predicate`` until it is truthy; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)


def accepts_connections(address: str | tuple[str, int]) -> bool:
    """Whether a TCP (host, port) or unix socket path accepts a connection."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(address)
        except OSError:
            return False
    return True


def make_traversable(path: Path) -> None:
    """Give "others" search (x) permission on ``path`` and its ancestors.

    The peers deliver mail as an unprivileged uid, which must be able to
    reach the Maildir by its absolute path; pytest creates its temporary
    directories with mode 0700. Only search permission is added (no listing),
    and only on directories we own.
    """
    for p in (path, *path.parents):
        st = p.stat()
        if st.st_mode & stat.S_IXOTH:
            continue
        if st.st_uid != os.geteuid():
            raise PeerError(f"{p} is not searchable by other users and not ours to chmod")
        p.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stat_fields(pid: int) -> tuple[str, int] | None:
    """(state, process group) of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may contain spaces and parens.
    rest = raw[raw.rfind(")") + 2:].split()
    return rest[0], int(rest[2])


def is_running(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None and fields[0] != "Z" and fields[1] == pgid:
            members.append(int(entry))
    return members


def stop_group(pgid: int, polite: Callable[[], object], grace: float = POLITE_GRACE,
               term_grace: float = STOP_TIMEOUT) -> None:
    """Stop a daemon whose master leads process group ``pgid``.

    Runs ``polite`` (the daemon's own stop command) and gives the group
    ``grace`` seconds to exit; then SIGTERMs the whole group and waits
    ``term_grace`` seconds (a Dovecot master lingers a second for its log
    process), and finally SIGKILLs whatever is left. Both Postfix and Dovecot
    masters lead their own group (setsid), so the group is exactly the daemon.
    """
    if not group_members(pgid):
        return
    with contextlib.suppress(Exception):
        polite()
    for sig, wait in ((None, grace), (signal.SIGTERM, term_grace), (signal.SIGKILL, STOP_TIMEOUT)):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        if wait_until(lambda: not group_members(pgid), wait):
            return
    raise PeerError(f"processes {group_members(pgid)} of group {pgid} survived SIGKILL")


def maildir_files(maildir: Path) -> list[Path]:
    """Message files of a Maildir (new/ and cur/), oldest first."""
    files: list[Path] = []
    for sub in ("new", "cur"):
        d = maildir / sub
        if d.is_dir():
            files.extend(p for p in d.iterdir() if p.is_file())
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def lower_all(addresses: Iterable[str]) -> list[str]:
    return [a.lower() for a in addresses]
