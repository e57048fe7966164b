"""Security scans against a running server: nmap's smtp-open-relay script
(Debian nmap) finds no open relay, and no listener answers AUTH before TLS.
(SMTP smuggling: tests/test_protocol.py and tests/test_smtp_server.py for
receiving, tests/test_smtp_stream.py for sending; TLS profile:
tests/test_tls_profile.py with sslyze.)"""

from __future__ import annotations

import base64
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import PASSWORD, ServerThread, require_tool
from tests.test_smtp_server import ALICE, read_replies


def test_nmap_smtp_open_relay_finds_no_relay(make_server: Callable[..., ServerThread],
                                             tmp_path: Path) -> None:
    nmap = require_tool("nmap")
    # nmap tries 16 relay forms in one session; each refusal counts as an
    # error, and at 10 (errors_max) the server would hang up before the end.
    server = make_server("errors_max = 100", directory=tmp_path)
    port = server.port("mx")
    # The script runs on ports known as SMTP; ours is not 25, so a services
    # file says it is (service detection would probe it with HTTP, which
    # the server answers with a ban).
    (tmp_path / "nmap-services").write_text(f"smtp\t{port}/tcp\t0.5\n")
    out = subprocess.run(
        [nmap, "-Pn", "-n", "--datadir", str(tmp_path), "-p", str(port),
         "--script", "smtp-open-relay",
         "--script-args", "smtp-open-relay.domain=example.test,smtp-open-relay.ip=127.0.0.1",
         "127.0.0.1"], capture_output=True, text=True, timeout=120).stdout
    assert "smtp-open-relay" in out, out
    assert "doesn't seem to be an open relay" in out, out
    assert "Server is an open relay" not in out


@pytest.mark.parametrize("listener", ["mx", "submission"])
def test_no_listener_answers_auth_before_tls(make_server: Callable[..., ServerThread],
                                             listener: str) -> None:
    srv = make_server()
    s = socket.create_connection(("127.0.0.1", srv.port(listener)), timeout=10)
    assert s.recv(200).startswith(b"220 ")
    creds = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode())
    s.sendall(b"EHLO t\r\nAUTH PLAIN " + creds + b"\r\nAUTH LOGIN\r\n")
    replies = read_replies(s, 3)
    ehlo_lines = replies[0]
    assert b"AUTH" not in ehlo_lines
    for r in replies[1:]:
        assert r[:1] == b"5", r  # never 334 or 235 in the clear
    s.close()


def test_implicit_tls_listener_says_nothing_in_the_clear(server: ServerThread) -> None:
    s = socket.create_connection(("127.0.0.1", server.port("submissions")), timeout=10)
    s.sendall(b"EHLO t\r\nAUTH PLAIN AGFsaWNlAHB3\r\n")
    s.settimeout(5)
    try:
        data = s.recv(200)
    except (TimeoutError, ConnectionResetError):
        data = b""
    assert not data.startswith((b"220", b"235", b"334")), data
    s.close()
