"""Authentication-Results: building (read back with a small RFC 8601
parser), removal of forged fields, and the end-of-DATA entry point."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tests.dns_server import LoopbackDns
from tests.test_dkim_verify import RFC8463_MESSAGE, RFC8463_ZONES

from postwarden.config import DnsConfig
from postwarden.delivery.dns import Resolver
from postwarden.message import authresults
from postwarden.message.arc import ArcResult
from postwarden.message.authresults import (
    SpfOutcome,
    authenticate,
    build,
    parse_authserv_id,
    remove_forged,
)
from postwarden.message.dkim_verify import DkimReport, DkimResult
from postwarden.policy.dmarc import DmarcRecord, DmarcResult

ID = "mail.example.test"

# --- a small RFC 8601 reader ------------------------------------------------------


def _words(text: str) -> list[str]:
    """Split on CFWS and ";" (kept as a word); comments dropped, quoted
    strings unquoted (a word starting with a NUL marks it as quoted)."""
    out: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            j, buf = i + 1, ""
            while text[j] != '"':
                if text[j] == "\\":
                    j += 1
                buf += text[j]
                j += 1
            cur += buf
            i = j + 1
        elif c == "(":
            depth = 0
            while True:
                if text[i] == "\\":
                    i += 2
                    continue
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
                if depth == 0:
                    break
        elif c in " \t;":
            if cur:
                out.append(cur)
            cur = ""
            if c == ";":
                out.append(";")
            i += 1
        else:
            cur += c
            i += 1
    if cur:
        out.append(cur)
    return out


def parse_ar(field: bytes) -> tuple[str, list[dict[str, str]]]:
    """(authserv-id, [{"method": m, "result": r, "reason": .., prop: value}])."""
    assert field.endswith(b"\r\n")
    name, _, value = field.decode("utf-8").partition(":")
    assert name == "Authentication-Results"
    unfolded = value.replace("\r\n", "")
    words = _words(unfolded)
    serv_id = words[0]
    entries: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for w in words[2:]:
        if w == ";":
            entries.append(cur)
            cur = {}
            continue
        key, _, val = w.partition("=")
        if not cur:
            cur = {"method": key, "result": val}
        else:
            cur[key] = val
    if cur:
        entries.append(cur)
    return serv_id, entries


def check_layout(field: bytes) -> None:
    lines = field.split(b"\r\n")
    assert lines[-1] == b""
    for line in lines[1:-1]:
        assert line[:1] in (b" ", b"\t")  # every continuation is folded
        assert b"\r" not in line and b"\n" not in line
    assert all(len(line) <= 998 for line in lines)


# --- building ---------------------------------------------------------------------

DKIM = DkimReport((
    DkimResult("example.org", "sel", "pass", header_b="abc/de+f", algorithm="rsa-sha256"),
    DkimResult("evil.example", "x", "fail", "body hash did not verify", header_b="AAAAAAAA"),
))
DMARC = DmarcResult("pass", "example.org", "reject", "none",
                    DmarcRecord("reject", "quarantine"), "example.org", True, True)


def test_full_header_reads_back() -> None:
    field = build(ID, spf=SpfOutcome("pass", "bounce@example.org", "mx.example.org"),
                  dkim=DKIM, dmarc=DMARC, arc=ArcResult("pass", "success", 2, "lists.example"),
                  remote_ip="192.0.2.7")
    check_layout(field)
    serv_id, entries = parse_ar(field)
    assert serv_id == ID
    assert entries == [
        {"method": "spf", "result": "pass", "smtp.mailfrom": "bounce@example.org"},
        {"method": "dkim", "result": "pass", "header.d": "example.org", "header.s": "sel",
         "header.b": "abc/de+f"},
        {"method": "dkim", "result": "fail", "reason": "body hash did not verify",
         "header.d": "evil.example", "header.s": "x", "header.b": "AAAAAAAA"},
        {"method": "dmarc", "result": "pass", "header.from": "example.org"},
        {"method": "arc", "result": "pass", "smtp.remote-ip": "192.0.2.7"},
    ]
    text = field.decode()
    assert "(p=reject sp=quarantine dis=none)" in text
    assert 'header.b="abc/de+f"' in text  # "/" is a tspecial: quoted (RFC 2045)
    assert "\r\n\tdkim=pass" in text


def test_null_sender_reports_helo() -> None:
    _, entries = parse_ar(build(ID, spf=SpfOutcome("none", "", "mx.example.org")))
    assert entries == [{"method": "spf", "result": "none", "smtp.helo": "mx.example.org"}]


def test_unsigned_and_empty() -> None:
    assert parse_ar(build(ID, dkim=DkimReport()))[1] == [{"method": "dkim", "result": "none"}]
    assert build(ID) == b"Authentication-Results: mail.example.test; none\r\n"


def test_dmarc_fail_and_permerror() -> None:
    fail = DmarcResult("fail", "example.org", "reject", "quarantine",
                       DmarcRecord("reject", pct=50), "example.org",
                       reason="not sampled (pct=50)")
    field = build(ID, dmarc=fail)
    assert "(p=reject sp=reject dis=quarantine)" in field.decode()
    assert parse_ar(field)[1] == [{"method": "dmarc", "result": "fail",
                                   "reason": "not sampled (pct=50)",
                                   "header.from": "example.org"}]
    perm = build(ID, dmarc=DmarcResult("permerror", "", "reject", "reject",
                                       reason="multiple From fields"))
    assert parse_ar(perm)[1] == [{"method": "dmarc", "result": "permerror",
                                  "reason": "multiple From fields"}]


def test_ipv6_remote_ip_is_quoted() -> None:
    field = build(ID, arc=ArcResult("none"), remote_ip="2001:db8::1")
    assert 'smtp.remote-ip="2001:db8::1"' in field.decode()
    assert parse_ar(field)[1][0]["smtp.remote-ip"] == "2001:db8::1"


@pytest.mark.parametrize("hostile", [
    'x@example.org\r\nX-Injected: yes',
    'a;dkim=pass@example.org',
    '"quoted\\"local"@example.org',
    "(comment)@example.org",
    "j\u00f6rg@b\u00fccher.example",
])
def test_hostile_values_stay_inside_the_field(hostile: str) -> None:
    dkim = DkimReport((DkimResult(hostile, hostile, "fail", reason=f"bad ({hostile})",
                                  header_b=hostile[:8]),))
    field = build(ID, spf=SpfOutcome("fail", hostile, hostile, comment=hostile), dkim=dkim)
    check_layout(field)
    _, entries = parse_ar(field)
    clean = hostile.replace("\r", "").replace("\n", "")
    assert [e["method"] for e in entries] == ["spf", "dkim"]
    assert entries[0]["smtp.mailfrom"] == clean
    assert entries[1]["header.d"] == clean
    assert b"\r\nX-Injected" not in field


def test_long_values_are_folded() -> None:
    long_domain = ".".join(["label" + str(n) for n in range(20)]) + ".example"
    dkim = DkimReport((DkimResult(long_domain, "selector2024", "pass", header_b="AbCdEfGh"),))
    field = build(ID, dkim=dkim)
    check_layout(field)
    assert max(len(line) for line in field.split(b"\r\n")) < 200
    assert parse_ar(field)[1][0]["header.d"] == long_domain


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.text(max_size=80))
def test_build_fuzz(mail_from: str, domain: str) -> None:
    field = build(ID, spf=SpfOutcome("pass", mail_from, "h"),
                  dkim=[DkimResult(domain, domain, "pass", domain, header_b=domain[:8])])
    check_layout(field)
    _, entries = parse_ar(field)
    assert [e["method"] for e in entries] == ["spf", "dkim"]


# --- forged fields ----------------------------------------------------------------

OTHER = b"Authentication-Results: other.example; spf=pass smtp.mailfrom=a@b.example\r\n"
KEEP = [
    b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n",
    OTHER,
    b"Authentication-Results: mail.example.test.evil.example; dkim=pass\r\n",
    b"Authentication-Results: (mail.example.test) other.example; dkim=pass\r\n",
    b"authentication-results:other.example;\r\n\tdmarc=pass\r\n",
    b"X-Authentication-Results: mail.example.test; dkim=pass\r\n",
    b"ARC-Authentication-Results: i=1; mail.example.test; dkim=pass\r\n",
    b"Subject:   spaced   \r\n",
]
FORGED = [
    b"Authentication-Results: mail.example.test; spf=pass smtp.mailfrom=a@b.example\r\n",
    b"Authentication-Results: MAIL.Example.TEST; dkim=pass\r\n",
    b"Authentication-Results: mail.example.test.; dkim=pass\r\n",
    b'Authentication-Results: "mail.example.test"; dkim=pass\r\n',
    b"Authentication-Results: (forged (nested)) mail.example.test; dmarc=pass\r\n",
    b"Authentication-Results:mail.example.test;dkim=pass\r\n",
    b"Authentication-Results: mail.example.test 1; dkim=pass\r\n",
    b"Authentication-Results:\r\n  mail.example.test;\r\n  dkim=pass header.d=bank.example\r\n",
    b"AUTHENTICATION-RESULTS: mail.example.test; none\r\n",
    b"Authentication-Results : mail.example.test; dkim=pass\r\n",  # RFC 5322 4.5.8
]


@pytest.mark.parametrize("forged", FORGED)
def test_forged_field_removed(forged: bytes) -> None:
    head = b"".join(KEEP[:4])
    tail = b"".join(KEEP[4:])
    body = b"\r\nAuthentication-Results: mail.example.test; in the body\r\n"
    cleaned, n = remove_forged(head + forged + tail + body, ID)
    assert n == 1
    assert cleaned == head + tail + body  # everything else byte-identical


def test_fields_of_other_ids_are_kept() -> None:
    block = b"".join(KEEP) + b"\r\nbody\r\n"
    assert remove_forged(block, ID) == (block, 0)


def test_several_forged_and_lf_line_ends() -> None:
    block = (FORGED[0] + OTHER + FORGED[1] + FORGED[7] + b"\r\n").replace(b"\r\n", b"\n")
    cleaned, n = remove_forged(block, ID)
    assert n == 3
    assert cleaned == (OTHER + b"\r\n").replace(b"\r\n", b"\n")


@pytest.mark.parametrize(("value", "expected"), [
    (b" mail.example.test; x", "mail.example.test"),
    (b" (c) \"Quoted.Example\" ; x", "quoted.example"),
    (b"\r\n\t(a\\)b) host.example;", "host.example"),
    (b" ;", None),
    (b" (unterminated", None),
    (b"", None),
])
def test_parse_authserv_id(value: bytes, expected: str | None) -> None:
    assert parse_authserv_id(value) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(KEEP + FORGED + [b"garbage\r\n", b" cont\r\n"]),
                max_size=8))
def test_remove_forged_fuzz(fields: list[bytes]) -> None:
    block = b"".join(fields) + b"\r\nbody\r\n"
    cleaned, n = remove_forged(block, ID)
    # The model: a forged field goes with the continuation lines after it.
    expected, dropping = [], False
    for f in fields:
        if not f.startswith(b" "):
            dropping = f in FORGED
        if not dropping:
            expected.append(f)
    assert cleaned == b"".join(expected) + b"\r\nbody\r\n"
    assert n == sum(f in FORGED for f in fields)
    again, m = remove_forged(cleaned, ID)
    assert (again, m) == (cleaned, 0)
    assert cleaned.endswith(b"\r\nbody\r\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_authserv_id_fuzz(value: bytes) -> None:
    result = parse_authserv_id(value)
    assert result is None or (result and result == result.lower())


# --- end of DATA ------------------------------------------------------------------


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    zones = dict(RFC8463_ZONES)
    zones["_dmarc.football.example.com"] = {"TXT": ["v=DMARC1; p=reject"]}
    with LoopbackDns(zones) as server:
        yield server


def test_authenticate_rfc8463_message(dns: LoopbackDns) -> None:
    resolver = Resolver(DnsConfig(nameservers=dns.nameservers, timeout=2.0))
    outcome = asyncio.run(authenticate(
        RFC8463_MESSAGE, resolver, authserv_id=ID, client_ip="192.0.2.9",
        helo="mx.football.example.com", mail_from="joe@football.example.com",
        spf_result="softfail", rng=random.Random(1)))
    assert [r.result for r in outcome.dkim.results] == ["pass", "pass"]
    assert (outcome.dmarc.result, outcome.dmarc.dkim_aligned, outcome.dmarc.spf_aligned) == (
        "pass", True, False)
    assert outcome.arc.cv == "none"
    check_layout(outcome.header)
    serv_id, entries = parse_ar(outcome.header)
    assert serv_id == ID
    assert [(e["method"], e["result"]) for e in entries] == [
        ("spf", "softfail"), ("dkim", "pass"), ("dkim", "pass"), ("dmarc", "pass"),
        ("arc", "none")]
    assert entries[3]["header.from"] == "football.example.com"
    assert entries[4]["smtp.remote-ip"] == "192.0.2.9"


def test_authenticate_spoofed_from_fails_dmarc(dns: LoopbackDns) -> None:
    resolver = Resolver(DnsConfig(nameservers=dns.nameservers, timeout=2.0))
    message = b"From: ceo@football.example.com\r\nSubject: wire money\r\n\r\nnow\r\n"
    outcome = asyncio.run(authenticate(
        message, resolver, authserv_id=ID, client_ip="203.0.113.5", helo="evil.example",
        mail_from="x@evil.example", spf_result="pass", rng=random.Random(1)))
    assert (outcome.dmarc.result, outcome.dmarc.disposition) == ("fail", "reject")
    assert parse_ar(outcome.header)[1][1] == {"method": "dkim", "result": "none"}


# --- quick paths held to the general ones ----------------------------------------

_CTL_REF = re.compile(r"[\x00-\x1f\x7f]")


def _value_reference(text: str) -> str:
    """value() as first written: every check by regular expression."""
    text = _CTL_REF.sub("", text)[:authresults.MAX_VALUE]
    if not text.isascii():
        return authresults.quote(text)
    if authresults._TOKEN.match(text) or authresults._DOMAIN.match(text):
        return text
    local, at, domain = text.rpartition("@")
    if at and authresults._DOT_ATOM.match(local) and authresults._DOMAIN.match(domain):
        return text
    return authresults.quote(text)


def _quote_reference(text: str) -> str:
    escaped = (_CTL_REF.sub("", text)[:authresults.MAX_VALUE]
               .replace("\\", "\\\\").replace('"', '\\"'))
    return f'"{escaped}"'


VALUE_TEXT = st.one_of(
    st.text(max_size=300),
    st.text(alphabet="ab-_.@\"\\ \t\r\n\x7f\x85é()", max_size=30),
    st.from_regex(r"[a-z0-9._-]{0,70}(@[a-z0-9._-]{0,70})?", fullmatch=True),
)


@settings(max_examples=500, deadline=None)
@given(VALUE_TEXT)
def test_value_and_quote_equal_the_regex_only_versions(text: str) -> None:
    assert authresults.value(text) == _value_reference(text)
    assert authresults.quote(text) == _quote_reference(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(KEEP + FORGED + [
    b"garbage\r\n", b" cont\r\n", b"X-Authentication-Results: mail.example.test;\r\n",
    b"Authentication-Result: mail.example.test;\r\n", b"aUtHeNtIcAtIoN-rEsUlTs: x;\r\n"]),
    max_size=8), st.sampled_from([b"\r\nbody\r\n", b"", b"\r\nAuthentication-Results: x\r\n"]))
def test_remove_forged_quick_scan_equals_the_split(fields: list[bytes], rest: bytes) -> None:
    """Without the name scan (every block split into fields) the answer is
    the same."""
    block = b"".join(fields) + rest
    quick = remove_forged(block, ID)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(authresults, "_QUICK_SCAN", -1)
        assert remove_forged(block, ID) == quick


def _fold_reference(first: str, entries: list[list[str]]) -> bytes:
    """_fold() as first written: every word placed one at a time."""
    lines = [first + (";" if entries else "; none")]
    for n, words in enumerate(entries):
        line = "\t" + words[0]
        for word in words[1:]:
            if len(line) + 1 + len(word) > authresults.LINE_LENGTH:
                lines.append(line)
                line = "\t  " + word
            else:
                line += " " + word
        lines.append(line + (";" if n < len(entries) - 1 else ""))
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


@settings(max_examples=500, deadline=None)
@given(st.lists(st.lists(st.one_of(st.text(alphabet="ab=é.", min_size=1, max_size=40),
                                   st.integers(1, 80).map(lambda n: "w" * n)),
                         min_size=1, max_size=6), max_size=5))
# A line of exactly LINE_LENGTH characters, and one over (tab included).
@example([["x" * 77]])
@example([["x" * 78]])
@example([["a" * 38, "b" * 38], ["c"]])
@example([["a" * 38, "b" * 39], ["c"]])
def test_fold_equals_word_by_word_folding(entries: list[list[str]]) -> None:
    first = "Authentication-Results: mail.example.test"
    assert authresults._fold(first, entries) == _fold_reference(first, entries)
