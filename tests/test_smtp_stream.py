"""The client's wire layer: DATA encoding (dot-stuffing, line ends) and
reply parsing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures_outbound import unstuff
from postwarden.delivery.smtp_stream import (
    MAX_REPLY_LINES,
    DataEncoder,
    PeerClosed,
    PeerProtocolError,
    PeerTimeout,
    Reply,
    parse_extensions,
    read_reply,
    send,
    size_limit,
)


def encode(chunks: list[bytes]) -> bytes:
    enc = DataEncoder()
    return b"".join(enc.feed(c) for c in chunks) + enc.finish()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@pytest.mark.parametrize(("body", "wire"), [
    (b"", b".\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\r\n..b\r\n", b"a\r\n...b\r\n.\r\n"),
    (b"a\nb\n.\n", b"a\r\nb\r\n..\r\n.\r\n"),  # bare LF: RFC 5321 2.3.8
    (b"a\rb\r", b"a\r\nb\r\n.\r\n"),  # bare CR
    (b"x\n.\r\n", b"x\r\n..\r\n.\r\n"),  # no smuggled end of data
])
def test_encoder_table(body: bytes, wire: bytes) -> None:
    assert encode([body]) == wire
    # Same result for every way of cutting the input in chunks.
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1):
            assert encode([body[:i], body[i:j], body[j:]]) == wire, (i, j)


lines = st.lists(st.text(alphabet=".ab\u00e9", max_size=6).map(lambda s: s.encode()),
                 max_size=12)


@given(lines, st.lists(st.integers(min_value=0, max_value=200), max_size=6),
       st.booleans())
@settings(max_examples=300, deadline=None)
def test_encoder_roundtrip(body_lines: list[bytes], cuts: list[int], final_crlf: bool) -> None:
    body = b"\r\n".join(body_lines) + (b"\r\n" if final_crlf and body_lines else b"")
    wire = encode(split(body, cuts))
    expected = body if body.endswith(b"\r\n") or not body else body + b"\r\n"
    assert unstuff(wire) == expected
    # The only CRLF.CRLF is the terminator.
    assert (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3


@given(st.binary(max_size=60), st.lists(st.integers(min_value=0, max_value=80), max_size=5))
@settings(max_examples=300, deadline=None)
def test_encoder_never_emits_bare_cr_or_lf(body: bytes, cuts: list[int]) -> None:
    wire = encode(split(body, cuts))
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")
    assert (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3


def reference_encode(body: bytes) -> bytes:
    """The DATA stream for ``body`` in one piece, the slow and obvious way:
    every CRLF, bare CR and bare LF becomes CRLF, then dot-stuffing."""
    text = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return (b"\r\n" + text).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"x", b"\r\n."]), max_size=40),
       st.lists(st.integers(min_value=0, max_value=80), max_size=5))
@settings(max_examples=400, deadline=None)
def test_encoder_matches_the_reference(parts: list[bytes], cuts: list[int]) -> None:
    # Canonical input (the fast path) and input with bare CRs and LFs alike,
    # cut anywhere, give what encoding the whole body at once gives.
    body = b"".join(parts)
    assert encode(split(body, cuts)) == reference_encode(body)


def reply_from(data: bytes, timeout: float = 1.0) -> Reply:
    async def go() -> Reply:
        reader = asyncio.StreamReader(limit=8192)
        reader.feed_data(data)
        reader.feed_eof()
        return await read_reply(reader, timeout, "testing")

    return asyncio.run(go())


def test_multiline_reply_and_enhanced_code() -> None:
    r = reply_from(b"550-5.1.1 no such\r\n550 5.1.1 user\r\n")
    assert r.code == 550 and r.enhanced == "5.1.1" and r.text == "5.1.1 no such 5.1.1 user"
    assert r.permanent and str(r) == "550 5.1.1 no such 5.1.1 user"
    assert reply_from(b"250\r\n").lines == ("",)
    # A code of another class is not believed; defaults are X.0.0.
    r = reply_from(b"451 5.1.1 odd\r\n")
    assert r.enhanced == "" and r.dsn() == "4.0.0"


@pytest.mark.parametrize("data", [b"hello\r\n", b"2500 x\r\n", b"250-a\r\n251 b\r\n",
                                  b"650 x\r\n", b"250x\r\n", b"2" * 9000 + b"\r\n"])
def test_malformed_replies(data: bytes) -> None:
    with pytest.raises(PeerProtocolError):
        reply_from(data)


def test_too_many_lines() -> None:
    with pytest.raises(PeerProtocolError):
        reply_from(b"250-x\r\n" * (MAX_REPLY_LINES + 1) + b"250 x\r\n")


def test_eof_and_timeout() -> None:
    with pytest.raises(PeerClosed):
        reply_from(b"250-partial\r\n")

    async def silent() -> None:
        await read_reply(asyncio.StreamReader(), 0.05, "waiting")

    with pytest.raises(PeerTimeout):
        asyncio.run(silent())


def test_a_reply_whose_first_lines_came_still_times_out() -> None:
    # The lines already received are read without a timer; the wait for
    # the rest is still bounded.
    async def go() -> float:
        reader = asyncio.StreamReader()
        reader.feed_data(b"250-first\r\n250-second\r\n")
        start = time.monotonic()
        with pytest.raises(PeerTimeout):
            await read_reply(reader, 0.2, "waiting")
        return time.monotonic() - start

    assert 0.15 < asyncio.run(go()) < 2


def test_a_trickled_reply_is_bounded_as_a_whole() -> None:
    # A server sending one continuation line every 50 ms, forever: the
    # timeout covers the whole reply, not each line.
    async def go() -> float:
        async def trickle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while True:
                    w.write(b"250-still talking\r\n")
                    await w.drain()
                    await asyncio.sleep(0.05)

        server = await asyncio.start_server(trickle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        try:
            with pytest.raises(PeerTimeout):
                await read_reply(reader, 0.3, "waiting")
            return time.monotonic() - start
        finally:
            writer.close()
            server.close()

    assert 0.25 < asyncio.run(go()) < 2


def test_send_to_a_server_that_stops_reading_times_out() -> None:
    async def go() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def deaf(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.append(w)  # never reads

        server = await asyncio.start_server(deaf, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await send(writer, b"MAIL FROM:<a@example.org>\r\n", 1.0, "sending MAIL")
            start = time.monotonic()
            with pytest.raises(PeerTimeout, match="sending message body"):
                for _ in range(1000):  # far beyond both sockets' buffers
                    await send(writer, b"x" * 65536, 0.3, "sending message body")
            assert time.monotonic() - start < 5
        finally:
            writer.transport.abort()
            server.close()

    asyncio.run(go())


def test_send_to_a_server_that_closed_fails() -> None:
    async def go() -> None:
        async def reset(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()  # RST

        server = await asyncio.start_server(reset, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            with pytest.raises(PeerClosed, match="sending message body"):
                for _ in range(100):
                    await send(writer, b"x" * 4096, 1.0, "sending message body")
                    await asyncio.sleep(0.01)
        finally:
            writer.transport.abort()
            server.close()

    asyncio.run(go())


def test_control_characters_are_removed() -> None:
    r = reply_from(b"550 bad\x1b[31m \x00thing\r\n")
    assert "\x1b" not in r.text and "\x00" not in r.text


def test_extensions() -> None:
    r = Reply(250, ("mx greets", "PIPELINING", "SIZE 1000", "auth=LOGIN PLAIN", "8bitmime",
                    "AUTH PLAIN"))
    ext = parse_extensions(r)
    assert ext == {"PIPELINING": "", "SIZE": "1000", "AUTH": "LOGIN PLAIN", "8BITMIME": ""}
    assert size_limit(ext) == 1000 and size_limit({"SIZE": ""}) == 0
