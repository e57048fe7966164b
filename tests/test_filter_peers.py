"""The external filters against the real daemons, started by the tests:
ClamAV's clamd with a signature database written here (EICAR, no download),
and rspamd 3.x on loopback with its DNS pointed at the loopback DNS server."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import ServerThread, maildir_messages, require_peer, wait_for
from tests.test_filter_e2e import ALICE, inbound
from tests.test_service import free_ports

from postwarden.filter.clamav import ClamavFilter, ClamavSettings
from postwarden.filter.rules import GTUBE
from postwarden.filter.verdict import Action, FilterMessage

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_MD5 = "44d88612fea8a8f36de82e1278abb02f"
START_TIMEOUT = 120.0


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _wait(ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, what: str
          ) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"{what} did not start:\n{tail}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A private clamd: (unix socket address, TCP address)."""
    binary = require_peer("clamd")
    work = tmp_path_factory.mktemp("clamd")
    db = work / "db"
    db.mkdir()
    # The EICAR file's MD5 (a hash signature: the file as a whole, such as
    # a decoded attachment) and its bytes anywhere (a plain message body).
    (db / "test.hdb").write_text(f"{EICAR_MD5}:{len(EICAR)}:Eicar-Test-Signature\n")
    (db / "test.ndb").write_text(f"Eicar-Test-Body:0:*:{EICAR.hex()}\n")
    sock = work / "clamd.sock"
    port = free_ports(1)[0]
    conf = work / "clamd.conf"
    conf.write_text(f"Foreground yes\nLocalSocket {sock}\nTCPSocket {port}\n"
                    f"TCPAddr 127.0.0.1\nDatabaseDirectory {db}\nLogFile {work}/clamd.log\n"
                    f"PidFile {work}/clamd.pid\nSelfCheck 3600\n")
    log = work / "clamd.log"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    _wait(sock.exists, proc, log, "clamd")
    try:
        yield f"unix:{sock}", f"127.0.0.1:{port}"
    finally:
        _stop(proc)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory, loopback_dns: Any) -> Iterator[str]:
    """A private rspamd (Debian's configuration, overridden to listen on
    loopback ports, keep its state in a temp dir and ask the loopback DNS)."""
    binary = require_peer("rspamd")
    work = tmp_path_factory.mktemp("rspamd")
    for d in ("db", "run", "log", "local/override.d", "local/local.d"):
        (work / d).mkdir(parents=True)
    normal, controller, proxy = free_ports(3)
    over = work / "local" / "override.d"
    (over / "worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{normal}";\ncount = 1;\n')
    (over / "worker-controller.inc").write_text(
        f'bind_socket = "127.0.0.1:{controller}";\ncount = 1;\n')
    (over / "worker-proxy.inc").write_text(
        f'bind_socket = "127.0.0.1:{proxy}";\nenabled = false;\n')
    (over / "logging.inc").write_text(
        f'type = "file";\nfilename = "{work}/log/rspamd.log";\nlevel = "info";\n')
    (work / "local" / "local.d" / "options.inc").write_text(
        f'dns {{ nameserver = ["127.0.0.1:{loopback_dns.port}"]; timeout = 0.5s; '
        "retransmits = 1; }\ndisable_hyperscan = true;\n")
    # "add header" from 6 (as Debian), reject at 15; no greylisting.
    (work / "local" / "override.d" / "actions.conf").write_text(
        "reject = 15;\nadd_header = 6;\ngreylist = null;\nrewrite_subject = null;\n")
    cmd = [binary, "-f", "-i", "-u", "root", "-g", "root", "-c", "/etc/rspamd/rspamd.conf"]
    for var, value in (("DBDIR", work / "db"), ("RUNDIR", work / "run"),
                       ("LOGDIR", work / "log"), ("LOCAL_CONFDIR", work / "local")):
        cmd.append(f"--var={var}={value}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _wait(lambda: _listening(normal), proc, work / "log" / "rspamd.log", "rspamd")
    try:
        yield f"http://127.0.0.1:{normal}"
    finally:
        _stop(proc)


def multipart_eicar() -> bytes:
    return (b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain\r\n\r\nthe report\r\n"
            b'--b\r\nContent-Type: application/octet-stream\r\n'
            b'Content-Disposition: attachment; filename="report.dat"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(EICAR).replace(b"\n", b"\r\n") + b"--b--\r\n")


@pytest.mark.parametrize("which", ["unix", "tcp"])
def test_clamd_instream_finds_eicar(clamd: tuple[str, str], which: str) -> None:
    import asyncio

    address = clamd[0] if which == "unix" else clamd[1]
    f = ClamavFilter(ClamavSettings(address, chunk_size=1024))
    head = b"From: a@example.org\r\nTo: b@example.test\r\nSubject: x\r\n"
    clean = asyncio.run(f.check(FilterMessage(head + b"\r\nhello\r\n" * 500, "inbound")))
    assert clean.action is Action.ACCEPT
    plain = asyncio.run(f.check(FilterMessage(head + b"\r\n" + EICAR + b"\r\n", "inbound")))
    assert plain.action is Action.REJECT and plain.rules == ("VIRUS:Eicar-Test-Body.UNOFFICIAL",)
    attached = asyncio.run(f.check(FilterMessage(head + multipart_eicar(), "inbound")))
    # Either signature: the decoded attachment's MD5, or the bytes in it.
    assert attached.action is Action.REJECT
    assert attached.rules[0].startswith("VIRUS:Eicar-Test-")
    assert attached.reply is not None and "Eicar" not in str(attached.reply)


def test_server_rejects_viruses_with_clamd(make_server: Callable[..., ServerThread],
                                           clamd: tuple[str, str]) -> None:
    st = make_server(f'[checks]\nverify = false\n[filters]\ninbound = ["clamav"]\n'
                     f'[filters.clamav]\naddress = "{clamd[0]}"\n')
    assert inbound(st, b"\r\n" + EICAR + b"\r\n") == (554, b"5.7.1 Message rejected: virus found")
    assert inbound(st, multipart_eicar()) == (554, b"5.7.1 Message rejected: virus found")
    assert inbound(st, b"\r\nclean\r\n")[0] == 250
    assert wait_for(lambda: maildir_messages(st.cfg, ALICE))


def _checkv2(url: str, message: bytes) -> dict[str, Any]:
    req = urllib.request.Request(url + "/checkv2", data=message, method="POST",
                                 headers={"IP": "192.0.2.1", "From": "a@example.org"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        result: dict[str, Any] = json.load(resp)
    return result


def test_server_with_rspamd(make_server: Callable[..., ServerThread], rspamd: str) -> None:
    st = make_server(f'[checks]\nverify = false\n[filters]\ninbound = ["rspamd"]\n'
                     f'[filters.rspamd]\nurl = "{rspamd}"\n')
    assert inbound(st, b"\r\n" + GTUBE + b"\r\n") == (554, b"5.7.1 Message rejected as spam")
    code, _ = inbound(st, b"\r\nHi Alice, lunch tomorrow at noon? Bob\r\n")
    assert code == 250
    [delivered] = wait_for(lambda: maildir_messages(st.cfg, ALICE))
    assert b"lunch tomorrow" in delivered
    # Below rspamd's reject score: delivered; headers only with "add header".
    if b"X-Spam-Action:" in delivered:
        assert b"X-Spam-Action: add header" in delivered and b"X-Spam-Flag: YES" in delivered
    # rspamd saw the session's facts (the client IP and HELO it was given).
    result = _checkv2(rspamd, b"Subject: hello\r\n\r\nhi\r\n")
    assert result["action"] in ("no action", "add header", "reject")


def test_rspamd_down_tempfails(make_server: Callable[..., ServerThread]) -> None:
    port = free_ports(1)[0]
    st = make_server(f'[checks]\nverify = false\n[filters]\ninbound = ["rspamd"]\n'
                     f'[filters.rspamd]\nurl = "http://127.0.0.1:{port}"\n')
    code, text = inbound(st, b"\r\nhello\r\n")
    assert code == 451 and text.startswith(b"4.3.0")
