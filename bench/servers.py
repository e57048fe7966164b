"""The servers under test: a private Postfix instance, postwarden, smtp-sink.

Everything listens on 127.0.0.1 on ports the kernel picks, in a work
directory of its own, and is stopped by process group (each server leads its
own session).  Nothing does DNS: Postfix has ``disable_dns_lookups`` and
``smtp_dns_support_level = disabled`` and only literal ``[127.0.0.1]:port``
next hops; postwarden only has ``smtp:[127.0.0.1]:port`` transports.

Modes (the same for both servers):

- ``hold``: accept only.  Postfix puts every message in its hold queue
  (``smtpd_client_restrictions = check_client_access
  inline:{127.0.0.1=HOLD}``); postwarden runs with ``[queue] workers = 0``.
  The recipient is ``sink@sink.test``.
- ``relay``: both relay every message over SMTP to their own smtp-sink.
  Postfix: ``relay_domains = sink.test``, ``transport_maps =
  inline:{sink.test=smtp:[127.0.0.1]:PORT}``; postwarden: ``sink.test`` is
  a local domain with the account ``sink@sink.test`` and ``[transports]
  "sink.test" = "smtp:[127.0.0.1]:PORT"``.
- ``maildir``: both deliver to a Maildir: Postfix with virtual(8) (as
  tests/peers/postfix.py does), postwarden with its own Maildir delivery.
  The recipient is ``sink@example.test``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from bench import procs
from postwarden.workers import process_count

HOST = "127.0.0.1"
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
START_TIMEOUT = 30.0
# postwarden has finished starting when its processes are idle: less than
# SETTLED_CPU seconds of CPU (two clock ticks) in SETTLE_WINDOW seconds.
SETTLE_WINDOW = 0.25
SETTLED_CPU = 0.025
STOP_TIMEOUT = 15.0
NOFILE = 65536  # the fd limit the servers get (idle-sessions test)
POSTFIX_PACKAGES = ("postfix",)

RCPT = {"hold": "sink@sink.test", "relay": "sink@sink.test", "maildir": "sink@example.test"}


class BenchError(RuntimeError):
    pass


# Every process group started and not yet stopped, so that a last cleanup
# (bench.compare's finally) can stop what an interrupted cleanup left behind.
STARTED: set[int] = set()


def stop_all() -> None:
    for pgid in list(STARTED):
        stop_group(pgid, grace=5.0)


# -- helpers -------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    path = shutil.which(name)
    if path:
        return path
    for d in SBIN_DIRS:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def ensure_postfix(install: bool) -> dict[str, str]:
    """Paths of postfix, postconf, postsuper, smtp-source and smtp-sink.

    When they are missing and ``install`` is set, installs Debian's postfix
    package the way .ci/run does: "No configuration", so that no system
    Postfix is set up or started on port 25.
    """
    names = ("postfix", "postconf", "smtp-source", "smtp-sink")
    tools = {n: find_tool(n) for n in names}
    if not all(tools.values()) and install and os.geteuid() == 0 and find_tool("apt-get"):
        print("bench: installing Postfix (Debian package, no configuration) ...", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["debconf-set-selections"], check=True, env=env, timeout=60,
                       input=b"postfix postfix/main_mailer_type select No configuration\n")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", *POSTFIX_PACKAGES], check=True,
                       env=env, timeout=900, stdout=subprocess.DEVNULL)
        tools = {n: find_tool(n) for n in names}
    missing = [n for n, p in tools.items() if p is None]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: install Debian's postfix package "
                         "(apt-get install postfix, 'No configuration')")
    return {n: str(p) for n, p in tools.items()}


def tool_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p]
    parts += [d for d in (*SBIN_DIRS, "/usr/bin", "/bin") if d not in parts]
    env["PATH"] = os.pathsep.join(parts)
    return env


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port free now, for a server started later, and not handed
    out before by this process.  Taken below the kernel's ephemeral range:
    a port the kernel picks for a bind to port 0 can be picked again
    before the server binds it (a postwarden whose mx and submission
    listeners got the same port), or become the local port of a client
    connection (smtp-source's, the sink's)."""
    low = _ephemeral_low()
    while True:
        want = random.randrange(10000, low) if low > 11000 else 0
        with socket.socket() as s:
            try:
                s.bind((HOST, want))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def greeting(port: int, timeout: float = 2.0) -> bytes | None:
    """The first line the server at ``port`` sends, or None."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.settimeout(timeout)
            line = s.recv(512)
            with contextlib.suppress(OSError):
                s.sendall(b"QUIT\r\n")
            return line
    except OSError:
        return None


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def stop_group(pgid: int | None, first: signal.Signals = signal.SIGTERM,
               grace: float = STOP_TIMEOUT) -> None:
    """Signal a process group and wait until no live process is left in it;
    SIGKILL it after ``grace`` seconds."""
    if pgid is None:
        return
    for sig, wait in ((first, grace), (signal.SIGKILL, 5.0)):
        if not procs.live_members(pgid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        if wait_until(lambda: not procs.live_members(pgid), wait):
            break
    STARTED.discard(pgid)


def raise_nofile(need: int = NOFILE) -> None:
    """Raise this process's fd limit to ``need`` (root may raise the hard
    limit too), or at least to the hard limit.  Also the preexec_fn of the
    servers (postwarden's default limit would cap the idle-sessions test)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(need, hard)))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def maildir_count(maildir: Path) -> int:
    n = 0
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            n += len(os.listdir(maildir / sub))
    return n


def parse_setting(item: str) -> tuple[str, str, str]:
    """``TABLE.KEY=VALUE`` (a TOML value; no table: a top-level key) as the
    (table, key, value) that PostwardenServer's ``settings`` take."""
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise ValueError(f"{item!r} is not TABLE.KEY=VALUE")
    table, _, key = name.rpartition(".")
    return table, key, value


def toml_set(text: str, table: str, key: str, value: str) -> str:
    """Set ``key = value`` (a TOML literal) in ``[table]`` of a config file.

    When the table exists, the line is inserted just below its header and a
    former assignment of the key in that table is commented out; otherwise
    the table is appended.  The result is parsed to check the key took.
    """
    header = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines)
                  if (m := header.match(line)) and m.group(1) == table), None)
    if start is None:
        lines += ["", f"[{table}]", f"{key} = {value}  # set by bench/"]
    else:
        end = next((i for i in range(start + 1, len(lines))
                    if lines[i].lstrip().startswith("[")), len(lines))
        assign = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for i in range(start + 1, end):
            if assign.match(lines[i]):
                lines[i] = "# (overridden by bench/) " + lines[i]
        lines.insert(start + 1, f"{key} = {value}  # set by bench/")
    result = "\n".join(lines) + "\n"
    node = tomllib.loads(result)
    for part in table.split("."):
        node = node[part]
    want = tomllib.loads(f"x = {value}")["x"]
    got = node[tomllib.loads(f"{key} = 0").popitem()[0]]
    if got != want:
        raise BenchError(f"could not set [{table}] {key} = {value} in the config")
    return result


