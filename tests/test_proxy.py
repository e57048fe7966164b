"""PROXY protocol parsers: table tests, round trips and arbitrary bytes."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden.smtp import proxy
from postwarden.smtp.proxy import ProxyError

ports = st.integers(0, 65535)
v4 = st.builds(lambda b: str(ipaddress.IPv4Address(b)), st.binary(min_size=4, max_size=4))
v6 = st.builds(lambda b: str(ipaddress.IPv6Address(b)), st.binary(min_size=16, max_size=16))
endpoints = st.one_of(
    st.tuples(st.tuples(v4, ports), st.tuples(v4, ports)),
    st.tuples(st.tuples(v6, ports), st.tuples(v6, ports)))


def test_v1_examples() -> None:
    h = proxy.parse_v1(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n")
    assert h.source == ("192.0.2.1", 56324) and h.destination == ("198.51.100.2", 25)
    h = proxy.parse_v1(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n")
    assert h.source == ("2001:db8::1", 1)
    assert proxy.parse_v1(b"PROXY UNKNOWN\r\n").source is None
    assert proxy.parse_v1(b"PROXY UNKNOWN whatever 1 2\r\n").source is None


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\n",  # no CR
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",  # missing port
    b"PROXY TCP4 192.0.2.1  198.51.100.2 1 25\r\n",  # double space
    b"PROXY TCP4 2001:db8::1 198.51.100.2 1 25\r\n",  # family mismatch
    b"PROXY TCP6 192.0.2.1 198.51.100.2 1 25\r\n",
    b"PROXY TCP4 192.0.2.01 198.51.100.2 1 25\r\n",  # leading zero
    b"PROXY TCP4 192.0.2.1 198.51.100.2 01 25\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 25\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 25\r\n",
    b"PROXY UDP4 192.0.2.1 198.51.100.2 1 25\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 25 extra\r\n",
    b"proxy TCP4 192.0.2.1 198.51.100.2 1 25\r\n",
    b"PROXY UNKNOWN" + b"x" * 100 + b"\r\n",  # over 107 bytes
])
def test_v1_malformed(line: bytes) -> None:
    with pytest.raises(ProxyError):
        proxy.parse_v1(line)


def test_v2_examples() -> None:
    data = proxy.build_v2(("192.0.2.1", 1234), ("198.51.100.2", 25), tlvs=b"\x04\x00\x01x")
    h = proxy.parse_v2(data)
    assert h.version == 2 and h.source == ("192.0.2.1", 1234) and h.length == len(data)
    local = proxy.build_v2(("192.0.2.1", 1), ("192.0.2.2", 2), local=True)
    assert proxy.parse_v2(local).source is None
    assert proxy.parse_v2(proxy.build_v2(None, None)).source is None


@pytest.mark.parametrize("mutate", [
    lambda b: b[:-1],  # shorter than announced
    lambda b: b + b"x",  # longer
    lambda b: b[:12] + b"\x11" + b[13:],  # version 1
    lambda b: b[:12] + b"\x2f" + b[13:],  # command 15
    lambda b: b[:13] + b"\x12" + b[14:],  # DGRAM
    lambda b: b[:13] + b"\x41" + b[14:],  # family 4
    lambda b: b[:13] + b"\x21" + b[14:],  # INET6 with a 12-byte block
    lambda b: b"\r\n\r\n\x00\r\nQUIX\n" + b[12:],  # signature
])
def test_v2_malformed(mutate: object) -> None:
    data = proxy.build_v2(("192.0.2.1", 1234), ("198.51.100.2", 25))
    with pytest.raises(ProxyError):
        proxy.parse_v2(mutate(data))  # type: ignore[operator]


def test_v2_length_cap() -> None:
    with pytest.raises(ProxyError):
        proxy.v2_length(proxy.V2_SIGNATURE + b"\x21\x11\xff\xff")


@given(endpoints)
def test_v1_round_trip(ep: tuple[tuple[str, int], tuple[str, int]]) -> None:
    data = proxy.build_v1(*ep)
    assert len(data) <= proxy.V1_MAX
    h = proxy.parse_v1(data)
    assert (h.source, h.destination, h.length) == (ep[0], ep[1], len(data))
    assert proxy.parse(data) == h


@given(endpoints, st.binary(max_size=300), st.booleans())
def test_v2_round_trip(ep: tuple[tuple[str, int], tuple[str, int]], tlvs: bytes,
                       local: bool) -> None:
    data = proxy.build_v2(*ep, local=local, tlvs=tlvs)
    h = proxy.parse_v2(data)
    assert h.length == len(data)
    assert (h.source, h.destination) == ((None, None) if local else ep)
    assert proxy.parse(data) == h


@given(st.binary(max_size=200))
@settings(max_examples=500)
def test_arbitrary_bytes_only_proxy_error(data: bytes) -> None:
    for parse in (proxy.parse_v1, proxy.parse_v2, proxy.parse):
        with contextlib.suppress(ProxyError):
            parse(data)


@given(st.binary(max_size=200).map(lambda b: b"PROXY " + b),
       st.binary(max_size=100).map(lambda b: proxy.V2_SIGNATURE + b))
def test_prefixed_garbage_only_proxy_error(v1: bytes, v2: bytes) -> None:
    for data in (v1, v2, v1 + b"\r\n"):
        with contextlib.suppress(ProxyError):
            proxy.parse(data)


def _read(data: bytes, eof: bool = True, timeout: float = 1.0
          ) -> tuple[proxy.ProxyHeader, bytes]:
    async def main() -> tuple[proxy.ProxyHeader, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        header = await proxy.read_header(reader, timeout)
        return header, await reader.read() if eof else b""
    return asyncio.run(main())


@given(endpoints, st.booleans(), st.binary(max_size=50))
@settings(max_examples=50, deadline=None)
def test_read_header_reads_exactly_the_header(
        ep: tuple[tuple[str, int], tuple[str, int]], v2: bool, rest: bytes) -> None:
    header = proxy.build_v2(*ep) if v2 else proxy.build_v1(*ep)
    h, after = _read(header + rest)
    assert h.source == ep[0] and after == rest


@given(st.binary(max_size=150))
@settings(max_examples=100, deadline=None)
def test_read_header_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(ProxyError):
        _read(data)


def test_read_header_truncated_and_timeout() -> None:
    full = proxy.build_v2(("192.0.2.1", 1), ("192.0.2.2", 25))
    with pytest.raises(ProxyError, match="closed"):
        _read(full[:20])
    with pytest.raises(ProxyError, match="timed out"):
        _read(b"PROXY TCP4 192.0.2.1", eof=False, timeout=0.1)
    with pytest.raises(ProxyError):
        _read(b"EHLO x\r\n")
