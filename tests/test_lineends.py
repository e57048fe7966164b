"""Line-end conversions: the fast test for CRLF-only text against the
obvious conversions, on text with and without bare CRs and LFs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden.message.lineends import crlf_to_lf, to_crlf, to_lf

pieces = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"x", b".", b"\r\r\n",
                                   b"\n\r"]), max_size=30).map(b"".join)


@pytest.mark.parametrize(("data", "lf"), [
    (b"", b""),
    (b"no line end", b"no line end"),
    (b"a\r\nb\r\n", b"a\nb\n"),
    (b"a\r\n\r\n.\r\n", b"a\n\n.\n"),
    (b"a\nb\r\n", None),  # bare LF
    (b"a\rb\r\n", None),  # bare CR
    (b"a\r\r\n", None),
    (b"a\r", None),
    (b"\n\r", None),
])
def test_crlf_to_lf_only_for_crlf_text(data: bytes, lf: bytes | None) -> None:
    assert crlf_to_lf(data) == lf


@settings(max_examples=500, deadline=None)
@given(pieces)
def test_conversions_match_the_obvious_ones(data: bytes) -> None:
    crlf_only = data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
    assert (crlf_to_lf(data) is not None) == crlf_only
    assert to_crlf(data) == data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(
        b"\n", b"\r\n")
    assert to_lf(data) == data.replace(b"\r\n", b"\n")
