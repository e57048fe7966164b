"""A small authoritative DNS server on loopback for tests (built on dnslib).

Zones are a dict of owner name -> {record type -> values}::

    zones = {
        "example.org": {"MX": [(10, "mx1.example.org"), (20, "mx2.example.org")],
                        "TXT": ["v=spf1 -all"]},
        "mx1.example.org": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        "alias.example.org": {"CNAME": "mx1.example.org"},
        "nullmx.example": {"MX": [(0, ".")]},
        "broken.example": "SERVFAIL",    # every query for the name: SERVFAIL
        "slow.example": "DROP",          # never answered (a timeout)
        "half.example": {"TXT": ["v=spf1 -all"], "OTHER": "DROP"},
    }
    with LoopbackDns(zones) as dns:
        DnsConfig(nameservers=(("127.0.0.1", dns.port),), timeout=1.0)

Names not in the dict (and with no name below them) are NXDOMAIN; a name
that exists without the record type asked gets an empty NOERROR answer
(NoAnswer).  CNAMEs are followed inside the zone data, as a recursive
resolver would.  ``set``/``remove`` change the data while running;
``queries`` records ``(name, type)`` of every question.  UDP and TCP are
served on the same port (dnspython retries truncated answers over TCP).

Types: A, AAAA (lists of addresses), MX (list of (preference, host)), TXT
(list of strings, long ones split into 255-octet pieces), CNAME (one name),
PTR/NS (lists of names), TLSA (list of (usage, selector, matching type,
data as bytes or hex)).  A TXT record given as a list (or tuple) of pieces is
one record with those character-strings; SPF (type 99) takes the same values
as TXT.  The key ``"OTHER"`` ("DROP" or "SERVFAIL") applies to the types a
name does not list: ``{"TXT": [...], "OTHER": "DROP"}`` answers TXT queries
and lets every other type time out.  Query names are matched on their raw
label octets, so an owner name may hold a space or other characters that a
master file would escape.

DNSSEC is pretended, not done: the AD bit of an answer is set when the
question asked for it (AD or DO) and every name of the answer (the CNAME
chain included) is in ``signed`` (exact names: ``LoopbackDns(zones,
signed={"example.org", "mx.example.org"})``, or ``dns.signed.add(...)``
while running), as a validating resolver would for signed data; otherwise
AD is clear.  No RRSIGs are sent.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pytest
from dnslib import (  # type: ignore[import-untyped]
    AAAA,
    CNAME,
    MX,
    NS,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    TLSA,
    TXT,
    A,
    DNSRecord,
)
from dnslib.server import (  # type: ignore[import-untyped]
    BaseResolver,
    DNSHandler,
    DNSLogger,
    DNSServer,
)

Zones = Mapping[str, Any]
TTL = 60


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


def _octets(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _txt(value: str | bytes | list[str | bytes] | tuple[str | bytes, ...]) -> TXT:
    if isinstance(value, list | tuple):
        # The character-strings of one record, as given (none: one empty string).
        return TXT([_octets(piece) for piece in value] or [b""])
    raw = _octets(value)
    return TXT([raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""])


def _rdata(rtype: str, value: Any) -> Any:
    if rtype == "A":
        return A(value)
    if rtype == "AAAA":
        return AAAA(value)
    if rtype == "MX":
        pref, host = value
        return MX(host if host != "." else ".", pref)
    if rtype in ("TXT", "SPF"):
        return _txt(value)
    if rtype == "CNAME":
        return CNAME(value)
    if rtype == "NS":
        return NS(value)
    if rtype == "PTR":
        return PTR(value)
    if rtype == "TLSA":
        usage, selector, mtype, data = value
        return TLSA(usage, selector, mtype, bytes.fromhex(data) if isinstance(data, str)
                    else bytes(data))
    raise ValueError(f"unsupported record type {rtype}")


class _ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, owner: LoopbackDns) -> None:
        self.owner = owner

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord | None:
        reply = request.reply()  # aa flag set: we are authoritative
        q = request.q
        # The raw labels, not str(qname), which escapes spaces and the like.
        qname = _norm(".".join(label.decode("latin-1") for label in q.qname.label))
        qtype = QTYPE.get(q.qtype)
        with self.owner.lock:
            self.owner.queries.append((qname, qtype))
            zones = dict(self.owner.zones)
        # reply() copies the question's flags; AD only for signed data.
        wants_ad = bool(request.header.ad) or any(
            getattr(rr, "rtype", None) == QTYPE.OPT and (rr.ttl >> 15) & 1
            for rr in request.ar)
        reply.header.ad = 0
        name = qname
        chain = [qname]
        for _ in range(8):  # CNAME chain limit
            data = zones.get(name)
            if data == "DROP":
                return None  # never answered: the client times out
            if data == "SERVFAIL":
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            if data is None:
                if name == qname and not any(n.endswith("." + name) for n in zones):
                    reply.header.rcode = RCODE.NXDOMAIN
                self._negative(reply, name)
                return self._sign(reply, chain, wants_ad)
            if "CNAME" in data and qtype != "CNAME":
                target = _norm(data["CNAME"])
                reply.add_answer(RR(name + ".", QTYPE.CNAME, ttl=TTL,
                                    rdata=CNAME(target + ".")))
                name = target
                chain.append(name)
                continue
            if qtype not in data and data.get("OTHER") == "DROP":
                return None
            if qtype not in data and data.get("OTHER") == "SERVFAIL":
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            values = data.get(qtype, [])
            if isinstance(values, str):
                values = [values]
            for v in values:
                reply.add_answer(RR(name + ".", getattr(QTYPE, qtype), ttl=TTL,
                                    rdata=_rdata(qtype, v)))
            if not values:
                self._negative(reply, name)
            return self._sign(reply, chain, wants_ad)
        return reply

    def _negative(self, reply: DNSRecord, name: str) -> None:
        """RFC 2308 3: a SOA in the authority section of a negative answer,
        when the server is set to give one (its MINIMUM is the negative TTL)."""
        ttl = self.owner.negative_ttl
        if ttl is not None:
            reply.add_auth(RR(name + ".", QTYPE.SOA, ttl=ttl, rdata=SOA(
                "ns.invalid.", "hostmaster.invalid.", (1, 3600, 600, 86400, ttl))))

    def _sign(self, reply: DNSRecord, chain: list[str], wants_ad: bool) -> DNSRecord:
        if wants_ad and all(self.owner.is_signed(n) for n in chain):
            reply.header.ad = 1
        return reply


class _DropHandler(DNSHandler):  # type: ignore[misc]
    """dnslib's handler, except that a ``None`` from the resolver sends
    nothing (a timeout test) and large UDP answers are truncated (TC set), so
    that the client retries over TCP."""

    def handle(self) -> None:
        if self.server.socket_type == socket.SOCK_STREAM:
            data = self.request.recv(8192)
            if len(data) < 2:
                return
            length = int.from_bytes(data[:2], "big")
            while len(data) - 2 < length:
                more = self.request.recv(8192)
                if not more:
                    return
                data += more
            query, tcp = data[2:2 + length], True
        else:
            query, tcp = self.request[0], False
        try:
            reply = self.server.resolver.resolve(DNSRecord.parse(query), self)
            if reply is None:
                return
            packed: bytes = reply.pack()
            if not tcp and len(packed) > 512:
                # TC set, question kept (dnspython checks it), no records.
                truncated = reply.truncate()
                truncated.add_question(*reply.questions)
                packed = truncated.pack()
        except Exception:  # a malformed query: no answer
            return
        if tcp:
            self.request.sendall(len(packed).to_bytes(2, "big") + packed)
        else:
            self.request[1].sendto(packed, self.client_address)


class LoopbackDns:
    """An authoritative DNS server for ``zones`` on 127.0.0.1 (UDP + TCP)."""

    def __init__(self, zones: Zones | None = None, address: str = "127.0.0.1", *,
                 signed: Iterable[str] = ()) -> None:
        self.address = address
        self.lock = threading.Lock()
        self.zones: dict[str, Any] = {}
        # Answers for these names are "DNSSEC-validated" (the AD bit).
        self.signed: set[str] = {_norm(n) for n in signed}
        self.queries: list[tuple[str, str]] = []
        # With a value, negative answers carry a SOA with that MINIMUM.
        self.negative_ttl: int | None = None
        for name, data in (zones or {}).items():
            self.set(name, data)
        self._servers: list[DNSServer] = []
        self.port = 0

    def set(self, name: str, data: Any) -> None:
        with self.lock:
            self.zones[_norm(name)] = data

    def remove(self, name: str) -> None:
        with self.lock:
            self.zones.pop(_norm(name), None)

    def is_signed(self, name: str) -> bool:
        return _norm(name) in self.signed

    def start(self) -> LoopbackDns:
        resolver = _ZoneResolver(self)
        logger = DNSLogger("-request,-reply,-truncated,-error", logf=lambda *_: None)
        for _attempt in range(20):
            udp = DNSServer(resolver, address=self.address, port=0, logger=logger,
                            handler=_DropHandler)
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(resolver, address=self.address, port=port, tcp=True,
                                logger=logger, handler=_DropHandler)
            except OSError:
                udp.server.server_close()
                continue
            self._servers = [udp, tcp]
            self.port = port
            break
        else:
            raise RuntimeError("no free port for the loopback DNS server")
        for srv in self._servers:
            # A short poll interval makes shutdown() quick.
            threading.Thread(target=srv.server.serve_forever, kwargs={"poll_interval": 0.02},
                             daemon=True).start()
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.server.shutdown()
            srv.server.server_close()
        self._servers = []

    @property
    def nameservers(self) -> tuple[tuple[str, int], ...]:
        """For :class:`postwarden.config.DnsConfig` ``nameservers``."""
        return ((self.address, self.port),)

    def __enter__(self) -> LoopbackDns:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def dns_server() -> Iterator[LoopbackDns]:
    """An empty running :class:`LoopbackDns`; fill it with ``dns_server.set``."""
    with LoopbackDns() as server:
        yield server
