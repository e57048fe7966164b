"""A loopback DNS stub: every query gets NXDOMAIN at once, and is counted.

postwarden checks SPF, DKIM, ARC and DMARC on inbound mail by default and
looks up MTA-STS/DANE data for outbound mail.  The bench must not send a
single query off the machine, so postwarden's ``[dns] nameservers`` points
here.  NXDOMAIN everywhere means: no SPF or DMARC record for the bench's
sender domain, so the checks find "none" and the mail is accepted, as with a
real sender domain that publishes nothing.  Postfix does no DNS at all in
the bench (``disable_dns_lookups``).

It runs in a thread of the bench process (UDP only; answers are far below
512 bytes) and counts queries by type, so the report can say how many
lookups postwarden made per message.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading

QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
          33: "SRV", 43: "DS", 48: "DNSKEY", 52: "TLSA"}


# The authority section of every answer: a SOA for the root zone whose TTL and
# MINIMUM (300 s) make the NXDOMAIN cacheable, as real servers' answers are
# (RFC 2308 3; without a SOA a negative answer is not cached).
NEGATIVE_TTL = 300
NEGATIVE_SOA = (b"\x00" + struct.pack("!HHIH", 6, 1, NEGATIVE_TTL, 22) + b"\x00\x00"
                + struct.pack("!IIIII", 1, 3600, 600, 86400, NEGATIVE_TTL))


def nxdomain(query: bytes) -> tuple[bytes, str] | None:
    """The NXDOMAIN answer to ``query`` and the query's type, or None if
    it is not a parsable one-question query."""
    if len(query) < 12:
        return None
    qid, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qdcount != 1:
        return None
    pos = 12
    while pos < len(query) and query[pos] != 0:
        if query[pos] & 0xC0:
            return None
        pos += 1 + query[pos]
    end = pos + 5
    if end > len(query):
        return None
    qtype = struct.unpack("!H", query[pos + 1:pos + 3])[0]
    # QR, the query's opcode, AA, RD as asked, RA, RCODE 3 (NXDOMAIN).
    answer_flags = 0x8000 | (flags & 0x7800) | 0x0400 | (flags & 0x0100) | 0x0080 | 3
    header = struct.pack("!HHHHHH", qid, answer_flags, 1, 0, 1, 0)
    return header + query[12:end] + NEGATIVE_SOA, QTYPES.get(qtype, str(qtype))


class DnsStub:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.counts: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dnsstub", daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = nxdomain(query)
            if reply is None:
                continue
            self.counts[reply[1]] += 1
            with contextlib.suppress(OSError):
                self.sock.sendto(reply[0], peer)

    def take_counts(self) -> dict[str, int]:
        """The counts since the last call (and reset them)."""
        counts, self.counts = self.counts, collections.Counter()
        return dict(counts)

    def start(self) -> DnsStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
