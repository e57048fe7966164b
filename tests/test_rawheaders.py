"""The header splitter shared by DKIM, ARC, DMARC and the filters, and its
memo of the last header parsed (message/rawheaders.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden.message import rawheaders
from postwarden.message.rawheaders import _parse, parse_header

MESSAGE = (b"From: a@example.com\r\nSubject: hi\r\n  folded\r\n"
           b"To: b@example.org\r\n\r\nbody line\r\nX-Not: a header\r\n")


def test_fields_of_a_message() -> None:
    block = parse_header(MESSAGE)
    assert [f.name for f in block.fields] == [b"From", b"Subject", b"To"]
    assert block.fields[1].value(MESSAGE) == b" hi  folded"
    assert MESSAGE[block.body_start:] == b"body line\r\nX-Not: a header\r\n"


def test_the_same_header_in_other_objects_gives_the_same_answer() -> None:
    """The stages each hold their own copy: the header block alone, the
    message as received, the message as queued."""
    head = MESSAGE[:MESSAGE.index(b"\r\n\r\n") + 4]
    first = parse_header(head)
    for other in (MESSAGE, head + b"other body", bytearray(MESSAGE)):
        assert parse_header(other) == first == _parse(other)
    # A different header is parsed afresh.
    changed = b"From: c@example.net\r\n" + MESSAGE
    assert parse_header(changed) == _parse(changed) != first


_LINES = st.sampled_from([
    b"From: a@example.com\r\n", b"Subject: x\r\n", b" folded\r\n", b"\tfolded\r\n",
    b"\r\n", b"\n", b"not a field\r\n", b"X: y\n", b"body\r\n", b"", b"To: b@example.org"])


@settings(max_examples=1000, deadline=None)
@given(st.lists(_LINES, max_size=8).map(b"".join), st.lists(_LINES, max_size=8).map(b"".join),
       st.integers(min_value=0, max_value=200))
def test_the_memo_never_changes_an_answer(first: bytes, tail: bytes, cut: int) -> None:
    """Whatever was parsed before, the answer is that of a fresh parse."""
    parse_header(first)
    second = first[:cut] + tail
    assert parse_header(second) == _parse(second)
    rawheaders._memo = None


def _reference_parse(data: bytes) -> tuple[list[tuple[bytes, int, int, int]], int, int, int]:
    """The splitter as first written (slices each line), kept as the oracle
    for the faster one: (fields, end, body_start, malformed)."""
    fields: list[tuple[bytes, int, int, int]] = []
    malformed = pos = 0
    size = len(data)
    current: tuple[bytes, int, int] | None = None
    while pos < size:
        nl = data.find(b"\n", pos)
        line_end = size if nl < 0 else nl + 1
        line = data[pos:line_end]
        if line in (b"\r\n", b"\n"):
            if current is not None:
                fields.append((current[0], current[1], pos, current[2]))
            return fields, pos, line_end, malformed
        if line[:1] in (b" ", b"\t"):
            if current is None:
                malformed += 1
        else:
            if current is not None:
                fields.append((current[0], current[1], pos, current[2]))
                current = None
            m = rawheaders._NAME.match(line)
            if m is None:
                malformed += 1
            else:
                current = (m.group(1), pos, pos + m.end())
        pos = line_end
    if current is not None:
        fields.append((current[0], current[1], size, current[2]))
    return fields, size, size, malformed


_PIECES = st.sampled_from([
    b"From", b"fROM", b"Subject", b"X-A", b"to", b":", b" :", b": ", b" ", b"\t", b"\r", b"\n",
    b"\r\n", b"v", b"\xff", b"@", b"a b"])


@settings(max_examples=2000, deadline=None)
@given(st.lists(_PIECES, max_size=30).map(b"".join), st.booleans())
def test_the_splitter_and_its_index_agree_with_the_reference(data: bytes, mutable: bool
                                                             ) -> None:
    """Fields, offsets and counts are those of the reference splitter; the
    index by lower-cased name holds the same fields in the same order."""
    subject = bytearray(data) if mutable else data
    block = _parse(subject)
    assert ([(f.name, f.start, f.end, f.value_start) for f in block.fields],
            block.end, block.body_start, block.malformed) == _reference_parse(subject)
    index: dict[bytes, list[rawheaders.Field]] = {}
    for f in block.fields:
        assert f.lname == f.name.lower()
        index.setdefault(f.name.lower(), []).append(f)
    assert block.by_name == index
    for name in (b"from", b"FROM", b"subject", b"x-a", b"to", b"missing"):
        expected = [f for f in block.fields if f.name.lower() == name.lower()]
        assert block.named(name) == expected
        assert block.first(name.lower()) == (expected[0] if expected else None)
