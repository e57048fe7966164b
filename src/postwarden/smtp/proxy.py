"""The PROXY protocol (HAProxy, versions 1 and 2): the real client address
of a connection that a load balancer forwards.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt (cited
below as "spec 2.1" etc.).  The header is the first thing on the connection,
before the greeting; :func:`read_header` reads exactly the header and leaves
everything after it in the stream.  :func:`parse_v1` and :func:`parse_v2`
validate strictly and raise :class:`ProxyError` on anything malformed:

- v1: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` or ``PROXY UNKNOWN ...\\r\\n``,
  at most 107 bytes with the CRLF (spec 2.1); single spaces, addresses in
  their canonical text form, ports decimal without leading zeros.
- v2: the 12-byte signature, version 2, command LOCAL (keep the real peer)
  or PROXY, family UNSPEC (keep the real peer) / INET / INET6 / UNIX (kept:
  no address to use) over STREAM, and a length that covers the addresses;
  TLVs after the addresses are skipped (spec 2.2).

Security exposure: parses untrusted bytes, but only from the addresses in
``trusted_proxies`` (checked by :func:`accept_header` before any read); a
header is bounded (107 bytes for v1, :data:`V2_MAX_LENGTH` for v2) and read
under a timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from dataclasses import dataclass
from typing import Protocol

from postwarden.envelope import ConnectionInfo
from postwarden.observe.log import get_logger

log = get_logger("proxy")

V1_MAX = 107  # spec 2.1: "PROXY TCP6 <39> <39> 65535 65535\r\n"
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16
# Address block plus TLVs; the spec allows 65535, HAProxy sends far less.
V2_MAX_LENGTH = 4096
HEADER_TIMEOUT = 10.0

_CMD_LOCAL, _CMD_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_PROTO_UNSPEC, _PROTO_STREAM = 0x0, 0x1
_ADDR_LEN = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


class ProxyError(Exception):
    """A missing, malformed, truncated or timed-out PROXY header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header.  ``source``/``destination`` are None when the header
    says to keep the connection's own addresses (v1 UNKNOWN, v2 LOCAL or
    UNSPEC/UNIX)."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int  # bytes the header took on the wire


# ---- version 1 --------------------------------------------------------------

def _v1_port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise ProxyError(f"bad port {text!r}")
    port = int(text)
    if port > 65535:
        raise ProxyError(f"port {port} out of range")
    return port


def _v1_addr(text: str, version: int) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"bad address {text!r}") from None
    if addr.version != version or str(addr) != text.lower():
        raise ProxyError(f"bad IPv{version} address {text!r}")
    return str(addr)


def parse_v1(line: bytes) -> ProxyHeader:
    """One whole v1 line, CRLF included."""
    if len(line) > V1_MAX:
        raise ProxyError("v1 header longer than 107 bytes")
    if not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n"):
        raise ProxyError("not a v1 header line")
    body = line[len(V1_PREFIX):-2]
    if b"\r" in body or b"\n" in body:
        raise ProxyError("stray CR/LF in v1 header")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("non-ASCII v1 header") from None
    if text == "UNKNOWN" or text.startswith("UNKNOWN "):
        # spec 2.1: the receiver must ignore what follows UNKNOWN.
        return ProxyHeader(1, None, None, len(line))
    parts = text.split(" ")
    if len(parts) != 5 or parts[0] not in ("TCP4", "TCP6"):
        raise ProxyError("v1 header needs PROTO SRC DST SPORT DPORT")
    version = 4 if parts[0] == "TCP4" else 6
    src = _v1_addr(parts[1], version)
    dst = _v1_addr(parts[2], version)
    return ProxyHeader(1, (src, _v1_port(parts[3])), (dst, _v1_port(parts[4])), len(line))


def build_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 header (UNKNOWN when ``source`` is None)."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP4" if ipaddress.ip_address(source[0]).version == 4 else "TCP6"
    return (f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            ).encode("ascii")


# ---- version 2 --------------------------------------------------------------

def v2_length(head: bytes) -> int:
    """The total header length announced by the first 16 bytes."""
    if len(head) < V2_HEADER or head[:12] != V2_SIGNATURE:
        raise ProxyError("not a v2 header")
    if head[12] >> 4 != 2:
        raise ProxyError(f"unsupported v2 version {head[12] >> 4}")
    length = int.from_bytes(head[14:16], "big")
    if length > V2_MAX_LENGTH:
        raise ProxyError(f"v2 header length {length} too large")
    return V2_HEADER + length


