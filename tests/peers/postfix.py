"""A private Postfix instance as a test peer (remote MX or upstream relay).

The instance has its own config, queue and data directories under the work
directory and is started with ``postfix -c CONFDIR start``; the system Postfix
(if any) is neither used nor touched. It listens on 127.0.0.1:PORT only, does
no DNS lookups and delivers nowhere but its Maildirs: mail for its domains goes
through virtual(8) into ``WORKDIR/mail/<domain>/`` (one Maildir per domain,
every local part accepted); mail for any other domain is bounced by the error
transport unless ``routes`` sends it to a loopback next hop.

Messages are told apart by the ``Delivered-To:`` header that virtual(8)
prepends: Postfix forbids regexp substitution in virtual_mailbox_maps (a
security rule), so per-local-part Maildirs would need every user listed.

SECURITY: runs Postfix's master as root (it must); the mail is written as
``mail_user`` (default ``nobody``). Anyone on the machine may connect to the
loopback port; mynetworks lets them relay, but only to the routes given.
"""

from __future__ import annotations

import email.parser
import email.policy
import os
import pwd
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from tests.peers import (
    HOST,
    POLL_INTERVAL,
    START_TIMEOUT,
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

DEFAULT_DOMAIN = "remote.test"
DEFAULT_HOSTNAME = "mx.remote.test"
REJECT_REPLY = "550 5.1.1 no such user here"
TEMPFAIL_REPLY = "450 4.2.1 mailbox busy, try again later"

# The services a delivering, non-chrooted instance needs; "smtpd" is added
# with the listener address. Columns: service type private unpriv chroot
# wakeup maxproc command.
_MASTER_SERVICES = """\
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
virtual   unix  - n n - - virtual
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixPeer(LoopbackPeer):
    """A private Postfix on 127.0.0.1 delivering to Maildirs under ``workdir``.

    ``domains``: domains accepted for local (virtual) delivery; the first is
    the default for ``messages("localpart")``.
    ``tls``: (cert_file, key_file) to offer STARTTLS; ``tls_level`` is
    smtpd_tls_security_level ("may", or "encrypt" to require it).
    ``reject`` / ``tempfail``: recipients refused at RCPT with
    REJECT_REPLY (550) / TEMPFAIL_REPLY (450); ``recipient_replies`` maps a
    recipient to any other "NNN text" reply.
    ``routes``: domain -> transport:nexthop, for example
    ``{"example.test": "smtp:[127.0.0.1]:2525"}`` or ``"lmtp:inet:127.0.0.1:24"``.
    ``main_cf``: extra main.cf parameters, applied last (they override).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        domains: Iterable[str] = (DEFAULT_DOMAIN,),
        hostname: str = DEFAULT_HOSTNAME,
        tls: tuple[Path, Path] | None = None,
        tls_level: str = "may",
        reject: Iterable[str] = (),
        tempfail: Iterable[str] = (),
        recipient_replies: Mapping[str, str] | None = None,
        routes: Mapping[str, str] | None = None,
        main_cf: Mapping[str, str] | None = None,
        mail_user: str = "nobody",
        postfix: str | None = None,
    ) -> None:
        super().__init__()
        self.workdir = Path(workdir).absolute()
        self.domains = lower_all(domains)
        if not self.domains:
            raise ValueError("PostfixPeer needs at least one domain")
        self.hostname = hostname
        self.tls = tls
        self.tls_level = tls_level
        replies = {a: REJECT_REPLY for a in lower_all(reject)}
        replies.update({a: TEMPFAIL_REPLY for a in lower_all(tempfail)})
        replies.update({k.lower(): v for k, v in (recipient_replies or {}).items()})
        self.recipient_replies = replies
        self.routes = dict(routes or {})
        self.main_cf_extra = dict(main_cf or {})
        self.mail_user = pwd.getpwnam(mail_user)
        self.postfix = postfix or find_tool("postfix")
        self.config_dir = self.workdir / "conf"
        self.queue_dir = self.workdir / "queue"
        self.data_dir = self.workdir / "data"
        self.mail_dir = self.workdir / "mail"
        self.log_path = self.workdir / "maillog"

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> PostfixPeer:
        if self.postfix is None:
            raise PeerError("postfix is not installed")
        if os.geteuid() != 0:
            raise PeerError("a private Postfix instance must be started as root")
        self._stop_leftover()
        self._prepare_dirs()
        self._port = free_port()
        self._write_config()
        try:
            rc, output = self._postfix("start")
        finally:
            self._pgid = read_pid(self.queue_dir / "pid" / "master.pid")
        if rc != 0 or self._pgid is None:
            self.stop()
            raise PeerError(f"postfix start failed ({rc}):\n{output}\n{self.log()}")
        # master -w returns once its listeners are bound; connect to be sure.
        if not wait_until(lambda: accepts_connections(self.address), START_TIMEOUT):
            self.stop()
            raise PeerError(f"postfix does not accept on {self.address}:\n{self.log()}")
        return self

    def stop(self) -> None:
        """Stop the instance and wait until none of its processes is left."""
        pgid = self._pgid
        self._pgid = None
        if pgid is not None:
            stop_group(pgid, lambda: self._postfix("stop"))

    def _stop_leftover(self) -> None:
        # A previous run in the same workdir that never stopped its master.
        pid = read_pid(self.queue_dir / "pid" / "master.pid")
        if pid is not None and is_running(pid):
            stop_group(pid, lambda: self._postfix("stop"))

    def _postfix(self, *args: str) -> tuple[int, str]:
        """Run ``postfix -c CONFDIR ARGS``: (exit status, output)."""
        assert self.postfix is not None
        # Output goes to a file, not a pipe, in case a daemon keeps the
        # inherited descriptor (reading the pipe to EOF would then hang).
        out_path = self.workdir / f"postfix-{args[0]}.out"
        with out_path.open("wb") as out:
            rc = subprocess.run([self.postfix, "-c", str(self.config_dir), *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=tool_env(), timeout=START_TIMEOUT, check=False).returncode
        return rc, out_path.read_text(errors="replace")

    # -- configuration -----------------------------------------------------

    def _prepare_dirs(self) -> None:
        for d in (self.config_dir, self.queue_dir, self.data_dir, self.mail_dir):
            d.mkdir(parents=True, exist_ok=True)
        # postfix check wants the config tree root-owned and not group/world
        # writable; data_directory belongs to mail_owner; the queue tree is
        # created by "postfix start" (post-install create-missing).
        self.config_dir.chmod(0o755)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        self.data_dir.chmod(0o700)
        # virtual(8) refuses uid 0 and writes as mail_user through the
        # absolute path, so every ancestor must be searchable.
        os.chown(self.mail_dir, self.mail_user.pw_uid, self.mail_user.pw_gid)
        make_traversable(self.mail_dir)

    def _main_cf(self) -> dict[str, str]:
        conf = self.config_dir
        p: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": self.domains[0],
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "inet_interfaces": HOST,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_banner": "$myhostname ESMTP Postfix (postwarden test peer)",
            # No DNS, ever: literal next hops only, looked up via /etc/hosts.
            "disable_dns_lookups": "yes",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "relayhost": "",
            "default_transport": "error:5.4.4 the test peer delivers nowhere else",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.workdir),
            "virtual_mailbox_domains": ", ".join(self.domains),
            "virtual_mailbox_base": str(self.mail_dir),
            "virtual_mailbox_maps": f"texthash:{conf / 'mailboxes'}",
            "virtual_uid_maps": f"static:{self.mail_user.pw_uid}",
            "virtual_gid_maps": f"static:{self.mail_user.pw_gid}",
            "virtual_minimum_uid": "1",
            "recipient_delimiter": "",
            "smtpd_recipient_restrictions": (
                f"check_recipient_access texthash:{conf / 'recipient_access'}, "
                "permit_mynetworks, reject_unauth_destination"),
            "transport_maps": f"texthash:{conf / 'transport'}",
            # Retry deferred mail quickly; tests never wait minutes.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "5s",
            "smtpd_tls_security_level": "none",
        }
        if self.tls is not None:
            cert, key = self.tls
            p.update({
                "smtpd_tls_security_level": self.tls_level,
                "smtpd_tls_cert_file": str(Path(cert).absolute()),
                "smtpd_tls_key_file": str(Path(key).absolute()),
                "smtpd_tls_received_header": "yes",
                "smtpd_tls_loglevel": "1",
            })
        p.update(self.main_cf_extra)
        return p

    def _write_config(self) -> None:
        conf = self.config_dir
        main = "".join(f"{k} = {v}\n" for k, v in self._main_cf().items())
        (conf / "main.cf").write_text(main)
        smtpd = f"{HOST}:{self._port} inet n - n - - smtpd\n"
        (conf / "master.cf").write_text(smtpd + _MASTER_SERVICES)
        # "@domain" entries catch every local part: one Maildir per domain.
        (conf / "mailboxes").write_text(
            "".join(f"@{d} {d}/\n" for d in self.domains))
        (conf / "recipient_access").write_text(
            "".join(f"{a} {r}\n" for a, r in self.recipient_replies.items()))
        (conf / "transport").write_text(
            "".join(f"{d} {t}\n" for d, t in self.routes.items()))
        # Postfix rereads main.cf and texthash tables until they are more than
        # a second old (dict_load_file: "file may still be changing"), dozing
        # 0.3s per try; backdated files load at once.
        past = time.time() - 60
        for path in conf.iterdir():
            os.utime(path, (past, past))

    # -- inspection ----------------------------------------------------------

    def _address(self, recipient: str) -> str:
        return (recipient if "@" in recipient else f"{recipient}@{self.domains[0]}").lower()

    def messages(self, recipient: str) -> list[bytes]:
        """Messages delivered to ``recipient`` ("local" or "local@domain"),
        oldest first, as stored (with Return-Path/Delivered-To prepended)."""
        address = self._address(recipient)
        domain = address.rpartition("@")[2]
        parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
        found = []
        for path in maildir_files(self.mail_dir / domain):
            data = path.read_bytes()
            delivered_to = parser.parsebytes(data).get("Delivered-To", "")
            if str(delivered_to).strip().lower() == address:
                found.append(data)
        return found

    def wait_for_messages(self, recipient: str, count: int = 1,
                          timeout: float = 10.0) -> list[bytes]:
        """At least ``count`` messages for ``recipient``; PeerError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(recipient)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise PeerError(f"{len(found)} of {count} messages for {recipient} after "
                                f"{timeout}s; maillog:\n{log_tail(self.log_path)}")
            time.sleep(POLL_INTERVAL)

    def log(self) -> str:
        """The instance's maillog (postlogd output) so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        """The maillog once it contains ``needle``; PeerError on timeout."""
        if not wait_until(lambda: needle in self.log(), timeout):
            raise PeerError(f"{needle!r} not logged after {timeout}s:\n{log_tail(self.log_path)}")
        return self.log()

    def queue_ids(self) -> list[str]:
        """Ids of messages still queued (deferred, active, incoming, hold)."""
        ids: list[str] = []
        for sub in ("incoming", "active", "deferred", "hold"):
            d = self.queue_dir / sub
            if d.is_dir():
                ids.extend(p.name for p in d.rglob("*") if p.is_file())
        return sorted(ids)

