"""Built-in content filters as tables: spam rules, attachments, outgoing
content review, the config section, and the chain's fail-closed/fail-open."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import zipfile

import pytest

from postwarden.filter import dlp, settings
from postwarden.filter.attachments import AttachmentSettings, AttachmentsFilter, extension
from postwarden.filter.chain import FilterChain
from postwarden.filter.rules import GTUBE, CustomRule, RulesFilter, RulesSettings
from postwarden.filter.verdict import Action, FilterMessage, FilterUnavailable, FilterVerdict

CLEAN_HEAD = (b"From: Alice <alice@example.org>\r\nTo: bob@example.test\r\n"
              b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n"
              b"Subject: hello\r\n")


def msg(data: bytes, direction: str = "inbound", auth_results: bytes = b"") -> FilterMessage:
    return FilterMessage(data=data, direction=direction, auth_results=auth_results)


# ---- spam rules ------------------------------------------------------------

@pytest.mark.parametrize(("message", "auth", "expect_rules", "action"), [
    (CLEAN_HEAD + b"\r\nhi\r\n", b"", [], Action.ACCEPT),
    (b"To: b@example.test\r\nSubject: x\r\n\r\nhi\r\n", b"",
     ["MISSING_DATE", "MISSING_MESSAGE_ID", "MISSING_FROM"], Action.HEADERS),
    (b"From: nobody\r\nDate: x\r\nMessage-ID: <1@x>\r\n\r\nhi\r\n", b"",
     ["MALFORMED_FROM"], Action.ACCEPT),
    (CLEAN_HEAD + b"From: second@example.org\r\n\r\nhi\r\n", b"", ["MULTIPLE_FROM"],
     Action.ACCEPT),
    (CLEAN_HEAD + b"\r\n" + GTUBE + b"\r\n", b"", ["GTUBE"], Action.REJECT),
    (CLEAN_HEAD + b"\r\nhi\r\n",
     b"Authentication-Results: mx; spf=fail smtp.mailfrom=a; dkim=fail; dmarc=fail\r\n",
     ["SPF_FAIL", "DKIM_FAIL", "DMARC_FAIL"], Action.HEADERS),
    (CLEAN_HEAD + b"\r\nhi\r\n", b"Authentication-Results: mx; spf=softfail; dkim=pass\r\n",
     ["SPF_SOFTFAIL"], Action.ACCEPT),
])
def test_builtin_rules(message: bytes, auth: bytes, expect_rules: list[str],
                       action: Action) -> None:
    verdict = RulesFilter(RulesSettings()).check(msg(message, auth_results=auth))
    assert isinstance(verdict, FilterVerdict)
    assert list(verdict.rules) == expect_rules
    assert verdict.action is action
    if action is Action.HEADERS:
        names = [k for k, _ in verdict.headers]
        assert names == ["X-Spam-Flag", "X-Spam-Score", "X-Spam-Rules"]
    if action is Action.REJECT:
        assert verdict.reply is not None and verdict.reply.code == 554


def test_custom_rules_score_against_thresholds() -> None:
    rules = RulesSettings(tag=3, quarantine=6, reject=0, custom=(
        CustomRule("LOTTERY", re.compile(rb"(?i)lottery"), 4.0, "subject"),
        CustomRule("WIRE", re.compile(rb"(?i)western union"), 3.0, "body"),
        CustomRule("MAILER", re.compile(rb"(?i)x-mailer: bulk"), 1.0, "headers"),
    ))
    f = RulesFilter(rules)
    v = f.check(msg(CLEAN_HEAD.replace(b"hello", b"You won the LOTTERY") + b"\r\nhi\r\n"))
    assert isinstance(v, FilterVerdict)
    assert v.action is Action.HEADERS and v.rules == ("LOTTERY",) and v.score == 4.0
    v = f.check(msg(CLEAN_HEAD.replace(b"hello", b"lottery") + b"X-Mailer: Bulk\r\n\r\n"
                    b"send via Western Union\r\n"))
    assert isinstance(v, FilterVerdict)
    assert v.action is Action.QUARANTINE and set(v.rules) == {"LOTTERY", "WIRE", "MAILER"}
    # A body rule does not look at the header, nor a header rule at the body.
    v = f.check(msg(CLEAN_HEAD + b"\r\nlottery\r\n"))
    assert isinstance(v, FilterVerdict) and v.rules == ()


def test_dnsbl_score_counts_for_inbound_only() -> None:
    async def listed(ip: str) -> int:
        return 2 if ip == "192.0.2.9" else 0

    f = RulesFilter(RulesSettings(), listed)
    m = FilterMessage(CLEAN_HEAD + b"\r\nhi\r\n", "inbound", client_ip="192.0.2.9")
    v = asyncio.run(f.check(m))  # type: ignore[arg-type]
    assert v.rules == ("DNSBL",) and v.score == 4.0


# ---- attachments -----------------------------------------------------------

def multipart(*parts: tuple[str, str, bytes]) -> bytes:
    """A multipart/mixed message with (content type, filename, content) parts."""
    out = CLEAN_HEAD + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n'
    out += b"\r\npreamble\r\n--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
    for ctype, name, content in parts:
        disp = f'attachment; filename="{name}"' if name else "inline"
        out += (f"--b1\r\nContent-Type: {ctype}\r\nContent-Disposition: {disp}\r\n"
                "Content-Transfer-Encoding: base64\r\n\r\n").encode()
        out += base64.encodebytes(content).replace(b"\n", b"\r\n")
    return out + b"--b1--\r\n"


def zipped(*members: tuple[str, bytes], encrypt: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, content in members:
            z.writestr(name, content)
    data = bytearray(buf.getvalue())
    if encrypt:  # set the "encrypted" flag bit in every header (enough to detect)
        for sig in (b"PK\x03\x04", b"PK\x01\x02"):
            i = data.find(sig)
            while i >= 0:
                off = i + (6 if sig == b"PK\x03\x04" else 8)
                data[off] |= 1
                i = data.find(sig, i + 4)
    return bytes(data)


PE = b"MZ\x90\x00" + b"\x00" * 60 + b"This program cannot be run in DOS mode"
OLE_MACRO = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 100 + "_VBA_PROJECT".encode(
    "utf-16-le")


@pytest.mark.parametrize(("parts", "blocked", "why"), [
    ([("application/pdf", "invoice.pdf", b"%PDF-1.4 fine")], False, ""),
    ([("application/octet-stream", "invoice.pdf.exe", b"xx")], True, "double extension"),
    ([("application/octet-stream", "setup.EXE. ", b"xx")], True, "blocked extension .exe"),
    ([("application/octet-stream", "report.pdf", PE)], True, "executable content"),
    ([("application/octet-stream", "notes.txt", b"#!/bin/sh\nrm -rf ~\n")], True, "script"),
    ([("application/octet-stream", "doc\u202efdp.exe", b"x")], True, "right-to-left"),
    ([("application/vnd.ms-word", "letter.doc", OLE_MACRO)], True, "office-macro"),
    ([("application/vnd.ms-excel", "sheet.xlsm", b"PK")], True, ".xlsm"),
    ([("application/zip", "photos.zip", zipped(("a.jpg", b"\xff\xd8\xff")))], False, ""),
    ([("application/zip", "photos.zip", zipped(("a.jpg.scr", b"x")))], True, ".scr"),
    ([("application/zip", "x.zip", zipped(("readme.txt", PE)))], True, "executable"),
    ([("application/zip", "x.zip",
       zipped(("inner.zip", zipped(("run.js", b"alert(1)")))))], True, ".js"),
    ([("application/vnd.openxmlformats-officedocument.wordprocessingml.document",
       "report.docx", zipped(("word/document.xml", b"<x/>"),
                             ("word/vbaProject.bin", b"\x00")))], True, "vbaProject"),
    ([("application/zip", "secret.zip", zipped(("a.txt", b"x"), encrypt=True))], True,
     "encrypted"),
])
def test_attachments(parts: list[tuple[str, str, bytes]], blocked: bool, why: str) -> None:
    f = AttachmentsFilter(AttachmentSettings())
    v = f.check(msg(multipart(*parts)))
    if not blocked:
        assert v.action is Action.ACCEPT, v.reason
        return
    assert v.action in (Action.REJECT, Action.QUARANTINE)
    assert why in v.reason
    if v.action is Action.REJECT:
        assert v.reply is not None and (v.reply.code, v.reply.enhanced) == (554, "5.7.1")


def test_encrypted_archives_are_configurable() -> None:
    m = msg(multipart(("application/zip", "s.zip", zipped(("a.txt", b"x"), encrypt=True))))
    assert AttachmentsFilter(AttachmentSettings(encrypted="allow")).check(m).action \
        is Action.ACCEPT
    assert AttachmentsFilter(AttachmentSettings(encrypted="reject")).check(m).action \
        is Action.REJECT


@pytest.mark.parametrize(("name", "ext"), [
    ("a.exe", "exe"), ("a.pdf.exe", "exe"), ("a.exe.pdf", "pdf"), ("A.EXE...", "exe"),
    ("noext", ""), ("dir/x.js", "js"), ("c:\\x\\y.bat", "bat")])
def test_extension(name: str, ext: str) -> None:
    assert extension(name) == ext


# ---- outgoing content review -------------------------------------------------

@pytest.mark.parametrize(("text", "hits"), [
    ("card 4111 1111 1111 1111 please", {"card": 1}),
    ("card 4111-1111-1111-1112 (bad Luhn)", {}),
    ("order 1234567890123456", {}),  # no issuer prefix and bad Luhn
    ("amex 378282246310005", {"card": 1}),
    ("身份证 11010519491231002X", {"cn-id": 1}),
    ("id 110105194912310021", {}),  # wrong check character
    ("id 110105194913310029", {}),  # month 13
    ("IBAN DE89 3704 0044 0532 0130 00", {"iban": 1}),
    ("IBAN GB82WEST12345698765432", {"iban": 1}),
    ("IBAN DE89 3704 0044 0532 0130 01", {}),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n", {"private-key": 1}),
    ("-----BEGIN RSA PRIVATE KEY-----", {"private-key": 1}),
    ("-----BEGIN PUBLIC KEY-----", {}),
    ("phone +1 555 0100, invoice 2024-0001", {}),
])
def test_dlp_detectors(text: str, hits: dict[str, int]) -> None:
    assert dlp.find(text, dlp.DETECTORS) == hits


def test_dlp_reads_encoded_parts_and_custom_patterns() -> None:
    f = dlp.DlpFilter(dlp.DlpSettings(patterns=(
        dlp.DlpPattern("project-x", re.compile(r"(?i)project x")),), action="reject"))
    m = msg(multipart(("text/plain", "notes.txt", b"card: 5555555555554444\n")), "outbound")
    v = f.check(m)
    assert v.action is Action.REJECT and v.rules == ("DLP_CARD",)
    assert "5555" not in v.reason  # the number itself is never logged
    m = msg(CLEAN_HEAD.replace(b"hello", b"Project X plans") + b"\r\nhi\r\n", "outbound")
    assert f.check(m).rules == ("DLP_PROJECT_X",)
    notify = dlp.DlpFilter(dlp.DlpSettings(action="notify")).check(
        msg(CLEAN_HEAD + b"\r\n4111111111111111\r\n", "outbound"))
    assert notify.action is Action.ACCEPT and notify.notify


# ---- configuration ---------------------------------------------------------------

@pytest.mark.parametrize(("table", "error"), [
    ({"inbound": ["rules", "spamassassin"]}, "filters.inbound: 'spamassassin' is not one of"),
    ({"bogus": 1}, "filters.bogus: unknown key"),
    ({"timeout": "soon"}, "filters.timeout:"),
    ({"rules": {"reject": "high"}}, "filters.rules.reject: must be a number"),
    ({"rules": {"scores": {"NOPE": 1}}}, "filters.rules.scores.NOPE: no such rule"),
    ({"rules": {"custom": [{"name": "X", "pattern": "("}]}},
     "filters.rules.custom[0].pattern:"),
    ({"attachments": {"encrypted": "maybe"}}, "filters.attachments.encrypted: must be one of"),
    ({"dlp": {"action": "shred"}}, "filters.dlp.action: must be one of"),
    ({"dlp": {"detectors": ["ssn"]}}, "filters.dlp.detectors: 'ssn' is not one of"),
    ({"clamav": {"address": "clamd"}}, "filters.clamav.address:"),
    ({"postmaster": "nobody"}, "filters.postmaster: must be an address"),
])
def test_settings_errors_name_the_key(table: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError) as info:
        settings.from_table(table)
    assert str(info.value).startswith(error)


def test_settings_defaults_and_values() -> None:
    d = settings.from_table({})
    assert d.inbound == ("rules", "attachments") and d.outbound == ("attachments", "dlp")
    s = settings.from_table({"inbound": ["clamav"], "timeout": "5s", "fail_open": ["clamav"],
                             "quarantine_retention": "7d",
                             "clamav": {"address": "127.0.0.1:3310"}})
    assert s.timeout == 5 and s.quarantine_retention == 7 * 86400
    assert s.clamav.address == "127.0.0.1:3310"


# ---- the chain ---------------------------------------------------------------

class Broken:
    name = "clamav"

    async def check(self, message: FilterMessage) -> FilterVerdict:
        raise FilterUnavailable("connection refused")


class Slow:
    name = "rspamd"

    async def check(self, message: FilterMessage) -> FilterVerdict:
        await asyncio.sleep(10)
        return FilterVerdict(Action.ACCEPT)


@pytest.mark.parametrize("flt", [Broken(), Slow()])
def test_chain_fails_closed_or_open(flt: Broken | Slow) -> None:
    m = msg(CLEAN_HEAD + b"\r\nhi\r\n")
    closed = asyncio.run(FilterChain([flt], timeout=0.2).run(m))
    assert closed.action is Action.TEMPFAIL
    assert closed.reply is not None and (closed.reply.code, closed.reply.enhanced[:2]) == (
        451, "4.")
    opened = asyncio.run(FilterChain([flt], timeout=0.2, fail_open=[flt.name]).run(m))
    assert opened.action is Action.ACCEPT and opened.reply is None
    assert opened.headers == [("X-Postwarden-Filter",
                               f"{flt.name} unavailable; message not checked")]


def test_chain_skips_named_filters_for_large_messages() -> None:
    m = msg(CLEAN_HEAD + b"\r\n" + b"x" * 2000 + b"\r\n")
    result = asyncio.run(FilterChain([Broken()], timeout=1, large_message=1000,
                                     skip_large=["clamav"]).run(m))
    assert result.action is Action.ACCEPT
    assert result.headers == [("X-Postwarden-Filter", "clamav skipped (message size)")]


def test_chain_keeps_the_strongest_verdict_and_stops_at_reject() -> None:
    rules = RulesFilter(RulesSettings(quarantine=1))
    attach = AttachmentsFilter(AttachmentSettings())
    m = msg(b"Subject: x\r\n\r\nhi\r\n")
    result = asyncio.run(FilterChain([rules, attach], timeout=1).run(m))
    assert result.action is Action.QUARANTINE and result.held_by == ["rules"]
    m = msg(b"Subject: x\r\n\r\n" + GTUBE + b"\r\n")
    result = asyncio.run(FilterChain([rules, Broken()], timeout=1).run(m))
    assert result.action is Action.REJECT and len(result.verdicts) == 1