def parse_v2(data: bytes) -> ProxyHeader:
    """One whole v2 header, nothing more."""
    total = v2_length(data)
    if len(data) != total:
        raise ProxyError(f"v2 header is {len(data)} bytes, announced {total}")
    command = data[12] & 0x0F
    family, proto = data[13] >> 4, data[13] & 0x0F
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyError(f"unknown v2 command {command}")
    if family not in _ADDR_LEN or proto > 2:
        raise ProxyError(f"unknown v2 family/protocol {data[13]:#04x}")
    if total - V2_HEADER < _ADDR_LEN[family]:
        raise ProxyError("v2 address block truncated")
    if command == _CMD_LOCAL:
        # spec 2.2: LOCAL (health checks): use the real connection endpoints.
        return ProxyHeader(2, None, None, total)
    if family in (_AF_UNSPEC, _AF_UNIX):
        return ProxyHeader(2, None, None, total)
    if proto != _PROTO_STREAM:
        raise ProxyError("v2 header for a non-stream protocol")
    body = data[V2_HEADER:]
    if family == _AF_INET:
        src = str(ipaddress.IPv4Address(body[0:4]))
        dst = str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = struct.unpack("!HH", body[8:12])
    else:
        src = str(ipaddress.IPv6Address(body[0:16]))
        dst = str(ipaddress.IPv6Address(body[16:32]))
        sport, dport = struct.unpack("!HH", body[32:36])
    return ProxyHeader(2, (src, sport), (dst, dport), total)


def build_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None, *,
             local: bool = False, tlvs: bytes = b"") -> bytes:
    """A v2 header; LOCAL when ``local``, UNSPEC when ``source`` is None."""
    cmd = 0x20 | (_CMD_LOCAL if local else _CMD_PROXY)
    if source is None or destination is None:
        fam, body = 0x00, b""
    else:
        s, d = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        fam = 0x11 if s.version == 4 else 0x21
        body = s.packed + d.packed + struct.pack("!HH", source[1], destination[1])
    body += tlvs
    return V2_SIGNATURE + bytes([cmd, fam]) + struct.pack("!H", len(body)) + body


def parse(data: bytes) -> ProxyHeader:
    """A whole header of either version."""
    if data.startswith(V2_SIGNATURE[:5]):
        return parse_v2(data)
    return parse_v1(data)


# ---- reading from a stream ---------------------------------------------------

class ExactReader(Protocol):
    """What the header is read from (asyncio's StreamReader, or the
    session's :class:`~postwarden.smtp.connection.SessionIO`): raises
    :class:`asyncio.IncompleteReadError` at the end of the stream."""

    async def readexactly(self, n: int) -> bytes: ...


async def _read(reader: ExactReader) -> ProxyHeader:
    first = await reader.readexactly(5)
    if first == V1_PREFIX[:5]:
        line = bytearray(first)
        while not line.endswith(b"\r\n"):
            if len(line) >= V1_MAX:
                raise ProxyError("v1 header longer than 107 bytes")
            line += await reader.readexactly(1)
        return parse_v1(bytes(line))
    if first == V2_SIGNATURE[:5]:
        head = first + await reader.readexactly(V2_HEADER - 5)
        total = v2_length(head)
        return parse_v2(head + await reader.readexactly(total - V2_HEADER))
    raise ProxyError("no PROXY header")


async def read_header(reader: ExactReader, timeout: float = HEADER_TIMEOUT
                      ) -> ProxyHeader:
    """Read exactly one header (v1 or v2) from ``reader``."""
    try:
        async with asyncio.timeout(timeout):
            return await _read(reader)
    except TimeoutError:
        raise ProxyError("timed out waiting for the PROXY header") from None
    except asyncio.IncompleteReadError:
        raise ProxyError("connection closed inside the PROXY header") from None


def is_trusted(peer_ip: str, trusted: tuple[str, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in ipaddress.ip_network(t, strict=False) for t in trusted)


async def accept_header(conn: ConnectionInfo, trusted: tuple[str, ...],
                        reader: ExactReader, timeout: float = HEADER_TIMEOUT) -> bool:
    """For a ``proxy_protocol`` listener: read the header from a trusted
    proxy and put the real client into ``conn``.  False:
    the connection must be closed without a greeting."""
    session, peer = conn.session_id, conn.peer_ip
    if not is_trusted(peer, trusted):
        log.warning("proxy_untrusted", session=session, client=peer)
        return False
    try:
        header = await read_header(reader, timeout)
    except ProxyError as exc:
        log.warning("proxy_header_invalid", session=session, client=peer, error=str(exc))
        return False
    if header.source is not None:
        conn.peer_ip, conn.peer_port = header.source
    log.info("proxy", session=session, proxy=peer, version=header.version,
             client=conn.peer_ip, port=conn.peer_port)
    return True