# -- smtp-sink -------------------------------------------------------------------


class Sink:
    """smtp-sink on 127.0.0.1:PORT, counting messages (``-c``): the
    counters are read from its output file, ``mesg=N`` being the number of
    messages whose final "." it acknowledged."""

    def __init__(self, workdir: Path, tool: str) -> None:
        self.workdir = workdir
        self.tool = tool
        self.port = free_port()
        self.out = workdir / "smtp-sink.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sink:
        self.workdir.mkdir(parents=True, exist_ok=True)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [self.tool, *user, "-c", f"{HOST}:{self.port}", "1024"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=tool_env())
        STARTED.add(self.proc.pid)
        if not wait_until(lambda: greeting(self.port) is not None, START_TIMEOUT):
            self.stop()
            raise BenchError(f"smtp-sink does not answer on port {self.port}")
        return self

    def count(self) -> int:
        try:
            with self.out.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256))
                tail = f.read()
        except OSError:
            return 0
        found = re.findall(rb"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc.pid, grace=3.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self.proc = None


# -- Postfix -------------------------------------------------------------------

_MASTER_SERVICES = """\
pickup    unix  n - n 60 1 pickup
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
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixServer:
    """A private Postfix: own config, queue, data and mail directories under
    ``workdir``, master.cf as Debian ships it minus chroot, smtpd on
    127.0.0.1:PORT.  Started with ``postfix -c CONFDIR start`` (as root)."""

    name = "postfix"

    def __init__(self, workdir: Path, mode: str, tools: dict[str, str],
                 sink_port: int | None = None, tls: tuple[Path, Path] | None = None) -> None:
        self.workdir = workdir
        self.mode = mode
        self.tools = tools
        self.sink_port = sink_port
        self.tls = tls
        self.port = free_port()
        self.conf = workdir / "conf"
        self.queue = workdir / "queue"
        self.data = workdir / "data"
        self.mail = workdir / "mail"
        self.log_path = workdir / "maillog"
        self.pgid: int | None = None
        self.mail_user = pwd.getpwnam("nobody")

    @property
    def maildir(self) -> Path:
        return self.mail / "example.test" / "sink"

    def main_cf(self) -> dict[str, str]:
        p = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix.bench.test",
            "mydomain": "bench.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "inet_interfaces": HOST,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_banner": "$myhostname ESMTP",
            # No DNS, ever.
            "disable_dns_lookups": "yes",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "relayhost": "",
            "default_transport": "error:5.4.4 the bench instance delivers nowhere else",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.workdir),
            # Like postwarden's mx listener: accept only known recipients of
            # our domains, relay for nobody.
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            "relay_domains": "sink.test",
            "relay_recipient_maps": "inline:{sink@sink.test=ok}",
            "virtual_mailbox_domains": "example.test",
            "virtual_mailbox_base": str(self.mail),
            "virtual_mailbox_maps": "inline:{sink@example.test=example.test/sink/}",
            "virtual_uid_maps": f"static:{self.mail_user.pw_uid}",
            "virtual_gid_maps": f"static:{self.mail_user.pw_gid}",
            "virtual_minimum_uid": "1",
            "smtpd_tls_security_level": "none",
        }
        if self.mode == "hold":
            p["smtpd_client_restrictions"] = "check_client_access inline:{127.0.0.1=HOLD}"
            p["transport_maps"] = "inline:{sink.test=discard:held}"
        elif self.mode == "relay":
            p["transport_maps"] = f"inline:{{sink.test=smtp:[{HOST}]:{self.sink_port}}}"
        if self.tls is not None:
            cert, key = self.tls
            p.update({"smtpd_tls_security_level": "may",
                      "smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(key)})
        return p

    def _write_config(self) -> None:
        for d in (self.conf, self.queue, self.data, self.mail):
            d.mkdir(parents=True, exist_ok=True)
        self.conf.chmod(0o755)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data, postfix_user.pw_uid, postfix_user.pw_gid)
        self.data.chmod(0o700)
        os.chown(self.mail, self.mail_user.pw_uid, self.mail_user.pw_gid)
        (self.conf / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in self.main_cf().items()))
        (self.conf / "master.cf").write_text(
            f"{HOST}:{self.port} inet n - n - - smtpd\n" + _MASTER_SERVICES)
        # Postfix rereads config files younger than a second ("file may
        # still be changing"), dozing 0.3 s a time; backdated ones load at once.
        past = time.time() - 60
        for path in self.conf.iterdir():
            os.utime(path, (past, past))

    def _postfix(self, *args: str) -> tuple[int, str]:
        out_path = self.workdir / f"postfix-{args[0]}.out"
        with out_path.open("wb") as out:
            rc = subprocess.run([self.tools["postfix"], "-c", str(self.conf), *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=tool_env(), timeout=START_TIMEOUT, check=False).returncode
        return rc, out_path.read_text(errors="replace")

    def start(self) -> PostfixServer:
        if os.geteuid() != 0:
            raise BenchError("a private Postfix instance must be started as root")
        self._write_config()
        try:
            rc, output = self._postfix("start")
        finally:
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.pgid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
                STARTED.add(self.pgid)
        if rc != 0 or self.pgid is None:
            self.stop()
            raise BenchError(f"postfix start failed ({rc}):\n{output}\n{self.log_tail()}")
        if not wait_until(lambda: (greeting(self.port) or b"").startswith(b"220"),
                          START_TIMEOUT):
            self.stop()
            raise BenchError(f"postfix does not greet on port {self.port}:\n{self.log_tail()}")
        return self

    def stop(self) -> None:
        # master(8) passes SIGTERM on to its children ("postfix stop" does
        # the same through a shell script); leftovers get SIGKILL.
        pgid, self.pgid = self.pgid, None
        stop_group(pgid)

    def accepted(self) -> int:
        """Messages in the hold queue."""
        return sum(1 for p in (self.queue / "hold").rglob("*") if p.is_file())

    def delivered(self) -> int:
        return maildir_count(self.maildir)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no maillog)"
        return "\n".join(text.splitlines()[-lines:])


# -- postwarden ------------------------------------------------------------------


def postwarden_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("postwarden")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "postwarden"]


def make_postwarden_template(directory: Path, env: Mapping[str, str] | None = None) -> Path:
    """``postwarden init`` once, plus the bench's domain and accounts;
    every run starts from a copy of this directory (a fresh, empty queue).
    ``env``: the commands' environment (``PYTHONPATH`` of another version
    of the code, which then creates the database files itself)."""
    pw = postwarden_cmd()

    def run(*args: str, stdin: bytes | None = None) -> None:
        r = subprocess.run([*pw, *args], input=stdin, capture_output=True, timeout=120,
                           check=False, env=env)
        if r.returncode != 0:
            raise BenchError(f"postwarden {' '.join(args)} failed: "
                             f"{r.stderr.decode(errors='replace')}")

    run("init", "--non-interactive", "--dir", str(directory), "--domain", "example.test",
        "--hostname", "mail.example.test", "--listen-host", HOST,
        "--mx-port", str(free_port()), "--submission-port", str(free_port()),
        "--submissions-port", str(free_port()))
    cfg = str(directory / "postwarden.toml")
    run("-c", cfg, "domain", "add", "sink.test")
    for address in ("sink@sink.test", "sink@example.test"):
        run("-c", cfg, "user", "add", address, "--password-stdin",
            stdin=b"bench-password-not-secret\n")
    return directory


class PostwardenServer:
    """``postwarden serve`` from a copy of the template directory, with the
    generated TOML edited: fresh listener ports, the mode's settings, the
    loopback DNS stub as resolver, and the log to a file in the run
    directory (at the default level unless ``log_level`` is given).
    ``checks=False`` turns off SPF/DKIM/ARC/DMARC verification."""

    name = "postwarden"

    def __init__(self, workdir: Path, mode: str, template: Path, dns_port: int,
                 sink_port: int | None = None, log_level: str | None = None,
                 checks: bool = True, wrapper: Sequence[str] = (),
                 env: Mapping[str, str] | None = None,
                 settings: Sequence[tuple[str, str, str]] = ()) -> None:
        self.workdir = workdir
        self.mode = mode
        self.template = template
        self.dns_port = dns_port
        self.sink_port = sink_port
        self.log_level = log_level
        self.checks = checks
        # ``wrapper``: a command that runs ``postwarden serve`` (valgrind, a
        # profiler); ``env``: its environment; ``settings``: (table, key,
        # TOML value) set last ("" as table: a top-level key).
        self.wrapper = list(wrapper)
        self.env = dict(env) if env is not None else None
        self.settings = list(settings)
        self.port = free_port()
        self.cfg = workdir / "postwarden.toml"
        self.pgid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def maildir(self) -> Path:
        return self.workdir / "data" / "mail" / "example.test" / "sink" / "Maildir"

    def _configure(self) -> None:
        shutil.copytree(self.template, self.workdir)
        text = self.cfg.read_text()
        text = toml_set(text, "listeners.mx", "address", f'"{HOST}:{self.port}"')
        text = toml_set(text, "listeners.submission", "address", f'"{HOST}:{free_port()}"')
        text = toml_set(text, "listeners.submissions", "address", f'"{HOST}:{free_port()}"')
        text = toml_set(text, "log", "file", '"postwarden.log"')
        # Every DNS query goes to the bench's loopback stub (bench.dnsstub).
        text = toml_set(text, "dns", "nameservers", f'["{HOST}:{self.dns_port}"]')
        # The load comes from one loopback address: like Postfix, which exempts
        # $mynetworks from its client limits (smtpd_client_event_limit_exceptions),
        # lift the per-client and total connection limits for the bench.
        text = toml_set(text, "connections", "max_per_ip", "0")
        text = toml_set(text, "connections", "max_total", "0")
        if not self.checks:
            text = toml_set(text, "checks", "verify", "false")
        if self.log_level:
            text = toml_set(text, "log", "level", f'"{self.log_level}"')
        if self.mode == "hold":
            text = toml_set(text, "queue", "workers", "0")
        elif self.mode == "relay":
            text = toml_set(text, "transports", '"sink.test"',
                            f'"smtp:[{HOST}]:{self.sink_port}"')
        for table, key, value in self.settings:
            if table:
                text = toml_set(text, table, key, value)
            else:  # top-level keys come before the first table
                text = f"{key} = {value}  # set by bench/\n{text}"
        self.cfg.write_text(text)

    def start(self, timeout: float = START_TIMEOUT,
              settled_cpu: float = SETTLED_CPU) -> PostwardenServer:
        self._configure()
        with (self.workdir / "serve.out").open("wb") as out:
            self.proc = subprocess.Popen(
                [*self.wrapper, *postwarden_cmd(), "-c", str(self.cfg), "serve"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=raise_nofile, env=self.env)
        self.pgid = self.proc.pid
        STARTED.add(self.pgid)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"postwarden exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
            return (greeting(self.port) or b"").startswith(b"220")

        if not wait_until(ready, timeout):
            self.stop()
            raise BenchError(f"postwarden does not greet on port {self.port}:\n"
                             f"{self.log_tail()}")
        # The main process greets as soon as it listens; each worker then
        # starts, imports and opens the stores on its own, for most of a
        # second of CPU.  Measuring from the first greeting would count that
        # start-up as the load's CPU, and give the load one process instead
        # of all of them for as long.  So wait until every process exists and
        # the server has gone idle (whatever its log level).
        want = self.expected_processes()
        if not wait_until(lambda: self.settled(want, settled_cpu), timeout, 0):
            self.stop()
            raise BenchError(f"postwarden did not settle with {want} processes:\n"
                             f"{self.log_tail()}")
        return self

    def expected_processes(self) -> int:
        """The processes the config asks for (``processes``, default "auto")."""
        setting = tomllib.loads(self.cfg.read_text()).get("processes", "auto")
        return process_count(setting if isinstance(setting, int) else 0)

    def settled(self, want: int, settled_cpu: float = SETTLED_CPU) -> bool:
        """``want`` processes run, and together they used less than
        ``settled_cpu`` seconds of CPU over the last SETTLE_WINDOW seconds."""
        assert self.pgid is not None
        before = procs.group_cpu(self.pgid)
        time.sleep(SETTLE_WINDOW)
        return (len(procs.live_members(self.pgid)) >= want
                and procs.group_cpu(self.pgid) - before < settled_cpu)

    def stop(self) -> None:
        pgid, self.pgid = self.pgid, None
        stop_group(pgid)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self.proc = None

    def accepted(self) -> int:
        """Messages in the queue (``postwarden queue list --json``)."""
        r = subprocess.run([*postwarden_cmd(), "-c", str(self.cfg), "queue", "list", "--json",
                            "--limit", "10000000"], capture_output=True, timeout=120,
                           check=False)
        if r.returncode != 0:
            raise BenchError(f"postwarden queue list failed: {r.stderr.decode()}")
        return len(json.loads(r.stdout))

    def delivered(self) -> int:
        return maildir_count(self.maildir)

    def log_tail(self, lines: int = 30) -> str:
        chunks = []
        for name in ("serve.out", "postwarden.log"):
            with contextlib.suppress(OSError):
                text = (self.workdir / name).read_text(errors="replace")
                chunks.append("\n".join(text.splitlines()[-lines:]))
        return "\n".join(chunks) or "(no log)"
