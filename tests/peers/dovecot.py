"""A private Dovecot serving LMTP as a test peer (the final delivery hop).

Started with ``dovecot -c WORKDIR/dovecot.conf``; base_dir (sockets, pid
file), state_dir, log and mail all live under the work directory, so it never
meets the system Dovecot. Only the lmtp protocol runs: one TCP listener on
127.0.0.1:PORT and one unix socket (``socket_path``). Each recipient gets
``WORKDIR/mail/<domain>/<local>/Maildir`` (lowercased, as Dovecot's default
auth_username_format %Lu does).

With ``users=None`` every address is accepted (static userdb); with a list of
users, anyone else is refused at RCPT with 550 5.1.1 (passwd-file userdb).

SECURITY: runs Dovecot's master as root (LMTP switches to the mail uid);
mail is written as ``mail_user`` (default ``nobody``). Anyone on the machine
may deliver through the loopback port or the world-writable socket.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from tests.peers import (
    HOST,
    POLL_INTERVAL,
    START_TIMEOUT,
    UNIX_PATH_MAX,
    LoopbackPeer,
    PeerError,
    accepts_connections,
    find_tool,
    free_port,
    is_running,
    log_tail,
    lower_all,
    maildir_files,
    make_traversable,
    read_pid,
    stop_group,
    tool_env,
    wait_until,
)

DEFAULT_HOSTNAME = "lmtp.remote.test"
# The longest socket name Dovecot creates in base_dir ("replication-notify-fifo").
_LONGEST_SOCKET_NAME = 24
# After SIGTERM the master waits a second for its log process before it
# exits. Delivered mail is already committed (LMTP answers after saving), so
# the group gets SIGTERM after this grace and SIGKILL after as long again.
STOP_GRACE = 0.2


class DovecotLmtpPeer(LoopbackPeer):
    """A private Dovecot LMTP server on 127.0.0.1 and a unix socket.

    ``users``: the only recipients accepted (None: everyone).
    ``hostname``: the name Dovecot uses in its greeting and Received header.
    ``extra_conf``: dovecot.conf text appended last (it overrides).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        users: Iterable[str] | None = None,
        hostname: str = DEFAULT_HOSTNAME,
        extra_conf: str = "",
        mail_user: str = "nobody",
        dovecot: str | None = None,
    ) -> None:
        super().__init__()
        self.workdir = Path(workdir).absolute()
        self.users = None if users is None else lower_all(users)
        self.hostname = hostname
        self.extra_conf = extra_conf
        self.mail_user = pwd.getpwnam(mail_user)
        self.dovecot = dovecot or find_tool("dovecot")
        self.config_path = self.workdir / "dovecot.conf"
        self.base_dir = self.workdir / "run"
        self.state_dir = self.workdir / "state"
        self.mail_dir = self.workdir / "mail"
        self.users_path = self.workdir / "users"
        self.log_path = self.workdir / "dovecot.log"
        self.socket_path = str(self.base_dir / "lmtp")

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> DovecotLmtpPeer:
        if self.dovecot is None:
            raise PeerError("dovecot is not installed")
        if os.geteuid() != 0:
            raise PeerError("a private Dovecot instance must be started as root")
        if len(str(self.base_dir)) + 1 + _LONGEST_SOCKET_NAME > UNIX_PATH_MAX:
            raise PeerError(f"base_dir {self.base_dir} is too long for unix socket paths")
        self._stop_leftover()
        self._prepare_dirs()
        self._port = free_port()
        self._write_config()
        # Output goes to a file, not a pipe: the daemonized master keeps the
        # inherited descriptors, so reading a pipe to EOF would hang.
        out_path = self.workdir / "start.out"
        try:
            with out_path.open("wb") as out:
                rc = subprocess.run([self.dovecot, "-c", str(self.config_path)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env=tool_env(), timeout=START_TIMEOUT,
                                    check=False).returncode
        finally:
            # The master writes its pid file after it forked into the
            # background, which may be just after "dovecot" returned.
            pid_file = self.base_dir / "master.pid"
            wait_until(lambda: read_pid(pid_file) is not None, START_TIMEOUT)
            self._pgid = read_pid(pid_file)
        if rc != 0 or self._pgid is None:
            self.stop()
            raise PeerError(f"dovecot failed to start ({rc}):\n"
                            f"{out_path.read_text(errors='replace')}\n{log_tail(self.log_path)}")
        ready = wait_until(lambda: accepts_connections(self.address)
                           and accepts_connections(self.socket_path), START_TIMEOUT)
        if not ready:
            self.stop()
            raise PeerError(f"dovecot does not accept LMTP:\n{log_tail(self.log_path)}")
        return self

    def stop(self) -> None:
        """Stop the master (SIGTERM), wait until none of its processes is left."""
        pgid = self._pgid
        self._pgid = None
        if pgid is not None:
            stop_group(pgid, lambda: os.kill(pgid, signal.SIGTERM), grace=STOP_GRACE,
                       term_grace=STOP_GRACE)

    def _stop_leftover(self) -> None:
        pid = read_pid(self.base_dir / "master.pid")
        if pid is not None and is_running(pid):
            stop_group(pid, lambda: os.kill(pid, signal.SIGTERM), grace=STOP_GRACE,
                       term_grace=STOP_GRACE)

    # -- configuration -----------------------------------------------------

    def _prepare_dirs(self) -> None:
        for d in (self.base_dir, self.state_dir, self.mail_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Dovecot's unprivileged processes (auth as "dovecot", lmtp as the
        # mail uid) reach base_dir and the Maildirs by absolute path.
        os.chown(self.mail_dir, self.mail_user.pw_uid, self.mail_user.pw_gid)
        make_traversable(self.mail_dir)
        make_traversable(self.base_dir)

    def _userdb(self) -> str:
        uid, gid = self.mail_user.pw_uid, self.mail_user.pw_gid
        home = f"{self.mail_dir}/%d/%n"
        if self.users is None:
            return (f"userdb {{\n  driver = static\n"
                    f"  args = uid={uid} gid={gid} home={home} allow_all_users=yes\n}}\n")
        # passwd-file: user:password:uid:gid:gecos:home:shell:extra; the
        # empty fields come from default_fields (which expands %d/%n).
        self.users_path.write_text("".join(f"{u}:::::::\n" for u in self.users))
        return (f"userdb {{\n  driver = passwd-file\n  args = {self.users_path}\n"
                f"  default_fields = uid={uid} gid={gid} home={home}\n}}\n")

    def _write_config(self) -> None:
        w = self.workdir
        text = f"""\
# Private Dovecot for postwarden tests: LMTP only, loopback only.
base_dir = {self.base_dir}
state_dir = {self.state_dir}
instance_name = postwarden-test-{os.getpid()}-{self._port}
protocols = lmtp
listen = {HOST}
hostname = {self.hostname}
postmaster_address = postmaster@{self.hostname}
log_path = {self.log_path}
info_log_path = {self.log_path}
ssl = no
auth_mechanisms = plain
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:{w}/mail/%d/%n/Maildir
# LMTP only does userdb lookups, but auth refuses to start without a passdb.
passdb {{
  driver = static
  args = nopassword=y
}}
{self._userdb()}
service lmtp {{
  inet_listener lmtp {{
    address = {HOST}
    port = {self._port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
{self.extra_conf}
"""
        self.config_path.write_text(text)

    # -- inspection ----------------------------------------------------------

    def maildir(self, address: str) -> Path:
        local, _, domain = address.lower().rpartition("@")
        if not local:
            raise ValueError(f"{address!r} is not local@domain")
        return self.mail_dir / domain / local / "Maildir"

    def messages(self, address: str) -> list[bytes]:
        """Messages delivered to ``address``'s INBOX, oldest first, as stored
        (with Return-Path/Delivered-To/Received prepended)."""
        return [p.read_bytes() for p in maildir_files(self.maildir(address))]

    def wait_for_messages(self, address: str, count: int = 1,
                          timeout: float = 10.0) -> list[bytes]:
        """At least ``count`` messages for ``address``; PeerError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(address)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise PeerError(f"{len(found)} of {count} messages for {address} after "
                                f"{timeout}s; log:\n{log_tail(self.log_path)}")
            time.sleep(POLL_INTERVAL)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
