"""Hostile MIME and CPython's email test corpus through the default filter
chains: no error, no hang, bounded work (the walker's limits hold)."""

from __future__ import annotations

import asyncio
import base64
import sys
import sysconfig
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden.filter import mime
from postwarden.filter.service import build_chain
from postwarden.filter.settings import FilterSettings
from postwarden.filter.verdict import Action, FilterMessage

HEAD = (b"From: a@example.org\r\nTo: b@example.test\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <1@example.org>\r\nSubject: torture\r\nMIME-Version: 1.0\r\n")
CHAINS = [build_chain(("rules", "attachments", "dlp"), FilterSettings())]


def run_chains(data: bytes) -> None:
    """Every built-in filter, inbound and outbound, must answer."""
    for direction in ("inbound", "outbound"):
        for chain in CHAINS:
            result = asyncio.run(chain.run(FilterMessage(data, direction)))
            assert result.action in tuple(Action)
            assert all(v.action is not Action.TEMPFAIL for _, v in result.verdicts), \
                result.reasons


def nested(depth: int) -> bytes:
    out = [HEAD]
    for i in range(depth):
        out.append(f'Content-Type: multipart/mixed; boundary="n{i}"\r\n\r\n--n{i}\r\n'.encode())
    out.append(b"Content-Type: application/octet-stream; name=\"deep.exe\"\r\n\r\nMZ\r\n")
    for i in reversed(range(depth)):
        out.append(f"--n{i}--\r\n".encode())
    return b"".join(out)


def many_parts(count: int) -> bytes:
    part = b"--p\r\nContent-Type: text/plain\r\n\r\nsmall part\r\n"
    return (HEAD + b'Content-Type: multipart/mixed; boundary="p"\r\n\r\n' + part * count
            + b"--p--\r\n")


HOSTILE = {
    "nested 1000 deep": nested(1000),
    "10000 parts": many_parts(10000),
    "no boundary parameter": HEAD + b"Content-Type: multipart/mixed\r\n\r\n--x\r\nhi\r\n",
    "boundary never used": HEAD + b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\nhi\r\n',
    "no close delimiter": HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
                          b"--b\r\nContent-Type: text/plain\r\n\r\nnever closed\r\n",
    "duplicated boundary": HEAD + b'Content-Type: multipart/mixed; boundary="d"\r\n\r\n'
                           b'--d\r\nContent-Type: multipart/mixed; boundary="d"\r\n\r\n'
                           b"--d\r\nContent-Type: text/plain\r\n\r\nx\r\n--d--\r\n--d--\r\n",
    "broken base64": HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
                     b'--b\r\nContent-Type: application/octet-stream; name="a.bin"\r\n'
                     b"Content-Transfer-Encoding: base64\r\n\r\nTV*&^%$#@!qQ===A\r\nx\r\n--b--\r\n",
    "1 MB header": HEAD + b"X-Long: " + b"a" * (1024 * 1024) + b"\r\n\r\nbody\r\n",
    "1 MB folded header": HEAD + b"X-Folded: a" + b"\r\n b" * (300 * 1024) + b"\r\n\r\nbody\r\n",
    "huge boundary": HEAD + b'Content-Type: multipart/mixed; boundary="' + b"q" * 5000
                     + b'"\r\n\r\n--q\r\n',
    "garbage parameters": HEAD + b"Content-Type: multipart/mixed; ;;; boundary*0*=utf-8''%; "
                          b"name*1=\"x\r\n\r\n--\r\n",
    "rfc822 loop": HEAD + b"Content-Type: message/rfc822\r\n\r\n" * 500 + b"hi\r\n",
    "bare LF": HEAD.replace(b"\r\n", b"\n") + b'Content-Type: multipart/mixed; boundary="b"\n\n'
               b'--b\nContent-Type: application/zip; name="x.zip"\n'
               b"Content-Transfer-Encoding: base64\n\nUEsDBAo=\n--b--\n",
    "corrupt zip": HEAD + b'Content-Type: application/zip; name="x.zip"\r\n'
                   b"Content-Transfer-Encoding: base64\r\n\r\n"
                   + base64.b64encode(b"PK\x03\x04" + b"\xff" * 500) + b"\r\n",
    "empty": b"",
    "header only": HEAD,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_mime_passes_through_the_chain(name: str) -> None:
    data = HOSTILE[name]
    tracemalloc.start()
    started = time.process_time()
    try:
        run_chains(data)
        structure = mime.walk(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.process_time() - started < 20  # a generous bound: a hang fails, not a slow box
    assert len(structure.parts) <= mime.MAX_PARTS
    assert peak < 64 * 1024 * 1024 + 20 * len(data)


def test_walker_bounds_are_reported() -> None:
    deep = mime.walk(nested(1000))
    assert deep.too_deep and max(p.depth for p in deep.parts) <= mime.MAX_DEPTH
    wide = mime.walk(many_parts(10000))
    assert wide.truncated and len(wide.parts) <= mime.MAX_PARTS


def test_walker_finds_attachments_and_decodes() -> None:
    data = (HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
            b"--b\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\naGk=\r\n--b--\r\n")
    s = mime.walk(data)
    assert [p.content_type for p in s.parts] == ["text/plain", "application/octet-stream"]
    assert s.parts[0].decoded(data) == b"hello"
    assert s.parts[1].filename == "résumé.pdf" and s.parts[1].attachment
    assert s.parts[1].decoded(data) == b"hi"


def corpus_dir() -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return stdlib / "test" / "test_email" / "data"


def test_cpython_email_corpus() -> None:
    """Lib/test/test_email/data: every file through the chains."""
    data_dir = corpus_dir()
    if not data_dir.is_dir():
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        pytest.skip(f"{data_dir} missing: CPython's test data (on Debian the package "
                    f"libpython{version}-testsuite)")
    files = sorted(p for p in data_dir.iterdir() if p.is_file())
    assert len(files) > 20
    for path in files:
        run_chains(path.read_bytes())


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from([
    b"--b\r\n", b"--b--\r\n", b"Content-Type: multipart/mixed; boundary=b\r\n",
    b"Content-Type: message/rfc822\r\n", b"Content-Transfer-Encoding: base64\r\n",
    b'Content-Disposition: attachment; filename="x.exe"\r\n', b"\r\n", b"TVqQ\r\n",
    b"PK\x03\x04", b"=?utf-8?b?eA==?=", b" folded\r\n", b"\n", b"--", b"a: b\r\n",
]), max_size=60))
def test_walker_never_raises(chunks: list[bytes]) -> None:
    data = HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n' + b"".join(chunks)
    mime.walk(data)
    run_chains(data)
