"""Access lists, connection limits and the PROXY protocol against a real
server on real sockets."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import DOMAIN, ServerThread, maildir_messages, wait_for, write_config

from postwarden import cli
from postwarden.smtp import proxy

ALICE = f"alice@{DOMAIN}"


def connect(port: int, send: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if send:
        s.sendall(send)
    return s


def line(s: socket.socket) -> bytes:
    """One reply line, or b'' when the server closed."""
    buf = b""
    while not buf.endswith(b"\n"):
        try:
            chunk = s.recv(1)
        except (ConnectionResetError, TimeoutError):
            return buf
        if not chunk:
            return buf
        buf += chunk
    return buf


def reply(s: socket.socket) -> bytes:
    """A whole (multi-line) reply."""
    out = b""
    while True:
        ln = line(s)
        out += ln
        if not ln or ln[3:4] != b"-":
            return out


def command(s: socket.socket, text: str) -> bytes:
    s.sendall(text.encode() + b"\r\n")
    return reply(s)


def greeting(port: int, send: bytes = b"") -> bytes:
    with connect(port, send) as s:
        return line(s)


# ---- access lists --------------------------------------------------------

def test_deny_cidr_at_connect(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server('[access]\ndeny = ["127.0.0.0/8", "2001:db8::/32"]\n')
    assert greeting(srv.port("mx")).startswith(b"554 5.7.1")


def test_allow_overrides_deny_and_limits(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server('[access]\ndeny = ["127.0.0.0/8"]\nallow = ["127.0.0.1/32"]\n'
                      '[connections]\nmax_per_ip = 1\n')
    socks = [connect(srv.port("mx")) for _ in range(3)]
    try:
        assert all(line(s).startswith(b"220 ") for s in socks)  # trusted: not counted
    finally:
        for s in socks:
            s.close()


def test_per_listener_deny(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server('[access.listeners.submission]\ndeny = ["127.0.0.1"]\n')
    assert greeting(srv.port("mx")).startswith(b"220 ")
    assert greeting(srv.port("submission")).startswith(b"554 5.7.1")


def test_deny_patterns(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server('[access]\ndeny_helo = ["*.bad.example"]\n'
                      'deny_sender = ["*@spam.example", "/^bulk[0-9]+@/"]\n'
                      f'deny_recipient = ["/^alice@{DOMAIN}$/"]\n')
    with connect(srv.port("mx")) as s:
        assert line(s).startswith(b"220 ")
        assert command(s, "EHLO host.BAD.example").startswith(b"550 5.7.1")
        assert command(s, "EHLO good.example").startswith(b"250")
        assert command(s, "MAIL FROM:<x@Spam.Example>").startswith(b"550 5.7.1")
        assert command(s, "MAIL FROM:<bulk42@a.example>").startswith(b"550 5.7.1")
        assert command(s, "MAIL FROM:<ok@a.example>").startswith(b"250")
        assert command(s, f"RCPT TO:<{ALICE}>").startswith(b"550 5.7.1")


def test_cli_changes_take_effect(make_server: Callable[..., ServerThread],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    srv = make_server()
    path = str(srv.cfg.path)
    port = srv.port("mx")
    assert greeting(port).startswith(b"220 ")
    assert cli.main(["-c", path, "access", "add", "deny", "127.0.0.0/8"]) == 0
    assert wait_for(lambda: greeting(port).startswith(b"554 5.7.1"), 5)
    assert cli.main(["-c", path, "access", "add", "deny-sender", "*@x.example"]) == 0
    assert cli.main(["-c", path, "access", "add", "--listener", "nope", "deny",
                     "10.0.0.0/8"]) == 1
    assert cli.main(["-c", path, "access", "add", "deny", "not-a-net"]) == 1
    capsys.readouterr()
    assert cli.main(["-c", path, "access", "list"]) == 0
    out = capsys.readouterr().out
    assert "127.0.0.0/8" in out and "*@x.example" in out
    assert cli.main(["-c", path, "access", "del", "deny", "127.0.0.0/8"]) == 0
    assert cli.main(["-c", path, "access", "del", "deny", "127.0.0.0/8"]) == 1
    assert wait_for(lambda: greeting(port).startswith(b"220 "), 5)
    with connect(port) as s:
        line(s)
        command(s, "EHLO a.example")
        assert command(s, "MAIL FROM:<a@x.example>").startswith(b"550 5.7.1")


def test_sighup_reload_reads_config(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server()
    port = srv.port("mx")
    path = srv.cfg.path
    path.write_text(path.read_text() + '\n[access]\ndeny = ["127.0.0.1"]\n')
    srv.loop.call_soon_threadsafe(srv.server.reload)
    assert wait_for(lambda: greeting(port).startswith(b"554 5.7.1"), 5)


# ---- connection limits ---------------------------------------------------

def test_per_ip_limit(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server("[connections]\nmax_per_ip = 3\nipv4_prefix = 24\n")
    port = srv.port("mx")
    socks = [connect(port) for _ in range(3)]
    try:
        assert all(line(s).startswith(b"220 ") for s in socks)
        assert greeting(port).startswith(b"421 4.7.0")
        socks.pop().close()
        assert wait_for(lambda: greeting(port).startswith(b"220 "), 5)
    finally:
        for s in socks:
            s.close()


def test_total_limit(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server("[connections]\nmax_total = 2\n")
    socks = [connect(srv.port("mx")), connect(srv.port("submission"))]
    try:
        assert all(line(s).startswith(b"220 ") for s in socks)
        assert greeting(srv.port("mx")).startswith(b"421 4.7.0")
    finally:
        for s in socks:
            s.close()


def test_new_connections_per_minute(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server("[connections]\nmax_new_per_minute = 4\n")
    port = srv.port("mx")
    for _ in range(4):
        assert greeting(port).startswith(b"220 ")
    assert greeting(port).startswith(b"421 4.7.0")


# ---- PROXY protocol ------------------------------------------------------

PROXIED = """
[listeners.proxied]
mode = "mx"
address = "127.0.0.1:0"
proxy_protocol = true
trusted_proxies = ["127.0.0.0/8"]
[listeners.elsewhere]
mode = "mx"
address = "127.0.0.1:0"
proxy_protocol = true
trusted_proxies = ["192.0.2.0/24"]
"""


def send_mail(s: socket.socket, subject: str) -> None:
    assert line(s).startswith(b"220 ")
    assert command(s, "EHLO client.example").startswith(b"250")
    assert command(s, "MAIL FROM:<x@remote.example>").startswith(b"250")
    assert command(s, f"RCPT TO:<{ALICE}>").startswith(b"250")
    assert command(s, "DATA").startswith(b"354")
    body = f"From: x@remote.example\r\nTo: {ALICE}\r\nSubject: {subject}\r\n\r\nhi\r\n.\r\n"
    s.sendall(body.encode())
    assert reply(s).startswith(b"250")
    command(s, "QUIT")


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_sets_client(make_server: Callable[..., ServerThread],
                                  version: int) -> None:
    srv = make_server(PROXIED)
    ep = (("203.0.113.7", 40000), ("198.51.100.1", 25)) if version == 1 else \
        (("2001:db8::7", 40000), ("2001:db8::1", 25))
    header = proxy.build_v1(*ep) if version == 1 else proxy.build_v2(*ep)
    with connect(srv.port("proxied"), header) as s:
        send_mail(s, f"v{version}")
    msgs = wait_for(lambda: maildir_messages(srv.cfg, ALICE))
    assert msgs and ep[0][0].encode() in msgs[0].split(b"\r\n\r\n")[0]


def test_proxy_limits_apply_to_real_client(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(PROXIED + '[access]\ndeny = ["203.0.113.0/24"]\n')
    header = proxy.build_v1(("203.0.113.7", 1), ("127.0.0.1", 25))
    assert greeting(srv.port("proxied"), header).startswith(b"554 5.7.1")
    other = proxy.build_v1(("198.51.100.7", 1), ("127.0.0.1", 25))
    assert greeting(srv.port("proxied"), other).startswith(b"220 ")


def test_proxy_bad_headers_close(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(PROXIED)
    full = proxy.build_v2(("192.0.2.1", 1), ("192.0.2.2", 25))
    with connect(srv.port("proxied"), full[:20]) as s:
        s.shutdown(socket.SHUT_WR)  # truncated
        assert line(s) == b""
    assert greeting(srv.port("proxied"), b"EHLO x\r\n") == b""  # no header
    assert greeting(srv.port("proxied"), b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n") == b""
    # From an address that is not a trusted proxy: closed without a greeting.
    header = proxy.build_v1(("203.0.113.7", 1), ("127.0.0.1", 25))
    assert greeting(srv.port("elsewhere"), header) == b""
    # A good one still works afterwards.
    assert greeting(srv.port("proxied"), header).startswith(b"220 ")


# ---- file-descriptor exhaustion -------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("uvloop", [True, False])
def test_accept_loop_survives_emfile(tmp_path: Path, cert_files: tuple[Path, Path],
                                     loopback_dns: Any, uvloop: bool) -> None:
    port = _free_port()
    cfg = write_config(tmp_path, cert_files, "[queue]\nworkers = 0\n"
                       "[connections]\nmax_per_ip = 0\nmax_new_per_minute = 0\n",
                       ports=(port, 0, 0), dns_port=loopback_dns.port)
    limit = 64

    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    env = dict(os.environ)
    log_path = tmp_path / "server.log"
    log_file = open(log_path, "wb")  # noqa: SIM115
    code = "import sys; from postwarden.cli import main; sys.exit(main(sys.argv[1:]))"
    if not uvloop:  # asyncio's own loop: hide uvloop from the app
        code = "import sys; sys.modules['uvloop'] = None; " + code
    p = subprocess.Popen([sys.executable, "-c", code, "-c", str(cfg), "serve"],
                         preexec_fn=lower_limit, env=env, cwd=str(tmp_path),
                         stdout=subprocess.DEVNULL, stderr=log_file)
    held: list[socket.socket] = []
    log_file.close()  # the child has its own descriptor (a file: a pipe could fill up)
    try:
        assert wait_for(lambda: _try_greeting(port), 20), "server did not start"
        exhausted = False
        for _ in range(limit * 2):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                exhausted = True
                break
            held.append(s)
            s.settimeout(2)
            try:
                if not line(s).startswith(b"220"):
                    exhausted = True
                    break
            except OSError:
                exhausted = True
                break
        assert exhausted, "the server never ran out of descriptors"
        for s in held:
            s.close()
        held.clear()
        ok = wait_for(lambda: _try_greeting(port), 15)
        assert p.poll() is None
        if not ok:
            p.send_signal(signal.SIGTERM)
            p.wait(15)
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines()
                     if "\"disconnect\"" not in ln and "\"connect\"" not in ln]
            pytest.fail("no 220 after EMFILE:\n" + "\n".join(lines)[-6000:])
    finally:
        for s in held:
            s.close()
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _try_greeting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.settimeout(3)
            return line(s).startswith(b"220 ")
    except OSError:
        time.sleep(0.1)
        return False
