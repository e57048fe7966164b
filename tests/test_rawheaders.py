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
