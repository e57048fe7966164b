"""Parsing of envelope paths and parameters: tables and properties."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden.envelope import Address
from postwarden.smtp.address import (
    PathError,
    parse_mail_params,
    parse_path,
    parse_rcpt_params,
    split_path_and_params,
    xtext_decode,
    xtext_encode,
)


@pytest.mark.parametrize(("text", "local", "domain"), [
    ("<u@example.test>", "u", "example.test"),
    ("<U.Name+tag@EXAMPLE.Test>", "U.Name+tag", "example.test"),
    ('<"u"@example.test>', "u", "example.test"),  # equivalent quoted form
    ('<"john doe"@example.test>', '"john doe"', "example.test"),
    ("<u@[127.0.0.1]>", "u", "[127.0.0.1]"),
    ("<u@[IPv6:0:0::1]>", "u", "[IPv6:::1]"),
    ("<@relay.example:u@example.test>", "u", "example.test"),
])
def test_valid_paths(text: str, local: str, domain: str) -> None:
    path = parse_path(text)
    assert path.address == Address(local, domain)


@pytest.mark.parametrize(("text", "code"), [
    ("u@example.test", 501),  # no brackets
    ("<u@ext@example.test>", 501),
    ("<u@example.test.>", 501),  # trailing dot
    ("<u@-bad.example>", 501),
    ("<u@exa mple.test>", 501),
    ("<u..v@example.test>", 501),
    ("<.u@example.test>", 501),
    ("<u@>", 501),
    ("<@example.test>", 501),
    ("<u>", 501),
    ("<u@[300.1.1.1]>", 501),
    ('<"unterminated@example.test>', 501),
    ("<" + "a" * 65 + "@example.test>", 501),
    ("<ü@example.test>", 553),  # needs SMTPUTF8
    ("<u@bücher.example>", 553),
])
def test_invalid_paths(text: str, code: int) -> None:
    with pytest.raises(PathError) as info:
        parse_path(text)
    assert info.value.reply.code == code


@pytest.mark.parametrize("text", ["<u%ext.example@example.test>", "<ext.example!u@example.test>",
                                  '<"u@ext.example"@example.test>'])
def test_routing_forms_are_flagged(text: str) -> None:
    assert parse_path(text).routing


def test_source_route_is_kept_apart() -> None:
    path = parse_path("<@a.example,@b.example:u@ext.example>")
    assert path.source_route == ("a.example", "b.example")
    assert path.address == Address("u", "ext.example")


def test_utf8_addresses_with_smtputf8() -> None:
    path = parse_path("<ü@bücher.example>", utf8=True)
    assert path.address == Address("ü", "bücher.example")


def test_null_and_postmaster() -> None:
    assert parse_path("<>", allow_null=True).address is None
    with pytest.raises(PathError):
        parse_path("<>")
    assert parse_path("<Postmaster>", allow_postmaster=True).address == Address("postmaster", "")


def test_split_path_and_params() -> None:
    assert split_path_and_params("FROM:<a@b.example> SIZE=1", "FROM:") == (
        "<a@b.example>", "SIZE=1")
    assert split_path_and_params("from: <a@b.example>", "FROM:") == ("<a@b.example>", "")
    assert split_path_and_params('TO:<"a>b"@c.example>', "TO:") == ('<"a>b"@c.example>', "")
    with pytest.raises(PathError):
        split_path_and_params("FROM:<a@b.example>SIZE=1", "FROM:")


def test_params() -> None:
    p = parse_mail_params("SIZE=100 BODY=8bitmime SMTPUTF8 RET=full ENVID=x+2By",
                          esmtp=True, size_max=1000)
    assert (p.size, p.body, p.smtputf8, p.ret, p.envid) == (100, "8BITMIME", True, "FULL", "x+y")
    r = parse_rcpt_params("NOTIFY=failure,delay ORCPT=rfc822;a+40b.example", esmtp=True)
    assert r.notify == ("FAILURE", "DELAY") and r.orcpt == "rfc822;a@b.example"


_atext = st.sampled_from("abcxyzABC0189!#$%&'*+/=?^_`{|}~-")
_atom = st.text(_atext, min_size=1, max_size=8)
_local = st.lists(_atom, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 64)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)


@settings(max_examples=300)
@given(_local, _domain)
def test_dot_string_round_trip(local: str, domain: str) -> None:
    path = parse_path(f"<{local}@{domain}>")
    assert path.address == Address(local, domain.lower())
    assert path.routing == any(c in local for c in "%!")


@settings(max_examples=300)
@given(_local, _domain)
def test_quoted_form_is_equivalent(local: str, domain: str) -> None:
    quoted = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert parse_path(f"<{quoted}@{domain}>").address == Address(local, domain)


@settings(max_examples=500)
@given(st.text(max_size=80))
def test_arbitrary_text_raises_only_path_error(text: str) -> None:
    for candidate in (text, f"<{text}>", f"<{text}@example.test>"):
        try:
            path = parse_path(candidate, utf8=True, allow_null=True, allow_postmaster=True)
        except PathError as exc:
            assert exc.reply.code in (501, 553)
        else:
            if path.address is not None and path.address.domain:
                # Whatever parses has exactly one unquoted @ boundary.
                assert "\r" not in str(path.address) and "\n" not in str(path.address)


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_params_raise_only_path_error(text: str) -> None:
    for fn in (lambda: parse_mail_params(text, esmtp=True, size_max=10**9),
               lambda: parse_rcpt_params(text, esmtp=True)):
        with contextlib.suppress(PathError):
            fn()


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=50))
def test_xtext_round_trip(text: str) -> None:
    assert xtext_decode(xtext_encode(text)) == text
