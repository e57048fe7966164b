"""The header fields of a raw message, as byte spans: where each starts and ends.

Owns the one splitter of a header section (RFC 5322 2.2, 2.2.3 folding) that
DKIM key prefetch, ARC, DMARC's From extraction and the removal of forged
Authentication-Results share.  It works on bytes and never rewrites them, so
a caller can drop some fields and keep every other byte identical.

A field name is one or more printable ASCII characters other than ``:``
followed by ``:`` (RFC 5322 3.6.8), or by whitespace and ``:`` (the obsolete
syntax of RFC 5322 4.5.8, which readers still accept, so it is counted: a
second ``From :`` is a second From field).
A line that is neither a field nor a continuation (it does not start with
space or tab) is counted in ``malformed`` and skipped; the header section
still goes on to the first empty line, so a garbage line cannot hide the
fields after it.  An mbox ``From sender date`` line is such a malformed line
(SMTP never carries one); it is not skipped specially, because ``From :`` at
the top is a real field.

Each parse also keeps an index of its fields by lower-cased name, so that
the many lookups of one message (DKIM, ARC, DMARC, the filters) are dict
lookups instead of scans of every field, and each field's lower-cased name
is computed once.

Security exposure: the input is the client's message.  The scan is linear
(one ``find`` per line) and allocates one small record per field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")


@dataclass(frozen=True, slots=True)
class Field:
    """One header field: ``data[start:end]`` is the whole field including
    its continuation lines and final line end; the value starts after the
    colon at ``value_start``; ``lname`` is ``name`` in lower case (field
    names are case-insensitive, RFC 5322 1.2.2)."""

    name: bytes
    start: int
    end: int
    value_start: int
    lname: bytes = field(compare=False, repr=False)

    def raw(self, data: bytes) -> bytes:
        return data[self.start:self.end]

    def value(self, data: bytes) -> bytes:
        """The value with folding removed (RFC 5322 2.2.3: CRLF before WSP)."""
        return unfold(data[self.value_start:self.end])


@dataclass(frozen=True, slots=True)
class HeaderBlock:
    """The fields in order; ``end`` is the offset of the empty line (or of
    the end of the data when there is none), ``body_start`` the offset after
    it; ``malformed`` counts lines that were neither fields nor folds.
    ``by_name`` maps each lower-cased name to its fields in order; it is
    shared by every holder of the block (see the memo): read it, never
    change it."""

    fields: tuple[Field, ...]
    end: int
    body_start: int
    malformed: int = 0
    by_name: dict[bytes, list[Field]] = field(default_factory=dict, compare=False,
                                              repr=False)

    def named(self, name: bytes) -> list[Field]:
        """The fields called ``name`` (any case), in order, as a new list."""
        return list(self.by_name.get(name.lower(), ()))

    def first(self, name: bytes) -> Field | None:
        """The first field called ``name`` (lower case), or None."""
        found = self.by_name.get(name)
        return found[0] if found else None


def unfold(value: bytes) -> bytes:
    """Remove the line breaks of a folded value, keeping the whitespace."""
    return value.replace(b"\r", b"").replace(b"\n", b"")


# The last header parsed, with its result.  One message's header is parsed
# by several stages, each holding its own bytes object: the header block
# alone (forged Authentication-Results), the message as received (DKIM,
# ARC, DMARC), the message as queued (filters).  The parse stops at the
# empty line, so its result holds for any data that starts with the same
# bytes up to and including that line.  Only for headers up to this size.
_MEMO_MAX = 1 << 20
_memo: tuple[bytes, HeaderBlock] | None = None  # (data up to the body, block)


def parse_header(data: bytes) -> HeaderBlock:
    """Split the header section of ``data`` (a message or a header block,
    CRLF or bare LF line ends) into fields."""
    global _memo
    memo = _memo
    if memo is not None and data.startswith(memo[0]):
        return memo[1]
    block = _parse(data)
    # Remembered only when the empty line was found (the answer is final).
    if block.end < block.body_start <= _MEMO_MAX:
        _memo = (bytes(data[:block.body_start]), block)
    return block


def parse_part_header(data: bytes) -> HeaderBlock:
    """As :func:`parse_header`, without the memo: for the header of a MIME
    part, which must not displace the message's header from the memo (and
    is read once)."""
    return _parse(data)


def _parse(data: bytes) -> HeaderBlock:
    fields: list[Field] = []
    malformed = 0
    pos = 0
    size = len(data)
    end = size
    # (name, start, value_start) of the field being collected.
    current: tuple[bytes, int, int] | None = None
    while pos < size:
        nl = data.find(b"\n", pos)
        line_end = size if nl < 0 else nl + 1
        first = data[pos]
        if nl == pos or (first == 13 and nl == pos + 1):  # the empty line: LF or CRLF
            end = pos
            break
        if first == 32 or first == 9:  # SP or HTAB: a continuation (RFC 5322 2.2.3)
            if current is None:
                malformed += 1  # a continuation with nothing to continue
        else:
            if current is not None:
                fields.append(Field(current[0], current[1], pos, current[2],
                                    current[0].lower()))
                current = None
            m = _NAME.match(data, pos, line_end)
            if m is None:
                malformed += 1
            else:
                current = (m.group(1), pos, m.end())
        pos = line_end
    else:
        line_end = size
    if current is not None:
        fields.append(Field(current[0], current[1], end, current[2], current[0].lower()))
    by_name: dict[bytes, list[Field]] = {}
    for f in fields:
        same = by_name.get(f.lname)
        if same is None:
            by_name[f.lname] = [f]
        else:
            same.append(f)
    return HeaderBlock(tuple(fields), end, line_end, malformed, by_name)
